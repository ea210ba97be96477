"""Checks of what the installed dependencies can do, made where the capability is needed.

sysv_ipc's prebuilt wheel lacks semtimedop(2): lock waits could not time out. That must
stop a writer or the daemon, with one line that says how to fix it; it must not stop
`stated --version`, `--help`, `check-config`, or read-only observers, which never wait
on a lock. So the check runs where a table's semaphore is opened, not at import.
"""
from __future__ import annotations

import sysv_ipc

from ..errors import InstallError

FIX = "pip install --force-reinstall --no-deps --no-binary sysv_ipc sysv_ipc"


def semtimedop_supported() -> bool:
    return bool(getattr(sysv_ipc, "SEMAPHORE_TIMEOUT_SUPPORTED", False))


def require_semtimedop() -> None:
    """Raise InstallError (one line, with the fix) when lock waits cannot time out."""
    if not semtimedop_supported():
        raise InstallError("sysv_ipc was installed from the prebuilt wheel, which lacks semtimedop, so lock "
                           f"waits cannot time out; rebuild it from source: {FIX}")
