"""Saving a live table to snapshots, and rebuilding a table from them.

Saver decides full vs delta (a full every `full_every` saves, and after any
failure), selects slots (full: every allocated slot; delta: slots dirty or
pinned), harvests writers' dirty marks into the daemon's two marks (stated/shm/marks.py) and clears
its own (`snap_pending`) *before* copying so a concurrent write is caught by the next save, writes
the file and prunes old chains.
Cost of a delta follows the dirty count, not the capacity (one C-speed scan of
the dirty column aside).

Saver.save is synchronous and reads the live table like any seqlock reader, so it may run in a
thread while others read the same segment; one Saver runs one save at a time (the daemon runs them
in its worker thread, daemon/saves.py; the CLI calls them directly).
"""
from __future__ import annotations

import grp
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import compress
from pathlib import Path

from ..errors import LayoutMismatch, MigrationRefused, RestoreError, SegmentNotFound, StatedError
from ..format import segment as fmt
from ..format.config import DaemonConfig, TableConfig
from ..format.schema import to_wire
from ..shm import segment
from ..shm.allocator import Allocator
from ..shm.marks import harvest
from ..shm.segment import Segment
from . import snapshot as snap

log = logging.getLogger("stated.persist")

__all__ = ["Saver", "SaveResult", "restore", "migrate_live", "restore_by_hand", "chain_for", "verify_file",
           "MigrationRefused", "RestoreError", "refuse_lossy"]


@dataclass
class SaveResult:
    path: Path
    kind: str
    records: int
    bytes: int
    seconds: float


