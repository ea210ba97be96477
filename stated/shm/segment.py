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
from collections.abc import Callable
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
    UnsupportedVersion,
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


UPGRADE_STEPS = 13   # the stores upgrade_v1 makes on a fresh format-1 segment (its tests stop after each)


def upgrade_v1(key: int, *, trust: Trust, table: str | None = None, stop_after: int | None = None) -> bool:
    """Upgrade the format-1 segment on `key` to format 2 in place, or finish an upgrade a crash
    interrupted. True when the segment is now a ready format-2 segment; False, having written
    nothing, when it is neither format 1 nor a half-upgraded one (the caller reports its own error).

    Only when it is safe: no process but us attached (a format-1 worker would go on using the
    semaphore as the lock and the old counter offsets), and the format-1 semaphore free (value >= 1;
    0 means a format-1 holder is inside, or a value left wrong: refused now, not waited on, since the
    holder would have to be attached). Otherwise UnsupportedVersion says why and what to do; the
    segment is left a valid format-1 segment (or, refused while finishing an interrupted upgrade, as
    that left it), and the next start or reload tries again.
    `trust` is the daemon's (provenance as for adoption). `stop_after` is a test hook: return False
    after that many stores, as a SIGKILL there would stop it.
    """
    name = f"table={table} " if table else ""
    try:
        shm = sysv_ipc.SharedMemory(key, 0)
    except sysv_ipc.ExistentialError:
        return False
    buf = memoryview(shm)
    try:
        check_provenance(shm, key, trust)
        return _upgrade(shm, buf, key, name, trust, stop_after)
    finally:
        buf.release()
        shm.detach()


