"""Saving a live table to snapshots, and rebuilding a table from them.

Saver decides full vs delta (a full every `full_every` saves, and after any
failure), selects slots (full: every allocated slot; delta: slots dirty or
pinned), clears their dirty marks *before* copying so a concurrent write is
caught by the next save, writes the file and prunes old chains.
Cost of a delta follows the dirty count, not the capacity (one C-speed scan of
the dirty column aside).
"""
from __future__ import annotations

import grp
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from . import format as fmt
from . import segment
from . import snapshot as snap
from .allocator import Allocator, _C
from .config import DaemonConfig, TableConfig
from .errors import LayoutMismatch, SegmentNotFound, StatedError
from .schema import to_wire
from .segment import Segment

log = logging.getLogger("stated.persist")


@dataclass
class SaveResult:
    path: Path
    kind: str
    records: int
    bytes: int
    seconds: float


class Saver:
    def __init__(self, tc: TableConfig, seg: Segment, alloc: Allocator, dc: DaemonConfig):
        self.tc, self.seg, self.alloc, self.dc = tc, seg, alloc, dc
        self.dir = snap.table_dir(dc.state_dir, tc.name)
        r = seg.header.regions
        self.records = seg.buf[r.records_offset:r.records_offset + tc.capacity * seg.header.record_size]
        snap.remove_stale_temporaries(self.dir)
        files = snap.list_files(self.dir)
        self.seq = files[-1][0] if files else 0
        self.base = 0
        self.saves_since_full = 0
        self.force_full = True          # the first save of a daemon's life is full
        self.gid = grp.getgrnam(dc.group).gr_gid if dc.group else None
        self.last_success: float | None = None
        self.last_size = 0

    def _make_dir(self) -> None:
        """state_dir/<table> with the config's mode (x bits added) and group, whatever the umask."""
        if self.dir.is_dir():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        dmode = (self.dc.mode & 0o770) | ((self.dc.mode & 0o440) >> 2)   # rw -> rwx for the same classes
        os.chmod(self.dir, dmode)
        if self.gid is not None:
            os.chown(self.dir, -1, self.gid)

    def close(self) -> None:
        self.records.release()

    def save(self, kind: str | None = None) -> SaveResult:
        """Write one snapshot. Raises SnapshotFailed (the next save is then full)."""
        t0 = time.perf_counter()
        if kind is None:
            kind = "full" if (self.force_full or self.saves_since_full >= self.dc.full_every) else "delta"
        a = self.alloc
        s8 = a._s8
        cap = a.capacity
        if kind == "full":
            s8[20::32] = bytes(cap)     # clear first: a slot allocated after this stays dirty for the next delta
            states = s8[18::32].tobytes()
            slots = [i for i in range(cap) if states[i] == fmt.SLOT_ALLOCATED] if states.count(0) != cap else []
        else:
            marks = int.from_bytes(s8[20::32].tobytes(), "little") | int.from_bytes(s8[21::32].tobytes(), "little")
            slots = []
            if marks:
                col = marks.to_bytes(cap, "little")
                i = col.find(1)
                while i >= 0:           # bytes.find skips clean runs at C speed: cost follows the dirty count
                    slots.append(i)
                    i = col.find(1, i + 1)
                for i in slots:
                    s8[32 * i + 20] = 0
        seq = self.seq + 1
        base = seq if kind == "full" else self.base
        header = {"format": snap.VERSION, "kind": kind, "table": self.tc.name, "key": self.tc.key,
                  "schema": to_wire(self.tc.layout.schema), "layout_hash": self.tc.layout.hash,
                  "record_size": self.tc.layout.record_size, "capacity": cap, "seq": seq, "base": base,
                  "prev": self.seq, "time": time.time(), "counters": a.counters()}
        owners = [[o.index, o.name, o.state, o.since_ms] for o in a.owners()]
        path = self.dir / snap.file_name(self.tc.name, seq, kind)
        try:
            try:
                self._make_dir()
            except OSError as e:
                raise snap.SnapshotFailed(f"cannot write snapshot {path}: {e.strerror or e}") from None
            n = snap.write_file(path, header, owners, snap.capture(a, self.records, self.tc.layout.record_size,
                                                                     slots), self.dc.mode)
            if self.gid is not None:
                try:
                    os.chown(path, -1, self.gid)
                except OSError as e:
                    log.warning("table=%s: cannot give %s to group %s: %s", self.tc.name, path, self.dc.group, e)
        except snap.SnapshotFailed:
            self.force_full = True
            raise
        self.seq = seq
        if kind == "full":
            self.base, self.saves_since_full, self.force_full = seq, 0, False
        else:
            self.saves_since_full += 1
        size = path.stat().st_size
        self.last_success, self.last_size = time.time(), size
        self.prune()
        return SaveResult(path, kind, n, size, time.perf_counter() - t0)

    def prune(self) -> None:
        """Keep the newest `snapshots_keep` fulls and the deltas that follow them."""
        files = snap.list_files(self.dir)
        fulls = [seq for seq, kind, _ in files if kind == "full"]
        if len(fulls) <= self.dc.snapshots_keep:
            return
        oldest_kept = fulls[-self.dc.snapshots_keep]
        for seq, kind, p in files:
            if seq < oldest_kept:
                try:
                    p.unlink()
                except OSError as e:
                    log.warning("table=%s: cannot prune %s: %s", self.tc.name, p, e)