class Saver:
    """Snapshots of one live table, in state_dir/<table>.

    `tc` must describe the segment as it is (its own layout and capacity), not what a config wishes
    it were: the records are copied with it. Directory problems (not ours, a symlink, unwritable)
    never raise from the constructor; they make every save fail with SnapshotFailed until fixed.
    """

    def __init__(self, tc: TableConfig, seg: Segment, alloc: Allocator, dc: DaemonConfig, *,
                 proc_root: str = "/proc"):
        if tc.layout.hash != seg.header.layout_hash or tc.capacity != seg.header.capacity:
            raise LayoutMismatch(f"table {tc.name!r}: a Saver needs the segment's own layout and capacity "
                                 f"({seg.header.layout_hash:#018x}, {seg.header.capacity} slots); given "
                                 f"{tc.layout.hash:#018x}, {tc.capacity} slots")
        self.tc, self.seg, self.alloc, self.dc = tc, seg, alloc, dc
        self.proc_root = proc_root
        self.dir = snap.table_dir(dc.state_dir, tc.name)
        r = seg.header.regions
        self.records = seg.buf[r.records_offset:r.records_offset + tc.capacity * seg.header.record_size]
        self.gid = grp.getgrnam(dc.group).gr_gid if dc.group else None
        self.seq = 0
        self.base = 0
        self.saves_since_full = 0
        self.force_full = True          # the first save of a daemon's life is full
        self.last_success: float | None = None
        self.last_size = 0
        try:                            # made now, with the configured mode, before anything else can
            with self._open() as sd:
                sd.remove_stale_temporaries()
                files = sd.list()
                self.seq = files[-1][0] if files else 0
        except (StatedError, OSError) as e:
            log.error("table=%s: snapshot directory %s is unusable: %s. Saves fail until it is fixed",
                      tc.name, self.dir, _why(e))

    def _open(self) -> snap.SnapshotDir:
        return snap.SnapshotDir.open(self.dir, mode=self.dc.mode, gid=self.gid, create=True,
                                     proc_root=self.proc_root)

    def close(self) -> None:
        self.records.release()

    def save(self, kind: str | None = None, *, prune: bool = True) -> SaveResult:
        """Write one snapshot: `kind` "full", "delta" (a full when there is no full of ours for it to
        follow) or None (the schedule decides). Raises SnapshotFailed (the next save is then full)."""
        t0 = time.perf_counter()
        try:
            sd = self._open()
            try:
                files = sd.list()
            except OSError:
                sd.close()
                raise
        except (StatedError, OSError) as e:
            self.force_full = True
            raise snap.SnapshotFailed(f"cannot write snapshot in {self.dir}: {_why(e)}") from None
        with sd:
            newest = files[-1][0] if files else 0
            if newest > self.seq:       # written by someone else: a delta of ours would not follow it
                self.force_full = True
            if kind is None:
                kind = "full" if (self.force_full or self.saves_since_full >= self.dc.full_every) else "delta"
            elif kind == "delta" and self.force_full:
                kind = "full"           # no full of ours to follow (first save, after a failure, or a newer file)
            a = self.alloc
            v = a.views
            cap = a.capacity
            if kind == "full":
                harvest(v)                  # writers' dirty marks -> snap_pending + store_pending (shm/marks.py)
                fmt.clear_column(v.snap_pending)    # clear first: a later write is caught by the next delta
                slots = _slots_where(fmt.copy_column(v.state), fmt.SLOT_ALLOCATED)
            else:
                harvest(v)
                marks = int.from_bytes(fmt.copy_column(v.snap_pending), "little") | \
                    int.from_bytes(fmt.copy_column(v.pinned), "little")
                runs = _runs_of(marks.to_bytes(cap, "little"), 1) if marks else []
                for lo, hi in runs:
                    fmt.clear_column(v.snap_pending, lo, hi)    # clear first: a later write is in the next delta
                slots = _slots_of(runs)
            prev = max(self.seq, newest)
            seq = prev + 1
            base = seq if kind == "full" else self.base
            header = snap.SnapshotHeader(kind=kind, table=self.tc.name, key=self.tc.key,
                                         schema=to_wire(self.tc.layout.schema), layout_hash=self.tc.layout.hash,
                                         record_size=self.tc.layout.record_size, capacity=cap, seq=seq, base=base,
                                         prev=prev, time=time.time(), counters=self._counters())
            name = snap.file_name(self.tc.name, seq, kind)
            capture = snap.Capture(a, self.records, self.tc.layout.record_size, slots)
            try:
                n = sd.write(name, header, self._owners(), capture, self.dc.mode, gid=self.gid,
                             fixups=capture.fixups)
            except snap.SnapshotFailed:
                self.force_full = True
                raise
            self._report(capture)
            self.seq = seq
            if kind == "full":
                self.base, self.saves_since_full, self.force_full = seq, 0, False
            else:
                self.saves_since_full += 1
            try:
                size = sd.size(name)
            except OSError:
                size = 0
            self.last_success, self.last_size = time.time(), size
            if prune:
                self._prune(sd, files + [(seq, kind, name)])
        return SaveResult(self.dir / name, kind, n, size, time.perf_counter() - t0)

    def _counters(self) -> dict[str, int]:
        """The shared counters, held to what a snapshot may carry (a worker can write anything there)."""
        out = {}
        for k, v in zip(fmt.COUNTERS, self.alloc.views.counters.tolist()):   # views: no core call in the save thread
            if v > snap.MAX_COUNTER:
                log.warning("table=%s: counter %s = %d is beyond any real count; saved as %d",
                            self.tc.name, k, v, snap.MAX_COUNTER)
                v = snap.MAX_COUNTER
            out[k] = v
        return out

    def _owners(self) -> list[snap.SavedOwner]:
        out = []
        for o in self.alloc.owners():
            if not o.name:
                log.warning("table=%s: owner entry %d has no name; not saved", self.tc.name, o.index)
                continue
            out.append(snap.SavedOwner(o.index, o.name[:snap.MAX_OWNER_NAME], o.state, o.since_ms))
        return out

    def _report(self, c: snap.Capture) -> None:
        name = self.tc.name
        if c.torn:
            log.warning("table=%s: %d slot(s) whose writer stayed mid-write were saved as is and flagged torn "
                        "(slots %s%s)", name, len(c.torn), ", ".join(map(str, c.torn[:20])),
                        ", ..." if len(c.torn) > 20 else "")
        if c.recopied:
            log.info("table=%s: %d slot(s) copied again: their entity moved to another slot during the save",
                     name, c.recopied)
        for slot, ent in c.dropped_entities:
            log.warning("table=%s slot=%d: entity %d is claimed by two slots of the live table; saved without "
                        "it on this one (as repair resolves it)", name, slot, ent)
        if c.normalised:
            log.warning("table=%s: %d slot(s) had a state, owner or flags no slot can have; saved as repair "
                        "would leave them", name, c.normalised)

    def prune(self) -> None:
        """Keep the newest `snapshots_keep` fulls and the deltas that follow them."""
        try:
            with self._open() as sd:
                self._prune(sd, sd.list())
        except (StatedError, OSError) as e:
            log.warning("table=%s: cannot prune %s: %s", self.tc.name, self.dir, _why(e))

    def _prune(self, sd: snap.SnapshotDir, files: list[tuple[int, str, str]]) -> None:
        fulls = sorted(seq for seq, kind, _ in files if kind == "full")
        if len(fulls) <= self.dc.snapshots_keep:
            return
        oldest_kept = fulls[-self.dc.snapshots_keep]
        for seq, _kind, name in files:
            if seq < oldest_kept:
                try:
                    sd.unlink(name)
                except OSError as e:
                    log.warning("table=%s: cannot prune %s: %s", self.tc.name, sd.path / name, e.strerror or e)


