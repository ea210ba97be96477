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

import array
import logging
import os
import time
from collections import Counter
from itertools import compress
from typing import NamedTuple

import sysv_ipc

from ..format import segment as fmt
from ._compat import require_semtimedop
from ..errors import CorruptSegment, DuplicateEntity, LockTimeout, NotOwner, OwnerBusy, OwnersExhausted, SegmentNotFound, SlotOutOfRange, StaleHandle, StatedError, TableFull
from .owners import Liveness, Owner, read_owners
from .segment import Segment, Trust, open_semaphore

log = logging.getLogger("stated.allocator")

M64 = (1 << 64) - 1
# word indexes into the header viewed as u32 / u64
_TOP, _USED, _OP, _ISLOT = fmt.A_FREE_TOP // 4, fmt.A_USED // 4, fmt.A_INTENT_OP // 4, fmt.A_INTENT_SLOT // 4
_IENT, _IOWN, _IPID = fmt.A_INTENT_ENTITY // 8, fmt.A_INTENT_OWNER // 4, fmt.A_INTENT_PID // 4
_ISEQ, _HOLDER, _ICOUNT = fmt.A_INDEX_SEQ // 4, fmt.A_HOLDER_PID // 4, fmt.A_INDEX_COUNT // 4
_C = {name: off // 8 for name, off in fmt.COUNTER_OFF.items()}
_C_ALLOCS, _C_FREES, _C_REAPED = _C["allocations"], _C["frees"], _C["reaped_slots"]
_C_TIMEOUTS, _C_REBUILDS = _C["lock_timeouts"], _C["rebuilds"]
_C_FULL, _C_DUP = _C["alloc_failures_full"], _C["alloc_failures_duplicate"]
_FREE_SELECTOR = bytes([1] + [0] * 255)    # bytes.translate tables: slot state -> "is free",
_LOW_BIT = bytes(i & 1 for i in range(256))  # byte -> its bit 0 (entity flag, seq parity)
U32 = 0xFFFFFFFF     # every counter, generation and seq in shared memory wraps as C would
_ICOUNT1, _ICOUNT2 = fmt.A_INTENT_COUNT // 8, fmt.A_INTENT_COUNT2 // 8
_new_handle = tuple.__new__      # Handle(slot, gen) without NamedTuple's slower __new__


class _Inconsistent(Exception):
    """Internal: shared allocator state disagrees with the slot table; caught under the lock,
    which rebuilds the derivable state. Never leaves this module."""


class Handle(NamedTuple):
    """A reference to one allocated record: valid while the slot keeps this generation."""

    slot: int
    generation: int


class Allocator:
    """Allocation state of one attached table. Not thread-safe (one per thread)."""

    def __init__(self, seg: Segment, *, table: str, lock_timeout: float = 2.0,
                 liveness: Liveness | None = None, pid: int | None = None, trust: Trust | None = None):
        self.seg, self.table, self.key = seg, table, seg.key
        self.lock_timeout = lock_timeout
        self.liveness = liveness or Liveness()
        self.pid = pid or os.getpid()
        self.trust = trust
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
        self._index_capacity = r.index_capacity
        self._ishift = 64 - (r.index_capacity.bit_length() - 1)
        index = buf[r.index_offset:r.index_offset + r.index_capacity * fmt.INDEX_ENTRY_SIZE]
        self._index = index
        self._i64 = index.cast("Q")     # entity = [2e]
        self._i32 = index.cast("I")     # slot + 1 = [4e+2]; 0 = empty
        self._owners_off = r.owners_offset
        self._o32 = buf[r.owners_offset:r.owners_offset + fmt.OWNERS_CAPACITY * fmt.OWNER_SIZE].cast("I")
        if not seg.readonly:
            require_semtimedop()        # lock waits must time out; read-only observers never wait
        self._sem = None if seg.readonly else open_semaphore(self.key, trust=trust)

    def release_views(self) -> None:
        for v in (self._h32, self._h64, self._s32, self._s64, self._s16, self._s8, self._free, self._i64,
                  self._i32, self._o32, self._slots, self._index):
            v.release()

    # ---- the lock -------------------------------------------------------------------
    def acquire(self) -> None:
        """Take the table lock within `lock_timeout`, then settle what a previous holder left.

        One deadline covers EINTR retries and a semaphore that must be reopened. After the
        semop: a live holder that entered under a since-removed semaphore is waited for, and
        an intent mark left by a dead holder is repaired. If anything after the semop raises,
        the lock is given back before the exception leaves: a kept lock would stop every
        process's alloc/free until the holder exits.
        """
        t0 = time.monotonic()
        try:
            self._sem.acquire(self.lock_timeout)
        except sysv_ipc.Error as e:
            self._acquire_slow(e, t0 + self.lock_timeout)
        try:
            h32 = self._h32
            holder = h32[_HOLDER]
            if holder and holder != self.pid:
                self._wait_swapped_holder(holder, t0 + self.lock_timeout)
            h32[_HOLDER] = self.pid
            if h32[_OP]:
                self._settle_intent()
        except BaseException:
            self.release()
            raise

    def _acquire_slow(self, e: Exception, deadline: float) -> None:
        """Slow path of acquire, bounded by `deadline`: a timeout becomes LockTimeout, a removed
        semaphore is reopened, a wait interrupted by a signal (EINTR: "Signaled while waiting")
        is retried with the time that is left, not a fresh timeout."""
        while True:
            if isinstance(e, sysv_ipc.BusyError):
                raise self._timeout()
            if isinstance(e, sysv_ipc.PermissionsError):
                raise StatedError(f"table {self.table!r} (key {self.key:#010x}): no permission to use its "
                                  f"semaphore; run the worker in the daemon's group") from None
            if isinstance(e, sysv_ipc.ExistentialError):
                self._reopen_semaphore(deadline)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._timeout()
            try:
                self._sem.acquire(remaining)
                return
            except sysv_ipc.Error as e2:
                e = e2

    def _timeout(self) -> LockTimeout:
        h64 = self._h64
        h64[_C_TIMEOUTS] = (h64[_C_TIMEOUTS] + 1) & M64    # racy by nature: we do not hold the lock
        return LockTimeout(f"table {self.table!r} (key {self.key:#010x}): allocator lock not obtained within "
                           f"{self.lock_timeout}s; last holder pid {self._h32[_HOLDER]}. If that process is "
                           f"stuck, stop it; a dead holder releases the lock automatically")

    def _wait_swapped_holder(self, holder: int, deadline: float) -> None:
        """The holder word names another process although we hold the semaphore.

        Normally the holder clears the word before releasing, so a non-zero word means either
        the holder died holding the lock (SEM_UNDO gave it back: proceed) or the semaphore was
        removed and recreated while a live holder was inside its critical section, and we
        entered on the new one. Then we wait, bounded, for it to leave. What this cannot close
        (without a compare-and-swap, which the pure-Python core lacks) is the few bytecodes
        between another process's semop and its write of the holder word; docs/format.md
        records that window.
        """
        while self.liveness.exists(holder):
            if time.monotonic() > deadline:
                raise self._timeout()
            time.sleep(0.0005)
            holder = self._h32[_HOLDER]
            if not holder or holder == self.pid:
                return

    def release(self) -> None:
        """Give the lock back. An op of ours that an exception interrupted is repaired first."""
        h32 = self._h32
        try:
            if h32[_OP] and h32[_IPID] == self.pid:
                self._rebuild("an operation was interrupted by an error")
        finally:
            h32[_HOLDER] = 0
            try:
                self._sem.release()
            except sysv_ipc.ExistentialError:
                pass   # removed from under us; the daemon recreates it and repairs

    def _reopen_semaphore(self, deadline: float | None = None) -> None:
        """The semaphore was removed (ipcrm, systemd RemoveIPC): wait for the daemon to recreate it."""
        if deadline is None:
            deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                self._sem = open_semaphore(self.key, trust=self.trust)
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

    def _rebuild(self, why: str) -> None:
        """Allocator state disagreed with the slot table (scribbled memory, or a bug): rebuild the
        derivable parts from slot states, count it and log it. Lock held."""
        h64 = self._h64
        h64[_C_REBUILDS] = (h64[_C_REBUILDS] + 1) & M64
        log.error("table=%s key=%#010x pid=%d: allocator state inconsistent (%s); rebuilt free stack, entity "
                  "index and counts from the slot table", self.table, self.key, self.pid, why)
        self.repair()

    # ---- alloc / free -----------------------------------------------------------------
    def alloc(self, entity: int | None, owner: int, init: bytes | None, records, rec_off: int,
              rec_size: int) -> Handle:
        """Take a free slot for `owner`, fill its record with `init`, index `entity`.

        Shared state another process can scribble on is checked before it is used as an
        offset; when it disagrees with the slot table, the derivable state is rebuilt and the
        allocation retried once. Only a slot table that still makes no sense raises
        CorruptSegment.
        """
        if entity is not None and not 0 <= entity <= M64:
            raise ValueError(f"entity ids are u64; {entity} is out of range")
        self.acquire()
        try:
            for attempt in (0, 1):
                try:
                    return self._alloc_locked(entity, owner, init, records, rec_off, rec_size)
                except (_Inconsistent, IndexError, ValueError, OverflowError) as e:
                    if attempt:
                        raise CorruptSegment(f"table {self.table!r} (key {self.key:#010x}): allocator state "
                                             f"still inconsistent after a rebuild ({e})") from None
                    done = self._h32[_OP] == fmt.INTENT_ALLOC and self._h32[_IPID] == self.pid
                    slot = self._h32[_ISLOT]
                    self._rebuild(str(e) or type(e).__name__)
                    if done and slot < self.capacity and self._s8[32 * slot + 18] == fmt.SLOT_ALLOCATED \
                            and self._s16[16 * slot + 8] == owner:
                        return Handle(slot, self._s32[8 * slot + 1])   # the rebuild completed it
            raise AssertionError("unreachable")
        finally:
            self.release()

    def _alloc_locked(self, entity: int | None, owner: int, init: bytes | None, records, rec_off: int,
                      rec_size: int) -> Handle:
        h32, s32, s8, h64 = self._h32, self._s32, self._s8, self._h64
        if entity is not None and self._find_checked(entity) >= 0:
            h64[_C_DUP] = (h64[_C_DUP] + 1) & M64
            raise DuplicateEntity(f"table {self.table!r}: entity {entity} already has a slot; "
                                  f"use lookup({entity}) to get its handle")
        top = h32[_TOP]
        # free_top, and the slot it names, are shared memory: bounds-checked before use
        slot = self._free[top - 1] if 0 < top <= self.capacity else self.capacity
        if slot >= self.capacity or s8[32 * slot + 18] != fmt.SLOT_FREE:
            top, slot = self._free_top_slow(top)
        # the intent mark, inlined (hot path): op is written last
        h32[_ISLOT] = slot
        h64[_IENT] = entity or 0
        h32[_IOWN] = owner
        h32[_IPID] = self.pid
        h64[_ICOUNT1] = h64[_C_ALLOCS]    # lets repair count this alloc exactly once
        h32[_OP] = fmt.INTENT_ALLOC
        h32[_TOP] = top - 1
        gen = (s32[8 * slot + 1] + 1) & U32
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
        h32[_USED] = (h32[_USED] + 1) & U32
        if owner:
            o = (owner - 1) * 16 + 12
            self._o32[o] = (self._o32[o] + 1) & U32
        h64[_C_ALLOCS] = (h64[_C_ALLOCS] + 1) & M64
        h32[_OP] = 0
        return _new_handle(Handle, (slot, gen))

    def _free_top_slow(self, top: int) -> tuple[int, int]:
        """Top of the free stack when the fast check failed: full, or rebuild a stack that disagrees
        with the slot table (a scribbled free_top of 0 must not make an empty table "full")."""
        states = self._s8[18::32].tobytes()
        n_free = states.count(fmt.SLOT_FREE)
        if top or n_free:
            self._rebuild(f"free stack (top {top}) disagrees with the slot table ({n_free} free slots)")
            top = self._h32[_TOP]
        if top == 0:
            self._h64[_C_FULL] = (self._h64[_C_FULL] + 1) & M64
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
        self.acquire()
        try:
            b = 32 * slot
            if self._s32[8 * slot + 1] != gen or self._s8[b + 18] != fmt.SLOT_ALLOCATED:
                raise StaleHandle(f"table {self.table!r}: slot {slot} generation {gen} was already freed "
                                  f"(now generation {self._s32[8 * slot + 1]})")
            slot_owner = self._s16[16 * slot + 8]
            if slot_owner != owner and not force:
                raise NotOwner(f"table {self.table!r}: slot {slot} belongs to owner #{slot_owner}, not to this "
                               f"worker's owner #{owner}")
            try:
                self._free_locked(slot, fmt.INTENT_FREE)
            except (_Inconsistent, IndexError, ValueError, OverflowError) as e:
                # the slot state was set free before anything that can fail: the rebuild completes the free
                self._rebuild(str(e) or type(e).__name__)
        finally:
            self.release()

    def _free_locked(self, slot: int, op: int) -> None:
        s8, h32, h64 = self._s8, self._h32, self._h64
        b = 32 * slot
        entity = self._s64[4 * slot + 1]
        slot_owner = self._s16[16 * slot + 8]
        h32[_ISLOT] = slot              # the intent mark, inlined (hot path): op is written last
        h64[_IENT] = entity
        h32[_IOWN] = slot_owner
        h32[_IPID] = self.pid
        h64[_ICOUNT1] = h64[_C_FREES]       # lets repair count this free exactly once
        h64[_ICOUNT2] = h64[_C_REAPED]
        h32[_OP] = op
        self._s32[8 * slot + 1] = (self._s32[8 * slot + 1] + 1) & U32
        s8[b + 18] = fmt.SLOT_FREE
        s8[b + 20] = 1          # dirty: the next delta records the free
        s8[b + 21] = 0
        if self._s32[8 * slot] & 1:
            self._s32[8 * slot] = (self._s32[8 * slot] + 1) & U32   # a writer died (or is) mid-section
        if s8[b + 19] & fmt.FLAG_HAS_ENTITY:
            self._index_delete(entity)
        s8[b + 19] = 0
        self._s16[16 * slot + 8] = 0
        top = h32[_TOP]
        if top >= self.capacity:
            raise _Inconsistent(f"free stack top {top} with slot {slot} still allocated")
        self._free[top] = slot
        h32[_TOP] = top + 1
        h32[_USED] = (h32[_USED] - 1) & U32
        if 0 < slot_owner <= fmt.OWNERS_CAPACITY:
            o = (slot_owner - 1) * 16 + 12
            if self._o32[o]:
                self._o32[o] -= 1
        h64[_C_FREES] = (h64[_C_FREES] + 1) & M64
        if op == fmt.INTENT_REAP:
            h64[_C_REAPED] = (h64[_C_REAPED] + 1) & M64
        h32[_OP] = 0

    # ---- entity index -------------------------------------------------------------------
    # Every probe loop is bounded by the index capacity: the index lives in shared memory, and
    # an index with no empty entry (scribbled) must raise, never spin while holding the lock.
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

    def _find_checked(self, entity: int) -> int:
        """`_find` under the lock, with the answer checked against the slot table; an index entry
        that names a free slot, a slot out of range or another entity is scribbled: rebuild."""
        slot = self._find(entity)
        if slot < 0:
            return -1
        if slot < self.capacity and self._s8[32 * slot + 18] == fmt.SLOT_ALLOCATED \
                and self._s8[32 * slot + 19] & fmt.FLAG_HAS_ENTITY and self._s64[4 * slot + 1] == entity:
            return slot
        self._rebuild(f"index entry for entity {entity} names slot {slot}, which does not hold it")
        return self._find(entity)

    def _index_insert(self, entity: int, slot: int) -> None:
        i64, i32, mask, h32 = self._i64, self._i32, self._imask, self._h32
        h32[_ISEQ] = (h32[_ISEQ] + 1) & U32
        e = self._home(entity)
        for _ in range(mask + 1):
            if not i32[4 * e + 2]:
                break
            e = (e + 1) & mask
        else:
            raise _Inconsistent("entity index has no empty entry")
        i64[2 * e] = entity
        i32[4 * e + 2] = slot + 1
        h32[_ICOUNT] = (h32[_ICOUNT] + 1) & U32
        h32[_ISEQ] = (h32[_ISEQ] + 1) & U32

    def _index_delete(self, entity: int) -> None:
        i64, i32, mask, h32 = self._i64, self._i32, self._imask, self._h32
        e = self._home(entity)
        for _ in range(mask + 1):
            if i32[4 * e + 2] == 0:
                return          # not there (repair will agree)
            if i64[2 * e] == entity:
                break
            e = (e + 1) & mask
        else:
            raise _Inconsistent("entity index has no empty entry")
        h32[_ISEQ] = (h32[_ISEQ] + 1) & U32
        hole, j = e, e
        for _ in range(mask + 1):   # backward-shift deletion keeps every probe chain unbroken
            j = (j + 1) & mask
            if i32[4 * j + 2] == 0:
                break
            k = self._home(i64[2 * j])
            if (hole < j and hole < k <= j) or (hole > j and (k > hole or k <= j)):
                continue
            i64[2 * hole] = i64[2 * j]
            i32[4 * hole + 2] = i32[4 * j + 2]
            hole = j
        else:
            raise _Inconsistent("entity index has no empty entry")
        i64[2 * hole] = 0
        i32[4 * hole + 2] = 0
        h32[_ICOUNT] = (h32[_ICOUNT] - 1) & U32
        h32[_ISEQ] = (h32[_ISEQ] + 1) & U32

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
            if slot >= self.capacity:
                slot = -2           # scribbled entry: let the locked path sort it out
            gen = s32[8 * slot + 1] if slot >= 0 else 0
            if h32[_ISEQ] != seq:
                continue
            if slot == -1:
                return None
            if slot >= 0 and s8[32 * slot + 18] == fmt.SLOT_ALLOCATED and self._s64[4 * slot + 1] == entity:
                return _new_handle(Handle, (slot, gen))
            if self._sem is None and i >= 8:
                return None         # an observer cannot repair; the index disagrees with the slots
        self.acquire()
        try:
            slot = self._find_checked(entity)
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
                    self._bump(_C["owner_takeovers"])
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
            off = self._owners_off + (idx - 1) * fmt.OWNER_SIZE
            prev_slots = mine.slots if mine else 0
            fmt.OWNER.pack_into(self.seg.buf, off, raw, pid, fmt.OWNER_ATTACHED, start, prev_slots, 0,
                                int(time.time() * 1000))
            self._settle_owner_slots(idx)
            self._bump(_C["attaches"])
            self._h32[_OP] = 0
            return idx
        finally:
            self.release()

    def _settle_owner_slots(self, idx: int) -> None:
        """Writers that died mid-section leave an odd seq: settle it (the record stays as written)."""
        s32 = self._s32
        for slot in self.slots_of(idx):
            if s32[8 * slot] & 1:
                s32[8 * slot] = (s32[8 * slot] + 1) & U32
                self._s8[32 * slot + 20] = 1   # dirty: the settled record reaches the next save
                self._bump(_C["settled_slots"])
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
                h64[_C_ALLOCS] = (h64[_ICOUNT1] + (state == fmt.SLOT_ALLOCATED)) & M64
            elif op in (fmt.INTENT_FREE, fmt.INTENT_REAP):
                h64[_C_FREES] = (h64[_ICOUNT1] + (state == fmt.SLOT_FREE)) & M64
                if op == fmt.INTENT_REAP:
                    h64[_C_REAPED] = (h64[_ICOUNT2] + (state == fmt.SLOT_FREE)) & M64
        h32[_OP] = fmt.INTENT_REPAIR
        h32[_ISEQ] |= 1
        s32 = self._s32
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
                    while self._i32[4 * e + 2]:     # ends: the index was cleared and has 2x capacity entries
                        e = (e + 1) & self._imask
                    self._i64[2 * e] = ent
                    self._i32[4 * e + 2] = slot + 1
                    count += 1
            else:
                if st != fmt.SLOT_FREE:
                    s8[32 * slot + 18] = fmt.SLOT_FREE
                if s32[8 * slot] & 1:     # freed inside a write section: nobody writes it now
                    s32[8 * slot] = (s32[8 * slot] + 1) & U32
                free_slots.append(slot)
        # free stack: lowest slot on top
        n = len(free_slots)
        for i, slot in enumerate(free_slots):
            self._free[i] = slot
        h32[_TOP] = n
        h32[_USED] = cap - n
        h32[_ICOUNT] = count
        if (h64[_C_ALLOCS] - h64[_C_FREES]) & M64 != cap - n:   # scribbled counters: keep frees, fix allocations
            h64[_C_ALLOCS] = (h64[_C_FREES] + cap - n) & M64
        for idx in range(1, fmt.OWNERS_CAPACITY + 1):
            self._o32[(idx - 1) * 16 + 12] = owner_counts[idx]
        self._bump(_C["lock_repairs"])
        h32[_ISEQ] = (h32[_ISEQ] + 1) & U32
        h32[_OP] = 0

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
        """Counts of slot states, the free stack top, used, index occupancy and owner slot counts,
        compared with the slot table. O(capacity) but in C loops, no Python loop per slot."""
        cap, h32 = self.capacity, self._h32
        states = self._s8[18::32].tobytes()
        n_free, n_alloc = states.count(fmt.SLOT_FREE), states.count(fmt.SLOT_ALLOCATED)
        problems = []
        if n_free + n_alloc != cap:
            problems.append(f"{cap - n_free - n_alloc} slots with an invalid state")
        if h32[_TOP] != n_free:
            problems.append(f"free stack top {h32[_TOP]} != {n_free} free slots")
        if h32[_USED] != n_alloc:
            problems.append(f"used {h32[_USED]} != {n_alloc} allocated slots")
        allocated = [st == fmt.SLOT_ALLOCATED for st in states] if n_free + n_alloc != cap else states
        flags = self._s8[19::32].tobytes()
        n_ent = bytes(compress(flags, allocated)).translate(_LOW_BIT).count(1)
        n_indexed = self._index_capacity - array.array("I", self._i32[2::4].tobytes()).count(0)
        if n_indexed != n_ent or h32[_ICOUNT] != n_ent:
            problems.append(f"entity index holds {n_indexed} entries (count word {h32[_ICOUNT]}) for {n_ent} "
                            f"entities")
        per_owner = Counter(compress(self._s16[8::16].tolist(), allocated))
        for idx in range(1, fmt.OWNERS_CAPACITY + 1):
            if self._o32[(idx - 1) * 16 + 12] != per_owner.get(idx, 0):
                problems.append(f"owner #{idx} slot count {self._o32[(idx - 1) * 16 + 12]} != "
                                f"{per_owner.get(idx, 0)}")
                break
        if (self._h64[_C_ALLOCS] - self._h64[_C_FREES]) & M64 != n_alloc:
            problems.append("counters: allocations - frees != allocated slots")
        seq_low = self._s8[0::32].tobytes()          # seq is little-endian: its parity is in byte 0
        if bytes(compress(seq_low, states.translate(_FREE_SELECTOR))).translate(_LOW_BIT).count(1):
            problems.append("a free slot is left inside a write section (odd seq)")
        return problems

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
        odd = [i for i, (st, seq) in enumerate(zip(states, self._s32[0::8].tolist()))
               if st == fmt.SLOT_FREE and seq & 1]
        if odd:
            problems.append(f"free slots left inside a write section (odd seq): {odd[:10]}")
        counts = [0] * (fmt.OWNERS_CAPACITY + 1)
        for s in allocated:
            ow = self._s16[16 * s + 8]
            counts[ow if ow <= fmt.OWNERS_CAPACITY else 0] += 1
        wrong = [i for i in range(1, fmt.OWNERS_CAPACITY + 1) if self._o32[(i - 1) * 16 + 12] != counts[i]]
        if wrong:
            problems.append(f"owner slot counts disagree with the slot table for owners {wrong[:10]}")
        allocs, frees = self._h64[_C_ALLOCS], self._h64[_C_FREES]
        if (allocs - frees) & M64 != len(allocated):
            problems.append(f"counters: allocations {allocs} - frees {frees} != allocated {len(allocated)}")
        return problems

    def _bump(self, counter: int) -> None:
        h64 = self._h64
        h64[counter] = (h64[counter] + 1) & M64

    def counters(self) -> dict[str, int]:
        return {name: self._h64[i] for name, i in _C.items()}

    def used(self) -> int:
        return self._h32[_USED]
