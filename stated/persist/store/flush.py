"""Write-behind: dirty records of stored tables to PostgreSQL, with versions, epochs and leases.

One `Store` per daemon, one `TableStore` per stored table. Each flush interval the daemon calls
`Store.tick()`, which (re)connects with backoff, then per table:

1. harvests writers' dirty marks into `store_pending` (stated/shm/marks.py) and lists the pending slots,
   plus pinned slots whose bytes differ from what was last written (live views leave no mark);
2. copies each record under its seqlock (seq even and unchanged, generation unchanged), yielding to
   the event loop every few hundred records;
3. in one transaction: COPY the rows into a temporary table, then one INSERT ... ON CONFLICT DO
   UPDATE that accepts a row only if this host holds the entity's lease at the row's epoch and the
   row's version is newer than the stored one (idempotent: a replayed batch changes nothing);
4. after COMMIT, clears `store_pending` of each slot whose record is byte-for-byte, seq and
   generation what was copied. Anything that changed meanwhile stays marked for the next pass.

A version is `(epoch << 32) | counter`: the epoch of this host's lease on the entity and a per-table
counter that grows with every batch of this daemon's life (each daemon start bumps the epochs it
holds, so the counter may restart). A claim elsewhere bumps the epoch: this host's later writes fail
the lease check, are counted as stale (`stale`), logged, and the entity is marked lost here (never
written again unless claimed again).

Nothing here blocks a worker: workers only ever wait on claim/flush/release (bounded by
`timeout`, failing with StoreUnavailable). During an outage the marks in shared memory are the
queue; the database is retried with backoff 0.1 s -> 10 s, and catch-up honours `max_rate`.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from ...errors import (
    DuplicateEntity,
    NotOwner,
    OwnedElsewhere,
    StatedError,
    StoreError,
    StoreRetry,
    StoreSchemaMismatch,
    StoreUnavailable,
)
from ...format import segment as fmt
from ...format.store_config import StoreConfig, redact
from ...shm import _native
from ...shm.marks import count_marked, harvest, marked
from . import leases, pg
from . import schema as sqlschema
from .schema import TableMapping

log = logging.getLogger("stated.store")

_SEQ_TRIES = 8          # seqlock copy attempts per record before leaving it for the next pass
BACKOFF_MIN, BACKOFF_MAX = 0.1, 10.0
SWEEP_EVERY = 10        # renewals between sweeps of orphaned leases (leases.sweep)


class Item(tuple):
    """(slot, generation, seq, entity, data, pinned): one record copied for writing. A tuple, because
    the flush loop makes thousands per batch; entity is -1 for an allocated slot without one."""

    __slots__ = ()
    slot = property(itemgetter(0))
    gen = property(itemgetter(1))
    seq = property(itemgetter(2))
    entity = property(itemgetter(3))
    data = property(itemgetter(4))
    pinned = property(itemgetter(5))


_item = tuple.__new__


@dataclass
class FlushResult:
    written: int = 0          # rows the database accepted
    stale: int = 0            # rows refused by the lease check (this host lost the lease)
    older: int = 0            # rows refused as not newer (a replay)
    skipped: int = 0          # marked slots left for later (mid-write) or dropped (no lease, no entity)
    cleared: int = 0          # marks cleared after commit
    seconds: float = 0.0


class TableStore:
    """The shared-memory side of one stored table: pending slots, seqlock copies, marks, epochs."""

    def __init__(self, name: str, mapping: TableMapping, alloc: Any, seg: Any):
        self.name, self.mapping, self.alloc = name, mapping, alloc
        self.core = alloc.core            # the native core: record copies and settles (store_copy/_settle)
        self.capacity = alloc.capacity
        self.rs = seg.header.record_size
        v = self.v = alloc.views          # the format's named slot columns (stated/format/segment.py)
        self.rec = v.records
        self.seq, self.gen, self.state, self.flags = v.seq, v.generation, v.state, v.flags
        self.entity, self.owner, self.pinned, self.store_pending = v.entity, v.owner, v.pinned, v.store_pending
        from ...shm.records import default_record, record_class
        self.init = bytes(default_record(record_class(mapping.layout, name)))
        self.epochs: dict[int, int] = {}          # entity -> epoch of the lease this host holds
        self.lost: set[int] = set()               # entities another host took: never written from here
        self.pending_since: dict[int, float] = {} # slot -> when first seen pending (insertion = age order)
        self.shadow: dict[int, tuple[int, bytes]] = {}   # pinned slot -> (generation, bytes last written)
        self.counter = 0
        self.last_scan = 0.0
        self.flushed = 0
        self.stale = 0
        self.older = 0
        self.poisoned: dict[int, tuple[int, bytes]] = {}  # slot -> (generation, bytes) the database refused

    def close(self) -> None:
        """The views belong to the allocator (released with it)."""

    # ---- which slots -------------------------------------------------------------------------
    def pending(self, now: float) -> list[int]:
        """Harvest writers' marks, then the slots to write: store_pending ones, and pinned allocated
        slots whose bytes differ from what this daemon last wrote for them."""
        harvest(self.v)
        slots = marked(self.store_pending)
        pinned = marked(self.pinned)
        if pinned:
            have = set(slots)
            rs, rec, state, gen = self.rs, self.rec, self.state, self.gen
            for s in pinned:
                if s in have or state[s] != fmt.SLOT_ALLOCATED:
                    continue
                sh = self.shadow.get(s)
                if sh is None or sh[0] != gen[s] or rec[s * rs:(s + 1) * rs].tobytes() != sh[1]:
                    slots.append(s)
        ps = self.pending_since
        for s in slots:
            if s not in ps:
                ps[s] = now
        self.last_scan = now
        return slots

    def lag(self, now: float) -> float:
        """Age of the oldest change not yet in the database (0 when none)."""
        for t in self.pending_since.values():      # insertion order is age order: the first is the oldest
            return max(0.0, now - t)
        return 0.0

    def dirty_count(self) -> int:
        return count_marked(self.v.dirty, self.store_pending)

    # ---- copy and settle ----------------------------------------------------------------------
    def copy_batch(self, slots: list[int]) -> tuple[list[Item], list[int]]:
        """Consistent copies of many records: (items, slots still mid-write after _SEQ_TRIES rounds).

        One C call (stated/native/_native.c, store_copy: the seqlock reader with acquire ordering, its
        comment has the argument): per slot seq and state, then generation, flags, entity, pinned and the
        record, then seq, generation and state again; unchanged means one allocation and no write
        section overlapped the copy. Freed slots (a free() marks the slot dirty) still hold the last
        writes until reused: they are copied under the entity the slot last had (written only if this
        host holds its lease)."""
        return _native.store_copy(self.core, slots, Item, _SEQ_TRIES)

    def copy(self, slot: int) -> Item | None:
        """One record's consistent copy (a few tries), or None to leave it for the next pass."""
        items, _later = self.copy_batch([slot])
        return items[0] if items else None

    def settle_many(self, items: list[Item]) -> int:
        """After COMMIT (or a definitive refusal): clear the store mark of each record that is still
        exactly what was copied (seq, generation, bytes). The compare and the clear are one C call
        (store_settle) holding the GIL, so the saver thread's harvest cannot slip a new mark in between
        and have it cleared. Returns how many marks were cleared."""
        changed = _native.store_settle(self.core, items)
        ps, shadow = self.pending_since, self.shadow
        pop = ps.pop
        for s, g, _q, _e, d, pin in items:
            pop(s, None)
            if pin:
                shadow[s] = (g, d)          # pinned: selected again only once its bytes differ from these
        for it in changed:
            # changed since the copy: what the database lacks now is newer than the scan that
            # preceded the copy (keeps stated_store_lag_seconds honest; dict order stays age order)
            ps[it[0]] = self.last_scan
        if shadow:                          # a slot freed since it was pinned: forget its bytes
            statec = self.state
            for it in items:
                if it[0] in shadow and statec[it[0]] != fmt.SLOT_ALLOCATED:
                    shadow.pop(it[0], None)
        return len(items) - len(changed)

    def drop(self, it: Item) -> None:
        """A copy that will never be written (no entity, not ours): clear its mark so it does not spin
        (only if the slot still holds exactly that copy: a slot freed and allocated again since keeps
        the new allocation's mark), and for a pinned slot remember the bytes, so it is not selected
        again until it changes."""
        _native.store_settle(self.core, [it])
        self.pending_since.pop(it[0], None)
        if it[5]:
            self.shadow[it[0]] = (it[1], it[4])

    def allocated_entities(self) -> dict[int, int]:
        """{entity: slot} of allocated slots with an entity (a scan of the slot table)."""
        states = self.state.tobytes()
        out: dict[int, int] = {}
        flags, ent = self.flags, self.entity
        i = states.find(fmt.SLOT_ALLOCATED)
        while i >= 0:
            if flags[i] & fmt.FLAG_HAS_ENTITY:
                out[ent[i]] = i
            i = states.find(fmt.SLOT_ALLOCATED, i + 1)
        return out

    def next_version_base(self) -> int:
        """The write counter for a batch just copied: the low half of its versions. Taken right after
        the copies, with no await in between, so versions follow the order of the copies: of two copies
        of one record (a write-behind batch, a worker's flush), the later one always wins."""
        self.counter = (self.counter + 1) & 0xFFFFFFFF
        return self.counter


