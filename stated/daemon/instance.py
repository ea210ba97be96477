"""One daemon per state_dir: an exclusive lock taken before anything is touched.

Two daemons on one config would fight over the control socket; two configs on one
state_dir would overwrite each other's snapshots. One config has one state_dir, so
a lock on the state_dir covers both. The lock is flock(2) on `state_dir/stated.lock`:

- opened with O_NOFOLLOW and checked to be a regular file (a symlink planted there
  is refused, never followed);
- held for the daemon's whole life by the open descriptor: the kernel releases it
  when the process dies, however it dies, so there is no stale lock to clean up;
- the holder writes its pid into the file, so the loser can name it. The file's
  content is only ever informative: the flock is the lock.
"""
from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from pathlib import Path

from ..errors import AlreadyRunning, StatedError

LOCK_NAME = "stated.lock"
PID_WAIT = 1.0      # seconds the loser waits for the holder to write its pid (it locks, then writes)


class InstanceLock:
    """The held lock. close() releases it (so does the process's exit)."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _read_pid(fd: int) -> int | None:
    try:
        raw = os.pread(fd, 32, 0)
    except OSError:
        return None
    text = raw.decode("ascii", "replace").strip()
    return int(text) if text.isdigit() and 0 < int(text) < 1 << 22 else None


def acquire(state_dir: Path, pid: int | None = None) -> InstanceLock:
    """Lock `state_dir` for this process or raise AlreadyRunning naming the holder's pid.

    The state_dir must exist. Raises StatedError if the lock file cannot be opened safely. The file is
    created 0600: flock(2) needs only an open descriptor, so anyone who can open it can hold it, and
    a group member holding it would keep the daemon from starting.
    """
    path = Path(state_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise StatedError(f"{path} is a symlink; refusing to follow it (remove it)") from None
        raise StatedError(f"cannot open the lock file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StatedError(f"{path} is not a regular file; refusing to use it as the lock (remove it)")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            deadline = time.monotonic() + PID_WAIT
            while holder is None and time.monotonic() < deadline:   # it has the lock but not yet written
                time.sleep(0.02)
                holder = _read_pid(fd)
            who = f"pid {holder}" if holder is not None else "a process that has not written its pid"
            raise AlreadyRunning(f"another stated ({who}) is running on state_dir {state_dir} (it holds {path}); "
                                 f"stop it first, or give this config its own state_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{pid or os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return InstanceLock(fd, path)
