"""Process liveness by pid + start time, and the owner table's entry codec.

A pid alone is not an identity: pids are recycled. A process is identified by
(pid, start time in clock ticks since boot), read from /proc/<pid>/stat field
22. A zombie (killed but not yet reaped) counts as dead. The /proc root comes
in through the constructor so tests can point it elsewhere.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from . import format as fmt


class Liveness:
    def __init__(self, proc_root: str = "/proc"):
        self.proc_root = proc_root

    def start_time(self, pid: int) -> int | None:
        """Start time of a live process, None if it does not exist or is a zombie."""
        if pid <= 0:
            return None
        try:
            with open(f"{self.proc_root}/{pid}/stat", "rb") as f:
                data = f.read()
        except OSError:
            return None
        # comm (field 2) may contain spaces and parentheses: split after the last ')'
        rest = data[data.rfind(b")") + 2:].split()
        if len(rest) < 20 or rest[0] in (b"Z", b"X"):
            return None
        return int(rest[19])

    def alive(self, pid: int, start_time: int) -> bool:
        return pid > 0 and self.start_time(pid) == start_time

    def me(self) -> tuple[int, int]:
        pid = os.getpid()
        st = self.start_time(pid)
        assert st is not None
        return pid, st


@dataclass(frozen=True)
class Owner:
    index: int          # 1-based; what slots store
    name: str
    pid: int
    state: int
    start_time: int
    slots: int
    since_ms: int       # unix time in milliseconds of the last state change

    @property
    def since(self) -> float:
        """Unix time (seconds) of the last state change."""
        return self.since_ms / 1000

    @property
    def state_name(self) -> str:
        return fmt.OWNER_STATE_NAMES.get(self.state, str(self.state))


def read_owners(buf, owners_offset: int) -> list[Owner]:
    """Every non-empty owner entry (a plain read: callers wanting exact numbers hold the lock)."""
    out = []
    for i in range(fmt.OWNERS_CAPACITY):
        raw = fmt.OWNER.unpack_from(buf, owners_offset + i * fmt.OWNER_SIZE)
        name, pid, state, start, slots, _, since = raw
        if state == fmt.OWNER_EMPTY:
            continue
        out.append(Owner(i + 1, name.rstrip(b"\0").decode("utf-8", "replace"), pid, state, start, slots, since))
    return out