class MigrationRefused(StatedError):
    """A layout change would lose data (or workers are attached) and was not allowed."""


def restore(tc: TableConfig, dc: DaemonConfig, chain: list, *, migrate: bool = False,
            allow_lossy: bool = False) -> tuple[Segment, int]:
    """Create the table's segment from a parsed snapshot chain. Returns (segment, records restored).

    The caller has checked the segment is absent. A chain whose layout or capacity
    differs from the config raises LayoutMismatch unless `migrate` (see migrate.py).
    """
    from . import migrate as migrate_mod
    head = chain[0][1]
    convert = None
    if head["layout_hash"] != tc.layout.hash or head["capacity"] != tc.capacity:
        old = snap.snapshot_layout(head)
        if not migrate:
            raise LayoutMismatch(
                segment.describe_mismatch(tc.key, tc.name, old, tc.layout).replace(
                    "segment at key", f"snapshot {chain[0][0].name} for key")
                + f" (capacity {head['capacity']} -> {tc.capacity})")
        highest = _highest_live_slot(chain)
        problems = migrate_mod.lossy_changes(old, tc.layout, head["capacity"], tc.capacity, highest)
        if problems and (not allow_lossy or any("capacity" in p for p in problems)):
            raise MigrationRefused(f"table {tc.name!r}: migration would lose data: {'; '.join(problems)}. "
                                   f"Re-run with --allow-lossy to accept that"
                                   if not any("capacity" in p for p in problems) else
                                   f"table {tc.name!r}: {'; '.join(problems)}")
        if old.hash != tc.layout.hash:
            convert = migrate_mod.converter(old, tc.layout)
    seg = segment.create(tc.key, tc.capacity, tc.layout, mode=dc.mode, group=dc.group, ready=False)
    try:
        n = _apply(seg, tc, chain, convert)
    except BaseException:
        seg.detach()
        segment.destroy(tc.key)     # never leave a half-restored table behind
        raise
    fmt.write_state(seg.buf, fmt.STATE_READY)
    return seg, n


def _highest_live_slot(chain: list) -> int:
    live: dict[int, int] = {}
    for _p, _h, _o, chunks in chain:
        for c in chunks:
            for slot, st in zip(memoryview(c["slots"]).cast("I"), c["states"]):
                live[slot] = st
    return max((s for s, st in live.items() if st == fmt.SLOT_ALLOCATED), default=-1)