class Store:
    """The daemon's database side: connections, schema, the flush loop, leases, claim/flush/release.

    `connect` and `clock` are injectable. Two connections: `bulk` for write-behind and lease renewal,
    `fast` for the workers' claim/flush/release, so a worker never queues behind a 5000-row batch.
    """

    def __init__(self, cfg: StoreConfig, *, connect: Callable[..., Awaitable[pg.Driver]] = pg.connect,
                 clock: Callable[[], float] = time.monotonic, migrate: bool = False, allow_lossy: bool = False,
                 on_flush: Callable[[float], None] | None = None):
        self.cfg = cfg
        self._connect = connect
        self.clock = clock
        self.migrate, self.allow_lossy = migrate, allow_lossy
        self.on_flush = on_flush
        self.tables: dict[str, TableStore] = {}
        self.bulk: pg.Driver | None = None
        self.fast: pg.Driver | None = None
        self._bulk_lock = asyncio.Lock()
        self._fast_lock = asyncio.Lock()
        self._conn_lock = asyncio.Lock()
        self.up = False
        self.ready = False             # schema checked and leases re-acquired since start
        self.last_error = ""
        self.errors: Counter[str] = Counter()
        self.backoff = BACKOFF_MIN
        self.next_try = 0.0
        self.next_renew = 0.0
        self._renewals = 0
        self._rate_budget = 0.0
        self._rate_t = clock()
        self.fatal: str | None = None  # a schema problem that needs an operator (layout change without --migrate)

    def add_table(self, name: str, layout: Any, alloc: Any, seg: Any) -> TableStore:
        ts = TableStore(name, TableMapping(name, layout, self.cfg.schema), alloc, seg)
        self.tables[name] = ts
        return ts

    def rebind(self, name: str, alloc: Any, seg: Any) -> None:
        """The daemon recreated the table's segment (it was removed under us): new views, same leases."""
        old = self.tables.get(name)
        if old is None:
            return
        ts = TableStore(name, old.mapping, alloc, seg)
        ts.epochs, ts.lost, ts.counter = old.epochs, old.lost, old.counter
        ts.flushed, ts.stale, ts.older = old.flushed, old.stale, old.older
        old.close()
        self.tables[name] = ts
        self.mark_all(name)            # whatever the removed copy held is what the database must get

    def mark_all(self, name: str) -> int:
        """Mark every allocated slot store_pending (after a restore from snapshots: the database may lack
        changes the lost memory had marked). Versions make the extra writes harmless."""
        ts = self.tables[name]
        n = 0
        for s in ts.allocated_entities().values():
            ts.store_pending[s] = 1
            n += 1
        return n

    def reset_connections(self) -> None:
        """Drop both connections (a pass was cancelled mid-transaction); the next call reconnects."""
        for d in (self.bulk, self.fast):
            if d is not None:
                d.abort()
        self.bulk = self.fast = None
        self.up = False
        self.next_try = 0.0

    def close_tables(self) -> None:
        for ts in self.tables.values():
            ts.close()
        self.tables.clear()

    # ---- connection ----------------------------------------------------------------------------
    def _fail(self, e: StatedError, kind: str) -> None:
        was_up = self.up
        self.errors[kind] += 1
        self.last_error = str(e)
        self.up = False
        for d in (self.bulk, self.fast):
            if d is not None:
                d.abort()
        self.bulk = self.fast = None
        now = self.clock()
        self.next_try = now + self.backoff
        if was_up or self.backoff == BACKOFF_MIN:
            log.error("store: %s; retrying in %.1fs (dirty records stay queued in shared memory)", e, self.backoff)
        else:
            log.warning("store: still unavailable: %s; next try in %.1fs", e, self.backoff)
        self.backoff = min(BACKOFF_MAX, self.backoff * 2)

    async def ensure_connected(self) -> bool:
        """Connect (both connections), set the schema up and, once per daemon life, re-acquire the
        leases of every allocated stored entity. False (and a backoff) when the database is not there."""
        if self._connected():
            return True
        async with self._conn_lock:
            if self._connected():
                return True
            return await self._connect_now()

    def _connected(self) -> bool:
        return (self.up and self.bulk is not None and not self.bulk.closed and self.fast is not None
                and not self.fast.closed)

    async def _connect_now(self) -> bool:
        if self.fatal is not None:
            return False
        if self.clock() < self.next_try:
            return False
        for d in (self.bulk, self.fast):
            if d is not None:
                d.abort()
        try:
            self.bulk = await self._connect(self.cfg.dsn, timeout=self.cfg.timeout, application_name="stated-flush")
            self.fast = await self._connect(self.cfg.dsn, timeout=self.cfg.timeout, application_name="stated-claim")
            async with self._bulk_lock:
                await self._setup(self.bulk)
                for d in (self.bulk, self.fast):
                    for ts in self.tables.values():
                        await d.execute(ts.mapping.temp_sql())
                await leases.heartbeat(self.bulk, sqlschema.ident(self.cfg.schema), self.cfg.host_id,
                                       self.cfg.lease_ttl)
                if not self.ready:
                    await self._reacquire(self.bulk)
                    self.ready = True
        except StoreUnavailable as e:
            self._fail(e, "unavailable")
            return False
        except StoreError as e:
            self._fail(e, "refused")
            return False
        self.up = True
        self.backoff = BACKOFF_MIN
        self.last_error = ""
        self.next_renew = 0.0
        self._renewals = 0             # the first renewal of a connection sweeps orphaned leases
        log.info("store: connected to %s as host_id=%s", redact(self.cfg.dsn), self.cfg.host_id)
        return True

    async def _setup(self, drv: pg.Driver) -> None:
        try:
            await setup_schema(drv, self.cfg.schema, [ts.mapping for ts in self.tables.values()],
                               migrate=self.migrate, allow_lossy=self.allow_lossy)
        except StoreSchemaMismatch as e:
            self.fatal = str(e)        # needs an operator: not retried until restart
            raise

    async def _reacquire(self, drv: pg.Driver) -> None:
        for name, ts in self.tables.items():
            ents = ts.allocated_entities()
            todo = [e for e in ents if e not in ts.epochs and e not in ts.lost]
            for i in range(0, len(todo), 10000):
                part = todo[i:i + 10000]
                got = await leases.acquire(drv, ts.mapping, self.cfg.host_id, self.cfg.lease_ttl, part)
                ts.epochs.update(got)
                for e in part:
                    if e not in got:
                        ts.lost.add(e)
                        log.error("store: table=%s entity=%d slot=%d: allocated here but its lease is held by "
                                  "another host (or the row exists without a lease); not written from this host "
                                  "until claimed", name, e, ents[e])
            if ents:
                log.info("store: table=%s: %d leases taken, %d refused", name, len(ts.epochs), len(ts.lost))

    async def close(self) -> None:
        for d in (self.bulk, self.fast):
            if d is not None:
                await d.close()
        self.bulk = self.fast = None
        self.up = False

    # ---- the flush loop ---------------------------------------------------------------------------
    async def tick(self) -> dict[str, FlushResult]:
        """One write-behind pass over every table (and lease renewal when due). Never raises for
        database trouble: it is counted, logged and retried with backoff."""
        if not await self.ensure_connected():
            for ts in self.tables.values():
                ts.pending(self.clock())     # keep lag accounting honest during an outage
            return {}
        out: dict[str, FlushResult] = {}
        try:
            budget = self._budget()
            for name, ts in self.tables.items():
                out[name] = await self.flush_table(ts, budget)
                if budget is not None:
                    budget = max(0, budget - out[name].written - out[name].stale - out[name].older)
            if self.clock() >= self.next_renew:
                await self.renew()
        except StoreUnavailable as e:
            self._fail(e, "unavailable")
        except StoreRetry as e:
            self.errors["retry"] += 1
            log.warning("store: %s; retrying next pass", e)
        except StoreError as e:
            self._fail(e, "refused")
        return out

    def _budget(self) -> int | None:
        """Rows allowed this pass under max_rate (None: no cap). Unused allowance carries over up to
        one second's worth."""
        if not self.cfg.max_rate:
            return None
        now = self.clock()
        self._rate_budget = min(self.cfg.max_rate, self._rate_budget + (now - self._rate_t) * self.cfg.max_rate)
        self._rate_t = now
        n = int(self._rate_budget)
        self._rate_budget -= n
        return n

    async def flush_table(self, ts: TableStore, budget: int | None = None) -> FlushResult:
        """Write every pending record of one table, in batches of `batch` rows."""
        t0 = time.perf_counter()
        res = FlushResult()
        slots = ts.pending(self.clock())
        if budget is not None:
            slots = slots[:budget]
        batch = self.cfg.batch
        for i in range(0, len(slots), batch):
            items, counter = await self._collect(ts, slots[i:i + batch], res)
            if items:
                async with self._bulk_lock:
                    if self.bulk is None:
                        raise StoreUnavailable("store connection closed")
                    await self._write_isolating(self.bulk, ts, items, counter, res)
        res.seconds = time.perf_counter() - t0
        if self.on_flush is not None and (res.written or res.stale or res.older):
            self.on_flush(res.seconds)
        return res

    async def _collect(self, ts: TableStore, slots: list[int], res: FlushResult) -> tuple[list[Item], int]:
        """Copy a batch and select what to write: (items, the batch's version counter)."""
        items: list[Item] = []
        # one C call for the whole batch (~1 ms for 5000 records) and the counter right after it, with
        # no await in between: versions follow the order of copies (see next_version_base)
        copied, later = ts.copy_batch(slots)
        counter = ts.next_version_base()
        res.skipped += len(later)           # still mid-write after a few rounds: the next pass
        lost = ts.lost
        seen: set[int] = set()
        dup = False
        statec = ts.state
        poisoned = ts.poisoned
        for it in copied:
            e = it[3]
            if poisoned:
                p = poisoned.get(it[0])
                if p is not None:
                    if p == (it[1], it[4]):
                        res.skipped += 1        # refused before and unchanged since: not again
                        continue
                    del poisoned[it[0]]
            if statec[it[0]] != 1:
                dup = True                  # a freed copy: checked against live slots below
            if e < 0:
                ts.drop(it)
                res.skipped += 1
                self.errors["no_entity"] += 1
                log.error("store: table=%s slot=%d: allocated without an entity; a stored table needs one "
                          "(alloc(entity=...)); not written", ts.name, it[0])
                continue
            if e in lost:
                ts.drop(it)
                res.stale += 1
                ts.stale += 1
                continue
            if e in seen:
                dup = True
            seen.add(e)
            items.append(it)
        if dup:
            items = self._dedupe(ts, items, res)
        # entities allocated here without a claim: take their leases first
        unknown = [it.entity for it in items if it.entity not in ts.epochs]
        if unknown:
            async with self._bulk_lock:
                if self.bulk is None:
                    raise StoreUnavailable("store connection closed")
                taken = await leases.acquire(self.bulk, ts.mapping, self.cfg.host_id, self.cfg.lease_ttl,
                                             [e for e in unknown if self._is_live(ts, e, items)])
            ts.epochs.update(taken)
            keep = []
            for it in items:
                if it.entity in ts.epochs:
                    keep.append(it)
                elif ts.state[it.slot] != fmt.SLOT_ALLOCATED:
                    ts.drop(it)              # a freed slot of an entity we never held: nothing to save
                    res.skipped += 1
                else:
                    ts.lost.add(it.entity)
                    ts.drop(it)
                    res.stale += 1
                    ts.stale += 1
                    self.errors["lease_conflict"] += 1
                    log.error("store: table=%s entity=%d slot=%d: another host holds this entity's lease (or it "
                              "exists in the database and was alloc()ed instead of claim()ed); its writes here are "
                              "not saved", ts.name, it.entity, it.slot)
            items = keep
        return items, counter

    def _dedupe(self, ts: TableStore, items: list[Item], res: FlushResult) -> list[Item]:
        """Freed copies of an entity that is live again here (or twice in the batch): the live slot wins;
        of two freed copies the first is kept and the other left marked for the next pass."""
        live = {it[3] for it in items if self.s_allocated(ts, it[0])}
        out, seen = [], set()
        for it in items:
            e = it[3]
            if self.s_allocated(ts, it[0]):
                out.append(it)
            elif e in live or ts.alloc.lookup(e) is not None:
                ts.drop(it)
                res.skipped += 1
            elif e not in seen:
                seen.add(e)
                out.append(it)
            else:
                res.skipped += 1
        return out

    @staticmethod
    def s_allocated(ts: TableStore, slot: int) -> bool:
        return ts.state[slot] == fmt.SLOT_ALLOCATED

    @staticmethod
    def _is_live(ts: TableStore, entity: int, items: list[Item]) -> bool:
        """Only allocated slots may take a lease (a freed slot's entity is someone else's business)."""
        return any(it.entity == entity and ts.state[it.slot] == fmt.SLOT_ALLOCATED for it in items)

    async def _write_isolating(self, drv: pg.Driver, ts: TableStore, items: list[Item], counter: int,
                               res: FlushResult) -> None:
        """_write, and when the database refuses the batch itself (not an outage: a row it will never
        accept, e.g. a CHECK a DBA added), halve it until the refused records are found. Those keep
        their marks (nothing is lost: they are retried when they change, or by the next daemon) but are
        skipped while unchanged, so one bad record cannot stop a table's write-behind."""
        try:
            await self._write(drv, ts, items, counter, res)
        except (StoreUnavailable, StoreRetry):
            raise
        except StoreError as e:
            if len(items) > 1:
                mid = len(items) // 2
                await self._write_isolating(drv, ts, items[:mid], counter, res)
                await self._write_isolating(drv, ts, items[mid:], counter, res)
                return
            it = items[0]
            ts.poisoned[it[0]] = (it[1], it[4])
            self.errors["rejected_row"] += 1
            res.skipped += 1
            log.error("store: table=%s entity=%d slot=%d: the database refuses this record (%s); it stays marked "
                      "and is retried when it changes", ts.name, it[3], it[0], e)

    async def _write(self, drv: pg.Driver, ts: TableStore, items: list[Item], counter: int, res: FlushResult) -> None:
        """One transaction: COPY the copies (version epoch << 32 | counter) into the temporary table, then
        the fenced upsert; after COMMIT, the marks of records unchanged since their copy are cleared."""
        m = ts.mapping
        payload = m.copy_data(items, ts.epochs, counter)
        async with drv.transaction():
            await drv.copy_binary(m.temp_name, m.copy_columns, payload)
            status = await drv.execute(m.upsert_sql(), m.name, self.cfg.host_id)
            written = int(status.rsplit(" ", 1)[1])
            fenced: dict[int, dict] = {}
            if written < len(items):
                fenced = {sqlschema.entity_from_sql(r["entity"]): r
                          for r in await drv.fetch(m.fenced_sql(), m.name, self.cfg.host_id)}
        if fenced:
            keep = []
            for it in items:
                f = fenced.get(it[3])
                if f is None:
                    keep.append(it)
                    continue
                if ts.epochs.get(it[3]) == f["mine"]:       # still believed ours: we lost it
                    ts.epochs.pop(it[3], None)
                    ts.lost.add(it[3])
                    res.stale += 1
                    ts.stale += 1
                    log.error("store: table=%s entity=%d slot=%d: write refused, host %r holds the lease at "
                              "epoch %s (ours was %s); this host's copy is stale and is no longer written",
                              ts.name, it[3], it[0], f["host_id"] or "(released)", f["epoch"], f["mine"])
                ts.drop(it)
            items = keep
        res.written += written
        res.older += len(items) - written            # refused as not newer: the database has it already
        ts.older += len(items) - written
        res.cleared += ts.settle_many(items)
        ts.flushed += written

    async def renew(self) -> None:
        """The heartbeat (renews every lease of this host at once), and release of the leases of
        entities freed here without release() once nothing of theirs is pending."""
        self.next_renew = self.clock() + self.cfg.lease_ttl / 3
        async with self._bulk_lock:
            if self.bulk is None:
                raise StoreUnavailable("store connection closed")
            await leases.heartbeat(self.bulk, sqlschema.ident(self.cfg.schema), self.cfg.host_id, self.cfg.lease_ttl)
        self._renewals += 1
        for ts in self.tables.values():
            here = ts.allocated_entities()
            gone = {e: ep for e, ep in ts.epochs.items() if e not in here}
            ts.lost &= set(here)       # a lost entity freed here is forgotten: a later claim starts afresh
            pending = {ts.entity[s] for s in marked(ts.store_pending)}
            if self._renewals % SWEEP_EVERY == 1:      # the first renewal of a connection, then every 10th
                async with self._bulk_lock:
                    if self.bulk is None:
                        raise StoreUnavailable("store connection closed")
                    n = await leases.sweep(self.bulk, ts.mapping, self.cfg.host_id, [*here, *pending])
                if n:
                    log.warning("store: table=%s: released %d leases this host held for entities it does not "
                                "have (a claim whose answer was lost)", ts.name, n)
            if not gone:
                continue
            drop = {e: ep for e, ep in gone.items() if e not in pending}
            async with self._bulk_lock:
                if self.bulk is None:
                    raise StoreUnavailable("store connection closed")
                await leases.release_many(self.bulk, ts.mapping, self.cfg.host_id, drop)
            for e in drop:
                ts.epochs.pop(e, None)

    # ---- worker calls (through the daemon's control socket) -----------------------------------------
    def _table(self, name: str) -> TableStore:
        ts = self.tables.get(name)
        if ts is None:
            raise StoreError(f"table {name!r} is not stored (set store = true under [tables.{name}] with a "
                             f"[store] section); claim, flush and release need a stored table")
        return ts

    async def _fast_conn(self) -> pg.Driver:
        if not self.up or self.fast is None or self.fast.closed:
            self.next_try = min(self.next_try, self.clock())     # a worker is waiting: try now
            if not await self.ensure_connected():
                raise StoreUnavailable(f"the database is unavailable ({self.last_error or 'not connected'})")
        assert self.fast is not None
        return self.fast

    async def _bounded(self, what: str, coro):
        try:
            return await asyncio.wait_for(coro, timeout=self.cfg.timeout * 2)
        except TimeoutError:
            raise StoreUnavailable(f"{what} did not complete within {self.cfg.timeout * 2:.1f}s") from None

    async def claim(self, table: str, entity: int, owner: int) -> tuple[int, int]:
        """Take the lease, load the row (defaults when none) into a new slot owned by `owner`.
        Returns the handle (slot, generation)."""
        return await self._bounded("claim", self._claim(table, entity, owner))

    async def _claim(self, table: str, entity: int, owner: int) -> tuple[int, int]:
        ts = self._table(table)
        if not isinstance(entity, int) or not 0 <= entity < 1 << 64:
            raise StoreError(f"entity must be a u64, got {entity!r}")
        h = ts.alloc.lookup(entity)
        if h is not None:
            raise DuplicateEntity(f"table {table!r}: entity {entity} is already allocated on this host (slot "
                                  f"{h[0]}, owner #{ts.owner[h[0]]}); release it there first")
        try:
            async with self._fast_lock:
                drv = await self._fast_conn()
                epoch, row = await leases.claim(drv, ts.mapping, self.cfg.host_id, self.cfg.lease_ttl, entity)
        except StoreUnavailable as e:
            self._fail(e, "unavailable")
            raise
        try:
            data = ts.mapping.encode(row, ts.init) if row is not None else ts.init
            handle = ts.alloc.alloc(entity, owner, data)
        except (StatedError, ValueError) as e:
            try:                            # do not leave the entity locked to us
                async with self._fast_lock:
                    await leases.release(await self._fast_conn(), ts.mapping, self.cfg.host_id, entity, epoch)
            except StatedError:
                pass
            if isinstance(e, StatedError):
                raise
            raise StoreError(str(e)) from None
        slot = handle[0]
        ts.v.snap_pending[slot] = 1      # the next snapshot has it, the database already does
        ts.v.dirty[slot] = 0
        ts.store_pending[slot] = 0
        ts.pending_since.pop(slot, None)
        ts.shadow.pop(slot, None)
        ts.epochs[entity] = epoch
        ts.lost.discard(entity)
        return handle[0], handle[1]

    async def flush_handle(self, table: str, slot: int, gen: int) -> bool:
        """Write one record now; return once committed. True if a write was needed."""
        return await self._bounded("flush", self._flush_handle(table, slot, gen))

    async def _flush_handle(self, table: str, slot: int, gen: int) -> bool:
        ts = self._table(table)
        it, counter, need = await self._flush_prepare(ts, slot, gen)
        if need:
            await self._write_one(ts, it, counter)
        return need

    async def _flush_prepare(self, ts: TableStore, slot: int, gen: int) -> tuple[Item, int, bool]:
        """For flush and release: the handle checked, the slot's dirty mark harvested (that slot only: no
        scan of the table), a consistent copy and its version counter (taken right after the copy), the
        lease of an entity allocated here without a claim. Returns (copy, counter, whether the database
        lacks it)."""
        table = ts.name
        if not (isinstance(slot, int) and 0 <= slot < ts.capacity) or ts.gen[slot] != gen \
                or ts.state[slot] != fmt.SLOT_ALLOCATED:
            raise StatedError(f"table {table!r}: handle (slot {slot}, generation {gen}) is stale")
        harvest(ts.v, slot)
        it = None
        deadline = self.clock() + self.cfg.timeout
        while it is None:
            it = ts.copy(slot)
            if it is None:
                if self.clock() > deadline:
                    raise StatedError(f"table {table!r} slot {slot}: the record stayed mid-write; flush refused")
                await asyncio.sleep(0.001)
        counter = ts.next_version_base()
        if it.entity < 0:
            raise StoreError(f"table {table!r} slot {slot}: no entity; a stored record needs one")
        if it.entity not in ts.epochs and it.entity not in ts.lost:
            # allocated here with alloc(entity), never flushed yet (a new character bought something):
            # take its lease now, under the same rules as the write-behind (new entity, or ours last)
            try:
                async with self._fast_lock:
                    drv = await self._fast_conn()
                    ts.epochs.update(await leases.acquire(drv, ts.mapping, self.cfg.host_id, self.cfg.lease_ttl,
                                                          [it.entity]))
            except StoreUnavailable as e:
                self._fail(e, "unavailable")
                raise
        if it.entity in ts.lost or it.entity not in ts.epochs:
            raise OwnedElsewhere(f"table {table!r} entity {it.entity}: this host does not hold its lease (another "
                                 f"host holds it, or the entity exists in the database and was alloc()ed here "
                                 f"instead of claim()ed); the write is not saved")
        sh = ts.shadow.get(slot)
        need = bool(ts.store_pending[slot]) or (it.pinned and (sh is None or sh != (it.gen, it.data)))
        return it, counter, need

    async def _write_one(self, ts: TableStore, it: Item, counter: int, *, release: bool = False) -> None:
        """One record on the claim connection (flush, release): BEGIN, COPY, one statement that checks
        (or, for release, drops) the lease and upserts (schema.write_one_sql), COMMIT. Returns once
        committed; OwnedElsewhere when fenced."""
        m = ts.mapping
        entity, epoch = it[3], ts.epochs[it[3]]
        payload = m.copy_data([it], ts.epochs, counter)
        try:
            async with self._fast_lock:
                drv = await self._fast_conn()
                async with drv.transaction():
                    await drv.copy_binary(m.temp_name, m.copy_columns, payload)
                    row = (await drv.fetch(m.write_one_sql(release), m.name, self.cfg.host_id,
                                           sqlschema.entity_to_sql(entity), epoch))[0]
        except StoreUnavailable as e:
            self._fail(e, "unavailable")
            raise
        if not row["held"]:
            if ts.epochs.get(entity) == epoch:      # still believed ours: we lost it
                ts.epochs.pop(entity, None)
                ts.lost.add(entity)
                ts.stale += 1
                log.error("store: table=%s entity=%d slot=%d: write refused, this host no longer holds the lease at "
                          "epoch %d; this host's copy is stale and is no longer written", ts.name, entity, it[0], epoch)
            ts.drop(it)
            raise OwnedElsewhere(f"table {ts.name!r} entity {entity}: the write was refused; another host holds "
                                 f"the lease now")
        written = int(row["written"])
        ts.flushed += written
        ts.older += 1 - written                  # refused as not newer: the database has a newer copy already
        ts.settle_many([it])

    async def release(self, table: str, slot: int, gen: int, owner: int) -> None:
        """Flush, free the slot, drop the lease."""
        await self._bounded("release", self._release(table, slot, gen, owner))

    async def _release(self, table: str, slot: int, gen: int, owner: int) -> None:
        """The last write and the lease drop commit together (one statement), then the slot is freed
        here. Nothing to write: the lease drop alone, after the free (if it fails, the lease lapses after
        lease_ttl: the record is in the database already)."""
        ts = self._table(table)
        if isinstance(slot, int) and 0 <= slot < ts.capacity and ts.owner[slot] != owner:
            raise NotOwner(f"table {table!r}: slot {slot} belongs to owner #{ts.owner[slot]}, not #{owner}")
        it, counter, need = await self._flush_prepare(ts, slot, gen)
        entity, epoch = it.entity, ts.epochs[it.entity]
        if need:
            await self._write_one(ts, it, counter, release=True)
        ts.alloc.free((slot, gen), owner)
        ts.epochs.pop(entity, None)
        ts.shadow.pop(slot, None)
        if need:
            return
        try:
            async with self._fast_lock:
                await leases.release(await self._fast_conn(), ts.mapping, self.cfg.host_id, entity, epoch)
        except StoreUnavailable as e:
            # the slot is freed and its record is in the database; the lease just lapses after lease_ttl
            log.warning("store: table=%s entity=%d: lease not released (%s); it expires in %.0fs", table,
                        entity, e, self.cfg.lease_ttl)

    async def export(self, table: str, entity: int) -> dict | None:
        """The entity's row as JSON-able data (None when there is none)."""
        ts = self._table(table)
        async with self._fast_lock:
            drv = await self._fast_conn()
            rows = await drv.fetch(ts.mapping.select_sql(), sqlschema.entity_to_sql(entity))
        return ts.mapping.to_json(rows[0]) if rows else None

    # ---- shutdown and status -----------------------------------------------------------------------
    async def final_flush(self, timeout: float) -> int:
        """Flush what is pending within `timeout`. Returns how many records stayed unsaved (logged)."""
        self.reset_connections()       # the periodic pass may have been cancelled inside a transaction
        async def go() -> None:
            while True:
                r = await self.tick()
                if not self.up or not any(x.written or x.older for x in r.values()):
                    return
        try:
            await asyncio.wait_for(go(), timeout=timeout)
        except TimeoutError:
            pass
        unsaved = sum(len(ts.pending(self.clock())) for ts in self.tables.values())
        if unsaved:
            log.error("store: %d records not saved to the database at shutdown (they stay marked in shared memory "
                      "and are written by the next daemon)", unsaved)
        else:
            log.info("store: every record is saved")
        return unsaved

    def status(self) -> dict:
        now = self.clock()
        return {"up": self.up, "dsn": redact(self.cfg.dsn), "host_id": self.cfg.host_id, "schema": self.cfg.schema,
                "last_error": self.fatal or self.last_error, "errors": dict(self.errors),
                "tables": {name: {"dirty": ts.dirty_count(), "lag_seconds": ts.lag(now), "leases": len(ts.epochs),
                                  "lost": len(ts.lost), "flushed": ts.flushed, "stale": ts.stale}
                           for name, ts in self.tables.items()}}



