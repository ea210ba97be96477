"""The slot allocator of one attached table: the Python face of the native core.

Contract
- The algorithms are the C11 core's (stated/native/stated_core.h, through the extension
  `stated.shm._native`), the very code C workers compile from the generated header: the table lock
  (a word taken by compare-and-swap; the semaphore only sleeps and wakes waiters), intent marks and
  repair, alloc/free/reap, the entity index, owner claims, verify and audit. There is no second
  copy of them in Python. docs/format.md "Allocator protocol" specifies them.
- This module builds the core for a validated segment: the semaphore comes from
  `segment.open_semaphore` (its provenance checked against `trust`), the same trust is handed to
  the core for a semaphore it has to look up again (removed and recreated), the record
  initialiser and the /proc root (the only OS input the core reads for liveness) come in here.
- It gives persistence and the daemon the narrow interface they use: acquire/release (repair()
  inside them repairs under the held lock, outside them takes the lock), audit, verify, owners,
  counters, `views` (the format's named columns) for reading and restoring slot columns.
- Not thread-safe, and not across fork(): the core takes the pid once (in a forked child it refuses
  the lock with StatedError). One Allocator per thread and process.
"""
from __future__ import annotations

import logging
from typing import NamedTuple

from ..format import segment as fmt
from ..format.segment import U64, C, SegmentViews
from . import _native
from .owners import Liveness, Owner, read_owners
from .segment import Segment, Trust, open_semaphore

log = logging.getLogger("stated.allocator")


class Handle(NamedTuple):
    """A reference to one allocated record: valid while the slot keeps this generation."""

    slot: int
    generation: int


class Allocator:
    """Allocation state of one attached table (a read-only segment makes an observer: no lock)."""

    def __init__(self, seg: Segment, *, table: str, lock_timeout: float = 2.0, read_timeout: float = 0.1,
                 liveness: Liveness | None = None, proc_root: str | None = None, pid: int | None = None,
                 trust: Trust | None = None, init: bytes | None = None):
        self.seg, self.table, self.key = seg, table, seg.key
        self.capacity = seg.header.capacity
        if proc_root is None:
            proc_root = liveness.proc_root if liveness is not None else "/proc"
        trust = trust or Trust.worker()
        semid = -1
        if not seg.readonly:
            semid = open_semaphore(self.key, trust=trust).id
        self.views = SegmentViews(seg.buf, seg.header)
        try:
            self.core = _native.Core(seg.buf, self.key, table=table, readonly=seg.readonly, semid=semid,
                                     lock_timeout=lock_timeout, read_timeout=read_timeout, init=init,
                                     handle=Handle, pid=pid or 0, proc_root=proc_root,
                                     trust_uids=sorted(trust.uids)[:8], trust_mode=trust.mode)
        except BaseException:
            self.views.release()
            raise
        self.pid = self.core.pid
        self._held = 0          # acquire() calls not yet released: repair() then runs under our lock

    @property
    def lock_timeout(self) -> float:
        return self.core.lock_timeout

    @lock_timeout.setter
    def lock_timeout(self, seconds: float) -> None:     # the daemon's reload changes it
        self.core.lock_timeout = seconds

    def release_views(self) -> None:
        """Close the core and release every view (the segment can then be detached)."""
        self.core.close()
        self.views.release()

    # ---- allocation on behalf of an owner (the daemon's store: claim and release) ---------------------
    def alloc(self, entity: int | None, owner: int, init: bytes | None = None) -> Handle:
        """Allocate a slot for owner index `owner` (not necessarily ours), its record set to `init`
        (record_size bytes; None: the table's initialiser). TableFull, DuplicateEntity, LockTimeout."""
        core, mine = self.core, self.core.owner
        core.owner = owner
        try:
            return core.alloc(entity, init)
        finally:
            core.owner = mine

    def free(self, h: tuple[int, int], owner: int, *, force: bool = False) -> None:
        """Free `h`, a slot of owner index `owner` (NotOwner otherwise, unless force). StaleHandle."""
        core, mine = self.core, self.core.owner
        core.owner = owner
        try:
            core.free(h, force)
        finally:
            core.owner = mine

    def lookup(self, entity: int) -> Handle | None:
        """Handle of the slot holding `entity`, or None (lock-free)."""
        return self.core.lookup(entity)

    # ---- the lock ---------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Take the table lock; an intent mark a dead process left is settled (repaired) first."""
        self.core.acquire()
        self._held += 1

    def release(self) -> None:
        """Give the lock back. An op of ours that an error interrupted is repaired first."""
        self._held -= 1
        self.core.release()

    def reopen_semaphore(self) -> None:
        self.core.reopen_semaphore()

    def lock_state(self) -> tuple[int, int]:
        """(lock word, acquisitions so far): the word is 0 when free, else names the holder."""
        return self.core.lock_state()

    def clear_lock(self, word: int) -> bool:
        """The daemon's remedy for a lock word stuck on a live process that is not inside (it watched
        the word and the acquisition count stay put for far longer than a section lasts): clear it if
        it still equals `word` and its holder is not stopped. True if cleared."""
        return self.core.clear_lock(word)

    def intent_pending(self) -> bool:
        """An intent mark is set (a mutation is running, or its process died mid-way)."""
        return self.core.intent_pending()

    # ---- repair and verification ------------------------------------------------------------------
    def repair(self) -> None:
        """Rebuild free stack, index, used and owner counts from slot states (under the lock: ours
        when inside acquire()/release(), else taken for the repair)."""
        if self._held:
            self.core.repair_locked()
        else:
            self.core.repair()

    def audit(self) -> list[str]:
        """The daemon's periodic check: problems found (and rebuilt); [] when consistent. The check
        runs without the lock first, so a healthy table costs its workers nothing. Raises
        CorruptSegment when the rebuilt table still fails verify()."""
        return self.core.audit()

    def verify(self) -> list[str]:
        """Every invariant; [] when consistent. Takes the lock unless the caller holds it (an
        observer's answer is racy)."""
        return self.core.verify(lock=not self._held)

    # ---- owners -----------------------------------------------------------------------------------
    def owners(self) -> list[Owner]:
        return read_owners(self.seg.buf, self.seg.header.regions.owners_offset)

    def claim_owner(self, name: str) -> int:
        """Attach as owner `name` (taking over a dead holder's slots). Returns the owner index."""
        return self.core.claim_owner(name)

    def set_owner_state(self, idx: int, state: int, *, only_pid: int | None = None) -> bool:
        """Mark an owner detached/dead (its slots stay). With `only_pid`, only if that pid still holds it."""
        return self.core.set_owner_state(idx, state, only_pid)

    def reap_owner(self, idx: int) -> int:
        """Free every slot of owner `idx` unless it re-attached meanwhile. Returns how many."""
        return self.core.reap_owner(idx)

    def slots_of(self, owner: int) -> list[int]:
        """Allocated slots whose owner index is `owner` (an O(capacity) scan)."""
        return self.core.owned_slots(owner)

    def allocated_slots(self) -> list[int]:
        """Every allocated slot (an O(capacity) scan)."""
        return self.core.allocated_slots()

    # ---- numbers ----------------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        return dict(zip(fmt.COUNTERS, self.core.counters()))

    def set_counters(self, values: dict[str, int]) -> None:
        """Restore saved counters (names this format knows, values in range; others ignored)."""
        for name, value in values.items():
            if name in C and isinstance(value, int) and 0 <= value <= U64:
                self.views.counters[C[name]] = value

    def used(self) -> int:
        return self.core.used()
