"""Table status read straight from the segments (used when no daemon answers)."""
from __future__ import annotations

from typing import Any

import sysv_ipc

from ..errors import StatedError
from ..format import segment as fmt
from ..format.config import Config
from ..shm import segment
from ..shm.owners import Liveness, read_owners


def table_status(name: str, key: int, capacity: int | None = None, liveness: Liveness | None = None) -> dict[str, Any]:
    """One table's facts, or {'error': ...} naming what is wrong. Never raises for a bad segment."""
    out: dict[str, Any] = {"table": name, "key": key}
    try:
        seg = segment.open(key, readonly=True, table=name)
    except StatedError as e:
        out.update(error=f"{type(e).__name__}: {e}")
        return out
    try:
        h = seg.header
        shm = seg.shm
        a32 = seg.buf[fmt.OFF_ALLOC:fmt.OFF_ALLOC + 64].cast("I")
        used = a32[(fmt.A_USED - fmt.OFF_ALLOC) // 4]
        a32.release()
        c64 = seg.buf[fmt.OFF_COUNTERS:fmt.OFF_COUNTERS + 8 * len(fmt.COUNTERS)].cast("Q")
        counters = dict(zip(fmt.COUNTERS, c64.tolist()))
        c64.release()
        liveness = liveness or Liveness()
        owners = []
        for o in read_owners(seg.buf, h.regions.owners_offset):
            alive = o.state == fmt.OWNER_ATTACHED and liveness.alive(o.pid, o.start_time)
            owners.append({"name": o.name, "pid": o.pid, "state": o.state_name, "alive": alive,
                           "slots": o.slots, "since": o.since})
        out.update(shmid=shm.id, capacity=h.capacity, used=used, free=h.capacity - used,
                   attached=shm.number_attached - 1, mode=f"{shm.mode & 0o777:04o}", uid=shm.uid, gid=shm.gid,
                   size_bytes=shm.size, record_size=h.record_size, layout_hash=f"{h.layout_hash:016x}",
                   state=fmt.STATE_NAMES.get(fmt.read_state(seg.buf), "?"), format_version=h.format_version,
                   counters=counters, owners=owners)
        if capacity is not None and capacity != h.capacity:
            out["warning"] = f"config says capacity {capacity}, segment has {h.capacity}"
        try:
            sysv_ipc.Semaphore(key)
        except sysv_ipc.ExistentialError:
            out["warning"] = "semaphore missing: the daemon recreates it on its next pass"
        return out
    finally:
        seg.detach()


def config_status(cfg: Config) -> list[dict[str, Any]]:
    return [table_status(t.name, t.key, t.capacity) for t in cfg.tables.values()]
