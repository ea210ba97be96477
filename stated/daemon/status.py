"""One table's numbers, computed once: `TableStats` feeds /metrics, `stated status` (through the daemon's
control socket, or read straight from the segments when no daemon answers) and `stated top`.

Definitions (the same wherever they are shown):
- attached: processes attached to the segment other than the one asking (the daemon, or the CLI);
- owners: alive (attached, process alive), unknown (attached, /proc cannot tell: kept as alive),
  dead (attached but its process is gone, or marked dead by the daemon), detached (closed cleanly);
  dead and detached owners are counted only while they hold slots (every entry is still listed);
- orphaned: allocated slots held by dead or detached owners — not free, so they count toward full.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import sysv_ipc

from ..errors import StatedError
from ..format import segment as fmt
from ..format.config import Config
from ..shm import segment
from ..shm.owners import DEAD, UNKNOWN, Liveness, Owner, read_owners


@dataclass
class OwnerStats:
    name: str
    pid: int
    state: str          # the entry's state: attached / detached / dead
    liveness: str       # what that means now: alive / unknown / dead / detached
    slots: int
    since: float        # unix time of the owner's last state change


@dataclass
class TableStats:
    table: str
    key: int
    error: str | None = None          # set: the table is not served / cannot be read (the rest is unset)
    capacity: int = 0
    used: int = 0
    orphaned: int = 0
    owners_alive: int = 0
    owners_unknown: int = 0
    owners_dead: int = 0
    owners_detached: int = 0
    attached: int = 0
    size_bytes: int = 0
    record_size: int = 0
    layout_hash: str = ""
    state: str = ""
    format_version: int = 0
    shmid: int = 0
    mode: str = ""
    uid: int = 0
    gid: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    owners: list[OwnerStats] = field(default_factory=list)
    warning: str | None = None
    # known only to the daemon
    dirty: int | None = None
    up: bool = True
    lost: int = 0
    snapshot_time: float | None = None
    snapshot_size: int = 0

    @property
    def free(self) -> int:
        return self.capacity - self.used

    def to_dict(self) -> dict[str, Any]:
        """For JSON and the control socket: every field, plus `free`; None fields are left out."""
        d = {k: v for k, v in asdict(self).items() if v is not None}
        if self.error is None:
            d["free"] = self.free
        return d


def owner_state(o: Owner, liveness: Liveness) -> str:
    if o.state == fmt.OWNER_DETACHED:
        return "detached"
    if o.state != fmt.OWNER_ATTACHED:
        return "dead"
    st = liveness.state(o.pid, o.start_time)
    return "dead" if st == DEAD else "unknown" if st == UNKNOWN else "alive"


def segment_stats(name: str, seg: segment.Segment, views: fmt.SegmentViews, liveness: Liveness) -> TableStats:
    """The numbers of one attached table (the caller holds one attach of its own)."""
    h, shm = seg.header, seg.shm
    st = TableStats(name, h.key, capacity=h.capacity, used=views.h32[fmt.W_USED], size_bytes=h.regions.total_size,
                    record_size=h.record_size, layout_hash=f"{h.layout_hash:016x}",
                    state=fmt.STATE_NAMES.get(fmt.read_state(seg.buf), "?"), format_version=h.format_version,
                    counters=dict(zip(fmt.COUNTERS, views.counters.tolist())))
    try:
        st.attached = max(0, shm.number_attached - 1)
        st.shmid, st.mode, st.uid, st.gid = shm.id, f"{shm.mode & 0o777:04o}", shm.uid, shm.gid
    except sysv_ipc.Error:          # removed under us (ipcrm -M): report what the mapping still says
        st.attached = 0
    orphaned = 0
    for o in read_owners(seg.buf, h.regions.owners_offset):
        state = owner_state(o, liveness)
        st.owners.append(OwnerStats(o.name, o.pid, o.state_name, state, o.slots, o.since))
        if state in ("dead", "detached"):
            if not o.slots:
                continue        # a gone owner holding nothing is history, not something to watch
            orphaned += o.slots
        setattr(st, f"owners_{state}", getattr(st, f"owners_{state}") + 1)
    st.orphaned = min(orphaned, st.used)
    return st


def table_status(name: str, key: int, capacity: int | None = None, liveness: Liveness | None = None) -> TableStats:
    """One table read straight from its segment (read-only attach); never raises for a bad segment:
    the problem is in `error`."""
    try:
        seg = segment.open(key, readonly=True, table=name)
    except StatedError as e:
        return TableStats(name, key, error=f"{type(e).__name__}: {e}")
    views = fmt.SegmentViews(seg.buf, seg.header)
    try:
        st = segment_stats(name, seg, views, liveness or Liveness())
        st.dirty = views.marked_slots()
        if capacity is not None and capacity != st.capacity:
            st.warning = f"config says capacity {capacity}, segment has {st.capacity}"
        try:
            sysv_ipc.Semaphore(key)
        except sysv_ipc.ExistentialError:
            st.warning = "semaphore missing: the daemon recreates it on its next pass"
        return st
    finally:
        views.release()
        seg.detach()


def config_status(cfg: Config) -> list[TableStats]:
    return [table_status(t.name, t.key, t.capacity) for t in cfg.tables.values()]