def migrate_live(tc: TableConfig, dc: DaemonConfig, *, allow_lossy: bool = False, force: bool = False
                 ) -> tuple[Segment, int]:
    """Convert the live segment at tc.key to tc's layout/capacity: safety snapshot, then rebuild from it."""
    from . import migrate as migrate_mod
    seg = segment.open(tc.key, table=tc.name)
    try:
        others = seg.shm.number_attached - 1
        if others > 0 and not force:
            raise MigrationRefused(f"table {tc.name!r}: {others} other process(es) are attached; stop the "
                                   f"workers first, or use --force (their writes after this point are lost)")
        old_tc = TableConfig(tc.name, tc.key, seg.header.capacity, seg.header.layout)
        alloc = Allocator(seg, table=tc.name, lock_timeout=dc.lock_timeout)
        highest = max(alloc.slots_of_any(), default=-1)
        problems = migrate_mod.lossy_changes(old_tc.layout, tc.layout, old_tc.capacity, tc.capacity, highest)
        if problems and (not allow_lossy or any("capacity" in p for p in problems)):
            alloc.release_views()
            raise MigrationRefused(f"table {tc.name!r}: migration would lose data: {'; '.join(problems)}. "
                                   f"Re-run with --allow-lossy to accept that")
        saver = Saver(old_tc, seg, alloc, dc)
        safety = saver.save("full")
        saver.close()
        alloc.release_views()
        log.info("table=%s: safety snapshot %s (%d records) before migration", tc.name, safety.path.name,
                 safety.records)
    finally:
        seg.detach()
    chain = [(safety.path, *snap.read_file(safety.path))]
    segment.destroy(tc.key)
    return restore(tc, dc, chain, migrate=True, allow_lossy=allow_lossy)


def _apply(seg: Segment, tc: TableConfig, chain: list, convert=None) -> int:
    a = Allocator(seg, table=tc.name, lock_timeout=5.0)
    try:
        rs = tc.layout.record_size
        r = seg.header.regions
        recs = seg.buf[r.records_offset:r.records_offset + tc.capacity * rs]
        s32, s16, s8, s64 = a._s32, a._s16, a._s8, a._s64
        live = set()
        for _path, h, _owners, chunks in chain:
            ors = h["record_size"]
            for c in chunks:
                slots = memoryview(c["slots"]).cast("I")
                gens = memoryview(c["gens"]).cast("I")
                owners = memoryview(c["owners"]).cast("H")
                ents = memoryview(c["entities"]).cast("Q")
                states, flags, data = c["states"], c["flags"], c["records"]
                for i in range(c["n"]):
                    slot = slots[i]
                    if slot >= tc.capacity:
                        continue
                    s32[8 * slot + 1] = gens[i]
                    s32[8 * slot] = 0
                    if states[i] == fmt.SLOT_ALLOCATED:
                        s16[16 * slot + 8] = owners[i]
                        s64[4 * slot + 1] = ents[i]
                        s8[32 * slot + 19] = flags[i] & fmt.FLAG_HAS_ENTITY
                        s8[32 * slot + 18] = fmt.SLOT_ALLOCATED
                        recs[slot * rs:(slot + 1) * rs] = (convert(data[i * ors:(i + 1) * ors]) if convert
                                                           else data[i * rs:(i + 1) * rs])
                        live.add(slot)
                    else:
                        s16[16 * slot + 8] = 0
                        s64[4 * slot + 1] = 0
                        s8[32 * slot + 19] = 0
                        s8[32 * slot + 18] = fmt.SLOT_FREE
                        recs[slot * rs:(slot + 1) * rs] = bytes(rs)
                        live.discard(slot)
        last_header, last_owners = chain[-1][1], chain[-1][2]
        now_ms = int(time.time() * 1000)
        for entry in last_owners:
            idx, name, _state, _since = entry
            if not (isinstance(idx, int) and 1 <= idx <= fmt.OWNERS_CAPACITY and isinstance(name, str)):
                continue
            off = r.owners_offset + (idx - 1) * fmt.OWNER_SIZE
            # restored owners have no process: detached until a worker attaches under the name
            fmt.OWNER.pack_into(seg.buf, off, name.encode()[:32], 0, fmt.OWNER_DETACHED, 0, 0, 0, now_ms)
        a.repair()                  # free stack, entity index, used and owner counts from slot states
        for name, value in last_header["counters"].items():
            if name in _C and isinstance(value, int) and 0 <= value < 1 << 64:
                a._h64[_C[name]] = value
        # the counters were read a moment before the records were copied: reconcile so that
        # allocations - frees = allocated slots, as on a live table
        allocs, frees, used = a._h64[_C["allocations"]], a._h64[_C["frees"]], a.used()
        if allocs - frees < used:
            a._h64[_C["allocations"]] = frees + used     # an alloc raced the copy (counters stay monotonic)
        else:
            a._h64[_C["frees"]] = allocs - used          # a free raced the copy
        recs.release()
        return len(live)
    finally:
        a.release_views()


