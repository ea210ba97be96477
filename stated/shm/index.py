"""The entity index: entity id -> slot, an open-addressing hash table in shared memory.

Linear probing from Fibonacci-hashed homes, backward-shift deletion (no tombstones, so probe
chains never degrade), capacity a power of two >= 2 x the table's capacity. Mutations happen under
the table lock and bump `index_seq` to odd before and to even after, so readers can look up
without the lock and retry when the seq moved (a seqlock over the whole index).

Every probe loop is bounded by the index capacity: the index lives in shared memory that any
attached process can scribble on, and an index with no empty entry must raise `Inconsistent`,
never spin while holding the lock. `Inconsistent` is internal to the data plane: the allocator
catches it under the lock and rebuilds the index from the slot table.
"""
from __future__ import annotations

from ..format.segment import HASH_MUL, U32, U64, W_INDEX_COUNT, W_INDEX_SEQ, SegmentViews


class Inconsistent(Exception):
    """Shared allocator state disagrees with the slot table (scribbled, or a bug). Never leaves shm/."""


class EntityIndex:
    def __init__(self, views: SegmentViews):
        self.v = views
        self.mask = views.index_capacity - 1
        self.shift = 64 - (views.index_capacity.bit_length() - 1)

    def home(self, entity: int) -> int:
        return ((entity * HASH_MUL) & U64) >> self.shift

    def find(self, entity: int) -> int:
        """Slot of `entity` per the index, or -1. Caller holds the lock or checks the index seq."""
        ents, slot1, mask = self.v.index_entity, self.v.index_slot1, self.mask
        e = self.home(entity)
        for _ in range(mask + 1):
            s = slot1[e]
            if s == 0:
                return -1
            if ents[e] == entity:
                return s - 1
            e = (e + 1) & mask
        return -1

    def insert(self, entity: int, slot: int, *, publish: bool = True) -> None:
        """Add entity -> slot (the caller checked it is absent). With publish, bump index_seq
        around the change for lock-free readers; repair publishes once for the whole rebuild."""
        ents, slot1, mask, h32 = self.v.index_entity, self.v.index_slot1, self.mask, self.v.h32
        if publish:
            h32[W_INDEX_SEQ] = (h32[W_INDEX_SEQ] + 1) & U32
        e = self.home(entity)
        for _ in range(mask + 1):
            if not slot1[e]:
                break
            e = (e + 1) & mask
        else:
            raise Inconsistent("entity index has no empty entry")
        ents[e] = entity
        slot1[e] = slot + 1
        h32[W_INDEX_COUNT] = (h32[W_INDEX_COUNT] + 1) & U32
        if publish:
            h32[W_INDEX_SEQ] = (h32[W_INDEX_SEQ] + 1) & U32

    def delete(self, entity: int) -> None:
        """Remove `entity` if present, shifting later entries of its probe chain back."""
        ents, slot1, mask, h32 = self.v.index_entity, self.v.index_slot1, self.mask, self.v.h32
        e = self.home(entity)
        for _ in range(mask + 1):
            if slot1[e] == 0:
                return          # not there (repair will agree)
            if ents[e] == entity:
                break
            e = (e + 1) & mask
        else:
            raise Inconsistent("entity index has no empty entry")
        h32[W_INDEX_SEQ] = (h32[W_INDEX_SEQ] + 1) & U32
        hole, j = e, e
        for _ in range(mask + 1):
            j = (j + 1) & mask
            if slot1[j] == 0:
                break
            k = self.home(ents[j])
            # the entry at j stays if its home lies cyclically in (hole, j]
            if (hole < j and hole < k <= j) or (hole > j and (k > hole or k <= j)):
                continue
            ents[hole] = ents[j]
            slot1[hole] = slot1[j]
            hole = j
        else:
            raise Inconsistent("entity index has no empty entry")
        ents[hole] = 0
        slot1[hole] = 0
        h32[W_INDEX_COUNT] = (h32[W_INDEX_COUNT] - 1) & U32
        h32[W_INDEX_SEQ] = (h32[W_INDEX_SEQ] + 1) & U32

    def clear(self) -> None:
        index = self.v.index
        index[:] = bytes(len(index))
        self.v.h32[W_INDEX_COUNT] = 0

    def occupied(self) -> int:
        """Entries in use, counted from the entries themselves (C speed)."""
        return self.v.index_capacity - self.v.index_slot1.tolist().count(0)

    def entries(self) -> dict[int, int]:
        """entity -> slot for every entry (for verify)."""
        return {self.v.index_entity[e]: s - 1 for e, s in enumerate(self.v.index_slot1.tolist()) if s}
