"""The slot allocator: one SysV semaphore per table, crash-consistent by intent + repair.

Contract
- Every mutation of allocator state (slot states, free stack, entity index,
  owner table) happens while holding the table's semaphore, taken with
  SEM_UNDO so the kernel gives it back when the holder dies, and with a
  timeout (semtimedop) so nobody waits forever.
- Before mutating, the holder writes an intent mark (op, slot, entity, owner,
  pid) into the allocator block and clears it when done. Whoever takes the
  lock and finds a mark left behind repairs first: slot states are the truth,
  and the free stack, entity index, used count and owner slot counts are
  rebuilt from them.
- Order inside alloc/free is chosen so that a crash at any point leaves the
  slot table meaning something: the generation is bumped *before* the state
  changes, so a (slot, generation) handle is valid iff the generations match.
- The entity index is an open-addressing hash table (linear probing, backward
  shift deletion) guarded by its own sequence word, so `lookup` runs without
  the lock and falls back to it only under contention.
"""
from __future__ import annotations

import logging
import os
import time
from typing import NamedTuple

import sysv_ipc

from . import format as fmt
from .errors import (CorruptSegment, DuplicateEntity, LockTimeout, NotOwner, OwnerBusy, SegmentNotFound, SlotOutOfRange,
                     StaleHandle, StatedError, TableFull)
from .owners import Liveness, Owner, read_owners
from .segment import Segment, open_semaphore

if not sysv_ipc.SEMAPHORE_TIMEOUT_SUPPORTED:
    raise ImportError(
        "sysv_ipc was installed from a prebuilt wheel without semtimedop, so lock waits cannot time out. "
        "Fix: pip install --force-reinstall --no-binary sysv_ipc sysv_ipc")

log = logging.getLogger("stated.allocator")