async def setup_schema(drv: pg.Driver, schema: str, mappings: list[TableMapping], *, migrate: bool = False,
                       allow_lossy: bool = False) -> list[str]:
    """Create what is missing; check (or, with migrate, convert) tables whose layout changed. One
    transaction. Returns what was done, one line per action (for `stated store init`)."""
    from ...format.layout import compute
    done: list[str] = []
    async with drv.transaction():
        for stmt in sqlschema.common_sql(schema):
            await drv.execute(stmt)
        reg = {r["name"]: r for r in await drv.fetch(
            f"SELECT name, layout_hash, schema FROM {sqlschema.ident(schema)}.tables")}
        for m in mappings:
            row = reg.get(m.name)
            if row is None:
                for stmt in m.create_sql():
                    await drv.execute(stmt)
                done.append(f"table {m.qualified}: created (layout {m.layout_hex})")
            elif row["layout_hash"] != m.layout_hex:
                old = compute(sqlschema.layout_from_registry(row["schema"]))
                stmts, problems = sqlschema.migration_sql(m, old)
                if not migrate:
                    raise StoreSchemaMismatch(
                        f"table {m.name!r}: the database holds layout {row['layout_hash']} but the config says "
                        f"{m.layout_hex}; restart the daemon with --migrate to convert it")
                if problems and not allow_lossy:
                    raise StoreSchemaMismatch(
                        f"table {m.name!r}: database migration would lose data: {'; '.join(map(str, problems))}. "
                        f"Re-run with --allow-lossy to accept that")
                for stmt in stmts:
                    await drv.execute(stmt)
                log.warning("store: table=%s migrated in the database %s -> %s", m.name, row["layout_hash"],
                            m.layout_hex)
                done.append(f"table {m.qualified}: migrated {row['layout_hash']} -> {m.layout_hex}")
            else:
                done.append(f"table {m.qualified}: up to date (layout {m.layout_hex})")
            cols = {r["column_name"] for r in await drv.fetch(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2",
                schema, m.name)}
            missing = [c for c in m.copy_columns if c not in cols]
            if missing:
                raise StoreSchemaMismatch(
                    f"table {m.qualified}: columns {missing} are missing from the database table; it does not "
                    f"match the layout (restore them, or drop the table and let stated recreate it)")
    return done
