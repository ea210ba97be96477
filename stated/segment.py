"""SysV objects of one table: create, open (after checking the header), destroy.

A table is one shared-memory segment plus one semaphore, both on the table's
key (shm and semaphore keys live in separate kernel namespaces). This module
knows nothing of allocation or records: it only guarantees that what it hands
out is a segment whose header has been validated.
"""
from __future__ import annotations

import ctypes
import errno
import grp
import os
import logging
import struct
import time
from dataclasses import dataclass

import sysv_ipc

from . import format as fmt
from .errors import CorruptSegment, ForeignSegment, LayoutMismatch, SegmentExists, SegmentNotFound, StatedError
from .layout import Layout

log = logging.getLogger("stated.segment")

INIT_WAIT = 2.0  # seconds an opener waits for a segment still being initialised


class PermissionDenied(StatedError, PermissionError):
    """The caller's uid/gid may not attach the segment or semaphore with the rights asked."""


@dataclass
class Segment:
    """An attached, validated segment. `buf` is the memoryview everything reads through."""

    shm: sysv_ipc.SharedMemory
    buf: memoryview
    header: fmt.Header
    readonly: bool

    @property
    def key(self) -> int:
        return self.header.key

    def detach(self) -> bool:
        """Release the buffer and detach; False (still attached) when views are still alive."""
        try:
            self.buf.release()
        except BufferError:
            return False
        try:
            self.shm.detach()
        except sysv_ipc.Error:
            pass
        return True


def _gid(group: str | None) -> int | None:
    if group is None:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise StatedError(f"group {group!r} does not exist; create it or change [daemon] group") from None


def open_semaphore(key: int, *, create_mode: int | None = None, group: str | None = None) -> sysv_ipc.Semaphore:
    """Open the table's semaphore (SEM_UNDO on). With `create_mode`, create it when missing.

    A semaphore has no header to check: create() refuses a key whose semaphore exists
    without a segment; here (recreation by the daemon) one created meanwhile is simply used.
    """
    try:
        sem = sysv_ipc.Semaphore(key)
    except sysv_ipc.ExistentialError:
        if create_mode is None:
            raise SegmentNotFound(f"no semaphore at key {key:#010x}: the daemon recreates it on its next "
                                  f"pass (`stated run`)") from None
        try:
            sem = sysv_ipc.Semaphore(key, sysv_ipc.IPC_CREX, create_mode, 1)
        except sysv_ipc.ExistentialError:   # somebody else created it just now
            sem = sysv_ipc.Semaphore(key)
        else:
            gid = _gid(group)
            if gid is not None:
                sem.gid = gid
    except sysv_ipc.PermissionsError:
        raise PermissionDenied(f"no permission to use the semaphore at key {key:#010x}; run the worker in "
                               f"the daemon's group (see [daemon] group)") from None
    sem.undo = True
    return sem


def create(key: int, capacity: int, layout: Layout, *, mode: int = 0o660, group: str | None = None,
           ready: bool = True) -> Segment:
    """Create a new table with IPC_CREAT|IPC_EXCL; never touches an existing segment.

    With ready=False the state word stays INITIALISING (attachers wait) until the
    caller, e.g. a restore, has filled it and calls format.write_state(buf, STATE_READY).
    """
    head, r = fmt.build_header(key, capacity, layout)
    try:
        sysv_ipc.Semaphore(key)
    except sysv_ipc.ExistentialError:
        pass
    else:   # no header to tell whose it is: never adopt (and reset) somebody else's lock
        raise ForeignSegment(f"a semaphore already exists at key {key:#010x} but no segment does: it is not "
                             f"stated's to reuse. If it is left over from a removed stated table, remove it "
                             f"with `ipcrm -S {key:#010x}`; otherwise choose another key in the config")
    try:
        # init_character: sysv_ipc fills new segments with spaces unless told otherwise
        shm = sysv_ipc.SharedMemory(key, sysv_ipc.IPC_CREX, mode, r.total_size, init_character=b"\0")
    except sysv_ipc.ExistentialError:
        raise SegmentExists(f"a segment already exists at key {key:#010x}") from None
    except ValueError as e:   # sysv_ipc reports EINVAL (size beyond shmmax) this way
        raise StatedError(f"cannot create a {r.total_size}-byte segment at key {key:#010x} ({e}): "
                          f"raise kernel.shmmax / kernel.shmall (deploy/sysctl.d/60-stated.conf)") from None
    except OSError as e:
        raise StatedError(f"cannot create segment at key {key:#010x}: {e}; check kernel.shmmni/shmall "
                          f"(deploy/sysctl.d/60-stated.conf)") from None
    gid = _gid(group)
    if gid is not None:
        shm.gid = gid
    buf = memoryview(shm)
    buf[0:len(head)] = head     # state word says INITIALISING until the end
    init_regions(buf, r, capacity)
    open_semaphore(key, create_mode=mode, group=group)
    if ready:
        fmt.write_state(buf, fmt.STATE_READY)
    header = fmt.parse_header(buf, shm.size, key)
    log.info("created table segment key=%#010x shmid=%d size=%d capacity=%d", key, shm.id, shm.size, capacity)
    return Segment(shm, buf, header, False)