def _upgrade(shm: sysv_ipc.SharedMemory, buf: memoryview, key: int, name: str, trust: Trust,
             stop_after: int | None) -> bool:
    if shm.size < fmt.SCHEMA_OFFSET or bytes(buf[0:len(fmt.MAGIC)]) != fmt.MAGIC:
        return False
    h32 = buf[0:fmt.SCHEMA_OFFSET].cast("I")
    try:
        version, state = h32[fmt.OFF_FORMAT_VERSION // 4], h32[fmt.OFF_STATE // 4]
        step = h32[fmt.A_UPGRADE_STEP // 4]
        if not (version == fmt.V1_FORMAT_VERSION and state in (fmt.STATE_READY, fmt.STATE_MIGRATING)
                or version == fmt.FORMAT_VERSION and state == fmt.STATE_MIGRATING):
            return False     # `migrating` is written by nothing but this upgrade
        header = fmt.parse_upgrading_header(buf, shm.size, key)
        where = f"{name}key={key:#010x} shmid={shm.id} pid={os.getpid()}"
        resumed = state == fmt.STATE_MIGRATING
        if resumed and step not in (0, fmt.UPGRADE_SAVED, fmt.UPGRADE_MOVED):
            raise CorruptSegment(f"{where}: the upgrade step word holds {step:#x}; the header was overwritten. "
                                 f"Run `stated destroy` and restart the daemon (it restores from snapshot)")
        n = 8 * len(fmt.COUNTERS)
        scratch = fmt.UPGRADE_SCRATCH

        def store32(off: int, value: int) -> None:
            h32[off // 4] = value

        def put(off: int, data: bytes) -> None:
            buf[off:off + len(data)] = data

        # The upgrade as single stores, in this order. The daemon may be SIGKILLed between any two;
        # the next start then finds a valid format-1 segment, or one it recognises and finishes, by
        # (format_version, state, upgrade step):
        #   v1 ready      0      nothing written (or a refusal put `ready` back): a format-1 segment
        #   v1 migrating  0      only the state written: start over, the counters are still at 192
        #   v1 migrating  SAVED  the counters are in the scratch area: redo the move from there; the
        #                        bytes [164, 352) may be half rewritten, the scratch copy is whole
        #   v1|v2 migr.   MOVED  the counters are at 256: clear the scratch, (re)write format_version and
        #                        header_crc (a crash between those two leaves a crc that matches the
        #                        header as either version: parse_upgrading_header accepts both), reset
        #                        the semaphore
        #   v2 migrating  0      all moved and flipped: only the state word remains
        # `migrating` (not `initialising`) holds everyone off meanwhile: processes of both versions
        # refuse it at once, whereas a daemon starting after a crash removes a segment left
        # `initialising` by a dead creator (a half-built table), which would lose every record since
        # the last snapshot. The counters move through a scratch area (the end of the counter room,
        # zero in both versions) because source [192, 288) and destination [256, 352) overlap: an
        # in-place move stopped half-way could not be told from a finished one; a copy from an intact
        # scratch copy can simply be made again.
        steps: list[tuple[str, Callable[[], None]]] = [
            ("state migrating", lambda: store32(fmt.OFF_STATE, fmt.STATE_MIGRATING)),
            ("save counters", lambda: put(scratch, bytes(buf[fmt.V1_OFF_COUNTERS:fmt.V1_COUNTERS_END]))),
            ("step saved", lambda: store32(fmt.A_UPGRADE_STEP, fmt.UPGRADE_SAVED)),
            ("clear holder pid", lambda: store32(fmt.V1_A_HOLDER_PID, 0)),             # now lock_seq
            ("clear lock and reserved", lambda: put(fmt.A_LOCK, bytes(fmt.OFF_COUNTERS - fmt.A_LOCK))),
            ("move counters", lambda: put(fmt.OFF_COUNTERS, bytes(buf[scratch:scratch + n]))),
            ("step moved", lambda: store32(fmt.A_UPGRADE_STEP, fmt.UPGRADE_MOVED)),
            ("clear scratch", lambda: put(scratch, bytes(n))),
            ("format version", lambda: store32(fmt.OFF_FORMAT_VERSION, fmt.FORMAT_VERSION)),
            ("header crc", lambda: store32(fmt.OFF_CRC, fmt.header_crc(buf))),
            ("semaphore", lambda: _reset_semaphore(key, trust)),
            ("step done", lambda: store32(fmt.A_UPGRADE_STEP, 0)),
            ("state ready", lambda: store32(fmt.OFF_STATE, fmt.STATE_READY)),
        ]
        assert len(steps) == UPGRADE_STEPS
        first_of = {label: i for i, (label, _) in enumerate(steps)}
        if not resumed:
            start = 0
        elif step == fmt.UPGRADE_SAVED:
            start = first_of["clear holder pid"]
        elif step == fmt.UPGRADE_MOVED:
            start = first_of["clear scratch"]
        else:
            start = first_of["save counters" if version == fmt.V1_FORMAT_VERSION else "semaphore"]
        done = 0
        if start == 0:
            store32(fmt.A_UPGRADE_STEP, 0)      # reserved in format 1: make sure it says "nothing moved yet"
            if stop_after == 0:
                return False
            steps[0][1]()                       # first: whoever attaches from now on refuses the segment
            done, start = 1, 1
        # Safe? Counted after `migrating` is stored: anyone who attached before it (and may have seen
        # `ready`) is counted in nattch; anyone attaching after it refuses the segment. Refused before
        # anything moved, the segment goes back to `ready`: a working format-1 segment for the old
        # workers still using it. Refused later, it stays `migrating` until a start can finish it.
        nothing_moved = start == 1
        try:
            _check_upgrade_safe(shm, key, trust, where, nothing_moved=nothing_moved, resumed=resumed)
        except BaseException:
            if nothing_moved:
                store32(fmt.OFF_STATE, fmt.STATE_READY)
            raise
        log.warning("%s: upgrading the segment from format version %d to %d in place%s (%d slots used)", where,
                    fmt.V1_FORMAT_VERSION, fmt.FORMAT_VERSION,
                    f", resuming an interrupted upgrade at step {start} ({steps[start][0]})" if resumed else "",
                    h32[fmt.A_USED // 4])
        for _what, do in steps[start:]:
            if stop_after is not None and done >= stop_after:
                return False
            do()
            done += 1
        log.info("%s: segment upgraded to format version %d (capacity %d, layout %#018x)", where,
                 fmt.FORMAT_VERSION, header.capacity, header.layout_hash)
        return True
    finally:
        h32.release()


def _check_upgrade_safe(shm: sysv_ipc.SharedMemory, key: int, trust: Trust, where: str, *, nothing_moved: bool,
                        resumed: bool) -> None:
    """Raise UnsupportedVersion, saying why and what to do, unless we are the only process attached and
    (while nothing has moved yet) the format-1 semaphore is free."""
    why = ""
    others = shm.number_attached - 1
    if others > 0:
        why = (f"{others} other process(es) are still attached to it (`ipcs -mp` shows shmid {shm.id}'s last "
               f"attacher, pid {shm.last_pid}): stop the workers still running the old stated")
    elif nothing_moved:
        try:
            sem = open_semaphore(key, trust=trust)
        except SegmentNotFound:
            sem = None          # a missing semaphore is held by nobody; adoption recreates it
        if sem is not None and sem.value == 0:
            why = (f"its format-1 semaphore (id {sem.id}) is taken (value 0, last operation by pid {sem.last_pid}) "
                   f"although nobody is attached: if no process of the old stated runs, remove it "
                   f"(`ipcrm -s {sem.id}`)")
    if not why:
        return
    what = (f"an interrupted upgrade of the segment from format version {fmt.V1_FORMAT_VERSION} to "
            f"{fmt.FORMAT_VERSION} cannot be finished now" if resumed and not nothing_moved else
            f"the segment is in format version {fmt.V1_FORMAT_VERSION} and cannot be upgraded to "
            f"{fmt.FORMAT_VERSION} now")
    raise UnsupportedVersion(f"{where}: {what}: {why}, then `systemctl reload stated` (or restart the daemon); "
                             f"it upgrades the segment in place, keeping every record")


def _reset_semaphore(key: int, trust: Trust) -> None:
    """Version 2's semaphore counts wake-ups and starts at 0; version 1's was the lock, 1 when free.
    SETVAL also drops every process's SEM_UNDO adjustment for it (semctl(2)), so no format-1 process
    that exits later adds a phantom +1 (which would only cost a waiter one extra look anyway)."""
    try:
        open_semaphore(key, trust=trust).value = 0
    except SegmentNotFound:
        pass                    # adoption creates it with value 0


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
