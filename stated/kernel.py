"""Start-up checks of the kernel's SysV shm settings, read from /proc/sys (root injectable)."""
from __future__ import annotations

from pathlib import Path

from . import format as fmt
from . import layout as layout_mod
from .config import Config
from .errors import StatedError

SYSCTL_FILE = "deploy/sysctl.d/60-stated.conf"


class KernelLimitError(StatedError):
    """A kernel setting would make the configured tables impossible or unsafe."""


def _read(root: Path, name: str) -> int | None:
    try:
        return int((root / "kernel" / name).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def segment_size(tc) -> int:
    blob = layout_mod.schema_blob(tc.layout)
    return fmt.regions(tc.capacity, tc.layout.record_size, len(blob)).total_size


def check(cfg: Config, sysctl_root: str | Path = "/proc/sys", page: int = fmt.PAGE) -> None:
    """Raise KernelLimitError naming the sysctl and the value to set."""
    root = Path(sysctl_root)
    if _read(root, "shm_rmid_forced") == 1:
        raise KernelLimitError(
            "kernel.shm_rmid_forced=1 makes the kernel destroy a segment as soon as no process is attached: "
            f"every table would vanish with the last worker. Set it to 0: `sysctl -w kernel.shm_rmid_forced=0` "
            f"and persist it ({SYSCTL_FILE})")
    sizes = {name: segment_size(tc) for name, tc in cfg.tables.items()}
    shmmax = _read(root, "shmmax")
    if shmmax is not None:
        for name, size in sizes.items():
            if size > shmmax:
                raise KernelLimitError(f"table {name!r} needs a {size}-byte segment but kernel.shmmax is "
                                       f"{shmmax}: `sysctl -w kernel.shmmax={size}` ({SYSCTL_FILE})")
    shmall = _read(root, "shmall")
    pages = sum((s + page - 1) // page for s in sizes.values())
    if shmall is not None and pages > shmall:
        raise KernelLimitError(f"the tables need {pages} pages of shared memory but kernel.shmall is {shmall} "
                               f"pages: `sysctl -w kernel.shmall={pages * 2}` ({SYSCTL_FILE})")
    shmmni = _read(root, "shmmni")
    if shmmni is not None and len(sizes) > shmmni:
        raise KernelLimitError(f"{len(sizes)} tables need {len(sizes)} segments but kernel.shmmni is {shmmni}: "
                               f"`sysctl -w kernel.shmmni=4096` ({SYSCTL_FILE})")
