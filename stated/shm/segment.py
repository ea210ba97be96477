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
import logging
import mmap
import os
import struct
import time
import zlib
from dataclasses import dataclass

import sysv_ipc

from ..errors import (
    CorruptSegment,
    ForeignSegment,
    LayoutMismatch,
    PermissionDenied,
    SegmentExists,
    SegmentInitialising,
    SegmentNotFound,
    StatedError,
)
from ..format import segment as fmt
from ..format.layout import Layout

log = logging.getLogger("stated.segment")

INIT_WAIT = 2.0  # seconds an opener waits for a segment still being initialised




@dataclass(frozen=True)
class Trust:
    """Whose IPC objects we accept: created (the kernel's cuid, which nobody can change) by one
    of `uids`, with no permission bits beyond `mode`.

    Without this, anyone who can create a SysV object could plant one on a table's key while
    it is absent (after a reboot, after `ipcrm`), and workers would write players into a
    segment the planter reads, or wait forever on a semaphore the planter holds.
    """

    uids: frozenset[int]
    mode: int = 0o770

    @classmethod
    def daemon(cls, mode: int) -> Trust:
        """The daemon adopts only its own user's (or root's) objects, no wider than configured."""
        return cls(frozenset({0, os.geteuid()}), mode)

    @classmethod
    def worker(cls, mode: int = 0o770, state_dir: str | os.PathLike | None = None) -> Trust:
        """A worker trusts root, itself and the daemon's user: the owner of the daemon's state_dir
        (a directory outsiders cannot create in its place)."""
        uids = {0, os.geteuid()}
        if state_dir is not None:
            try:
                uids.add(os.lstat(state_dir).st_uid)
            except OSError:
                pass
        return cls(frozenset(uids), mode)


def check_provenance(obj: sysv_ipc.SharedMemory | sysv_ipc.Semaphore, key: int, trust: Trust) -> None:
    """Refuse (ForeignSegment) an object created by an untrusted uid or with too wide a mode."""
    what, flag = ("segment", "m") if isinstance(obj, sysv_ipc.SharedMemory) else ("semaphore", "s")
    cuid, perm = obj.cuid, obj.mode & 0o777
    if cuid in trust.uids and not perm & ~trust.mode:
        return
    raise ForeignSegment(
        f"the {what} at key {key:#010x} (id {obj.id}) was created by uid {cuid} with mode {perm:04o}; stated "
        f"accepts only objects created by uid {'/'.join(map(str, sorted(trust.uids)))} with no permission beyond "
        f"{trust.mode:04o}. It may have been planted: inspect it with `ipcs -{flag}i {obj.id}`, remove it with "
        f"`ipcrm -{flag} {obj.id}`, then restart the daemon")


@dataclass
class Segment:
    """An attached, validated segment. `buf` is the memoryview everything reads through."""

    shm: sysv_ipc.SharedMemory
    buf: memoryview
    header: fmt.Header
    readonly: bool
    pristine: bytes = b""      # the immutable header bytes [0, OFF_CRC + 4) as validated at attach

    def repair_header(self) -> str | None:
        """Put back what another process overwrote in the immutable header (checked against the
        copy validated at attach) and a state word that is not READY. Returns what was repaired,
        None when nothing was. The daemon calls this for the tables it serves: it knows their
        layout, so a scribble there is repairable rather than fatal to new attaches."""
        buf, head = self.buf, self.pristine
        r = self.header.regions
        blob_ok = zlib.crc32(bytes(buf[0:fmt.HEADER.size]) + bytes(buf[r.schema_offset:r.schema_offset +
                                                                         r.schema_size])) \
            == int.from_bytes(head[fmt.OFF_CRC:fmt.OFF_CRC + 4], "little")
        fixed = []
        if bytes(buf[0:len(head)]) != head or not blob_ok:
            buf[0:len(head)] = head
            blob = fmt.schema_blob_of(self.header)
            buf[r.schema_offset:r.schema_offset + len(blob)] = blob
            fixed.append("immutable header")
        if fmt.read_state(buf) != fmt.STATE_READY:
            fixed.append(f"state word {fmt.read_state(buf):#x}")
            fmt.write_state(buf, fmt.STATE_READY)
        return ", ".join(fixed) or None

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

    def detach_under_views(self) -> None:
        """Detach although ctypes objects may still point into the mapping.

        shmdt would leave them pointing at unmapped memory (their next use is a SIGSEGV), so the
        mapping is instead replaced, at the same address and in one mmap(MAP_FIXED) call, by
        private zero pages: the segment is detached (the kernel drops the attach with the old
        mapping), and a stray access reads zeros from private memory instead of crashing.
        """
        try:
            self.buf.release()
        except BufferError:
            pass
        size = (self.shm.size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
        libc = _libc_handle()
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long)
        got = libc.mmap(self.shm.address, size, mmap.PROT_READ | mmap.PROT_WRITE,
                        mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED, -1, 0)
        if got != self.shm.address:
            log.warning("key=%#010x: could not replace the mapping (errno %d); it stays attached until exit",
                        self.key, ctypes.get_errno())


def _gid(group: str | None) -> int | None:
    if group is None:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise StatedError(f"group {group!r} does not exist; create it or change [daemon] group") from None