def _runs_of(col: bytes, value: int) -> list[tuple[int, int]]:
    """[lo, hi) runs of the bytes of `col` (a copy of a byte column) equal to `value`, ascending, found by
    a regular expression (C speed: the cost follows the number of runs, not of bytes)."""
    if col.count(value) == len(col):
        return [(0, len(col))] if col else []
    return [m.span() for m in re.finditer(re.escape(bytes([value])) + b"+", col)]


def _slots_where(col: bytes, value: int) -> Sequence[int]:
    """The indexes of the bytes of `col` equal to `value`, ascending (itertools.compress over a
    translated copy: C speed); a range when that is every index."""
    n = col.count(value)
    if n == len(col):
        return range(n)
    if n == 0:
        return []
    return list(compress(range(len(col)), col.translate(bytes(int(i == value) for i in range(256)))))


def _slots_of(runs: list[tuple[int, int]]) -> Sequence[int]:
    """The slots of `runs`, ascending: a range when it is one run."""
    if len(runs) == 1:
        return range(*runs[0])
    out: list[int] = []
    for lo, hi in runs:
        out.extend(range(lo, hi))
    return out


def _why(e: BaseException) -> str:
    return (e.strerror or str(e)) if isinstance(e, OSError) else str(e)


def refuse_lossy(table: str, changes: list, allow_lossy: bool) -> None:
    """Raise MigrationRefused for changes that lose data: always for those no flag allows (dropping
    allocated slots), otherwise unless `allow_lossy`. Decided on the changes' kinds, never their text."""
    never = [c for c in changes if not c.allowed_with_flag]
    if never:
        raise MigrationRefused(f"table {table!r}: {'; '.join(map(str, never))} (refused even with --allow-lossy)")
    if changes and not allow_lossy:
        raise MigrationRefused(f"table {table!r}: migration would lose data: {'; '.join(map(str, changes))}. "
                               f"Re-run with --allow-lossy to accept that")


def _plan(tc: TableConfig, chain: snap.Chain, *, migrate: bool, allow_lossy: bool) -> Callable[[bytes], bytes] | None:
    """Check that `chain` can become tc's table; returns the record converter (None when layouts agree).

    Raises LayoutMismatch (the layout or capacity differ and not `migrate`), MigrationRefused, RestoreError.
    """
    from . import migrate as migrate_mod
    head = chain.full.header
    for f in chain.files[1:]:
        why = snap.continues(head, f.header)
        if why:
            raise RestoreError(f"{f.path}: {why}")
    if head.layout_hash == tc.layout.hash and head.capacity == tc.capacity:
        return None
    old = head.layout()
    if not migrate:
        raise LayoutMismatch(
            segment.describe_mismatch(tc.key, tc.name, old, tc.layout).replace(
                "segment at key", f"snapshot {chain.full.path.name} for key")
            + f" (capacity {head.capacity} -> {tc.capacity})")
    refuse_lossy(tc.name, migrate_mod.lossy_changes(old, tc.layout, head.capacity, tc.capacity,
                                                    _highest_live_slot(chain)), allow_lossy)
    return migrate_mod.converter(old, tc.layout) if old.hash != tc.layout.hash else None


def restore(tc: TableConfig, dc: DaemonConfig, chain: snap.Chain, *, migrate: bool = False,
            allow_lossy: bool = False) -> tuple[Segment, int]:
    """Create the table's segment from a parsed snapshot chain. Returns (segment, records restored).

    The caller has checked the segment is absent. A chain whose layout or capacity
    differs from the config raises LayoutMismatch unless `migrate` (see migrate.py).
    """
    convert = _plan(tc, chain, migrate=migrate, allow_lossy=allow_lossy)
    seg = segment.create(tc.key, tc.capacity, tc.layout, mode=dc.mode, group=dc.group, ready=False)
    try:
        n = _apply(seg, tc, chain, convert)
    except BaseException:
        seg.detach()
        segment.destroy(tc.key)     # never leave a half-restored table behind
        raise
    fmt.write_state(seg.buf, fmt.STATE_READY)
    return seg, n


