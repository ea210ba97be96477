"""Bring a configured table into existence: adopt a valid segment or create a new one.

Adoption never changes a byte of an existing segment except recreating a
missing semaphore. A segment that fails validation (foreign magic, corrupt
header, different layout or capacity) is refused with its own error; the
daemon stops rather than guess.
"""
from __future__ import annotations

import logging

from . import segment
from .config import DaemonConfig, TableConfig
from .errors import SegmentNotFound
from .segment import Segment

log = logging.getLogger("stated.provision")


def ensure(tc: TableConfig, dc: DaemonConfig) -> tuple[Segment, bool]:
    """Return (segment, created). Raises CorruptSegment, LayoutMismatch, SegmentExists."""
    try:
        seg = segment.open(tc.key, expect=tc.layout, expect_capacity=tc.capacity, table=tc.name)
    except SegmentNotFound:
        seg = segment.create(tc.key, tc.capacity, tc.layout, mode=dc.mode, group=dc.group)
        log.info("table=%s key=%#010x shmid=%d: created (%d slots of %d bytes)",
                 tc.name, tc.key, seg.shm.id, tc.capacity, tc.layout.record_size)
        return seg, True
    ensure_semaphore(tc, dc)
    log.info("table=%s key=%#010x shmid=%d: adopted existing segment", tc.name, tc.key, seg.shm.id)
    return seg, False


def ensure_semaphore(tc: TableConfig, dc: DaemonConfig) -> bool:
    """Recreate the table's semaphore if it was removed (True if recreated)."""
    try:
        segment.open_semaphore(tc.key)
        return False
    except SegmentNotFound:
        segment.open_semaphore(tc.key, create_mode=dc.mode, group=dc.group)
        log.warning("table=%s key=%#010x: semaphore was missing (removed by ipcrm or systemd RemoveIPC?); "
                    "recreated", tc.name, tc.key)
        return True