M64 = (1 << 64) - 1
# word indexes into the header viewed as u32 / u64
_TOP, _USED, _OP, _ISLOT = fmt.A_FREE_TOP // 4, fmt.A_USED // 4, fmt.A_INTENT_OP // 4, fmt.A_INTENT_SLOT // 4
_IENT, _IOWN, _IPID = fmt.A_INTENT_ENTITY // 8, fmt.A_INTENT_OWNER // 4, fmt.A_INTENT_PID // 4
_ISEQ, _HOLDER, _ICOUNT = fmt.A_INDEX_SEQ // 4, fmt.A_HOLDER_PID // 4, fmt.A_INDEX_COUNT // 4
_C = {name: off // 8 for name, off in fmt.COUNTER_OFF.items()}
_C_ALLOCS, _C_FREES, _C_REAPED = _C["allocations"], _C["frees"], _C["reaped_slots"]
_ICOUNT1, _ICOUNT2 = fmt.A_INTENT_COUNT // 8, fmt.A_INTENT_COUNT2 // 8
_new_handle = tuple.__new__      # Handle(slot, gen) without NamedTuple's slower __new__


class Handle(NamedTuple):
    """A reference to one allocated record: valid while the slot keeps this generation."""

    slot: int
    generation: int


class Allocator:
    """Allocation state of one attached table. Not thread-safe (one per thread)."""

    def __init__(self, seg: Segment, *, table: str, lock_timeout: float = 2.0,
                 liveness: Liveness | None = None, pid: int | None = None):
        self.seg, self.table, self.key = seg, table, seg.key
        self.lock_timeout = lock_timeout
        self.liveness = liveness or Liveness()
        self.pid = pid or os.getpid()
        h = seg.header
        r = h.regions
        self.capacity = cap = h.capacity
        self.owner_index = 0
        buf = seg.buf
        self._h32 = buf[0:fmt.SCHEMA_OFFSET].cast("I")
        self._h64 = buf[0:fmt.SCHEMA_OFFSET].cast("Q")
        slots = buf[r.slots_offset:r.slots_offset + cap * fmt.SLOT_SIZE]
        self._slots = slots
        self._s32 = slots.cast("I")     # seq = [8i], generation = [8i+1]
        self._s64 = slots.cast("Q")     # entity = [4i+1]
        self._s16 = slots.cast("H")     # owner = [16i+8]
        self._s8 = slots.cast("B")      # state = [32i+18], flags +19, dirty +20, pinned +21
        self._free = buf[r.free_offset:r.free_offset + 4 * cap].cast("I")
        self._imask = r.index_capacity - 1
        self._ishift = 64 - (r.index_capacity.bit_length() - 1)
        index = buf[r.index_offset:r.index_offset + r.index_capacity * fmt.INDEX_ENTRY_SIZE]
        self._index = index
        self._i64 = index.cast("Q")     # entity = [2e]
        self._i32 = index.cast("I")     # slot + 1 = [4e+2]; 0 = empty
        self._owners_off = r.owners_offset
        self._o32 = buf[r.owners_offset:r.owners_offset + fmt.OWNERS_CAPACITY * fmt.OWNER_SIZE].cast("I")
        self._sem = None if seg.readonly else open_semaphore(self.key)

    def release_views(self) -> None:
        for v in (self._h32, self._h64, self._s32, self._s64, self._s16, self._s8, self._free, self._i64,
                  self._i32, self._o32, self._slots, self._index):
            v.release()

    # ---- the lock -------------------------------------------------------------------
    def acquire(self) -> None:
        """Take the table lock (bounded wait), repairing if a dead holder left an intent."""
        try:
            self._sem.acquire(self.lock_timeout)
        except sysv_ipc.Error as e:
            self._acquire_failed(e)
        self._h32[_HOLDER] = self.pid
        if self._h32[_OP]:
            self._settle_intent()

    def _acquire_failed(self, e: Exception) -> None:
        """Slow path of acquire: a timeout becomes LockTimeout; a removed semaphore is reopened;
        a wait interrupted by a signal (EINTR: "Signaled while waiting") is simply retried."""
        if not isinstance(e, (sysv_ipc.BusyError, sysv_ipc.ExistentialError)):
            try:
                self._sem.acquire(self.lock_timeout)
            except sysv_ipc.Error as e2:
                self._acquire_failed(e2)
            return
        if isinstance(e, sysv_ipc.BusyError):
            self._h64[_C["lock_timeouts"]] += 1    # racy by nature: we do not hold the lock
            holder = self._h32[_HOLDER]
            raise LockTimeout(f"table {self.table!r} (key {self.key:#010x}): allocator lock not obtained "
                              f"within {self.lock_timeout}s; last holder pid {holder}. If that process is "
                              f"stuck, stop it; a dead holder releases the lock automatically") from None
        self._reopen_semaphore()
        try:
            self._sem.acquire(self.lock_timeout)
        except sysv_ipc.Error as e2:
            self._acquire_failed(e2)

    def release(self) -> None:
        self._h32[_HOLDER] = 0
        try:
            self._sem.release()
        except sysv_ipc.ExistentialError:
            pass   # removed from under us; the daemon recreates it and repairs

    def _reopen_semaphore(self) -> None:
        """The semaphore was removed (ipcrm, systemd RemoveIPC): wait for the daemon to recreate it."""
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                self._sem = open_semaphore(self.key)
                log.warning("table=%s key=%#010x pid=%d: semaphore was removed; reopened the new one",
                            self.table, self.key, self.pid)
                return
            except SegmentNotFound:
                if time.monotonic() > deadline:
                    raise LockTimeout(f"table {self.table!r} (key {self.key:#010x}): its semaphore was "
                                      f"removed and not recreated within {self.lock_timeout}s; is the daemon "
                                      f"running?") from None
                time.sleep(0.01)

    def _settle_intent(self) -> None:
        """An intent mark is set: wait for a live setter (semaphore was swapped), else repair."""
        ipid = self._h32[_IPID]
        deadline = time.monotonic() + self.lock_timeout
        while self._h32[_OP] and ipid != self.pid and self.liveness.start_time(ipid) is not None \
                and time.monotonic() < deadline:
            time.sleep(0.0005)   # its setter is alive and mid-mutation under a removed semaphore
            ipid = self._h32[_IPID]
        if self._h32[_OP]:
            op = self._h32[_OP]
            log.warning("table=%s key=%#010x: repairing after pid %d died during op %d on slot %d",
                        self.table, self.key, ipid, op, self._h32[_ISLOT])
            self.repair()

    def intent_pending(self) -> bool:
        """An intent mark is set (a mutation is running, or its process died mid-way)."""
        return bool(self._h32[_OP])

    def _intent(self, op: int, slot: int, entity: int, owner: int) -> None:
        h32 = self._h32
        h32[_ISLOT] = slot
        self._h64[_IENT] = entity & M64
        h32[_IOWN] = owner
        h32[_IPID] = self.pid
        h64 = self._h64
        h64[_ICOUNT1] = h64[_C_FREES]       # lets repair count this free exactly once
        h64[_ICOUNT2] = h64[_C_REAPED]
        h32[_OP] = op            # written last: the mark is complete once op is non-zero

    # ---- alloc / free -----------------------------------------------------------------
    def alloc(self, entity: int | None, owner: int, init: bytes | None, records, rec_off: int,
              rec_size: int) -> Handle:
        """Take a free slot for `owner`, fill its record with `init`, index `entity`."""
        h32, s32, s8 = self._h32, self._s32, self._s8
        sem = self._sem
        try:                                    # acquire(), inlined: this is the hot path
            sem.acquire(self.lock_timeout)
        except sysv_ipc.Error as e:
            self._acquire_failed(e)
            sem = self._sem
        h32[_HOLDER] = self.pid
        if h32[_OP]:
            self._settle_intent()
        try:
            if entity is not None:
                if self._find(entity) >= 0:
                    self._h64[_C["alloc_failures_duplicate"]] += 1
                    raise DuplicateEntity(f"table {self.table!r}: entity {entity} already has a slot; "
                                          f"use lookup({entity}) to get its handle")
                if not 0 <= entity <= M64:
                    raise ValueError(f"entity ids are u64; {entity} is out of range")
            top = h32[_TOP]
            slot = self._free[top - 1] if top else 0
            if not top or slot >= self.capacity or s8[32 * slot + 18] != fmt.SLOT_FREE:
                top, slot = self._free_top_slow(top)
            # the intent mark, inlined (hot path): op is written last
            h32[_ISLOT] = slot
            self._h64[_IENT] = entity or 0
            h32[_IOWN] = owner
            h32[_IPID] = self.pid
            self._h64[_ICOUNT1] = self._h64[_C_ALLOCS]    # lets repair count this alloc exactly once
            h32[_OP] = fmt.INTENT_ALLOC
            h32[_TOP] = top - 1
            gen = (s32[8 * slot + 1] + 1) & 0xFFFFFFFF
            s32[8 * slot + 1] = gen
            if init is not None:
                base = rec_off + slot * rec_size
                records[base:base + rec_size] = init
            b = 32 * slot
            if entity is not None:
                self._s64[4 * slot + 1] = entity
                s8[b + 19] = fmt.FLAG_HAS_ENTITY
            else:
                self._s64[4 * slot + 1] = 0
                s8[b + 19] = 0
            self._s16[16 * slot + 8] = owner
            s8[b + 20] = 1      # dirty: a new record must reach the next snapshot
            s8[b + 21] = 0
            s8[b + 18] = fmt.SLOT_ALLOCATED
            if entity is not None:
                self._index_insert(entity, slot)
            h32[_USED] += 1
            if owner:
                self._o32[(owner - 1) * 16 + 12] += 1
            self._h64[_C_ALLOCS] += 1
            h32[_OP] = 0
            return _new_handle(Handle, (slot, gen))
        finally:
            h32[_HOLDER] = 0                    # release(), inlined
            try:
                sem.release()
            except sysv_ipc.ExistentialError:
                pass

    def _free_top_slow(self, top: int) -> tuple[int, int]:
        """Top of the free stack when the fast check failed: full, or repair a stack that disagrees."""
        if top:
            self.repair()               # free stack disagrees with the slot table: rebuild it
            top = self._h32[_TOP]
        if top == 0:
            self._h64[_C["alloc_failures_full"]] += 1
            raise TableFull(f"table {self.table!r} is full: all {self.capacity} slots are allocated. "
                            f"Free some, or raise capacity in the config and migrate")
        slot = self._free[top - 1]
        if slot >= self.capacity or self._s8[32 * slot + 18] != fmt.SLOT_FREE:
            raise CorruptSegment(f"table {self.table!r}: free stack still inconsistent after repair")
        return top, slot

    def free(self, h: Handle, owner: int, *, force: bool = False) -> None:
        slot, gen = h
        if not 0 <= slot < self.capacity:
            raise SlotOutOfRange(f"table {self.table!r}: slot {slot} is outside [0, {self.capacity})")
        s8, h32, sem = self._s8, self._h32, self._sem
        try:                                    # acquire(), inlined: this is the hot path
            sem.acquire(self.lock_timeout)
        except sysv_ipc.Error as e:
            self._acquire_failed(e)
            sem = self._sem
        h32[_HOLDER] = self.pid
        if h32[_OP]:
            self._settle_intent()
        try:
            b = 32 * slot
            if self._s32[8 * slot + 1] != gen or s8[b + 18] != fmt.SLOT_ALLOCATED:
                raise StaleHandle(f"table {self.table!r}: slot {slot} generation {gen} was already freed "
                                  f"(now generation {self._s32[8 * slot + 1]})")
            slot_owner = self._s16[16 * slot + 8]
            if slot_owner != owner and not force:
                raise NotOwner(f"table {self.table!r}: slot {slot} belongs to owner #{slot_owner}, not to this "
                               f"worker's owner #{owner}")
            self._free_locked(slot, fmt.INTENT_FREE)
        finally:
            h32[_HOLDER] = 0                    # release(), inlined
            try:
                sem.release()
            except sysv_ipc.ExistentialError:
                pass

    def _free_locked(self, slot: int, op: int) -> None:
        s8, h32 = self._s8, self._h32
        b = 32 * slot
        entity = self._s64[4 * slot + 1]
        slot_owner = self._s16[16 * slot + 8]
        h32[_ISLOT] = slot              # the intent mark, inlined (hot path): op is written last
        self._h64[_IENT] = entity
        h32[_IOWN] = slot_owner
        h32[_IPID] = self.pid
        h64 = self._h64
        h64[_ICOUNT1] = h64[_C_FREES]       # lets repair count this free exactly once
        h64[_ICOUNT2] = h64[_C_REAPED]
        h32[_OP] = op
        self._s32[8 * slot + 1] = (self._s32[8 * slot + 1] + 1) & 0xFFFFFFFF
        s8[b + 18] = fmt.SLOT_FREE
        s8[b + 20] = 1          # dirty: the next delta records the free
        s8[b + 21] = 0
        if self._s32[8 * slot] & 1:
            self._s32[8 * slot] += 1   # a writer died mid-section; the slot is gone anyway
        if s8[b + 19] & fmt.FLAG_HAS_ENTITY:
            self._index_delete(entity)
        s8[b + 19] = 0
        self._s16[16 * slot + 8] = 0
        top = self._h32[_TOP]
        self._free[top] = slot
        self._h32[_TOP] = top + 1
        self._h32[_USED] -= 1
        if slot_owner:
            o = (slot_owner - 1) * 16 + 12
            if self._o32[o]:
                self._o32[o] -= 1
        h64[_C_FREES] += 1
        if op == fmt.INTENT_REAP:
            h64[_C_REAPED] += 1
        self._h32[_OP] = 0

    # ---- entity index -------------------------------------------------------------------
    def _home(self, entity: int) -> int:
        return ((entity * fmt.HASH_MUL) & M64) >> self._ishift

    def _find(self, entity: int) -> int:
        """Slot of `entity` per the index, or -1. Caller holds the lock or checks the index seq."""
        i64, i32, mask = self._i64, self._i32, self._imask
        e = self._home(entity)
        for _ in range(mask + 1):
            s = i32[4 * e + 2]
            if s == 0:
                return -1
            if i64[2 * e] == entity:
                return s - 1
            e = (e + 1) & mask
        return -1

    def _index_insert(self, entity: int, slot: int) -> None:
        i64, i32, mask = self._i64, self._i32, self._imask
        self._h32[_ISEQ] += 1
        e = self._home(entity)
        while i32[4 * e + 2]:
            e = (e + 1) & mask
        i64[2 * e] = entity
        i32[4 * e + 2] = slot + 1
        self._h32[_ICOUNT] += 1
        self._h32[_ISEQ] += 1

    def _index_delete(self, entity: int) -> None:
        i64, i32, mask = self._i64, self._i32, self._imask
        e = self._home(entity)
        while True:
            if i32[4 * e + 2] == 0:
                return          # not there (repair will agree)
            if i64[2 * e] == entity:
                break
            e = (e + 1) & mask
        self._h32[_ISEQ] += 1
        hole, j = e, e
        while True:   # backward-shift deletion keeps every probe chain unbroken
            j = (j + 1) & mask
            if i32[4 * j + 2] == 0:
                break
            k = self._home(i64[2 * j])
            if (hole < j and hole < k <= j) or (hole > j and (k > hole or k <= j)):
                continue
            i64[2 * hole] = i64[2 * j]
            i32[4 * hole + 2] = i32[4 * j + 2]
            hole = j
        i64[2 * hole] = 0
        i32[4 * hole + 2] = 0
        self._h32[_ICOUNT] -= 1
        self._h32[_ISEQ] += 1

    def lookup(self, entity: int) -> Handle | None:
        """Handle of the slot holding `entity`, without the lock unless the index is changing."""
        if not 0 <= entity <= M64:
            return None
        h32, s8, s32 = self._h32, self._s8, self._s32
        # writers fall back to the lock after a few tries; readonly observers cannot lock, so they keep
        # trying (bounded by lock_timeout) rather than answer None while the index is changing
        tries = 8 if self._sem is not None else 1 << 62
        deadline = None
        for i in range(tries):
            if i and i % 64 == 0:
                now = time.monotonic()
                deadline = deadline or now + self.lock_timeout
                if now > deadline:
                    raise LockTimeout(f"table {self.table!r}: the entity index kept changing for "
                                      f"{self.lock_timeout}s (a writer died mid-update?); retry")
                time.sleep(0)
            seq = h32[_ISEQ]
            if seq & 1:
                continue
            slot = self._find(entity)
            gen = s32[8 * slot + 1] if slot >= 0 else 0
            if h32[_ISEQ] != seq:
                continue
            if slot < 0:
                return None
            if s8[32 * slot + 18] == fmt.SLOT_ALLOCATED and self._s64[4 * slot + 1] == entity:
                return _new_handle(Handle, (slot, gen))
        self.acquire()
        try:
            slot = self._find(entity)
            return None if slot < 0 else Handle(slot, s32[8 * slot + 1])
        finally:
            self.release()

    # ---- owners -------------------------------------------------------------------------
    def owners(self) -> list[Owner]:
        return read_owners(self.seg.buf, self._owners_off)

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
                    self._h64[_C["owner_takeovers"]] += 1
                    log.info("table=%s owner=%s: pid %d takes over %d slots from pid %d",
                             self.table, name, pid, mine.slots, mine.pid)
            else:
                used = {o.index for o in entries}
                free_idx = [i for i in range(1, fmt.OWNERS_CAPACITY + 1) if i not in used]
                if not free_idx:   # reuse a gone owner that holds nothing
                    free_idx = [o.index for o in entries if o.slots == 0 and
                                not (o.state == fmt.OWNER_ATTACHED and self.liveness.alive(o.pid, o.start_time))]
                if not free_idx:
                    raise StatedError(f"table {self.table!r}: all {fmt.OWNERS_CAPACITY} owner entries are in "
                                      f"use by owners holding slots; free slots of retired owners")
                idx = free_idx[0]
            self._intent(fmt.INTENT_OWNER, 0, 0, idx)
            off = self._owners_off + (idx - 1) * fmt.OWNER_SIZE
            prev_slots = mine.slots if mine else 0
            fmt.OWNER.pack_into(self.seg.buf, off, raw, pid, fmt.OWNER_ATTACHED, start, prev_slots, 0,
                                int(time.time() * 1000))
            self._settle_owner_slots(idx)
            self._h64[_C["attaches"]] += 1
            self._h32[_OP] = 0
            return idx
        finally:
            self.release()

    def _settle_owner_slots(self, idx: int) -> None:
        """Writers that died mid-section leave an odd seq: settle it (the record stays as written)."""
        s32 = self._s32
        for slot in self.slots_of(idx):
            if s32[8 * slot] & 1:
                s32[8 * slot] += 1
                self._s8[32 * slot + 20] = 1   # dirty: the settled record reaches the next save
                self._h64[_C["settled_slots"]] += 1
                log.warning("table=%s slot=%d: writer died mid-write; record settled as last written",
                            self.table, slot)

    def set_owner_state(self, idx: int, state: int, *, only_pid: int | None = None) -> bool:
        """Mark an owner detached/dead (its slots stay). With `only_pid`, only if that pid still holds it."""
        self.acquire()
        try:
            base = (idx - 1) * 16
            if only_pid is not None and (self._o32[base + 8] != only_pid
                                         or self._o32[base + 9] != fmt.OWNER_ATTACHED):
                return False
            now = int(time.time() * 1000)
            self._o32[base + 9] = state
            self._o32[base + 14] = now & 0xFFFFFFFF
            self._o32[base + 15] = now >> 32
            return True
        finally:
            self.release()

    def slots_of(self, owner: int) -> list[int]:
        """Allocated slots whose owner index is `owner` (an O(capacity) scan)."""
        states = self._s8[18::32]
        owners = self._s16[8::16]
        return [i for i, (st, ow) in enumerate(zip(states, owners)) if ow == owner and st == fmt.SLOT_ALLOCATED]

    def slots_of_any(self) -> list[int]:
        """Every allocated slot (an O(capacity) scan)."""
        return [i for i, st in enumerate(self._s8[18::32]) if st == fmt.SLOT_ALLOCATED]

    def reap_owner(self, idx: int) -> int:
        """Free every slot of owner `idx` unless it re-attached meanwhile. Returns how many."""
        self.acquire()
        try:
            if self._o32[(idx - 1) * 16 + 9] == fmt.OWNER_ATTACHED:
                return 0            # it came back between the caller's check and now
            n = 0
            for slot in self.slots_of(idx):
                self._free_locked(slot, fmt.INTENT_REAP)     # counts frees and reaped_slots itself
                n += 1
            return n
        finally:
            self.release()

    # ---- repair and verification ----------------------------------------------------------
    def repair(self) -> None:
        """Rebuild free stack, index, used count and owner counts from slot states. Lock held."""
        h32, s8, h64 = self._h32, self._s8, self._h64
        op, islot = h32[_OP], h32[_ISLOT]
        if islot < self.capacity:     # count the interrupted op exactly once, whether or not it took effect
            state = s8[32 * islot + 18]
            if op == fmt.INTENT_ALLOC:
                h64[_C_ALLOCS] = h64[_ICOUNT1] + (state == fmt.SLOT_ALLOCATED)
            elif op in (fmt.INTENT_FREE, fmt.INTENT_REAP):
                h64[_C_FREES] = h64[_ICOUNT1] + (state == fmt.SLOT_FREE)
                if op == fmt.INTENT_REAP:
                    h64[_C_REAPED] = h64[_ICOUNT2] + (state == fmt.SLOT_FREE)
        h32[_OP] = fmt.INTENT_REPAIR
        h32[_ISEQ] |= 1
        cap = self.capacity
        states = s8[18::32].tobytes()
        owner_counts = [0] * (fmt.OWNERS_CAPACITY + 1)
        free_slots = []
        self._index[:] = bytes(len(self._index))
        count = 0
        for slot in range(cap - 1, -1, -1):
            st = states[slot]
            if st == fmt.SLOT_ALLOCATED:
                ow = self._s16[16 * slot + 8]
                if ow > fmt.OWNERS_CAPACITY:
                    self._s16[16 * slot + 8] = ow = 0
                owner_counts[ow] += 1
                if s8[32 * slot + 19] & fmt.FLAG_HAS_ENTITY:
                    ent = self._s64[4 * slot + 1]
                    if self._find(ent) >= 0:      # two slots claim one entity: keep the first
                        s8[32 * slot + 19] = 0
                        continue
                    e = self._home(ent)
                    while self._i32[4 * e + 2]:
                        e = (e + 1) & self._imask
                    self._i64[2 * e] = ent
                    self._i32[4 * e + 2] = slot + 1
                    count += 1
            else:
                if st != fmt.SLOT_FREE:
                    s8[32 * slot + 18] = fmt.SLOT_FREE
                free_slots.append(slot)
        # free stack: lowest slot on top
        n = len(free_slots)
        for i, slot in enumerate(free_slots):
            self._free[i] = slot
        h32[_TOP] = n
        h32[_USED] = cap - n
        h32[_ICOUNT] = count
        for idx in range(1, fmt.OWNERS_CAPACITY + 1):
            self._o32[(idx - 1) * 16 + 12] = owner_counts[idx]
        self._h64[_C["lock_repairs"]] += 1
        h32[_ISEQ] += 1
        h32[_OP] = 0

    def verify(self) -> list[str]:
        """Check every invariant; returns problems found (empty when consistent). Lock held by caller."""
        problems = []
        cap = self.capacity
        states = self._s8[18::32].tolist()
        top = self._h32[_TOP]
        allocated = [i for i, s in enumerate(states) if s == fmt.SLOT_ALLOCATED]
        bad = [i for i, s in enumerate(states) if s not in (fmt.SLOT_FREE, fmt.SLOT_ALLOCATED)]
        if bad:
            problems.append(f"slots with invalid state: {bad[:10]}")
        stack = self._free[:top].tolist() if top <= cap else []
        if top > cap:
            problems.append(f"free stack top {top} > capacity {cap}")
        if len(set(stack)) != len(stack):
            problems.append("free stack holds a slot twice")
        free_set = set(stack)
        for s in stack:
            if s >= cap or states[s] != fmt.SLOT_FREE:
                problems.append(f"free stack holds slot {s} which is not free")
                break
        if len(free_set) + len(allocated) != cap:
            problems.append(f"free {len(free_set)} + allocated {len(allocated)} != capacity {cap}")
        if self._h32[_USED] != len(allocated):
            problems.append(f"used counter {self._h32[_USED]} != allocated {len(allocated)}")
        entities = {}
        for s in allocated:
            if self._s8[32 * s + 19] & fmt.FLAG_HAS_ENTITY:
                ent = self._s64[4 * s + 1]
                if ent in entities:
                    problems.append(f"entity {ent} held by slots {entities[ent]} and {s}")
                entities[ent] = s
        indexed = {}
        for e in range(self._imask + 1):
            v = self._i32[4 * e + 2]
            if v:
                indexed[self._i64[2 * e]] = v - 1
        if indexed != entities:
            problems.append(f"entity index ({len(indexed)} entries) disagrees with slot table "
                            f"({len(entities)} entities)")
        for ent, s in entities.items():
            if self._find(ent) != s:
                problems.append(f"entity {ent} not reachable by probing")
                break
        if self._h32[_OP]:
            problems.append(f"intent mark {self._h32[_OP]} left set")
        allocs, frees = self._h64[_C_ALLOCS], self._h64[_C_FREES]
        if allocs - frees != len(allocated):
            problems.append(f"counters: allocations {allocs} - frees {frees} != allocated {len(allocated)}")
        return problems

    def counters(self) -> dict[str, int]:
        return {name: self._h64[i] for name, i in _C.items()}

    def used(self) -> int:
        return self._h32[_USED]
