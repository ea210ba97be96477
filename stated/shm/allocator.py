"""The slot allocator: crash-consistent by intent mark + repair, under the table lock.

Contract
- Every mutation of allocator state (slot states, free stack, entity index, owner table) happens
  while holding the table lock (shm/lock.py).
- Before mutating, the holder writes an intent mark (op, slot, entity, owner, pid, the op's counter)
  into the allocator block and clears it when done. Whoever takes the lock and finds a mark left by
  a dead process repairs first: slot states are the truth, and the free stack, entity index, used
  count, owner slot counts (and the interrupted op's counter, exactly once) are rebuilt from them.
- Order inside alloc/free is chosen so that a crash at any point leaves the slot table meaning
  something: the generation is bumped *before* the state changes, so a (slot, generation) handle is
  valid iff the generations match.
- Shared memory is untrusted: values are bounds-checked before use as indexes; disagreement with the
  slot table (`Inconsistent`) makes the holder rebuild (counted in `rebuilds`) and retry once.
- Every u32/u64 stored wraps as C unsigned arithmetic does (`& U32`, `& U64`).

The narrow interface others use: alloc/free/lookup, the owner operations, repair/verify/audit,
counters()/set_counters()/used(), and `views` (the format's named views) for reading columns.
docs/format.md "Allocator protocol" is the same algorithm written for C implementers.
"""
from __future__ import annotations

import array
import logging
import os
import time
from collections import Counter
from itertools import compress
from typing import NamedTuple

from ..errors import (
    CorruptSegment,
    DuplicateEntity,
    NotOwner,
    OwnerBusy,
    OwnersExhausted,
    SlotOutOfRange,
    StaleHandle,
    TableFull,
)
from ..format import segment as fmt
from ..format.segment import (
    Q_INTENT_COUNT,
    Q_INTENT_COUNT2,
    Q_INTENT_ENTITY,
    U32,
    U64,
    W_FREE_TOP,
    W_INDEX_COUNT,
    W_INDEX_SEQ,
    W_INTENT_OP,
    W_INTENT_OWNER,
    W_INTENT_PID,
    W_INTENT_SLOT,
    W_USED,
    C,
    SegmentViews,
)
from ._compat import require_semtimedop
from .index import EntityIndex, Inconsistent
from .lock import TableLock
from .owners import Liveness, Owner, read_owners
from .segment import Segment, Trust

log = logging.getLogger("stated.allocator")

C_ALLOCS, C_FREES, C_REAPED, C_REBUILDS = C["allocations"], C["frees"], C["reaped_slots"], C["rebuilds"]
C_FULL, C_DUP = C["alloc_failures_full"], C["alloc_failures_duplicate"]
_FREE_SELECTOR = bytes([1] + [0] * 255)     # bytes.translate tables: slot state -> "is free",
_LOW_BIT = bytes(i & 1 for i in range(256))  # byte -> its bit 0 (entity flag, seq parity)
_new_handle = tuple.__new__                  # Handle(slot, gen) without NamedTuple's slower __new__
_SCRIBBLED = (Inconsistent, IndexError, ValueError, OverflowError)   # what scribbled shared state raises


class Handle(NamedTuple):
    """A reference to one allocated record: valid while the slot keeps this generation."""

    slot: int
    generation: int


