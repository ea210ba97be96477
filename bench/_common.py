"""Helpers shared by the bench scripts: free IPC keys, cleanup on any exit, formatting."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:          # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import sysv_ipc  # noqa: E402

BENCH_PREFIX = 0x5F000000


def key_in_use(key: int) -> bool:
    """True if a shm segment or a semaphore exists at `key`."""
    for cls in (sysv_ipc.SharedMemory, sysv_ipc.Semaphore):
        try:
            obj = cls(key)
        except sysv_ipc.ExistentialError:
            continue
        except sysv_ipc.PermissionsError:
            return True
        if cls is sysv_ipc.SharedMemory:
            obj.detach()
        return True
    return False


def pick_keys(n: int, salt: int = 0) -> list[int]:
    """`n` unused keys 0x5F<pid:12 bits><counter:12 bits>, skipping any key in use."""
    base = BENCH_PREFIX | (((os.getpid() + salt) & 0xFFF) << 12)
    out = []
    for i in range(1, 0x1000):
        k = base | i
        if not key_in_use(k):
            out.append(k)
            if len(out) == n:
                return out
    raise RuntimeError(f"no {n} free IPC keys under {base:#010x}")


def remove_raw_key(key: int) -> None:
    """Remove a non-stated shm segment and semaphore at `key` (the naive free stack's)."""
    try:
        sysv_ipc.SharedMemory(key).remove()
    except sysv_ipc.ExistentialError:
        pass
    try:
        sysv_ipc.Semaphore(key).remove()
    except sysv_ipc.ExistentialError:
        pass


def exit_on_signals() -> None:
    """SIGTERM/SIGHUP raise SystemExit so every try/finally cleanup runs (SIGINT already does)."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, handler)


def human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.1f}"
