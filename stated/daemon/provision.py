"""Bring a configured table into existence: adopt a valid segment or create a new one.

Adoption never changes a byte of an existing segment except recreating a
missing semaphore, and upgrading a segment of ours in format version 1 in place
(segment.upgrade_v1: only when no other process is attached). A segment that fails validation (foreign magic, corrupt
header, different layout or capacity) is refused with its own error; the
daemon stops rather than guess.
"""
from __future__ import annotations

import logging

import sysv_ipc

from ..errors import CorruptSegment, LayoutMismatch, SegmentInitialising, SegmentNotFound
from ..format import segment as fmt
from ..format.config import DaemonConfig, TableConfig
from ..shm import segment
from ..shm.owners import Liveness
from ..shm.segment import Segment

log = logging.getLogger("stated.provision")


def ensure(tc: TableConfig, dc: DaemonConfig, *, migrate: bool = False, allow_lossy: bool = False,
           force: bool = False) -> tuple[Segment, str, int]:
    """Return (segment, how, records restored), how in created/adopted/restored.

    A live segment is always adopted, never overwritten by a snapshot; only an absent
    one is restored from the newest valid snapshot chain (or created empty).
    Raises CorruptSegment, LayoutMismatch, SegmentExists.
    """
    from ..persist import saver as persist
    from ..persist import snapshot
    trust = segment.Trust.daemon(dc.mode)
    try:
        try:
            seg = segment.open(tc.key, expect=tc.layout, expect_capacity=tc.capacity, table=tc.name, trust=trust)
        except SegmentInitialising as e:
            remove_half_built(tc, e.creator_pid, trust)
            raise SegmentNotFound(str(e)) from None
        except CorruptSegment:
            # An older format version (UnsupportedVersion), or an upgrade a crash interrupted (its
            # header fails as `migrating` or mid-checksum): upgrade or finish it in place when safe,
            # then adopt it like any other (layout and capacity checked as usual). Anything else, or an
            # unsafe moment (UnsupportedVersion saying why), leaves the table not served.
            if not segment.upgrade_v1(tc.key, trust=trust, table=tc.name):
                raise
            seg = segment.open(tc.key, expect=tc.layout, expect_capacity=tc.capacity, table=tc.name, trust=trust)
    except LayoutMismatch:
        if not migrate:
            raise
        seg, n = persist.migrate_live(tc, dc, allow_lossy=allow_lossy, force=force)
        log.info("table=%s key=%#010x shmid=%d: migrated %d records to layout %#018x", tc.name, tc.key,
                 seg.shm.id, n, tc.layout.hash)
        return seg, "migrated", n
    except SegmentNotFound:
        chain = snapshot.chain(snapshot.table_dir(dc.state_dir, tc.name), mode=dc.mode)
        for w in chain.warnings:
            log.warning("table=%s: snapshot %s", tc.name, w)
        if chain:
            seg, n = persist.restore(tc, dc, chain, migrate=migrate, allow_lossy=allow_lossy)
            log.info("table=%s key=%#010x shmid=%d: restored %d records from %s", tc.name, tc.key, seg.shm.id,
                     n, ", ".join(chain.names()))
            return seg, "restored", n
        seg = segment.create(tc.key, tc.capacity, tc.layout, mode=dc.mode, group=dc.group)
        log.info("table=%s key=%#010x shmid=%d: created (%d slots of %d bytes)",
                 tc.name, tc.key, seg.shm.id, tc.capacity, tc.layout.record_size)
        return seg, "created", 0
    try:
        ensure_semaphore(tc, dc)
    except BaseException:
        seg.detach()
        raise
    log.info("table=%s key=%#010x shmid=%d: adopted existing segment", tc.name, tc.key, seg.shm.id)
    return seg, "adopted", 0


def remove_half_built(tc: TableConfig, creator_pid: int, trust: segment.Trust) -> None:
    """A segment left INITIALISING by a creator that died (a daemon SIGKILLed while creating or
    restoring) can never become ready: remove it so the caller rebuilds the table. A live
    creator is still at work: CorruptSegment (try again later), never a removal under it."""
    if Liveness().exists(creator_pid):
        raise CorruptSegment(f"table {tc.name!r} (key {tc.key:#010x}) is being built by live pid {creator_pid}; "
                             f"is another daemon or `stated restore` running?")
    shm = sysv_ipc.SharedMemory(tc.key, 0)
    try:
        segment.check_provenance(shm, tc.key, trust)
        if bytes(memoryview(shm)[0:8]) != fmt.MAGIC or fmt.read_state(memoryview(shm)) != fmt.STATE_INITIALISING:
            raise CorruptSegment(f"table {tc.name!r} (key {tc.key:#010x}) changed while being inspected")
    finally:
        shm.detach()
    log.warning("table=%s key=%#010x shmid=%d: its creator pid %d died while building it; removing the "
                "half-built segment and rebuilding", tc.name, tc.key, shm.id, creator_pid)
    shm.remove()


def ensure_semaphore(tc: TableConfig, dc: DaemonConfig) -> bool:
    """Recreate the table's semaphore if it was removed (True if recreated). An existing one
    must pass the provenance check (ForeignSegment otherwise)."""
    trust = segment.Trust.daemon(dc.mode)
    try:
        segment.open_semaphore(tc.key, trust=trust)
        return False
    except SegmentNotFound:
        segment.open_semaphore(tc.key, create_mode=dc.mode, group=dc.group, trust=trust)
        log.warning("table=%s key=%#010x: semaphore was missing (removed by ipcrm or systemd RemoveIPC?); "
                    "recreated", tc.name, tc.key)
        return True
