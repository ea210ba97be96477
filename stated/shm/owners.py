"""Process liveness by pid + start time, and the owner table's entry codec.

A pid alone is not an identity: pids are recycled. A process is identified by
(pid, start time in clock ticks since boot), read from /proc/<pid>/stat field
22. The /proc root and the kill(2) probe come in through the constructor so
tests can point them elsewhere.

A process is called dead only with proof: kill(pid, 0) fails with ESRCH (the pid
is gone), /proc shows it as a zombie (with no thread left: a leader that called
pthread_exit shows 'Z' while its threads run on), or its start time differs from
the one recorded (the pid was recycled). Anything else that stops us from reading
/proc/<pid>/stat (EMFILE under a connection flood, EACCES, a /proc mounted
hidepid=2 that hides other users' processes) answers UNKNOWN, and every caller
treats UNKNOWN as alive: freeing a live worker's slots is far worse than keeping
a dead one's a little longer.
"""
from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import StatedError
from ..format import segment as fmt

ALIVE, DEAD, UNKNOWN = "alive", "dead", "unknown"
START_UNKNOWN = -1      # start_time() of a process that exists but whose /proc entry cannot be read
PID_MAX_LIMIT = 1 << 22  # Linux never hands out a pid at or above this (kernel.pid_max is at most 2^22)


class Liveness:
    def __init__(self, proc_root: str = "/proc", kill: Callable[[int, int], None] = os.kill):
        self.proc_root = proc_root
        self._kill = kill

    def _exists(self, pid: int) -> bool | None:
        """kill(pid, 0): True (exists; EPERM means it exists under another uid), False (ESRCH), None (unknown)."""
        try:
            self._kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        except OSError:
            return None

    def _probe(self, pid: int) -> tuple[str, int | None]:
        """(ALIVE, start time) | (DEAD, None) | (UNKNOWN, None): what can be proven about `pid`."""
        if not 0 < pid < PID_MAX_LIMIT:    # owner entries live in shared memory: any u32 can be there
            return DEAD, None
        exists = self._exists(pid)
        if exists is False:
            return DEAD, None
        try:
            with open(f"{self.proc_root}/{pid}/stat", "rb") as f:
                data = f.read()
        except OSError as e:
            # ENOENT/ESRCH: it exited just now, or /proc hides it (hidepid); ask kill(2) again
            if e.errno in (errno.ENOENT, errno.ESRCH) and self._exists(pid) is False:
                return DEAD, None
            return UNKNOWN, None
        # comm (field 2) may contain spaces and parentheses: split after the last ')'
        rest = data[data.rfind(b")") + 2:].split()
        if len(rest) < 20 or not rest[19].isdigit():
            return UNKNOWN, None
        if rest[0] == b"X" or (rest[0] == b"Z" and self._threads(pid) == 1):
            return DEAD, None      # exited, not yet reaped by its parent
        return ALIVE, int(rest[19])

    def _threads(self, pid: int) -> int:
        """The "Threads:" count of /proc/<pid>/status (0: unreadable). 'Z' in /proc/<pid>/stat is the
        state of the thread-group leader only: a process whose main thread called pthread_exit shows
        it while its other threads run on. One that really exited and waits to be reaped counts 1."""
        try:
            with open(f"{self.proc_root}/{pid}/status", "rb") as f:
                data = f.read(4096)
        except OSError:
            return 0
        for line in data.splitlines():
            if line.startswith(b"Threads:"):
                value = line[8:].strip()
                return int(value) if value.isdigit() else 0
        return 0

    def state(self, pid: int, start_time: int) -> str:
        """ALIVE, DEAD (proven: pid gone, zombie, or another process on a recycled pid) or UNKNOWN.

        Callers must treat UNKNOWN like ALIVE: never free, take over or mark dead on it.
        """
        st, start = self._probe(pid)
        if st == ALIVE and start != start_time:
            return DEAD
        return st

    def exists(self, pid: int) -> bool:
        """The pid is not proven gone (for a pid recorded without a start time, e.g. a lock holder
        or a segment's creator): kill(2) says it exists, or cannot say."""
        return 0 < pid < PID_MAX_LIMIT and self._exists(pid) is not False

    def alive(self, pid: int, start_time: int) -> bool:
        """Not proven dead (ALIVE or UNKNOWN): the safe answer for every release decision."""
        return self.state(pid, start_time) != DEAD

    def start_time(self, pid: int) -> int | None:
        """Start time of a live process; None only with proof it is gone or a zombie;
        START_UNKNOWN (-1) when it exists but /proc/<pid>/stat cannot be read."""
        st, start = self._probe(pid)
        if st == DEAD:
            return None
        return START_UNKNOWN if start is None else start

    def me(self) -> tuple[int, int]:
        pid = os.getpid()
        st, start = self._probe(pid)
        if start is None:
            raise StatedError(f"cannot read {self.proc_root}/{pid}/stat (this process's start time, needed to "
                              f"register as an owner): is /proc mounted, and are descriptors left?")
        return pid, start


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