def open_semaphore(key: int, *, create_mode: int | None = None, group: str | None = None,
                   trust: Trust | None = None) -> sysv_ipc.Semaphore:
    """Open the table's semaphore. With `create_mode`, create it (value 0) when missing.

    The lock itself is a word in the segment (format.A_LOCK, taken by the native core); the
    semaphore only puts waiters to sleep, its value counts pending wake-ups. A semaphore has no
    header to check: its provenance (creator uid and mode) is all there is, so an existing one is
    checked against `trust` (default: root, ourselves, no world bits).
    """
    trust = trust or Trust.worker()
    try:
        sem = sysv_ipc.Semaphore(key)
        check_provenance(sem, key, trust)
    except sysv_ipc.ExistentialError:
        if create_mode is None:
            raise SegmentNotFound(f"no semaphore at key {key:#010x}: the daemon recreates it on its next "
                                  f"pass (`stated run`)") from None
        try:
            sem = sysv_ipc.Semaphore(key, sysv_ipc.IPC_CREX, create_mode, 0)
        except sysv_ipc.ExistentialError:   # somebody else created it just now
            sem = sysv_ipc.Semaphore(key)
            check_provenance(sem, key, trust)
        else:
            gid = _gid(group)
            if gid is not None:
                sem.gid = gid
    except sysv_ipc.PermissionsError:
        raise PermissionDenied(f"no permission to use the semaphore at key {key:#010x}; run the worker in "
                               f"the daemon's group (see [daemon] group)") from None
    return sem


def create(key: int, capacity: int, layout: Layout, *, mode: int = 0o660, group: str | None = None,
           ready: bool = True) -> Segment:
    """Create a new table with IPC_CREAT|IPC_EXCL; never touches an existing segment.

    With ready=False the state word stays INITIALISING (attachers wait) until the
    caller, e.g. a restore, has filled it and calls format.write_state(buf, STATE_READY).
    A semaphore left on the key without a segment (the segment was removed with `ipcrm -M`)
    is reused when we made it (provenance checked); anybody else's is refused, never reset.
    """
    head, r = fmt.build_header(key, capacity, layout)
    trust = Trust.daemon(mode)
    try:
        leftover = sysv_ipc.Semaphore(key)
    except sysv_ipc.ExistentialError:
        pass
    else:
        check_provenance(leftover, key, trust)
        if leftover.value:           # wake-ups pending for a segment that is gone: nobody waits for them
            leftover.value = 0
        log.warning("key=%#010x: reusing the semaphore (id %d) left behind when the segment was removed",
                    key, leftover.id)
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
    open_semaphore(key, create_mode=mode, group=group, trust=trust)
    if ready:
        fmt.write_state(buf, fmt.STATE_READY)
    header = fmt.parse_header(buf, shm.size, key)
    pristine = bytes(buf[0:fmt.OFF_CRC + 4])
    log.info("created table segment key=%#010x shmid=%d size=%d capacity=%d", key, shm.id, shm.size, capacity)
    return Segment(shm, buf, header, False, pristine)


def init_regions(buf: memoryview, r: fmt.Regions, capacity: int) -> None:
    """Fill an empty table: all slots free, the free stack full (slot 0 on top), index empty."""
    stack = struct.pack(f"<{capacity}I", *range(capacity - 1, -1, -1))
    buf[r.free_offset:r.free_offset + 4 * capacity] = stack
    struct.pack_into("<II", buf, fmt.A_FREE_TOP, capacity, 0)


def open(key: int, *, readonly: bool = False, expect: Layout | None = None,
         expect_capacity: int | None = None, table: str | None = None, trust: Trust | None = None) -> Segment:
    """Attach an existing table by key and validate its provenance and header before trusting it.

    With `expect`, the segment's layout hash must match it (LayoutMismatch otherwise).
    `trust` says whose segments are accepted (default: root's or our own, no world bits).
    """
    trust = trust or Trust.worker()
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
        check_provenance(shm, key, trust)
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
    if state == fmt.STATE_INITIALISING:
        raise SegmentInitialising(f"{name}segment at key {key:#010x} is still being built by pid "
                                  f"{shm.creator_pid}: wait for the daemon to finish (or `stated status`); if "
                                  f"that pid died, the next daemon start rebuilds the table", shm.creator_pid)
    if state not in fmt.STATE_NAMES:
        raise CorruptSegment(f"{name}segment at key {key:#010x} has an invalid state word {state:#x}: its "
                             f"header was overwritten. Restart the daemon (it repairs a table it runs) or "
                             f"`stated destroy` the table and restore it from a snapshot")
    if state != fmt.STATE_READY:
        raise CorruptSegment(f"{name}segment at key {key:#010x} is {fmt.STATE_NAMES[state]}, not ready: "
                             f"wait for the daemon to finish (or `stated status`)")
    if expect is not None and header.layout_hash != expect.hash:
        raise LayoutMismatch(describe_mismatch(key, table, header.layout, expect))
    if expect_capacity is not None and header.capacity != expect_capacity:
        raise LayoutMismatch(f"{name}segment at key {key:#010x} has capacity {header.capacity}, the config "
                             f"says {expect_capacity}: run `stated migrate` to resize")
    return Segment(shm, buf, header, readonly, bytes(buf[0:fmt.OFF_CRC + 4]))


_libc = None
_MAP_FIXED = 0x10    # Linux, every architecture (the mmap module does not export it)


def _libc_handle() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _shmid(key: int) -> int:
    """shmget(key, 0, 0): the id without attaching (sysv_ipc's constructor always attaches read-write)."""
    shmid = _libc_handle().shmget(ctypes.c_int(key), ctypes.c_size_t(0), ctypes.c_int(0))
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
