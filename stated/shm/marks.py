"""Dirty marks with two consumers: the snapshot saver and the database store.

Writers (Python write sections, `set`, C `stated_write_end`/`stated_mark_dirty`) set one byte per
slot, `dirty` (slot byte 20), *after* their data. Two consumers need to know what changed, each at
its own pace and each surviving a daemon SIGKILL: the next snapshot must contain every change, and
so must the database. One byte cannot serve both (whoever clears it first would hide the change from
the other), and changing every writer to set two bytes would touch the hot path and the C header.

So the daemon, and only the daemon, *harvests*: for each slot with `dirty == 1` it sets
`snap_pending` (byte 22) and `store_pending` (byte 23), then clears `dirty`. A mark only ever moves
forward (both consumer bytes are stored before `dirty` is cleared), so a SIGKILL at any point leaves
each change marked for both consumers. A write that lands after the harvest sets `dirty` again and is
caught by the next one. Each consumer then clears only its own byte:

- the saver clears `snap_pending` before it copies the record (as it cleared `dirty` before);
- the store clears `store_pending` only after the database committed the copy, and only if the
  record's bytes, seq and generation are still what it copied (stated/persist/store/flush.py).

`store_pending` is set on every table, stored or not: marks on a table without a store just stay
set (harmless), and a table that becomes stored starts with every change since it was created.
`pinned` slots (written through live views, which leave no mark) are handled by each consumer on its
own: the saver copies them every time, the store compares them with what it last wrote.
"""
from __future__ import annotations

from ..format.segment import SegmentViews
from . import _native


def harvest(v: SegmentViews, slot: int | None = None) -> int:
    """Move every `dirty` mark (or only `slot`'s) into `snap_pending` and `store_pending`. Returns how
    many moved.

    One C loop over the slot table (stated/native/_native.c, `harvest`): per dirty slot, both pending
    marks are stored, then `dirty` is cleared by an atomic exchange (acquire-release); the comment
    there argues the ordering, which holds on weakly ordered CPUs (ARM64) as on x86-64. The
    exchange also makes every write it clears visible to the copies made after it. The GIL is held
    throughout, so the saver thread's harvest and the store's never interleave."""
    if slot is None:
        return _native.harvest(v.dirty, v.snap_pending, v.store_pending)
    one = slice(slot, slot + 1)
    return _native.harvest(v.dirty[one], v.snap_pending[one], v.store_pending[one])


def marked(col: memoryview) -> list[int]:
    """Slots whose byte in the column `col` (a SegmentViews slot column) is non-zero, in slot order.

    Any non-zero value counts (a scribbled 2 is still a mark: erring towards one extra write)."""
    return _native.marked(col)


def count_marked(*cols: memoryview) -> int:
    """Slots with any of the columns' bytes non-zero."""
    return _native.count_marked(*cols)
