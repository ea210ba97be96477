"""Snapshots: checksummed msgpack streams of a table's allocated slots, and the files that hold them.

File = 16-byte preamble (b"STATEDSN", u32 version, u32 0) then frames:
    u32 length, u32 crc32(body), body (msgpack)
frame 0: header  {"format", "kind" (full|delta), "table", "key", "schema", "layout_hash", "record_size",
                  "capacity", "seq", "base" (seq of the full a delta applies to; itself for a full),
                  "prev" (seq of the snapshot a delta follows), "time", "counters"}
frame 1: owners  [[index, name, state, since_ms], ...]
frames:  chunks  {"n", "slots", "gens", "owners", "entities", "states", "flags", "records"}
                 (packed little-endian columns: u32, u32, u16, u64, u8, u8, n*record_size bytes)
last:    end     {"end": true, "records": total, "chunks": k}

A file is valid only if every frame's crc matches, the end frame is there with the right totals, and
its contents can be true (counters in range, each slot and each entity at most once, states, flags and
owner indexes that exist, a seq that agrees with the file name, ...): a truncated, damaged or lying
file is refused whole, never half-loaded. The writer only ever writes what the reader accepts.

In code a file is typed: SnapshotHeader (frame 0), SavedOwner (frame 1's entries), Chunk (a chunk frame,
made only by decode_chunk: the one decoder reading, verifying and restoring share), SnapshotFile (a whole
valid file) and Chain (what a restore replays). Dicts exist only on the wire.

Files in state_dir are not trusted. Directories are opened with O_DIRECTORY|O_NOFOLLOW and must be
owned by our euid and no wider than the configured mode (they are created with that mode whatever
the umask); every file operation is relative to the directory's descriptor; snapshot files are
opened with O_NOFOLLOW|O_NONBLOCK and read only when they are regular files no larger than a
snapshot of their table can be. Files are written to a uniquely named dot-temporary (O_EXCL),
fsynced, renamed into place and the directory fsynced, so a crash mid-write leaves only a temporary
that no reader ever lists, and a name planted by someone else never blocks a save.
"""
from __future__ import annotations

import builtins
import errno
import functools
import logging
import math
import operator
import os
import re
import secrets
import stat
import struct
import time
import zlib
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from ..errors import CorruptSnapshot, SnapshotFailed, StatedError, UnsafePath
from ..format import layout as layout_mod
from ..format import segment as fmt
from ..format.schema import from_wire

__all__ = ["CorruptSnapshot", "SnapshotFailed", "UnsafePath", "Capture", "SnapshotDir", "SnapshotHeader",
           "SavedOwner", "Chunk", "SnapshotFile", "Chain", "decode_chunk", "read_file", "write_file", "chain",
           "list_files", "file_name", "table_dir", "remove_stale_temporaries"]

log = logging.getLogger("stated.snapshot")

MAGIC = b"STATEDSN"
VERSION = 1
PREAMBLE = struct.Struct("<8sII")
FRAME = struct.Struct("<II")
CHUNK = 4096                # slots per chunk frame (at most)
BULK_SPAN = 8               # a chunk whose slots span at most this many times their number is copied by column
CLAIM_GROUP = 1 << 18       # entities per set when a save checks that no entity is claimed twice
MAX_FRAME = 256 << 20
MAX_HEADER_FRAME = 4 << 20  # the schema blob is at most 1 MiB
MAX_OWNERS = fmt.OWNERS_CAPACITY
MAX_OWNER_NAME = 128        # characters; stored names are 32 bytes, decoded with replacement characters
MAX_COUNTER = (1 << 63) - 1  # a real counter never gets near; restore's arithmetic stays inside u64
MAX_SEQ = (1 << 62) - 1
SEQ_WAIT = 0.05             # seconds a save pass waits, in total, for writers found mid-section
RETRY_GRACE = 0.002         # per chunk with such slots: a live writer finishes in microseconds
FLAG_TORN = 0x80            # in a snapshot's flags column: the writer stayed mid-write; bytes may be torn
KNOWN_FLAGS = fmt.FLAG_HAS_ENTITY | FLAG_TORN
TMP_ATTEMPTS = 8            # unique temporary names tried before a save gives up

_DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


# ---- names ----------------------------------------------------------------------------------------
def table_dir(state_dir: Path, table: str) -> Path:
    return Path(state_dir) / table


def file_name(table: str, seq: int, kind: str) -> str:
    return f"{table}.{seq:010d}.{kind}.snap"


def parse_name(name: str) -> tuple[str, int, str] | None:
    """(table, seq, kind) of a snapshot file name; None for anything else (temporaries start with a dot)."""
    parts = name.split(".")
    if name.startswith(".") or len(parts) != 4 or parts[3] != "snap" or parts[2] not in ("full", "delta") \
            or not parts[1].isdigit() or not parts[1].isascii():
        return None
    return parts[0], int(parts[1]), parts[2]


def dir_mode(mode: int) -> int:
    """The directory mode for a file mode: the same classes, with x added where r is (0o660 -> 0o770)."""
    return (mode & 0o770) | ((mode & 0o440) >> 2)


# ---- what a file holds, typed --------------------------------------------------------------------------
def _is_bool(v) -> bool:
    return isinstance(v, bool)


