"""The table lock: one SysV semaphore used as a mutex, with SEM_UNDO and a deadline.

Contract
- `acquire()` returns holding the lock, or raises LockTimeout (within `timeout`), StatedError
  (permission) or whatever a hook raised — and then it does NOT hold the lock: anything that fails
  after the semop gives the semaphore back before the exception leaves.
- One deadline covers the whole acquire: EINTR ("Signaled while waiting") is retried with the time
  left, and a removed semaphore is reopened (the daemon recreates it) within the same deadline.
- SEM_UNDO: when a holder dies, the kernel gives its lock back. What the holder was doing is the
  allocator's business (the intent mark), not the lock's.
- `holder_pid` in the allocator block names the holder. A non-zero value naming another live
  process right after our semop means the semaphore was removed and recreated while that process
  held the old one: we wait for it to leave (bounded). See docs/format.md "Taking and releasing
  the lock" for the window this cannot close without a compare-and-swap.
"""
from __future__ import annotations

import logging
import time

import sysv_ipc

from ..errors import LockTimeout, SegmentNotFound, StatedError
from ..format.segment import U64, W_HOLDER, C, SegmentViews
from .owners import Liveness
from .segment import Trust, open_semaphore

log = logging.getLogger("stated.lock")


class TableLock:
    """The lock of one attached table (one per process and table; not thread-safe)."""

    def __init__(self, views: SegmentViews, *, key: int, table: str, timeout: float, pid: int,
                 liveness: Liveness, trust: Trust | None):
        self.views, self.key, self.table = views, key, table
        self.timeout, self.pid, self.liveness, self.trust = timeout, pid, liveness, trust
        self.sem = open_semaphore(key, trust=trust)

    def acquire(self) -> None:
        t0 = time.monotonic()
        try:
            self.sem.acquire(self.timeout)
        except sysv_ipc.Error as e:
            self._acquire_slow(e, t0 + self.timeout)
        h32 = self.views.h32
        try:
            holder = h32[W_HOLDER]
            if holder and holder != self.pid:
                self._wait_swapped_holder(holder, t0 + self.timeout)
            h32[W_HOLDER] = self.pid
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        self.views.h32[W_HOLDER] = 0
        try:
            self.sem.release()
        except sysv_ipc.ExistentialError:
            pass   # removed from under us; the daemon recreates it and repairs

    def _acquire_slow(self, e: Exception, deadline: float) -> None:
        while True:
            if isinstance(e, sysv_ipc.BusyError):
                raise self.timed_out()
            if isinstance(e, sysv_ipc.PermissionsError):
                raise StatedError(f"table {self.table!r} (key {self.key:#010x}): no permission to use its "
                                  f"semaphore; run the worker in the daemon's group") from None
            if isinstance(e, sysv_ipc.ExistentialError):
                self.reopen(deadline)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self.timed_out()
            try:
                self.sem.acquire(remaining)
                return
            except sysv_ipc.Error as e2:
                e = e2

    def timed_out(self) -> LockTimeout:
        """Count a timeout (racy by nature: we do not hold the lock) and describe it."""
        c = self.views.counters
        c[C["lock_timeouts"]] = (c[C["lock_timeouts"]] + 1) & U64
        return LockTimeout(f"table {self.table!r} (key {self.key:#010x}): allocator lock not obtained within "
                           f"{self.timeout}s; last holder pid {self.views.h32[W_HOLDER]}. If that process is "
                           f"stuck, stop it; a dead holder releases the lock automatically")

    def _wait_swapped_holder(self, holder: int, deadline: float) -> None:
        """The holder word names another process although we hold the semaphore: it died holding
        the lock (proceed), or it is alive inside its critical section under a semaphore that was
        removed and recreated (wait for it to leave, until the deadline)."""
        while self.liveness.exists(holder):
            if time.monotonic() > deadline:
                raise self.timed_out()
            time.sleep(0.0005)
            holder = self.views.h32[W_HOLDER]
            if not holder or holder == self.pid:
                return

    def reopen(self, deadline: float | None = None) -> None:
        """The semaphore was removed (ipcrm, systemd RemoveIPC): wait for the daemon to recreate it."""
        if deadline is None:
            deadline = time.monotonic() + self.timeout
        while True:
            try:
                self.sem = open_semaphore(self.key, trust=self.trust)
                log.warning("table=%s key=%#010x pid=%d: semaphore was removed; reopened the new one",
                            self.table, self.key, self.pid)
                return
            except SegmentNotFound:
                if time.monotonic() > deadline:
                    raise LockTimeout(f"table {self.table!r} (key {self.key:#010x}): its semaphore was "
                                      f"removed and not recreated within {self.timeout}s; is the daemon "
                                      f"running?") from None
                time.sleep(0.01)