def init_regions(buf: memoryview, r: fmt.Regions, capacity: int) -> None:
    """Fill an empty table: all slots free, the free stack full (slot 0 on top), index empty."""
    stack = struct.pack(f"<{capacity}I", *range(capacity - 1, -1, -1))
    buf[r.free_offset:r.free_offset + 4 * capacity] = stack
    struct.pack_into("<II", buf, fmt.A_FREE_TOP, capacity, 0)


def open(key: int, *, readonly: bool = False, expect: Layout | None = None,
         expect_capacity: int | None = None, table: str | None = None) -> Segment:
    """Attach an existing table by key and validate its header before trusting it.

    With `expect`, the segment's layout hash must match it (LayoutMismatch otherwise).
    """
    name = f"table {table!r} " if table else ""
    try:
        if readonly:   # attach SHM_RDONLY straight away: a read-only user may not attach read-write at all
            shm = sysv_ipc.attach(_shmid(key), None, sysv_ipc.SHM_RDONLY)
        else:
            shm = sysv_ipc.SharedMemory(key, 0)
    except sysv_ipc.ExistentialError:
        raise SegmentNotFound(f"{name}has no segment at key {key:#010x}: start the daemon (`stated run "
                              f"--config ...`) so it creates or restores it, or check the key") from None
    except sysv_ipc.PermissionsError:
        raise PermissionDenied(f"{name}segment at key {key:#010x}: permission denied; run the worker as a "
                               f"member of the daemon's group, or attach readonly=True if allowed") from None
    # sysv_ipc's buffer over a SHM_RDONLY attach claims to be writable (a write would segfault)
    buf = memoryview(shm).toreadonly() if readonly else memoryview(shm)
    try:
        return _validate(shm, buf, key, readonly, expect, expect_capacity, name, table)
    except BaseException:
        buf.release()
        shm.detach()        # a refused segment must not stay attached (it would block migration)
        raise


def _validate(shm, buf, key, readonly, expect, expect_capacity, name, table) -> Segment:
    deadline = time.monotonic() + INIT_WAIT
    while True:
        header = fmt.parse_header(buf, shm.size, key)
        state = fmt.read_state(buf)
        if state != fmt.STATE_INITIALISING or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    if state != fmt.STATE_READY:
        raise CorruptSegment(f"{name}segment at key {key:#010x} is {fmt.STATE_NAMES.get(state, state)!s}, "
                             f"not ready: wait for the daemon to finish (or `stated status`)")
    if expect is not None and header.layout_hash != expect.hash:
        raise LayoutMismatch(describe_mismatch(key, table, header.layout, expect))
    if expect_capacity is not None and header.capacity != expect_capacity:
        raise LayoutMismatch(f"{name}segment at key {key:#010x} has capacity {header.capacity}, the config "
                             f"says {expect_capacity}: run `stated migrate` to resize")
    return Segment(shm, buf, header, readonly)


_libc = None


def _shmid(key: int) -> int:
    """shmget(key, 0, 0): the id without attaching (sysv_ipc's constructor always attaches read-write)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    shmid = _libc.shmget(ctypes.c_int(key), ctypes.c_size_t(0), ctypes.c_int(0))
    if shmid < 0:
        err = ctypes.get_errno()
        if err == errno.EACCES:
            raise sysv_ipc.PermissionsError("permission denied")
        raise sysv_ipc.ExistentialError(f"no segment ({os.strerror(err)})")
    return shmid


def describe_mismatch(key: int, table: str | None, have: Layout, want: Layout) -> str:
    """Human diff of two layouts, for LayoutMismatch and migration refusals."""
    hv = {f.name: f.field.decl.split(" = ")[0] for f in have.fields}
    wv = {f.name: f.field.decl.split(" = ")[0] for f in want.fields}
    diffs = [f"+ {wv[n]}" for n in wv if n not in hv]
    diffs += [f"- {hv[n]}" for n in hv if n not in wv]
    diffs += [f"~ {hv[n]} -> {wv[n]}" for n in wv if n in hv and hv[n] != wv[n]]
    if not diffs and have.names() != want.names():
        diffs.append(f"field order {have.names()} -> {want.names()}")
    name = f"table {table!r} " if table else ""
    return (f"{name}segment at key {key:#010x} has layout {have.hash:#018x}, expected {want.hash:#018x} "
            f"({'; '.join(diffs) or 'same fields, different layout'}). Restart the daemon with --migrate "
            f"to convert it, or attach with the schema the segment has")


def destroy(key: int) -> bool:
    """Remove the segment and semaphore at `key` if they are stated's. True if anything was removed.

    A foreign segment (wrong magic) is refused with ForeignSegment, never removed.
    """
    removed = False
    try:
        shm = sysv_ipc.SharedMemory(key, 0)
    except sysv_ipc.ExistentialError:
        shm = None
    if shm is not None:
        buf = memoryview(shm)
        magic = bytes(buf[0:8]) if shm.size >= 8 else b""
        buf.release()
        if magic != fmt.MAGIC:
            shm.detach()
            raise ForeignSegment(f"segment at key {key:#010x} is not a stated segment; refusing to remove it")
        shm.detach()
        shm.remove()
        removed = True
    try:
        sysv_ipc.Semaphore(key).remove()
        removed = True
    except sysv_ipc.ExistentialError:
        pass
    return removed