def _int_in(v, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


@dataclass(frozen=True)
class SnapshotHeader:
    """Frame 0: what the file is a snapshot of (table, key, schema and layout, capacity), where it sits in
    its chain (seq; base: the full a delta applies to, itself for a full; prev: the file a delta
    follows), when it was taken and the table's shared counters then.

    `from_wire` is the only way in from a file, and refuses (CorruptSnapshot) anything that cannot be
    true; `to_wire` is what the writer packs (the same keys, in the same order, as format 1 always had).
    """

    kind: str
    table: str
    key: int
    schema: list
    layout_hash: int
    record_size: int
    capacity: int
    seq: int
    base: int
    prev: int
    time: float
    counters: dict[str, int]
    format: int = VERSION

    def to_wire(self) -> dict[str, Any]:
        return {"format": self.format, "kind": self.kind, "table": self.table, "key": self.key,
                "schema": self.schema, "layout_hash": self.layout_hash, "record_size": self.record_size,
                "capacity": self.capacity, "seq": self.seq, "base": self.base, "prev": self.prev,
                "time": self.time, "counters": self.counters}

    @classmethod
    def from_wire(cls, path: Path, h: Any) -> SnapshotHeader:
        need: dict[str, type | tuple[type, ...]] = {
            "format": int, "kind": str, "table": str, "key": int, "schema": list, "layout_hash": int,
            "record_size": int, "capacity": int, "seq": int, "base": int, "prev": int, "time": (int, float),
            "counters": dict}
        if not isinstance(h, dict):
            raise CorruptSnapshot(f"{path}: header frame malformed")
        for k, t in need.items():
            if not isinstance(h.get(k), t) or isinstance(h.get(k), bool):
                raise CorruptSnapshot(f"{path}: header field {k!r} missing or malformed")
        if h["format"] != VERSION:
            raise CorruptSnapshot(f"{path}: header says format {h['format']}, this stated reads {VERSION}")
        if h["kind"] not in ("full", "delta") or not 1 <= h["capacity"] <= 1 << 26:
            raise CorruptSnapshot(f"{path}: header kind/capacity invalid")
        table = h["table"]
        if not table or len(table) > 255 or "/" in table or "\0" in table or table.startswith("."):
            raise CorruptSnapshot(f"{path}: table name {table[:40]!r} cannot be a table's")
        if not -(1 << 31) <= h["key"] < 1 << 32:
            raise CorruptSnapshot(f"{path}: key {h['key']} is not a SysV key")
        seq, base, prev = h["seq"], h["base"], h["prev"]
        if not (1 <= seq <= MAX_SEQ and 0 <= prev < seq and 1 <= base <= seq):
            raise CorruptSnapshot(f"{path}: seq {seq}, base {base}, prev {prev} cannot be")
        if h["kind"] == "full" and base != seq:
            raise CorruptSnapshot(f"{path}: a full snapshot whose base ({base}) is not itself ({seq})")
        if h["kind"] == "delta" and not base <= prev:
            raise CorruptSnapshot(f"{path}: a delta following {prev}, before its base full {base}")
        if not math.isfinite(h["time"]) or h["time"] < 0:
            raise CorruptSnapshot(f"{path}: time {h['time']} cannot be")
        for name, value in h["counters"].items():
            if not isinstance(name, str) or not _int_in(value, 0, MAX_COUNTER):
                raise CorruptSnapshot(f"{path}: counter {str(name)[:40]!r} = {str(value)[:40]} is out of range "
                                      f"(0..{MAX_COUNTER})")
        try:
            lay = layout_mod.compute(from_wire(h["schema"]))
        except (StatedError, RecursionError) as e:
            raise CorruptSnapshot(f"{path}: schema unreadable ({str(e)[:200]})") from None
        if lay.hash != h["layout_hash"] or lay.record_size != h["record_size"]:
            raise CorruptSnapshot(f"{path}: layout hash does not match its own schema")
        return cls(kind=h["kind"], table=table, key=h["key"], schema=h["schema"], layout_hash=h["layout_hash"],
                   record_size=h["record_size"], capacity=h["capacity"], seq=seq, base=base, prev=prev,
                   time=h["time"], counters=dict(h["counters"]), format=h["format"])

    def layout(self) -> layout_mod.Layout:
        """The record layout of the file's schema (checked against layout_hash by from_wire)."""
        return layout_mod.compute(from_wire(self.schema))

    def max_file_size(self) -> int:
        """The most bytes a valid snapshot with this header can have (each slot at most once)."""
        per_chunk = FRAME.size + 160                # msgpack map and bin headers of a chunk frame
        return (PREAMBLE.size + 2 * FRAME.size + MAX_HEADER_FRAME + MAX_OWNERS * (MAX_OWNER_NAME * 4 + 64)
                + (self.capacity + 1) * per_chunk + self.capacity * (4 + 4 + 2 + 8 + 1 + 1 + self.record_size)
                + 256)


@dataclass(frozen=True)
class SavedOwner:
    """One entry of the owners frame: a named owner as it was, by its index in the owner table."""

    index: int
    name: str
    state: int
    since_ms: int

    def to_wire(self) -> list:
        return [self.index, self.name, self.state, self.since_ms]


def decode_owners(path: Path, owners: Any) -> list[SavedOwner]:
    """Frame 1, checked: at most the owner table's size, indexes 1..OWNERS_CAPACITY and each once."""
    if not isinstance(owners, list) or len(owners) > MAX_OWNERS:
        raise CorruptSnapshot(f"{path}: owners frame malformed")
    out: list[SavedOwner] = []
    seen = set()
    for o in owners:        # entries are [index, name, state, since_ms]
        if not (isinstance(o, list) and len(o) == 4 and _int_in(o[0], 1, fmt.OWNERS_CAPACITY)
                and isinstance(o[1], str) and 0 < len(o[1]) <= MAX_OWNER_NAME and _int_in(o[2], 0, (1 << 32) - 1)
                and _int_in(o[3], 0, (1 << 64) - 1)):
            raise CorruptSnapshot(f"{path}: owners frame entry {str(o)[:80]} malformed")
        if o[0] in seen:
            raise CorruptSnapshot(f"{path}: owner index {o[0]} appears twice")
        seen.add(o[0])
        out.append(SavedOwner(*o))
    return out


_STATES = bytes((fmt.SLOT_FREE, fmt.SLOT_ALLOCATED))
_FLAGS = bytes(f for f in range(256) if not f & ~KNOWN_FLAGS)
_NOT_TORN = bytes(f for f in range(256) if not f & FLAG_TORN)
_WITH_ENTITY = bytes(f for f in range(256) if f & fmt.FLAG_HAS_ENTITY)
_WITHOUT_ENTITY = bytes(f for f in range(256) if not f & fmt.FLAG_HAS_ENTITY)


@dataclass(frozen=True)
class Chunk:
    """One chunk frame, decoded: n entries as typed columns over the frame's bytes.

    Entry i is slot `slots[i]`, with generation `gens[i]`, owner index `owners[i]` (0: none), entity
    `entities[i]` (meaningful when `flags[i]` has FLAG_HAS_ENTITY), state `states[i]` (free or
    allocated) and record `record(i)`. Made only by `decode_chunk`, which checked the sizes.
    """

    n: int
    record_size: int
    slots: memoryview       # u32
    gens: memoryview        # u32
    owners: memoryview      # u16
    entities: memoryview    # u64
    states: bytes
    flags: bytes
    records: bytes

    def record(self, i: int) -> bytes:
        return self.records[i * self.record_size:(i + 1) * self.record_size]

    def torn(self) -> int:
        """Entries flagged torn (their writer stayed mid-write while they were copied)."""
        return len(self.flags.translate(None, _NOT_TORN))

    def claims(self) -> list[tuple[int, int]]:
        """(slot, entity) of every allocated entry that holds an entity, in file order."""
        states, flags, n = self.states, self.flags, self.n
        if states.count(fmt.SLOT_ALLOCATED) == n and not flags.translate(None, _WITH_ENTITY):
            return list(zip(self.slots.tolist(), self.entities.tolist()))
        return [(s, e) for s, st, fl, e in zip(self.slots, states, flags, self.entities)
                if st == fmt.SLOT_ALLOCATED and fl & fmt.FLAG_HAS_ENTITY]


_COLUMNS = (("slots", 4), ("gens", 4), ("owners", 2), ("entities", 8), ("states", 1), ("flags", 1))


def decode_chunk(path: Path, c: Any, record_size: int, capacity: int) -> Chunk:
    """The one chunk decoder (reading, verifying and restoring all go through it): a chunk frame's map
    made into a Chunk, its shape checked (at most CHUNK entries, every column n entries long, slots
    inside `capacity`). What the entries mean is checked by read_file (check_chunk). Raises CorruptSnapshot."""
    if not isinstance(c, dict) or not _int_in(c.get("n"), 0, CHUNK):
        raise CorruptSnapshot(f"{path}: chunk malformed")
    n = c["n"]
    for k, size in (*_COLUMNS, ("records", record_size)):
        v = c.get(k)
        if not isinstance(v, bytes) or len(v) != size * n:
            raise CorruptSnapshot(f"{path}: chunk column {k!r} has the wrong size")
    slots = memoryview(c["slots"]).cast("I")
    if n and max(slots) >= capacity:
        raise CorruptSnapshot(f"{path}: chunk names a slot beyond capacity {capacity}")
    return Chunk(n=n, record_size=record_size, slots=slots, gens=memoryview(c["gens"]).cast("I"),
                 owners=memoryview(c["owners"]).cast("H"), entities=memoryview(c["entities"]).cast("Q"),
                 states=c["states"], flags=c["flags"], records=c["records"])


def check_chunk(path: Path, c: Chunk, seen_slots: set[int], seen_entities: set[int]) -> None:
    """What the columns say must be possible: each slot once per file, known states and flags, owner
    indexes inside the owner table, each entity held by one allocated slot. (Set operations: C speed.)"""
    states, flags, n = c.states, c.flags, c.n
    if states.translate(None, _STATES):
        raise CorruptSnapshot(f"{path}: a slot state other than free (0) or allocated (1)")
    if flags.translate(None, _FLAGS):
        raise CorruptSnapshot(f"{path}: unknown flag bits (known: {KNOWN_FLAGS:#x})")
    slots = c.slots.tolist()
    here = set(slots)
    if len(here) != n or not seen_slots.isdisjoint(here):
        dup = next(s for s in (slots if len(here) != n else here) if s in seen_slots or slots.count(s) > 1)
        raise CorruptSnapshot(f"{path}: slot {dup} appears twice")
    seen_slots |= here
    owners = c.owners
    if n and max(owners) > fmt.OWNERS_CAPACITY:
        for i in range(n):
            if states[i] == fmt.SLOT_ALLOCATED and owners[i] > fmt.OWNERS_CAPACITY:
                raise CorruptSnapshot(f"{path}: slot {slots[i]} names owner {owners[i]}, beyond the owner table "
                                      f"(1..{fmt.OWNERS_CAPACITY})")
    held = [e for _s, e in c.claims()]
    mine = set(held)
    if len(mine) != len(held) or not seen_entities.isdisjoint(mine):
        dup = next(e for e in held if e in seen_entities or held.count(e) > 1)
        raise CorruptSnapshot(f"{path}: entity {dup} is held by two slots")
    seen_entities |= mine


@dataclass(frozen=True)
class SnapshotFile:
    """A whole valid file, as read_file returns it."""

    path: Path
    header: SnapshotHeader
    owners: list[SavedOwner]
    chunks: list[Chunk]

    @property
    def records(self) -> int:
        return sum(c.n for c in self.chunks)


@dataclass
class Chain:
    """What a restore replays, oldest first: a full, then the deltas that follow it in order; and the
    warnings naming every file that was skipped or ended the chain while it was looked for."""

    files: list[SnapshotFile]
    warnings: list[str] = field(default_factory=list)

    @property
    def full(self) -> SnapshotFile:
        return self.files[0]

    @property
    def newest(self) -> SnapshotFile:
        return self.files[-1]

    def names(self) -> list[str]:
        return [f.path.name for f in self.files]

    def __bool__(self) -> bool:
        return bool(self.files)


def continues(full: SnapshotHeader, delta: SnapshotHeader) -> str | None:
    """Why `delta` cannot apply on top of `full` (another table, key, layout or capacity), or None."""
    for k, what in (("table", "table"), ("key", "key"), ("layout_hash", "layout"), ("record_size", "layout"),
                    ("capacity", "capacity")):
        v, w = getattr(full, k), getattr(delta, k)
        if v != w:
            if k in ("key", "layout_hash"):
                v, w = f"{v:#x}", f"{w:#x}"
            return f"its {what} ({k} {w}) differs from its full's ({v})"
    return None


# ---- directories ----------------------------------------------------------------------------------
def _open_dir(name: str | Path, dir_fd: int | None, where: Path, *, mode: int, create: bool, gid: int | None,
              euid: int, tighten: bool) -> int:
    """Open (and with `create`, make) one directory level without following a symlink, then check it."""
    created = False
    try:
        fd = os.open(name, _DIR_OPEN, dir_fd=dir_fd)
    except FileNotFoundError:
        if not create:
            raise
        try:
            os.mkdir(name, dir_mode(mode), dir_fd=dir_fd)
            created = True
        except FileExistsError:
            pass
        fd = _reopen_dir(name, dir_fd, where)
    except OSError as e:
        _dir_refusal(e, name, dir_fd, where)
        raise
    try:
        if created:
            os.fchmod(fd, dir_mode(mode))            # whatever the umask
            if gid is not None:
                os.fchown(fd, -1, gid)
        check_dir(fd, where, mode=mode, euid=euid, tighten=tighten)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _reopen_dir(name, dir_fd, where) -> int:
    try:
        return os.open(name, _DIR_OPEN, dir_fd=dir_fd)
    except OSError as e:
        _dir_refusal(e, name, dir_fd, where)
        raise


def _dir_refusal(e: OSError, name, dir_fd, where: Path) -> None:
    """Turn the errors of an O_NOFOLLOW|O_DIRECTORY open into UnsafePath when something else sits there."""
    if e.errno in (errno.ELOOP, errno.ENOTDIR):
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            return
        if stat.S_ISLNK(st.st_mode):
            raise UnsafePath(f"{where} is a symlink; stated does not follow symlinks in state_dir "
                             f"(replace it with a directory owned by uid {os.geteuid()})") from None
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafePath(f"{where} is not a directory") from None


_warned_wide: set[str] = set()


def check_dir(fd: int, where: Path, *, mode: int, euid: int, tighten: bool) -> None:
    """A directory we keep snapshots in (or their table directories in): trusted only if owned by our
    euid or by root (who is trusted anyway: a volume's mount root is root's), and not writable by others
    (anyone could have put things in it). Bits beyond dir_mode(mode) are taken away with a warning
    when `tighten` and the directory is ours (a table directory, made by stated); otherwise (state_dir,
    which may be an operator's or a volume's directory) they are only reported, once."""
    st = os.fstat(fd)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(f"{where} is not a directory")
    if st.st_uid not in (euid, 0):
        raise UnsafePath(f"{where} is owned by uid {st.st_uid}, neither this process's user (uid {euid}) nor "
                         f"root: its files are not trusted. Run stated as uid {st.st_uid}, or chown the directory")
    perm = stat.S_IMODE(st.st_mode) & 0o777
    allowed = dir_mode(mode)
    if perm & 0o002:
        raise UnsafePath(f"{where} is writable by others (mode {perm:#o}): files planted in it cannot be told "
                         f"from ours. Check its contents, then chmod {allowed:#o} it")
    if perm & ~allowed:
        if tighten and st.st_uid == euid:
            os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~(perm & ~allowed))
            log.warning("%s had mode %#o, wider than the configured %#o: tightened", where, perm, allowed)
        elif str(where) not in _warned_wide:
            _warned_wide.add(str(where))
            log.warning("%s has mode %#o, wider than the configured %#o (left as it is: stated did not make "
                        "it); chmod %#o it", where, perm, allowed, allowed)


