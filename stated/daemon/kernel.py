"""Start-up checks of the kernel's SysV shm settings and the machine's memory (roots injectable).

Run before anything is created: a table that cannot fit is a config mistake (KernelLimitError, a
ConfigError: exit code 78), reported in one line naming the table and what to change, never a
MemoryError traceback from shmget.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import KernelLimitError
from ..format import layout as layout_mod
from ..format import segment as fmt
from ..format.config import Config
from ..format.units import human_bytes

__all__ = ["KernelLimitError", "check", "segment_size", "mem_total"]

SYSCTL_FILE = "deploy/sysctl.d/60-stated.conf"


def _read(root: Path, name: str) -> int | None:
    try:
        return int((root / "kernel" / name).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def segment_size(tc) -> int:
    blob = layout_mod.schema_blob(tc.layout)
    return fmt.regions(tc.capacity, tc.layout.record_size, len(blob)).total_size


def mem_total(meminfo: str | Path = "/proc/meminfo") -> int | None:
    """MemTotal in bytes, None when unknown."""
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemTotal:"):
                parts = line.split()
                return int(parts[1]) * (1024 if parts[2:3] == ["kB"] else 1)
    except (OSError, ValueError, IndexError):
        return None
    return None


def check(cfg: Config, sysctl_root: str | Path = "/proc/sys", page: int = fmt.PAGE,
          meminfo: str | Path = "/proc/meminfo") -> None:
    """Raise KernelLimitError naming the sysctl and the value to set, or the table that cannot fit in memory."""
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
    total = mem_total(meminfo)
    if total is not None:
        for name, size in sizes.items():
            if size > total:
                raise KernelLimitError(f"table {name!r} needs a {human_bytes(size)} segment but this machine has "
                                       f"{human_bytes(total)} of memory: lower its capacity or its record size")
        if sum(sizes.values()) > total:
            raise KernelLimitError(f"the tables need {human_bytes(sum(sizes.values()))} of shared memory together but "
                                   f"this machine has {human_bytes(total)}: lower their capacities")
    shmmni = _read(root, "shmmni")
    if shmmni is not None and len(sizes) > shmmni:
        raise KernelLimitError(f"{len(sizes)} tables need {len(sizes)} segments but kernel.shmmni is {shmmni}: "
                               f"`sysctl -w kernel.shmmni=4096` ({SYSCTL_FILE})")
