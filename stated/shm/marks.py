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

import threading

from ..format.segment import SegmentViews

_NONZERO = bytes([0] + [1] * 255)     # translate table: any non-zero byte -> 1
_FENCE = threading.Lock()


def fence() -> None:
    """A full memory barrier from Python: taking and giving back a lock executes a locked
    instruction (x86 `lock cmpxchg`), which drains this CPU's store buffer. x86 may let a later load
    pass an earlier store; without this, a consumer's record copy could read old data while its
    `dirty = 0` still sits in the store buffer, and a writer's new `dirty = 1` could land before it
    and be overwritten. (The native core uses an atomic exchange for the same reason.)"""
    _FENCE.acquire()
    _FENCE.release()


def harvest(v: SegmentViews) -> int:
    """Move every `dirty` mark into `snap_pending` and `store_pending`. Returns how many moved.

    Cost follows the number of dirty slots: one C-speed copy of the dirty column, clean runs skipped
    by bytes.find.
    """
    col = v.dirty.tobytes()
    if col.count(0) == v.capacity:
        return 0
    col = col.translate(_NONZERO)
    dirty, snap, store = v.dirty, v.snap_pending, v.store_pending
    n = 0
    i = col.find(1)
    while i >= 0:
        store[i] = 1
        snap[i] = 1
        dirty[i] = 0            # last: a kill before this leaves the change marked twice, never zero times
        n += 1
        i = col.find(1, i + 1)
    fence()                     # the clears are visible before any record is copied after this
    return n


def marked(col: memoryview, capacity: int) -> list[int]:
    """Slots whose byte in the column `col` (a SegmentViews slot column) is non-zero, in slot order.

    Any non-zero value counts (a scribbled 2 is still a mark: erring towards one extra write)."""
    data = col.tobytes()
    if data.count(0) == capacity:
        return []
    data = data.translate(_NONZERO)
    out = []
    i = data.find(1)
    while i >= 0:
        out.append(i)
        i = data.find(1, i + 1)
    return out


def count_marked(capacity: int, *cols: memoryview) -> int:
    """Slots with any of the columns' bytes non-zero (a C-speed OR of byte columns)."""
    acc = 0
    for c in cols:
        acc |= int.from_bytes(c.tobytes(), "little")
    return capacity - acc.to_bytes(capacity, "little").count(0) if acc else 0