class SnapshotDir:
    """One table's snapshot directory, open and checked; every file operation is relative to its fd."""

    def __init__(self, path: Path, fd: int, proc_root: str = "/proc"):
        self.path, self.fd, self.proc_root = Path(path), fd, proc_root

    @classmethod
    def open(cls, path: Path, *, mode: int = 0o660, gid: int | None = None, create: bool = False,
             euid: int | None = None, proc_root: str = "/proc") -> SnapshotDir:
        """state_dir/<table>: both levels checked (see check_dir); with `create`, made with the
        configured mode and group whatever the umask (missing parents of state_dir with that mode, less
        the umask).
        Raises FileNotFoundError when absent (and not `create`), UnsafePath, OSError."""
        path = Path(path)
        euid = os.geteuid() if euid is None else euid
        state_dir = path.parent
        if create and not state_dir.parent.is_dir():
            os.makedirs(state_dir.parent, mode=dir_mode(mode), exist_ok=True)
        sfd = _open_dir(state_dir, None, state_dir, mode=mode, create=create, gid=gid, euid=euid, tighten=False)
        try:
            tfd = _open_dir(path.name, sfd, path, mode=mode, create=create, gid=gid, euid=euid, tighten=True)
        finally:
            os.close(sfd)
        return cls(path, tfd, proc_root)

    @classmethod
    def open_given(cls, path: Path) -> SnapshotDir:
        """A directory an operator named (`stated restore --from DIR/FILE`): no ownership checks, but its
        files are still opened without following symlinks and only as regular files."""
        return cls(Path(path), os.open(Path(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> SnapshotDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def list(self) -> list[tuple[int, str, str]]:
        """(seq, kind, name) of every snapshot-named entry, oldest first. Temporaries never match."""
        out = []
        for name in os.listdir(self.fd):
            parsed = parse_name(name)
            if parsed:
                out.append((parsed[1], parsed[2], name))
        return sorted(out)

    def read(self, name: str) -> SnapshotFile:
        return read_file(self.path / name, dir_fd=self.fd)

    def write(self, name: str, header: SnapshotHeader, owners: Sequence[SavedOwner], chunks: Iterable[dict],
              mode: int = 0o660, *, gid: int | None = None,
              fixups: Callable[[], dict[int, builtins.list]] | None = None) -> int:
        return _write_at(self.fd, self.path, name, header, owners, chunks, mode, gid=gid, fixups=fixups)

    def size(self, name: str) -> int:
        return os.stat(name, dir_fd=self.fd, follow_symlinks=False).st_size

    def unlink(self, name: str) -> None:
        os.unlink(name, dir_fd=self.fd)

    def remove_stale_temporaries(self) -> None:
        """Delete temporaries left by writers that died mid-snapshot (their pid is gone)."""
        for name in os.listdir(self.fd):
            if not (name.startswith(".") and name.endswith(".tmp")):
                continue
            parts = name.split(".")     # .<snapshot name>.<pid>.t<token>.tmp (or, before, .<name>.<pid>.tmp)
            pid = parts[-3] if len(parts) > 3 and parts[-2].startswith("t") else parts[-2]
            if pid.isdigit() and pid.isascii() and not os.path.exists(f"{self.proc_root}/{pid}"):
                try:
                    os.unlink(name, dir_fd=self.fd)
                    log.info("removed temporary %s left by dead pid %s", self.path / name, pid)
                except OSError as e:
                    log.warning("cannot remove temporary %s: %s", self.path / name, e.strerror or e)

# ---- capturing a live table --------------------------------------------------------------------------
_PARITY = bytes(b & 1 for b in range(256))
_EVEN = bytes(range(0, 256, 2))
_NONZERO = re.compile(rb"[^\x00]")


def _odd_words(seqs: bytes) -> set[int]:
    """Positions of the odd u32 words of a little-endian column copy (slots mid-write)."""
    low = seqs[0::4]
    if not low.translate(None, _EVEN):
        return set()
    return {m.start() for m in _NONZERO.finditer(low.translate(_PARITY))}


def _changed_words(a: bytes, b: bytes, width: int) -> set[int]:
    """Positions of the `width`-byte words that differ between two copies of one column."""
    if a == b:
        return set()
    x = (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")
    return {m.start() // width for m in _NONZERO.finditer(x)}


@functools.lru_cache(maxsize=16)
def _records_of(record_size: int, n: int) -> struct.Struct:
    """A Struct that splits n records into a tuple of n bytes objects in one C call (then picked and
    joined, also in C: no Python step per record)."""
    return struct.Struct(f"{record_size}s" * n)


def _pick(idx: list[int]) -> Callable[[Any], tuple]:
    """A C-speed gather of `idx` from a sequence (operator.itemgetter, always returning a tuple)."""
    if len(idx) == 1:
        i = idx[0]
        return lambda col: (col[i],)
    return operator.itemgetter(*idx)


class Capture:
    """Consistent copies of `slots` (ascending, in file order) as chunk frames, for one save pass.

    Each slot is copied under its seqlock. A chunk whose slots lie close together (a full snapshot of
    a table more than half full, most deltas of busy tables) is copied a column at a time: the
    sequence and generation columns, then the records and the other columns, then sequences and
    generations again, each a C-speed copy of a contiguous range; a slot whose sequence was odd or
    whose sequence or generation changed in between is then copied again on its own. A scattered
    chunk is copied slot by slot. Between chunks the capture sleeps(0), letting other threads (the
    daemon's event loop) take the GIL.

    A slot found mid-write is retried after the rest of its chunk; the waiting is bounded per pass,
    not per slot: one deadline (`wait` seconds after the first such slot) shared by every slot of the
    pass, plus `grace` per chunk so that a live writer a few microseconds into its section is waited
    for. What is still mid-write then (its writer died) is saved as is and flagged torn.

    What is written always passes read_file: states other than free/allocated are written free,
    owner indexes beyond the owner table as 0, unknown flag bits dropped (what repair does to the
    live table). A file never names an entity twice: an entity that moves from slot A to slot B
    during the pass (A copied, then freed, then B allocated and copied) makes A's copy stale, so
    `fixups` copies A again after the pass; should A still claim the entity (a damaged slot table),
    A keeps its record without the entity, as repair resolves it.
    """

    def __init__(self, alloc, records: memoryview, record_size: int, slots: Sequence[int], *,
                 wait: float = SEQ_WAIT, grace: float = RETRY_GRACE,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.alloc, self.records, self.rs, self.slots = alloc, records, record_size, slots
        self.wait, self.grace, self.clock, self.sleep = wait, grace, clock, sleep
        self.deadline: float | None = None
        self.torn: list[int] = []           # slots saved as is, flagged torn
        self.normalised = 0                 # entries whose state/owner/flags were not what a file may hold
        self.recopied = 0                   # stale entries copied again after the pass
        self.dropped_entities: list[tuple[int, int]] = []   # (slot, entity) claimed twice in the live table
        # what each chunk's entries claim, in copy order: its entity column (every entry claims, file
        # positions start..) or (entity, position) pairs; checked for an entity claimed twice after the pass
        self._claimed: list[tuple[int, bytes | list[tuple[int, int]]]] = []
        self._groups: list[set[int]] = []   # every entity claimed so far, in sets of at most CLAIM_GROUP
        self._twice = False                 # an entity was claimed by two copies
        self._seen: dict[int, int] = {}     # entity -> file position of its latest copy (when one is claimed twice)
        self._stale: list[int] = []         # file positions whose entity a later copy claims

    def _copy(self, slot: int) -> list | None:
        """One seqlock copy: [gen, owner, entity, state, flags, record], or None while mid-write."""
        v = self.alloc.views
        off = slot * self.rs
        seq = v.seq[slot]
        gen = v.generation[slot]
        data = self.records[off:off + self.rs].tobytes()
        e = [gen, v.owner[slot], v.entity[slot], v.state[slot], v.flags[slot], data]
        if seq & 1 or v.seq[slot] != seq or v.generation[slot] != gen:
            return None
        return e

    def _copy_as_is(self, slot: int) -> list:
        v = self.alloc.views
        off = slot * self.rs
        return [v.generation[slot], v.owner[slot], v.entity[slot], v.state[slot], v.flags[slot] | FLAG_TORN,
                self.records[off:off + self.rs].tobytes()]

    def _settle(self, part: Sequence[int], pending: list[int]) -> list[tuple[int, list]]:
        """Retry the chunk's slots found mid-write, within the pass's wait; [(index, entry)] in copy order."""
        now = self.clock()
        if self.deadline is None:
            self.deadline = now + self.wait
        limit = max(self.deadline, now + self.grace)
        done = []
        while True:
            still = []
            for i in pending:
                e = self._copy(part[i])
                if e is None:
                    still.append(i)
                else:
                    done.append((i, e))
            pending = still
            if not pending or self.clock() >= limit:
                break
            self.sleep(0.0002)
        for i in pending:
            done.append((i, self._copy_as_is(part[i])))
            self.torn.append(part[i])
        return done

    def _normalise(self, e: list) -> None:
        st, fl, ow = e[3], e[4], e[1]
        if st not in (fmt.SLOT_FREE, fmt.SLOT_ALLOCATED):
            e[3] = fmt.SLOT_FREE
        e[4] = fl & KNOWN_FLAGS
        if ow > fmt.OWNERS_CAPACITY:
            e[1] = 0
        if (e[3], e[4], e[1]) != (st, fl, ow):
            self.normalised += 1


    def _columns(self, part: Sequence[int]) -> tuple[array, array, array, bytes, bytes, bytes, list[int]]:
        """(gens, owners, entities, states, flags, records, indexes of `part` to copy again) of one chunk."""
        lo, hi = part[0], part[-1] + 1
        if hi - lo > BULK_SPAN * len(part):
            return self._columns_by_slot(part)
        v, rs = self.alloc.views, self.rs
        seq1 = v.seq[lo:hi].tobytes()
        gen1 = v.generation[lo:hi].tobytes()
        recs = self.records[lo * rs:hi * rs].tobytes()
        states = v.state[lo:hi].tobytes()
        flags = v.flags[lo:hi].tobytes()
        owners = v.owner[lo:hi].tobytes()
        ents = v.entity[lo:hi].tobytes()
        seq2 = v.seq[lo:hi].tobytes()
        gen2 = v.generation[lo:hi].tobytes()
        again = _odd_words(seq1) | _changed_words(seq1, seq2, 4) | _changed_words(gen1, gen2, 4)
        gens, ows, es = array("I"), array("H"), array("Q")
        if hi - lo == len(part):            # every slot of the range: the copies are the columns
            gens.frombytes(gen1)
            ows.frombytes(owners)
            es.frombytes(ents)
            return gens, ows, es, states, flags, recs, sorted(again)
        idx = [s - lo for s in part]
        pick = _pick(idx)
        gens.extend(pick(memoryview(gen1).cast("I")))
        ows.extend(pick(memoryview(owners).cast("H")))
        es.extend(pick(memoryview(ents).cast("Q")))
        return (gens, ows, es, bytes(pick(states)), bytes(pick(flags)),
                b"".join(pick(_records_of(rs, hi - lo).unpack(recs))),
                [k for k, i in enumerate(idx) if i in again] if again else [])

    def _columns_by_slot(self, part: Sequence[int]) -> tuple[array, array, array, bytes, bytes, bytes, list[int]]:
        v = self.alloc.views
        seq_col, gen_col, state_col, flags_col = v.seq, v.generation, v.state, v.flags
        owner_col, entity_col = v.owner, v.entity
        records, rs = self.records, self.rs
        gens, owners, ents = array("I"), array("H"), array("Q")
        states, flags = bytearray(), bytearray()
        recs = []
        again = []
        for i, slot in enumerate(part):
            seq = seq_col[slot]
            gen = gen_col[slot]
            off = slot * rs
            recs.append(records[off:off + rs].tobytes())
            if seq & 1 or seq_col[slot] != seq or gen_col[slot] != gen:
                again.append(i)         # placeholder values, replaced by _settle
            gens.append(gen)
            owners.append(owner_col[slot])
            ents.append(entity_col[slot])
            states.append(state_col[slot])
            flags.append(flags_col[slot])
        return gens, owners, ents, bytes(states), bytes(flags), b"".join(recs), again

    def _claims(self, start: int, ents: array, states: bytes, flags: bytes, fixed: list[tuple[int, list]]
                ) -> list[tuple[int, int]]:
        """(entity, file position) of what the chunk's entries claim, in copy order: the entries not in
        `fixed` in file order, then those of `fixed` (copied again after the rest) in theirs."""
        skip = {i for i, _ in fixed}
        if states.count(fmt.SLOT_ALLOCATED) == len(ents) and not flags.translate(None, _WITH_ENTITY):
            pairs = list(zip(ents.tolist(), range(start, start + len(ents))))
            for i in sorted(skip, reverse=True):
                del pairs[i]
        elif not states.count(fmt.SLOT_ALLOCATED) or not flags.translate(None, _WITHOUT_ENTITY):
            pairs = []
        else:
            pairs = [(e, start + i) for i, (e, st, fl) in enumerate(zip(ents, states, flags))
                     if st == fmt.SLOT_ALLOCATED and fl & fmt.FLAG_HAS_ENTITY and i not in skip]
        pairs += [(e[2], start + i) for i, e in fixed if e[3] == fmt.SLOT_ALLOCATED and e[4] & fmt.FLAG_HAS_ENTITY]
        return pairs

    def _note(self, start: int, claims: bytes | list[tuple[int, int]]) -> None:
        """Keep a chunk's claims (in copy order) and check them, as the pass goes, against every claim
        before: a set of the chunk's entities, tested for disjointness against a few sets of at most
        CLAIM_GROUP earlier entities, then added to the newest of them. Each of these is a C call of a
        fraction of a millisecond (a set of a million entities would cost tens of milliseconds per
        resize, check or free in one go, while the daemon's loop waits for the GIL)."""
        self._claimed.append((start, claims))
        if self._twice:
            return
        ents = memoryview(claims).cast("Q") if isinstance(claims, bytes) else [e for e, _ in claims]
        chunk = set(ents)
        if len(chunk) != len(ents) or not all(g.isdisjoint(chunk) for g in self._groups):
            self._twice = True          # found; _find_stale replays the claims to see which copies are stale
            while self._groups:
                self._groups.pop()
            return
        if not self._groups or len(self._groups[-1]) >= CLAIM_GROUP:
            self._groups.append(chunk)
        else:
            self._groups[-1] |= chunk

    def _find_stale(self) -> None:
        """After the pass: when an entity was claimed by two copies (it moved during the pass, or the live
        slot table is damaged), replay the claims in copy order to find the stale copies (each earlier
        copy of an entity a later one claims)."""
        while self._groups:
            self._groups.pop()          # one set freed at a time
        if not self._twice:
            return
        holder, stale = self._seen, self._stale
        for start, c in self._claimed:
            pairs = zip(memoryview(c).cast("Q"), range(start, start + len(c) // 8)) if isinstance(c, bytes) else c
            for e, pos in pairs:
                prev = holder.get(e)
                if prev is not None:
                    stale.append(prev)
                holder[e] = pos

    def __iter__(self) -> Iterator[dict]:
        slots, rs = self.slots, self.rs
        for start in range(0, len(slots), CHUNK):
            part = slots[start:start + CHUNK]
            gens, owners, ents, states, flags, recs, again = self._columns(part)
            n = len(part)
            if states.translate(None, _STATES) or flags.translate(None, _FLAGS) or max(owners) > fmt.OWNERS_CAPACITY:
                retry = set(again)
                odd = [i for i in range(n) if i not in retry and (states[i] not in _STATES or flags[i] & ~KNOWN_FLAGS
                                                                   or owners[i] > fmt.OWNERS_CAPACITY)]
            else:
                odd = []
            fixed = [(i, [gens[i], owners[i], ents[i], states[i], flags[i], recs[i * rs:(i + 1) * rs]]) for i in odd]
            if again:
                fixed += self._settle(part, again)     # copied after everything else in the chunk
            entities = ents.tobytes()
            if fixed:
                for _i, e in fixed:
                    self._normalise(e)
                self._note(start, self._claims(start, ents, states, flags, fixed))
                st, fl, rb = bytearray(states), bytearray(flags), bytearray(recs)
                for i, e in fixed:
                    gens[i], owners[i], ents[i], st[i], fl[i] = e[:5]
                    rb[i * rs:(i + 1) * rs] = e[5]
                states, flags, recs, entities = bytes(st), bytes(fl), bytes(rb), ents.tobytes()
            elif states.count(fmt.SLOT_ALLOCATED) == n and not flags.translate(None, _WITH_ENTITY):
                self._note(start, entities)     # every entry claims its entity: the column says it
            else:
                self._note(start, self._claims(start, ents, states, flags, []))
            yield {"n": n, "slots": array("I", part).tobytes(), "gens": gens.tobytes(), "owners": owners.tobytes(),
                   "entities": entities, "states": states, "flags": flags, "records": recs}

    def fixups(self) -> dict[int, list[tuple[int, list]]]:
        """After the pass: {chunk index: [(index in chunk, entry)]} for entries made stale by a later copy."""
        out: dict[int, list[tuple[int, list]]] = {}
        self._find_stale()
        for pos in sorted(set(self._stale)):
            slot = self.slots[pos]
            e = self._copy(slot)
            if e is None:
                e = self._copy_as_is(slot)
                self.torn.append(slot)
            self._normalise(e)
            if e[3] == fmt.SLOT_ALLOCATED and e[4] & fmt.FLAG_HAS_ENTITY:
                holder = self._seen.get(e[2])
                if holder is not None and holder != pos:
                    e[4] &= ~fmt.FLAG_HAS_ENTITY          # another copy holds it: keep one, as repair does
                    self.dropped_entities.append((slot, e[2]))
                else:
                    self._seen[e[2]] = pos
            self.recopied += 1
            out.setdefault(pos // CHUNK, []).append((pos % CHUNK, e))
        return out


def _patch_chunk(c: dict, patches: list[tuple[int, list]]) -> dict:
    rs = len(c["records"]) // c["n"] if c["n"] else 0
    cols = {k: bytearray(c[k]) for k in ("gens", "owners", "entities", "states", "flags", "records")}
    for i, (gen, ow, ent, st, fl, data) in patches:
        struct.pack_into("<I", cols["gens"], 4 * i, gen)
        struct.pack_into("<H", cols["owners"], 2 * i, ow)
        struct.pack_into("<Q", cols["entities"], 8 * i, ent)
        cols["states"][i], cols["flags"][i] = st, fl
        cols["records"][i * rs:(i + 1) * rs] = data
    return dict(c, **{k: bytes(v) for k, v in cols.items()})


# ---- writing ------------------------------------------------------------------------------------
def _frame(obj: Any) -> tuple[bytes, bytes]:
    """(frame header, body) of one frame; written one after the other, never joined (a chunk frame's
    body is a few MB: joining would copy it once more)."""
    body = msgpack.packb(obj, use_bin_type=True)
    return FRAME.pack(len(body), zlib.crc32(body)), body


_CHUNK_KEYS = ("n", "slots", "gens", "owners", "entities", "states", "flags", "records")
_FIXSTR = {k: bytes([0xA0 | len(k)]) + k.encode() for k in _CHUNK_KEYS}


def _msgpack_bin(n: int) -> bytes:
    """msgpack's header of a bin of n bytes (bin 8/16/32, the smallest that fits, as msgpack.packb)."""
    if n < 1 << 8:
        return bytes((0xC4, n))
    if n < 1 << 16:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def _chunk_frame(c: dict) -> list[bytes]:
    """A chunk frame as pieces to write one after the other: the bytes msgpack.packb(c) gives, without
    copying the records column into one body (the crc runs over the pieces in turn). Anything but a
    chunk as Capture makes it (keys in order, bytes columns, 0 <= n < 2^16) is packed by msgpack."""
    n = c.get("n")
    if tuple(c) != _CHUNK_KEYS or type(n) is not int or not 0 <= n < 1 << 16 \
            or any(type(c[k]) is not bytes for k in _CHUNK_KEYS[1:]):
        return list(_frame(c))
    head = bytearray(b"\x88" + _FIXSTR["n"])
    head += bytes((n,)) if n < 128 else (bytes((0xCC, n)) if n < 256 else b"\xcd" + n.to_bytes(2, "big"))
    for k in _CHUNK_KEYS[1:-1]:
        head += _FIXSTR[k] + _msgpack_bin(len(c[k])) + c[k]
    records = c["records"]
    head += _FIXSTR["records"] + _msgpack_bin(len(records))
    return [FRAME.pack(len(head) + len(records), zlib.crc32(records, zlib.crc32(head))), bytes(head), records]


def write_file(path: Path, header: SnapshotHeader, owners: Sequence[SavedOwner], chunks: Iterable[dict],
               mode: int = 0o660) -> int:
    """Write `path` atomically (see _write_at); its directory as given, unchecked. Raises SnapshotFailed."""
    path = Path(path)
    try:
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise SnapshotFailed(f"cannot write snapshot {path}: {e.strerror or e}") from None
    try:
        return _write_at(dfd, path.parent, path.name, header, owners, chunks, mode)
    finally:
        os.close(dfd)


def _create_temporary(dfd: int, name: str, mode: int) -> tuple[int, str]:
    """A new temporary beside `name`: O_EXCL and a random token, so a planted name never blocks a save."""
    last: OSError | None = None
    for _ in range(TMP_ATTEMPTS):
        tmp = f".{name}.{os.getpid()}.t{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode & 0o660,
                           dir_fd=dfd), tmp
        except FileExistsError as e:
            last = e
    raise SnapshotFailed(f"cannot create a temporary for {name}: {TMP_ATTEMPTS} fresh names all exist ({last})")


def _write_at(dfd: int, where: Path, name: str, header: SnapshotHeader, owners: Sequence[SavedOwner],
              chunks: Iterable[dict], mode: int = 0o660, *, gid: int | None = None,
              fixups: Callable[[], dict[int, list]] | None = None) -> int:
    """Write `name` in directory `dfd` atomically (temporary, fsync, rename, fsync dir).

    Returns records written. Raises SnapshotFailed; the temporary is gone then and nothing else changed.
    """
    path = where / name
    total = nchunks = 0
    tmp = None
    try:
        fd, tmp = _create_temporary(dfd, name, mode)
        try:
            with os.fdopen(fd, "wb", buffering=1 << 16) as f:
                os.fchmod(fd, mode & 0o660)     # whatever the umask
                if gid is not None:
                    try:
                        os.fchown(fd, -1, gid)
                    except OSError as e:
                        log.warning("cannot give %s to gid %d: %s", path, gid, e.strerror or e)
                f.write(PREAMBLE.pack(MAGIC, VERSION, 0))
                f.writelines(_frame(header.to_wire()))
                f.writelines(_frame([o.to_wire() for o in owners]))
                offsets = []
                for c in chunks:
                    offsets.append(f.tell())
                    f.writelines(_chunk_frame(c))
                    total += c["n"]
                    nchunks += 1
                if fixups is not None:
                    patches = fixups()
                    if patches:
                        f.flush()
                        for k, p in patches.items():
                            _rewrite_frame(f.fileno(), offsets[k], functools.partial(_patch_chunk, patches=p))
                f.writelines(_frame({"end": True, "records": total, "chunks": nchunks}))
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            _unlink_at(dfd, tmp)
            raise
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        tmp = None
        os.fsync(dfd)
    except OSError as e:
        if tmp is not None:
            _unlink_at(dfd, tmp)
        raise SnapshotFailed(f"cannot write snapshot {path}: {e.strerror or e}") from None
    return total


def _rewrite_frame(fd: int, offset: int, change: Callable[[dict], dict]) -> None:
    n, _crc = FRAME.unpack(os.pread(fd, FRAME.size, offset))
    body = msgpack.packb(change(msgpack.unpackb(os.pread(fd, n, offset + FRAME.size), raw=False)),
                         use_bin_type=True)
    if len(body) != n:      # cannot happen: same keys, same column sizes
        raise OSError(errno.EIO, "patched chunk changed size")
    os.pwrite(fd, FRAME.pack(n, zlib.crc32(body)) + body, offset)


def _unlink_at(dfd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dfd)
    except OSError:
        pass


# ---- reading ---------------------------------------------------------------------------------------
def _open_for_reading(path: Path, dir_fd: int | None) -> tuple[int, int]:
    """(fd, size) of a regular snapshot file, never following a symlink, never blocking on a FIFO and
    never opening a device. Raises CorruptSnapshot naming the file."""
    target = path.name if dir_fd is not None else path
    try:
        st = os.stat(target, dir_fd=dir_fd, follow_symlinks=False)
    except OSError as e:
        raise CorruptSnapshot(f"{path}: cannot read ({e.strerror})") from None
    if stat.S_ISLNK(st.st_mode):
        raise CorruptSnapshot(f"{path}: is a symlink; snapshots are only read as regular files")
    if not stat.S_ISREG(st.st_mode):
        raise CorruptSnapshot(f"{path}: not a regular file (a {_kind(st.st_mode)})")
    try:
        fd = os.open(target, _FILE_OPEN, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CorruptSnapshot(f"{path}: is a symlink; snapshots are only read as regular files") from None
        raise CorruptSnapshot(f"{path}: cannot read ({e.strerror})") from None
    st2 = os.fstat(fd)
    if not stat.S_ISREG(st2.st_mode) or (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise CorruptSnapshot(f"{path}: replaced while being opened")
    if st2.st_mode & 0o002:
        os.close(fd)
        raise CorruptSnapshot(f"{path}: writable by others (mode {stat.S_IMODE(st2.st_mode):#o}); not trusted")
    return fd, st2.st_size


def _kind(m: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(m):
            return name
    return "special file"


def _read_exact(fd: int, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        b = os.read(fd, min(n - got, 1 << 24))
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)



def read_file(path: Path, *, dir_fd: int | None = None) -> SnapshotFile:
    """Read and verify a whole file. Raises CorruptSnapshot on any doubt; never returns part of a file.

    With `dir_fd`, path.name is opened relative to it (path is for messages).
    """
    path = Path(path)
    fd, size = _open_for_reading(path, dir_fd)
    try:
        head = _read_exact(fd, PREAMBLE.size + FRAME.size)
        if len(head) < PREAMBLE.size:
            raise CorruptSnapshot(f"{path}: truncated (no preamble)")
        magic, version, _ = PREAMBLE.unpack_from(head, 0)
        if magic != MAGIC:
            raise CorruptSnapshot(f"{path}: not a stated snapshot")
        if version != VERSION:
            raise CorruptSnapshot(f"{path}: snapshot format {version}, this stated reads {VERSION}")
        if len(head) < PREAMBLE.size + FRAME.size:
            raise CorruptSnapshot(f"{path}: truncated (0 frames)")
        n, _crc = FRAME.unpack_from(head, PREAMBLE.size)
        if n > MAX_HEADER_FRAME or PREAMBLE.size + FRAME.size + n > size:
            raise CorruptSnapshot(f"{path}: truncated at byte {PREAMBLE.size + FRAME.size} (frame of {n} bytes)")
        data = head + _read_exact(fd, n)
        header = SnapshotHeader.from_wire(path, _decode_frames(path, data, PREAMBLE.size)[0])
        limit = header.max_file_size()
        if size > limit:
            raise CorruptSnapshot(f"{path}: {size} bytes, larger than any snapshot of a table of "
                                  f"{header.capacity} slots of {header.record_size} bytes can be ({limit})")
        data += _read_exact(fd, size - len(data))
    finally:
        os.close(fd)
    frames = _decode_frames(path, data, PREAMBLE.size)
    del data
    if len(frames) < 3:
        raise CorruptSnapshot(f"{path}: truncated ({len(frames)} frames)")
    _header, owners, *raw_chunks, end = frames
    if not (isinstance(end, dict) and end.get("end") is True):
        raise CorruptSnapshot(f"{path}: truncated (no end frame)")
    _check_name(path, header)
    seen_slots: set[int] = set()
    seen_entities: set[int] = set()
    chunks = []
    for raw in raw_chunks:
        c = decode_chunk(path, raw, header.record_size, header.capacity)
        check_chunk(path, c, seen_slots, seen_entities)
        chunks.append(c)
    total = sum(c.n for c in chunks)
    if end.get("records") != total or end.get("chunks") != len(chunks) or _is_bool(end.get("records")):
        raise CorruptSnapshot(f"{path}: end frame says {end.get('records')} records, file has {total}")
    return SnapshotFile(path, header, decode_owners(path, owners), chunks)


def _decode_frames(path: Path, data: bytes, pos: int) -> list[Any]:
    frames: list[Any] = []
    while pos < len(data):
        if pos + FRAME.size > len(data):
            raise CorruptSnapshot(f"{path}: truncated frame header at byte {pos}")
        n, crc = FRAME.unpack_from(data, pos)
        pos += FRAME.size
        if n > MAX_FRAME or pos + n > len(data):
            raise CorruptSnapshot(f"{path}: truncated at byte {pos} (frame of {n} bytes)")
        body = data[pos:pos + n]
        if zlib.crc32(body) != crc:
            raise CorruptSnapshot(f"{path}: checksum mismatch in frame {len(frames)} at byte {pos}")
        pos += n
        try:
            frames.append(msgpack.unpackb(body, raw=False, strict_map_key=False))
        except (msgpack.UnpackException, ValueError, TypeError, RecursionError) as e:
            raise CorruptSnapshot(f"{path}: frame {len(frames)} does not decode ({e})") from None
    return frames


def _check_name(path: Path, h: SnapshotHeader) -> None:
    """A file named like a snapshot must be the snapshot its name says (chains are ordered by name)."""
    parsed = parse_name(path.name)
    if parsed and parsed != (h.table, h.seq, h.kind):
        raise CorruptSnapshot(f"{path}: its header says {h.kind} seq {h.seq} of table {h.table!r}, "
                              f"its name something else")


# ---- the set of files of one table -------------------------------------------------------------------
def list_files(d: Path) -> list[tuple[int, str, Path]]:
    """(seq, kind, path) of every snapshot-named entry of directory `d`, oldest first ([] if absent)."""
    try:
        with SnapshotDir(Path(d), os.open(Path(d), _DIR_OPEN)) as sd:
            return [(seq, kind, Path(d) / name) for seq, kind, name in sd.list()]
    except OSError:
        return []


def remove_stale_temporaries(d: Path) -> None:
    """Delete temporaries left by a writer that died mid-snapshot (their pid is gone)."""
    try:
        sd = SnapshotDir(Path(d), os.open(Path(d), _DIR_OPEN))
    except OSError:
        return
    with sd:
        sd.remove_stale_temporaries()


def chain(d: Path, *, mode: int = 0o660, euid: int | None = None) -> Chain:
    """The newest restorable chain of table directory `d`, parsed: newest valid full + its valid deltas
    in order, with warnings naming every file skipped.

    A bad full (damaged, not a regular file, semantically wrong) is skipped, falling back to the
    previous full; the first bad, out-of-order or mismatching delta ends the chain (later deltas
    would miss its changes). An absent directory has no chain; one that is not ours to trust
    (see check_dir) raises UnsafePath: nothing in it is read.
    """
    try:
        sd = SnapshotDir.open(d, mode=mode, euid=euid)
    except (FileNotFoundError, NotADirectoryError):     # absent, or a path through a file: no snapshots
        return Chain([])
    except OSError as e:
        raise UnsafePath(f"{d}: cannot open ({e.strerror or e})") from None
    with sd:
        try:
            files = sd.list()
        except OSError as e:
            raise UnsafePath(f"{d}: cannot list ({e.strerror or e})") from None
        return _chain_in(sd, files)


def _chain_in(sd: SnapshotDir, files: list[tuple[int, str, str]]) -> Chain:
    warnings: list[str] = []
    fulls = [(seq, name) for seq, kind, name in files if kind == "full"]
    for seq, name in reversed(fulls):
        try:
            out = [sd.read(name)]
        except CorruptSnapshot as e:
            warnings.append(f"skipped {e}")
            continue
        full = out[0].header
        prev = seq
        for dseq, kind, dname in files:
            if kind != "delta" or dseq <= seq:
                continue
            try:
                parsed = sd.read(dname)
            except CorruptSnapshot as e:
                warnings.append(f"stopped at {e}")
                break
            h = parsed.header
            if h.base != seq:
                break
            why = continues(full, h)
            if why:
                warnings.append(f"stopped at {sd.path / dname}: {why}")
                break
            if h.prev != prev:
                warnings.append(f"stopped at {sd.path / dname}: it follows {h.prev}, expected {prev}")
                break
            out.append(parsed)
            prev = dseq
        return Chain(out, warnings)
    return Chain([], warnings)