class Allocator:
    """Allocation state of one attached table. Not thread-safe (one per thread)."""

    def __init__(self, seg: Segment, *, table: str, lock_timeout: float = 2.0,
                 liveness: Liveness | None = None, pid: int | None = None, trust: Trust | None = None):
        self.seg, self.table, self.key = seg, table, seg.key
        self.liveness = liveness or Liveness()
        self.pid = pid or os.getpid()
        self.capacity = seg.header.capacity
        self.views = v = SegmentViews(seg.buf, seg.header)
        self.index = EntityIndex(v)
        self.lock: TableLock | None = None
        self._lock_timeout = lock_timeout
        if not seg.readonly:
            require_semtimedop()        # lock waits must time out; read-only observers never wait
            self.lock = TableLock(v, key=self.key, table=table, timeout=lock_timeout, pid=self.pid,
                                  liveness=self.liveness, trust=trust)

    @property
    def lock_timeout(self) -> float:
        return self._lock_timeout

    @lock_timeout.setter
    def lock_timeout(self, seconds: float) -> None:     # the daemon's reload changes it
        self._lock_timeout = seconds
        if self.lock is not None:
            self.lock.timeout = seconds

    def release_views(self) -> None:
        self.views.release()

    # ---- the lock, with the allocator's settle/repair around it -------------------------------
    def acquire(self) -> None:
        """Take the table lock; if a previous holder left an intent mark, settle it first."""
        assert self.lock is not None, "read-only attaches do not lock"
        self.lock.acquire()
        try:
            if self.views.h32[W_INTENT_OP]:
                self._settle_intent()
        except BaseException:
            self.lock.release()
            raise

    def release(self) -> None:
        """Give the lock back. An op of ours that an exception interrupted is repaired first."""
        assert self.lock is not None
        h32 = self.views.h32
        try:
            if h32[W_INTENT_OP] and h32[W_INTENT_PID] == self.pid:
                self._rebuild("an operation was interrupted by an error")
        finally:
            self.lock.release()

    def reopen_semaphore(self) -> None:
        assert self.lock is not None
        self.lock.reopen()

    def _settle_intent(self) -> None:
        """An intent mark is set: wait for a live setter (semaphore was swapped), else repair."""
        h32 = self.views.h32
        ipid = h32[W_INTENT_PID]
        deadline = time.monotonic() + self._lock_timeout
        while h32[W_INTENT_OP] and ipid != self.pid and self.liveness.start_time(ipid) is not None \
                and time.monotonic() < deadline:
            time.sleep(0.0005)   # its setter is alive and mid-mutation under a removed semaphore
            ipid = h32[W_INTENT_PID]
        if h32[W_INTENT_OP]:
            log.warning("table=%s key=%#010x: repairing after pid %d died during op %d on slot %d",
                        self.table, self.key, ipid, h32[W_INTENT_OP], h32[W_INTENT_SLOT])
            self.repair()

    def intent_pending(self) -> bool:
        """An intent mark is set (a mutation is running, or its process died mid-way)."""
        return bool(self.views.h32[W_INTENT_OP])

    def _intent(self, op: int, slot: int, entity: int, owner: int) -> None:
        """The intent mark; `op` is written last (the mark is complete once it is non-zero)."""
        v = self.views
        v.h32[W_INTENT_SLOT] = slot
        v.h64[Q_INTENT_ENTITY] = entity & U64
        v.h32[W_INTENT_OWNER] = owner
        v.h32[W_INTENT_PID] = self.pid
        v.h64[Q_INTENT_COUNT] = v.counters[C_FREES] if op != fmt.INTENT_ALLOC else v.counters[C_ALLOCS]
        v.h64[Q_INTENT_COUNT2] = v.counters[C_REAPED]
        v.h32[W_INTENT_OP] = op

    def _rebuild(self, why: str) -> None:
        """Allocator state disagreed with the slot table (scribbled memory, or a bug): rebuild the
        derivable parts from slot states, count it and log it. Lock held."""
        self.views.bump("rebuilds")
        log.error("table=%s key=%#010x pid=%d: allocator state inconsistent (%s); rebuilt free stack, entity "
                  "index and counts from the slot table", self.table, self.key, self.pid, why)
        self.repair()

    # ---- alloc / free -------------------------------------------------------------------------
    def alloc(self, entity: int | None, owner: int, init: bytes | None) -> Handle:
        """Take a free slot for `owner`, fill its record with `init`, index `entity`.

        Raises TableFull, DuplicateEntity, LockTimeout; CorruptSegment only when the slot table
        still makes no sense after a rebuild.
        """
        if entity is not None and not 0 <= entity <= U64:
            raise ValueError(f"entity ids are u64; {entity} is out of range")
        self.acquire()
        try:
            try:
                return self._alloc_locked(entity, owner, init)
            except _SCRIBBLED as e:
                h32, v = self.views.h32, self.views
                ours = h32[W_INTENT_OP] == fmt.INTENT_ALLOC and h32[W_INTENT_PID] == self.pid
                slot = h32[W_INTENT_SLOT]
                self._rebuild(str(e) or type(e).__name__)
                if ours and slot < self.capacity and v.state[slot] == fmt.SLOT_ALLOCATED and v.owner[slot] == owner:
                    return Handle(slot, v.generation[slot])   # the rebuild completed our allocation
            try:
                return self._alloc_locked(entity, owner, init)
            except _SCRIBBLED as e:
                raise CorruptSegment(f"table {self.table!r} (key {self.key:#010x}): allocator state still "
                                     f"inconsistent after a rebuild ({e})") from None
        finally:
            self.release()

    def _alloc_locked(self, entity: int | None, owner: int, init: bytes | None) -> Handle:
        v = self.views
        h32, h64, counters, state = v.h32, v.h64, v.counters, v.state
        if entity is not None and self._find_checked(entity) >= 0:
            counters[C_DUP] = (counters[C_DUP] + 1) & U64
            raise DuplicateEntity(f"table {self.table!r}: entity {entity} already has a slot; "
                                  f"use lookup({entity}) to get its handle")
        top = h32[W_FREE_TOP]
        # free_top, and the slot it names, are shared memory: bounds-checked before use
        slot = v.free[top - 1] if 0 < top <= self.capacity else self.capacity
        if slot >= self.capacity or state[slot] != fmt.SLOT_FREE:
            top, slot = self._free_top_slow(top)
        # the intent mark, inlined (hot path): op is written last
        h32[W_INTENT_SLOT] = slot
        h64[Q_INTENT_ENTITY] = entity or 0
        h32[W_INTENT_OWNER] = owner
        h32[W_INTENT_PID] = self.pid
        h64[Q_INTENT_COUNT] = counters[C_ALLOCS]      # lets repair count this alloc exactly once
        h32[W_INTENT_OP] = fmt.INTENT_ALLOC
        h32[W_FREE_TOP] = top - 1
        gen = (v.generation[slot] + 1) & U32
        v.generation[slot] = gen                        # before the state: no stale handle matches
        if init is not None:
            rs = v.record_size
            v.records[slot * rs:(slot + 1) * rs] = init
        if entity is not None:
            v.entity[slot] = entity
            v.flags[slot] = fmt.FLAG_HAS_ENTITY
        else:
            v.entity[slot] = 0
            v.flags[slot] = 0
        v.owner[slot] = owner
        v.dirty[slot] = 1       # a new record must reach the next snapshot
        v.pinned[slot] = 0
        state[slot] = fmt.SLOT_ALLOCATED
        if entity is not None:
            self.index.insert(entity, slot)
        h32[W_USED] = (h32[W_USED] + 1) & U32
        if owner:
            v.owner_slots[owner - 1] = (v.owner_slots[owner - 1] + 1) & U32
        counters[C_ALLOCS] = (counters[C_ALLOCS] + 1) & U64
        h32[W_INTENT_OP] = 0
        return _new_handle(Handle, (slot, gen))

    def _free_top_slow(self, top: int) -> tuple[int, int]:
        """Top of the free stack when the fast check failed: full, or rebuild a stack that disagrees
        with the slot table (a scribbled free_top of 0 must not make an empty table "full")."""
        v = self.views
        n_free = v.state.tobytes().count(fmt.SLOT_FREE)
        if top or n_free:
            self._rebuild(f"free stack (top {top}) disagrees with the slot table ({n_free} free slots)")
            top = v.h32[W_FREE_TOP]
        if top == 0:
            v.counters[C_FULL] = (v.counters[C_FULL] + 1) & U64
            raise TableFull(f"table {self.table!r} is full: all {self.capacity} slots are allocated. "
                            f"Free some, or raise capacity in the config and migrate")
        slot = v.free[top - 1]
        if slot >= self.capacity or v.state[slot] != fmt.SLOT_FREE:
            raise CorruptSegment(f"table {self.table!r}: free stack still inconsistent after repair")
        return top, slot

    def free(self, h: Handle, owner: int, *, force: bool = False) -> None:
        slot, gen = h
        if not 0 <= slot < self.capacity:
            raise SlotOutOfRange(f"table {self.table!r}: slot {slot} is outside [0, {self.capacity})")
        v = self.views
        self.acquire()
        try:
            if v.generation[slot] != gen or v.state[slot] != fmt.SLOT_ALLOCATED:
                raise StaleHandle(f"table {self.table!r}: slot {slot} generation {gen} was already freed "
                                  f"(now generation {v.generation[slot]})")
            slot_owner = v.owner[slot]
            if slot_owner != owner and not force:
                raise NotOwner(f"table {self.table!r}: slot {slot} belongs to owner #{slot_owner}, not to this "
                               f"worker's owner #{owner}")
            try:
                self._free_locked(slot, fmt.INTENT_FREE)
            except _SCRIBBLED as e:
                # the slot state was set free before anything that can fail: the rebuild completes the free
                self._rebuild(str(e) or type(e).__name__)
        finally:
            self.release()

    def _free_locked(self, slot: int, op: int) -> None:
        v = self.views
        h32, h64, counters = v.h32, v.h64, v.counters
        entity, slot_owner = v.entity[slot], v.owner[slot]
        h32[W_INTENT_SLOT] = slot               # the intent mark, inlined (hot path): op is written last
        h64[Q_INTENT_ENTITY] = entity
        h32[W_INTENT_OWNER] = slot_owner
        h32[W_INTENT_PID] = self.pid
        h64[Q_INTENT_COUNT] = counters[C_FREES]      # lets repair count this free exactly once
        h64[Q_INTENT_COUNT2] = counters[C_REAPED]
        h32[W_INTENT_OP] = op
        v.generation[slot] = (v.generation[slot] + 1) & U32
        v.state[slot] = fmt.SLOT_FREE
        v.dirty[slot] = 1           # the next delta records the free
        v.pinned[slot] = 0
        if v.seq[slot] & 1:         # a writer died (or is, freeing from inside its own section) mid-write
            v.seq[slot] = (v.seq[slot] + 1) & U32
        if v.flags[slot] & fmt.FLAG_HAS_ENTITY:
            self.index.delete(entity)
        v.flags[slot] = 0
        v.owner[slot] = 0
        top = h32[W_FREE_TOP]
        if top >= self.capacity:
            raise Inconsistent(f"free stack top {top} with slot {slot} still allocated")
        v.free[top] = slot
        h32[W_FREE_TOP] = top + 1
        h32[W_USED] = (h32[W_USED] - 1) & U32
        if 0 < slot_owner <= fmt.OWNERS_CAPACITY and v.owner_slots[slot_owner - 1]:
            v.owner_slots[slot_owner - 1] -= 1
        counters[C_FREES] = (counters[C_FREES] + 1) & U64
        if op == fmt.INTENT_REAP:
            counters[C_REAPED] = (counters[C_REAPED] + 1) & U64
        h32[W_INTENT_OP] = 0

    # ---- lookup ---------------------------------------------------------------------------------
    def _find_checked(self, entity: int) -> int:
        """Index lookup under the lock, checked against the slot table; an entry that names a free
        slot, a slot out of range or another entity is scribbled: rebuild and look again."""
        slot = self.index.find(entity)
        if slot < 0:
            return -1
        v = self.views
        if slot < self.capacity and v.state[slot] == fmt.SLOT_ALLOCATED \
                and v.flags[slot] & fmt.FLAG_HAS_ENTITY and v.entity[slot] == entity:
            return slot
        self._rebuild(f"index entry for entity {entity} names slot {slot}, which does not hold it")
        return self.index.find(entity)

    def lookup(self, entity: int) -> Handle | None:
        """Handle of the slot holding `entity`, without the lock unless the index is changing."""
        if not 0 <= entity <= U64:
            return None
        v = self.views
        h32, state, generation, ent_col, find = v.h32, v.state, v.generation, v.entity, self.index.find
        # writers fall back to the lock after a few tries; read-only observers cannot lock, so they keep
        # trying (bounded by lock_timeout) rather than answer None while the index is changing
        tries = 8 if self.lock is not None else 1 << 62
        deadline = None
        for i in range(tries):
            if i and i % 64 == 0:
                now = time.monotonic()
                deadline = deadline or now + self._lock_timeout
                if now > deadline:
                    raise self.lock.timed_out() if self.lock else CorruptSegment(
                        f"table {self.table!r}: the entity index kept changing for {self._lock_timeout}s")
                time.sleep(0)
            seq = h32[W_INDEX_SEQ]
            if seq & 1:
                continue
            slot = find(entity)
            if slot >= self.capacity:
                slot = -2           # scribbled entry: let the locked path sort it out
            gen = generation[slot] if slot >= 0 else 0
            if h32[W_INDEX_SEQ] != seq:
                continue
            if slot == -1:
                return None
            if slot >= 0 and state[slot] == fmt.SLOT_ALLOCATED and ent_col[slot] == entity:
                return _new_handle(Handle, (slot, gen))
            if self.lock is None and i >= 8:
                return None         # an observer cannot repair; the index disagrees with the slots
        self.acquire()
        try:
            slot = self._find_checked(entity)
            return None if slot < 0 else Handle(slot, generation[slot])
        finally:
            self.release()

    # ---- owners ---------------------------------------------------------------------------------
    def owners(self) -> list[Owner]:
        return read_owners(self.seg.buf, self.seg.header.regions.owners_offset)

    def claim_owner(self, name: str) -> int:
        """Attach as owner `name` (taking over a dead holder's slots). Returns the owner index."""
        raw = name.encode("utf-8")
        if not raw or len(raw) > 32:
            raise ValueError(f"owner names are 1 to 32 bytes of UTF-8, got {name!r}")
        pid, start = self.liveness.me()
        self.acquire()
        try:
            entries = self.owners()
            mine = next((o for o in entries if o.name == name), None)
            if mine is not None:
                if (mine.state == fmt.OWNER_ATTACHED and mine.pid != pid
                        and self.liveness.alive(mine.pid, mine.start_time)):
                    raise OwnerBusy(f"table {self.table!r}: owner {name!r} is held by live pid {mine.pid}; "
                                    f"stop that worker first, or use another owner name")
                idx = mine.index
                if mine.pid != pid and mine.slots:
                    self.views.bump("owner_takeovers")
                    log.info("table=%s owner=%s: pid %d takes over %d slots from pid %d",
                             self.table, name, pid, mine.slots, mine.pid)
            else:
                used = {o.index for o in entries}
                free_idx = [i for i in range(1, fmt.OWNERS_CAPACITY + 1) if i not in used]
                if not free_idx:   # reuse a gone owner that holds nothing
                    free_idx = [o.index for o in entries if o.slots == 0 and
                                not (o.state == fmt.OWNER_ATTACHED and self.liveness.alive(o.pid, o.start_time))]
                if not free_idx:
                    raise OwnersExhausted(
                        f"table {self.table!r}: all {fmt.OWNERS_CAPACITY} owner names are taken by owners that "
                        f"still hold slots, so owner {name!r} cannot attach. Reuse a retired worker's name, or "
                        f"release a dead owner's slots: `stated reap --owner NAME` (after the daemon saves them), "
                        f"or set dead_owner = \"release\" for this table")
                idx = free_idx[0]
            self._intent(fmt.INTENT_OWNER, 0, 0, idx)
            off = self.seg.header.regions.owners_offset + (idx - 1) * fmt.OWNER_SIZE
            fmt.OWNER.pack_into(self.seg.buf, off, raw, pid, fmt.OWNER_ATTACHED, start,
                                mine.slots if mine else 0, 0, int(time.time() * 1000))
            self._settle_owner_slots(idx)
            self.views.bump("attaches")
            self.views.h32[W_INTENT_OP] = 0
            return idx
        finally:
            self.release()

    def _settle_owner_slots(self, idx: int) -> None:
        """Writers that died mid-section leave an odd seq: settle it (the record stays as written)."""
        v = self.views
        for slot in self.slots_of(idx):
            if v.seq[slot] & 1:
                v.seq[slot] = (v.seq[slot] + 1) & U32
                v.dirty[slot] = 1   # the settled record reaches the next save
                v.bump("settled_slots")
                log.warning("table=%s slot=%d: writer died mid-write; record settled as last written",
                            self.table, slot)

    def set_owner_state(self, idx: int, state: int, *, only_pid: int | None = None) -> bool:
        """Mark an owner detached/dead (its slots stay). With `only_pid`, only if that pid still holds it."""
        v = self.views
        self.acquire()
        try:
            if only_pid is not None and (v.owner_pid[idx - 1] != only_pid
                                         or v.owner_state[idx - 1] != fmt.OWNER_ATTACHED):
                return False
            v.owner_state[idx - 1] = state
            v.owner_since_ms[idx - 1] = int(time.time() * 1000)
            return True
        finally:
            self.release()

    def slots_of(self, owner: int) -> list[int]:
        """Allocated slots whose owner index is `owner` (an O(capacity) scan)."""
        v = self.views
        return [i for i, (st, ow) in enumerate(zip(v.state, v.owner)) if ow == owner and st == fmt.SLOT_ALLOCATED]

    def allocated_slots(self) -> list[int]:
        """Every allocated slot (an O(capacity) scan)."""
        return [i for i, st in enumerate(self.views.state.tobytes()) if st == fmt.SLOT_ALLOCATED]

    def reap_owner(self, idx: int) -> int:
        """Free every slot of owner `idx` unless it re-attached meanwhile. Returns how many."""
        self.acquire()
        try:
            if self.views.owner_state[idx - 1] == fmt.OWNER_ATTACHED:
                return 0            # it came back between the caller's check and now
            n = 0
            for slot in self.slots_of(idx):
                self._free_locked(slot, fmt.INTENT_REAP)     # counts frees and reaped_slots itself
                n += 1
            return n
        finally:
            self.release()

    # ---- repair and verification ----------------------------------------------------------------
    def repair(self) -> None:
        """Rebuild free stack, index, used count and owner counts from slot states. Lock held."""
        v = self.views
        h32, h64, counters = v.h32, v.h64, v.counters
        op, islot = h32[W_INTENT_OP], h32[W_INTENT_SLOT]
        if islot < self.capacity:     # count the interrupted op exactly once, whether or not it took effect
            st = v.state[islot]
            if op == fmt.INTENT_ALLOC:
                counters[C_ALLOCS] = (h64[Q_INTENT_COUNT] + (st == fmt.SLOT_ALLOCATED)) & U64
            elif op in (fmt.INTENT_FREE, fmt.INTENT_REAP):
                counters[C_FREES] = (h64[Q_INTENT_COUNT] + (st == fmt.SLOT_FREE)) & U64
                if op == fmt.INTENT_REAP:
                    counters[C_REAPED] = (h64[Q_INTENT_COUNT2] + (st == fmt.SLOT_FREE)) & U64
        h32[W_INTENT_OP] = fmt.INTENT_REPAIR
        h32[W_INDEX_SEQ] |= 1
        cap = self.capacity
        states = v.state.tobytes()
        owner_counts = [0] * (fmt.OWNERS_CAPACITY + 1)
        free_slots = []
        self.index.clear()
        for slot in range(cap - 1, -1, -1):
            st = states[slot]
            if st == fmt.SLOT_ALLOCATED:
                ow = v.owner[slot]
                if ow > fmt.OWNERS_CAPACITY:
                    v.owner[slot] = ow = 0
                owner_counts[ow] += 1
                if v.flags[slot] & fmt.FLAG_HAS_ENTITY:
                    ent = v.entity[slot]
                    if self.index.find(ent) >= 0:      # two slots claim one entity: keep the first
                        v.flags[slot] = 0
                        continue
                    self.index.insert(ent, slot, publish=False)   # fits: the index has 2x capacity entries
            else:
                if st != fmt.SLOT_FREE:
                    v.state[slot] = fmt.SLOT_FREE
                if v.seq[slot] & 1:     # freed inside a write section: nobody writes it now
                    v.seq[slot] = (v.seq[slot] + 1) & U32
                free_slots.append(slot)
        n = len(free_slots)             # free stack: lowest slot on top
        v.free[0:n] = array.array("I", free_slots)
        h32[W_FREE_TOP] = n
        h32[W_USED] = cap - n
        if (counters[C_ALLOCS] - counters[C_FREES]) & U64 != cap - n:   # scribbled counters: fix allocations
            counters[C_ALLOCS] = (counters[C_FREES] + cap - n) & U64
        for idx in range(1, fmt.OWNERS_CAPACITY + 1):
            v.owner_slots[idx - 1] = owner_counts[idx]
        v.bump("lock_repairs")
        h32[W_INDEX_SEQ] = (h32[W_INDEX_SEQ] + 1) & U32
        h32[W_INTENT_OP] = 0

    def audit(self) -> list[str]:
        """The daemon's periodic check: find disagreement between the derivable allocator state and
        the slot table, and rebuild it. Returns the problems found (empty: consistent).

        The checks run at C speed (bytes counts over strided columns), first without the lock, so
        a healthy table costs its workers nothing; only when something looks wrong is the lock
        taken, the check repeated (a mutation in flight is not damage) and the state rebuilt.
        Raises CorruptSegment when the rebuilt table still fails verify().
        """
        if not self._quick_check():
            return []
        self.acquire()
        try:
            problems = self._quick_check()
            if problems:
                self._rebuild("; ".join(problems))
                left = self.verify()
                if left:
                    raise CorruptSegment(f"table {self.table!r} (key {self.key:#010x}): still inconsistent "
                                         f"after a rebuild: {'; '.join(left)}")
            return problems
        finally:
            self.release()

    def _quick_check(self) -> list[str]:
        """Counts of slot states, the free stack top, used, index occupancy, owner slot counts,
        counters and odd seqs of free slots, against the slot table: O(capacity) in C loops."""
        v, cap = self.views, self.capacity
        h32 = v.h32
        states = v.state.tobytes()
        n_free, n_alloc = states.count(fmt.SLOT_FREE), states.count(fmt.SLOT_ALLOCATED)
        problems = []
        if n_free + n_alloc != cap:
            problems.append(f"{cap - n_free - n_alloc} slots with an invalid state")
        if h32[W_FREE_TOP] != n_free:
            problems.append(f"free stack top {h32[W_FREE_TOP]} != {n_free} free slots")
        if h32[W_USED] != n_alloc:
            problems.append(f"used {h32[W_USED]} != {n_alloc} allocated slots")
        allocated = [st == fmt.SLOT_ALLOCATED for st in states] if n_free + n_alloc != cap else states
        n_ent = bytes(compress(v.flags.tobytes(), allocated)).translate(_LOW_BIT).count(1)
        n_indexed = self.index.occupied()
        if n_indexed != n_ent or h32[W_INDEX_COUNT] != n_ent:
            problems.append(f"entity index holds {n_indexed} entries (count word {h32[W_INDEX_COUNT]}) for "
                            f"{n_ent} entities")
        per_owner = Counter(compress(v.owner.tolist(), allocated))
        for idx in range(1, fmt.OWNERS_CAPACITY + 1):
            if v.owner_slots[idx - 1] != per_owner.get(idx, 0):
                problems.append(f"owner #{idx} slot count {v.owner_slots[idx - 1]} != {per_owner.get(idx, 0)}")
                break
        if (v.counters[C_ALLOCS] - v.counters[C_FREES]) & U64 != n_alloc:
            problems.append("counters: allocations - frees != allocated slots")
        if bytes(compress(v.seq_low.tobytes(), states.translate(_FREE_SELECTOR))).translate(_LOW_BIT).count(1):
            problems.append("a free slot is left inside a write section (odd seq)")
        return problems

    def verify(self) -> list[str]:
        """Check every invariant; returns problems found (empty when consistent). Lock held by caller."""
        v, cap = self.views, self.capacity
        problems = []
        states = v.state.tolist()
        top = v.h32[W_FREE_TOP]
        allocated = [i for i, s in enumerate(states) if s == fmt.SLOT_ALLOCATED]
        bad = [i for i, s in enumerate(states) if s not in (fmt.SLOT_FREE, fmt.SLOT_ALLOCATED)]
        if bad:
            problems.append(f"slots with invalid state: {bad[:10]}")
        stack = v.free[:top].tolist() if top <= cap else []
        if top > cap:
            problems.append(f"free stack top {top} > capacity {cap}")
        if len(set(stack)) != len(stack):
            problems.append("free stack holds a slot twice")
        for s in stack:
            if s >= cap or states[s] != fmt.SLOT_FREE:
                problems.append(f"free stack holds slot {s} which is not free")
                break
        if len(set(stack)) + len(allocated) != cap:
            problems.append(f"free {len(set(stack))} + allocated {len(allocated)} != capacity {cap}")
        if v.h32[W_USED] != len(allocated):
            problems.append(f"used counter {v.h32[W_USED]} != allocated {len(allocated)}")
        entities: dict[int, int] = {}
        for s in allocated:
            if v.flags[s] & fmt.FLAG_HAS_ENTITY:
                if v.entity[s] in entities:
                    problems.append(f"entity {v.entity[s]} held by slots {entities[v.entity[s]]} and {s}")
                entities[v.entity[s]] = s
        indexed = self.index.entries()
        if indexed != entities:
            problems.append(f"entity index ({len(indexed)} entries) disagrees with slot table "
                            f"({len(entities)} entities)")
        for ent, s in entities.items():
            if self.index.find(ent) != s:
                problems.append(f"entity {ent} not reachable by probing")
                break
        if v.h32[W_INTENT_OP]:
            problems.append(f"intent mark {v.h32[W_INTENT_OP]} left set")
        odd = [i for i, (st, seq) in enumerate(zip(states, v.seq.tolist())) if st == fmt.SLOT_FREE and seq & 1]
        if odd:
            problems.append(f"free slots left inside a write section (odd seq): {odd[:10]}")
        counts = [0] * (fmt.OWNERS_CAPACITY + 1)
        for s in allocated:
            counts[v.owner[s] if v.owner[s] <= fmt.OWNERS_CAPACITY else 0] += 1
        wrong = [i for i in range(1, fmt.OWNERS_CAPACITY + 1) if v.owner_slots[i - 1] != counts[i]]
        if wrong:
            problems.append(f"owner slot counts disagree with the slot table for owners {wrong[:10]}")
        allocs, frees = v.counters[C_ALLOCS], v.counters[C_FREES]
        if (allocs - frees) & U64 != len(allocated):
            problems.append(f"counters: allocations {allocs} - frees {frees} != allocated {len(allocated)}")
        return problems

    # ---- numbers --------------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        return dict(zip(fmt.COUNTERS, self.views.counters.tolist()))

    def set_counters(self, values: dict[str, int]) -> None:
        """Restore saved counters (names this format knows, values in range; others ignored)."""
        for name, value in values.items():
            if name in C and isinstance(value, int) and 0 <= value <= U64:
                self.views.counters[C[name]] = value

    def used(self) -> int:
        return self.views.h32[W_USED]