def verify_file(path: Path) -> dict:
    """`stated snapshot --verify`: the header and totals of a valid file, CorruptSnapshot otherwise."""
    header, owners, chunks = snap.read_file(path)
    torn = sum(sum(1 for f in c["flags"] if f & snap.FLAG_TORN) for c in chunks)
    return {"path": str(path), "kind": header["kind"], "table": header["table"], "seq": header["seq"],
            "base": header["base"], "records": sum(c["n"] for c in chunks), "owners": len(owners),
            "layout_hash": f"{header['layout_hash']:016x}", "capacity": header["capacity"],
            "time": header["time"], "torn_flagged": torn}


class RestoreError(StatedError):
    """No usable snapshot, or the table already exists."""


def chain_for(path: Path) -> list:
    """The parsed chain ending at `path`: itself if full, else its base full and the deltas up to it."""
    header, owners, chunks = snap.read_file(path)
    if header["kind"] == "full":
        return [(Path(path), header, owners, chunks)]
    files = snap.list_files(Path(path).parent)
    out = []
    for seq, kind, p in files:
        if seq == header["base"] and kind == "full":
            out.append((p, *snap.read_file(p)))
        elif kind == "delta" and header["base"] < seq <= header["seq"]:
            parsed = snap.read_file(p)
            if parsed[0]["base"] == header["base"]:
                out.append((p, *parsed))
    if not out or out[0][1]["kind"] != "full":
        raise RestoreError(f"{path} is a delta and its base full snapshot (seq {header['base']}) is not beside it")
    prev = out[0][1]["seq"]
    for p, h, *_ in out[1:]:
        if h["prev"] != prev:
            raise RestoreError(f"the delta chain to {path} has a gap before {p.name}")
        prev = h["seq"]
    return out


def restore_by_hand(tc: TableConfig, dc: DaemonConfig, path: Path, force: bool) -> dict:
    """`stated restore --from FILE`: refuses over an existing segment unless `force`, which first
    takes a safety snapshot of the existing table."""
    chain = chain_for(path)
    try:
        seg = segment.open(tc.key, table=tc.name)
    except SegmentNotFound:
        seg = None
    except StatedError as e:
        if not force:
            raise RestoreError(f"table {tc.name!r}: the segment at {tc.key:#010x} is unusable ({e}); "
                               f"use --force to replace it") from None
        segment.destroy(tc.key)     # refuses (ForeignSegment) when it is not stated's
        seg = None
    safety = None
    if seg is not None:
        if not force:
            seg.detach()
            raise RestoreError(f"table {tc.name!r} has a live segment at {tc.key:#010x}; restoring would "
                               f"overwrite it. Use --force (a safety snapshot is taken first)")
        alloc = Allocator(seg, table=tc.name, lock_timeout=dc.lock_timeout)
        saver = Saver(tc, seg, alloc, dc)
        safety = str(saver.save("full").path)
        saver.close()
        alloc.release_views()
        seg.detach()
        segment.destroy(tc.key)
    seg, n = restore(tc, dc, chain)
    seg.detach()
    return {"table": tc.name, "records": n, "from": [str(p) for p, *_ in chain], "safety_snapshot": safety}