def _highest_live_slot(chain: snap.Chain) -> int:
    live: dict[int, int] = {}
    for f in chain.files:
        for c in f.chunks:
            live.update(zip(c.slots, c.states))
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
        try:
            highest = max(alloc.allocated_slots(), default=-1)
            refuse_lossy(tc.name, migrate_mod.lossy_changes(old_tc.layout, tc.layout, old_tc.capacity, tc.capacity,
                                                            highest), allow_lossy)
            safety = _save_full(old_tc, seg, alloc, dc)
        finally:
            alloc.release_views()
        log.info("table=%s: safety snapshot %s (%d records) before migration", tc.name, safety.path.name,
                 safety.records)
    finally:
        seg.detach()
    chain = snap.Chain([snap.read_file(safety.path)])
    segment.destroy(tc.key)
    return restore(tc, dc, chain, migrate=True, allow_lossy=allow_lossy)


def _save_full(own: TableConfig, seg: Segment, alloc: Allocator, dc: DaemonConfig) -> SaveResult:
    """A full snapshot of a live table outside the daemon (safety copies); `own` is the segment's own
    layout and capacity. Prunes nothing: an operator mid-recovery keeps every file."""
    saver = Saver(own, seg, alloc, dc)
    try:
        return saver.save("full", prune=False)
    finally:
        saver.close()


def _apply(seg: Segment, tc: TableConfig, chain: snap.Chain, convert: Callable[[bytes], bytes] | None = None) -> int:
    a = Allocator(seg, table=tc.name, lock_timeout=5.0)
    try:
        rs = tc.layout.record_size
        r = seg.header.regions
        v = a.views
        recs = v.records
        live = set()
        holder: dict[int, int] = {}     # entity -> slot holding it so far (kept from the first delta on)
        for k, f in enumerate(chain.files):
            ors = f.header.record_size
            track = k > 0
            if k == 1:                  # a file never names an entity twice: the full's are unique
                holder = _entities_of(chain.full.chunks)
            for c in f.chunks:
                slots, gens, owners, ents = c.slots, c.gens, c.owners, c.entities
                states, flags, data = c.states, c.flags, c.records
                for i in range(c.n):
                    slot = slots[i]
                    if slot >= tc.capacity:
                        continue
                    if track and v.flags[slot] & fmt.FLAG_HAS_ENTITY and holder.get(v.entity[slot]) == slot:
                        del holder[v.entity[slot]]
                    v.generation[slot] = gens[i]
                    v.seq[slot] = 0
                    if states[i] == fmt.SLOT_ALLOCATED:
                        if track and flags[i] & fmt.FLAG_HAS_ENTITY:
                            _claim_entity(v, holder, ents[i], slot, tc.name)
                        v.owner[slot] = owners[i]
                        v.entity[slot] = ents[i]
                        v.flags[slot] = flags[i] & fmt.FLAG_HAS_ENTITY
                        v.state[slot] = fmt.SLOT_ALLOCATED
                        recs[slot * rs:(slot + 1) * rs] = (convert(data[i * ors:(i + 1) * ors]) if convert
                                                           else data[i * rs:(i + 1) * rs])
                        live.add(slot)
                    else:
                        v.owner[slot] = 0
                        v.entity[slot] = 0
                        v.flags[slot] = 0
                        v.state[slot] = fmt.SLOT_FREE
                        recs[slot * rs:(slot + 1) * rs] = bytes(rs)
                        live.discard(slot)
        last = chain.newest
        now_ms = int(time.time() * 1000)
        for o in last.owners:           # indexes and names checked by read_file
            off = r.owners_offset + (o.index - 1) * fmt.OWNER_SIZE
            # restored owners have no process: detached until a worker attaches under the name
            fmt.OWNER.pack_into(seg.buf, off, o.name.encode()[:32], 0, fmt.OWNER_DETACHED, 0, 0, 0, now_ms)
        a.repair()                  # free stack, entity index, used and owner counts from slot states
        a.set_counters(last.header.counters)
        # the counters were read a moment before the records were copied: reconcile so that
        # allocations - frees = allocated slots, as on a live table
        counts = a.counters()
        allocs, frees, used = counts["allocations"], counts["frees"], a.used()
        if allocs - frees < used:
            a.set_counters({"allocations": frees + used})     # an alloc raced the copy (counters stay monotonic)
        else:
            a.set_counters({"frees": allocs - used})          # a free raced the copy
        return len(live)
    finally:
        a.release_views()


def _entities_of(chunks: list[snap.Chunk]) -> dict[int, int]:
    """entity -> slot of every allocated entry with an entity."""
    out: dict[int, int] = {}
    for c in chunks:
        out.update((e, s) for s, e in c.claims())
    return out


def _claim_entity(v: fmt.SegmentViews, holder: dict[int, int], entity: int, slot: int, table: str) -> None:
    """A later file's slot takes an entity an earlier file gave another slot: the later copy is the
    newer truth (the entity was freed there and allocated here in between). The earlier slot keeps its
    record without the entity, as repair resolves two slots claiming one entity."""
    prev = holder.get(entity)
    if prev is not None and prev != slot:
        v.flags[prev] &= ~fmt.FLAG_HAS_ENTITY
        log.warning("table=%s slot=%d: entity %d moved to slot %d in a later snapshot of the chain; "
                    "slot %d keeps its record without it", table, prev, entity, slot, prev)
    holder[entity] = slot


def verify_file(path: Path) -> dict:
    """`stated snapshot --verify`: the header and totals of a valid file, CorruptSnapshot otherwise."""
    f = snap.read_file(path)
    h = f.header
    return {"path": str(path), "kind": h.kind, "table": h.table, "seq": h.seq, "base": h.base,
            "records": f.records, "owners": len(f.owners), "layout_hash": f"{h.layout_hash:016x}",
            "capacity": h.capacity, "time": h.time, "torn_flagged": sum(c.torn() for c in f.chunks)}


def chain_for(path: Path) -> snap.Chain:
    """The parsed chain ending at `path`: itself if full, else its base full and the deltas up to it.

    Files beside `path` are opened relative to its directory, never through a symlink."""
    path = Path(path)
    try:
        sd = snap.SnapshotDir.open_given(path.parent)
    except OSError as e:
        raise RestoreError(f"{path.parent}: cannot open ({e.strerror or e})") from None
    with sd:
        given = sd.read(path.name)
        header = given.header
        if header.kind == "full":
            return snap.Chain([given])
        out = []
        for seq, kind, name in sd.list():
            if seq == header.base and kind == "full":
                out.append(sd.read(name))
            elif kind == "delta" and header.base < seq <= header.seq:
                parsed = sd.read(name)
                if parsed.header.base == header.base:
                    out.append(parsed)
    if not out or out[0].header.kind != "full":
        raise RestoreError(f"{path} is a delta and its base full snapshot (seq {header.base}) is not beside it")
    prev = out[0].header.seq
    for f in out[1:]:
        why = snap.continues(out[0].header, f.header)
        if why:
            raise RestoreError(f"the delta chain to {path} cannot be used: {f.path.name}: {why}")
        if f.header.prev != prev:
            raise RestoreError(f"the delta chain to {path} has a gap before {f.path.name}")
        prev = f.header.seq
    return snap.Chain(out)


def restore_by_hand(tc: TableConfig, dc: DaemonConfig, path: Path, force: bool) -> dict:
    """`stated restore --from FILE`: refuses over an existing segment unless `force`, which first
    takes a safety snapshot of the existing table, in that table's own layout.

    Everything that can refuse (the file, its chain, its layout against the config, the safety
    snapshot) does so before the live table is touched. Afterwards the restored table is saved as a
    new full, so that it, not the safety copy, is what the next start-up restores.
    """
    chain = chain_for(path)
    _plan(tc, chain, migrate=False, allow_lossy=False)
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
        try:
            if not force:
                raise RestoreError(f"table {tc.name!r} has a live segment at {tc.key:#010x}; restoring would "
                                   f"overwrite it. Use --force (a safety snapshot is taken first)")
            own = TableConfig(tc.name, tc.key, seg.header.capacity, seg.header.layout)
            alloc = Allocator(seg, table=tc.name, lock_timeout=dc.lock_timeout)
            try:
                safety = str(_save_full(own, seg, alloc, dc).path)
            finally:
                alloc.release_views()
        finally:
            seg.detach()
        log.info("table=%s: safety snapshot %s of the live table before restoring", tc.name, safety)
        segment.destroy(tc.key)
    seg, n = restore(tc, dc, chain)
    saved = None
    try:
        alloc = Allocator(seg, table=tc.name, lock_timeout=dc.lock_timeout)
        try:
            saved = str(_save_full(tc, seg, alloc, dc).path)
        finally:
            alloc.release_views()
    except StatedError as e:
        log.warning("table=%s: restored, but could not save it as the newest snapshot (%s): until the daemon "
                    "saves, a restart without the segment would restore an older state", tc.name, e)
    finally:
        seg.detach()
    return {"table": tc.name, "records": n, "from": [str(f.path) for f in chain.files], "safety_snapshot": safety,
            "saved_as": saved}
