"""The segment format: header fields, region placement, header validation.

See docs/format.md for the same facts written for C implementers. Everything
here is little-endian. A segment is:

    [header page(s)] [slot table] [free stack] [entity index] [records (page-aligned)]

The header's first 120 bytes and the schema blob are immutable after creation
and covered by `header_crc`; the state word, allocator block, counters and
owner table after them change at run time.
"""
from __future__ import annotations

import struct
import time
import zlib
from dataclasses import dataclass

import msgpack

from ..errors import CorruptSegment, SchemaError, UnsupportedVersion
from . import layout as layout_mod
from .schema import from_wire

MAGIC = b"STATEDSG"
FORMAT_VERSION = 2       # 2: the lock is a word in the segment (A_LOCK), the semaphore only sleeps and wakes
PAGE = 4096

# --- header: immutable part (offset 0..120), then crc and state -------------------
HEADER = struct.Struct("<8sIIQIIQQQQQIIIIIIQIIQ")
HEADER_FIELDS = ("magic", "format_version", "header_size", "layout_hash", "record_size", "capacity",
                 "total_size", "slots_offset", "free_offset", "index_offset", "records_offset",
                 "index_capacity", "schema_offset", "schema_size", "owners_offset", "owners_capacity",
                 "slot_size", "created_at", "key", "reserved0", "reserved1")
assert HEADER.size == 120
OFF_FORMAT_VERSION = 8  # u32, inside the immutable part
OFF_SCHEMA_OFFSET = 76  # u32 schema_offset, then u32 schema_size, inside the immutable part
_probe = HEADER.pack(b"STATEDSG", *range(1, len(HEADER_FIELDS)))      # each field's index as its value
assert struct.unpack_from("<I", _probe, OFF_FORMAT_VERSION)[0] == HEADER_FIELDS.index("format_version")
assert struct.unpack_from("<I", _probe, OFF_SCHEMA_OFFSET)[0] == HEADER_FIELDS.index("schema_offset")
OFF_CRC = 120           # u32 crc32(header[0:120] + schema blob)
OFF_STATE = 124         # u32 state word

STATE_INITIALISING, STATE_READY, STATE_MIGRATING, STATE_RETIRED = 1, 2, 3, 4
STATE_NAMES = {STATE_INITIALISING: "initialising", STATE_READY: "ready",
               STATE_MIGRATING: "migrating", STATE_RETIRED: "retired"}

# --- allocator block at 128 (u32 words unless noted) -----------------------------
OFF_ALLOC = 128
A_FREE_TOP = 128        # u32 entries on the free stack
A_USED = 132            # u32 allocated slots
A_INTENT_OP = 136       # u32 mutation in progress (INTENT_*) or 0
A_INTENT_SLOT = 140     # u32
A_INTENT_ENTITY = 144   # u64
A_INTENT_OWNER = 152    # u32
A_INTENT_PID = 156      # u32 pid of the process that set the intent
A_INDEX_SEQ = 160       # u32 seqlock over the entity index (odd while it changes)
A_LOCK_SEQ = 164        # u32 acquisitions of the lock (wraps): tells one long hold from many short ones
A_INDEX_COUNT = 168     # u32 entries in the entity index
A_INTENT_COUNT = 176    # u64 the op's counter before it (allocations for ALLOC, frees for FREE/REAP)
A_INTENT_COUNT2 = 184   # u64 reaped_slots before a REAP
A_LOCK = 192            # u64 the table lock: 0 free, else the holder (LOCK_* bits below); own cache line
# the lock word: holder pid (bits 0-21: Linux pids stay below 2^22), the holder's start time in clock
# ticks since boot (bits 22-62, so a recycled pid never passes for the holder), bit 63: waiters may sleep
LOCK_PID_BITS, LOCK_START_BITS, LOCK_WAITERS = 22, 41, 1 << 63
INTENT_NONE, INTENT_ALLOC, INTENT_FREE, INTENT_OWNER, INTENT_REAP, INTENT_REPAIR, INTENT_RESTORE = range(7)

# --- shared counters at 256: u64 each --------------------------------------------
OFF_COUNTERS = 256
COUNTERS = ("allocations", "frees", "alloc_failures_full", "alloc_failures_duplicate", "lock_repairs",
            "lock_timeouts", "reaped_slots", "torn_reads", "settled_slots", "owner_takeovers",
            "attaches", "rebuilds")
COUNTER_OFF = {name: OFF_COUNTERS + 8 * i for i, name in enumerate(COUNTERS)}
SCHEMA_OFFSET = 512     # schema blob starts here; counters may grow up to it (32 slots)

# --- format version 1, only for the in-place upgrade (stated/shm/segment.upgrade_v1) ----------------
# Version 1 differs only here: the semaphore itself was the table lock (value 1 free, SEM_UNDO), 164 held
# the advisory holder pid, and the counters (the same COUNTERS, in the same order) started at 192, where
# version 2 keeps the lock word and reserved bytes. Everything else is byte-identical.
V1_FORMAT_VERSION = 1
V1_A_HOLDER_PID = 164   # u32 pid holding the lock (advisory); version 2's A_LOCK_SEQ
V1_OFF_COUNTERS = 192   # u64 each; version 2's A_LOCK and reserved bytes [200, 256)
V1_COUNTERS_END = V1_OFF_COUNTERS + 8 * len(COUNTERS)     # 288, inside version 2's counters
# The upgrade's own bookkeeping, in bytes reserved (zero) in both versions and zero again once it is done:
A_UPGRADE_STEP = 172    # u32 0, or how far an interrupted upgrade got (UPGRADE_*)
UPGRADE_SCRATCH = SCHEMA_OFFSET - 8 * len(COUNTERS)      # 416: the counters while they move (end of the room)
UPGRADE_SAVED, UPGRADE_MOVED = 1, 2

# --- slot table entries (32 bytes) -------------------------------------------------
SLOT = struct.Struct("<IIQHBBBBBBQ")
# snap_pending / store_pending are written by the daemon only (stated/shm/marks.py): it moves each writer's
# `dirty` mark into both, so the snapshot saver and the database store each clear their own.
SLOT_FIELDS = ("seq", "generation", "entity", "owner", "state", "flags", "dirty", "pinned",
               "snap_pending", "store_pending", "reserved1")
SLOT_SIZE = SLOT.size
assert SLOT_SIZE == 32
S_SEQ, S_GEN, S_ENTITY, S_OWNER, S_STATE, S_FLAGS, S_DIRTY, S_PINNED = 0, 4, 8, 16, 18, 19, 20, 21
S_SNAP_PENDING, S_STORE_PENDING = 22, 23
SLOT_FREE, SLOT_ALLOCATED = 0, 1
FLAG_HAS_ENTITY = 1

# --- owner table entries (64 bytes) ---------------------------------------------------
OWNER = struct.Struct("<32sIIQIIQ")
OWNER_FIELDS = ("name", "pid", "state", "start_time", "slots", "reserved", "since_ms")  # since_ms: unix ms
OWNER_SIZE = OWNER.size
O_PID, O_STATE, O_START, O_SLOTS, O_SINCE = 32, 36, 40, 48, 56     # byte offsets inside an owner entry
assert OWNER_SIZE == 64
OWNERS_CAPACITY = 255   # owner index 1..255 is stored in a slot; 0 means none
OWNER_EMPTY, OWNER_ATTACHED, OWNER_DETACHED, OWNER_DEAD = 0, 1, 2, 3
OWNER_STATE_NAMES = {OWNER_EMPTY: "empty", OWNER_ATTACHED: "attached",
                     OWNER_DETACHED: "detached", OWNER_DEAD: "dead"}

# --- entity index entries (16 bytes): u64 entity, u32 slot+1 (0 = empty), u32 pad --------
INDEX_ENTRY = struct.Struct("<QII")
INDEX_ENTRY_SIZE = 16
HASH_MUL = 0x9E3779B97F4A7C15   # Fibonacci hashing: ((entity * HASH_MUL) mod 2^64) >> (64 - bits)


def _up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class Regions:
    """Where everything sits; a pure function of (capacity, record_size, schema size)."""

    header_size: int
    slots_offset: int
    free_offset: int
    index_offset: int
    index_capacity: int
    records_offset: int
    total_size: int
    schema_offset: int
    schema_size: int
    owners_offset: int
    owners_capacity: int


def regions(capacity: int, record_size: int, schema_size: int) -> Regions:
    owners_offset = _up(SCHEMA_OFFSET + schema_size, 64)
    header_size = _up(owners_offset + OWNERS_CAPACITY * OWNER_SIZE, PAGE)
    slots = header_size
    free = _up(slots + capacity * SLOT_SIZE, 64)
    index = _up(free + capacity * 4, 64)
    index_capacity = 1 << max(4, (2 * capacity - 1).bit_length())   # power of two >= 2 * capacity
    records = _up(index + index_capacity * INDEX_ENTRY_SIZE, PAGE)
    total = records + capacity * record_size
    return Regions(header_size, slots, free, index, index_capacity, records, total,
                   SCHEMA_OFFSET, schema_size, owners_offset, OWNERS_CAPACITY)


@dataclass(frozen=True)
class Header:
    """The validated immutable header, plus the layout decoded from its schema blob."""

    key: int
    layout_hash: int
    record_size: int
    capacity: int
    regions: Regions
    layout: layout_mod.Layout
    created_at: int
    format_version: int = FORMAT_VERSION


def build_header(key: int, capacity: int, lay: layout_mod.Layout) -> tuple[bytes, Regions]:
    """Header bytes [0, SCHEMA_OFFSET + schema) for a new segment, state INITIALISING."""
    blob = layout_mod.schema_blob(lay)
    r = regions(capacity, lay.record_size, len(blob))
    fixed = HEADER.pack(MAGIC, FORMAT_VERSION, r.header_size, lay.hash, lay.record_size, capacity,
                        r.total_size, r.slots_offset, r.free_offset, r.index_offset, r.records_offset,
                        r.index_capacity, r.schema_offset, r.schema_size, r.owners_offset,
                        r.owners_capacity, SLOT_SIZE, int(time.time()), key, 0, 0)
    crc = zlib.crc32(fixed + blob)
    head = bytearray(SCHEMA_OFFSET + len(blob))
    head[0:120] = fixed
    struct.pack_into("<II", head, OFF_CRC, crc, STATE_INITIALISING)
    head[SCHEMA_OFFSET:] = blob
    return bytes(head), r


def version_message(where: str, version: int) -> str:
    """Why a segment of another format version is refused, and what to do about it."""
    have = f"{where} has format version {version}; this stated uses version {FORMAT_VERSION}."
    if version == V1_FORMAT_VERSION:
        return (f"{have} The daemon of this version upgrades its own segment in place, keeping every record, "
                f"once no other process is attached to it: stop the workers still running the old stated, then "
                f"`systemctl reload stated` (or restart the daemon); start the workers of the new version after")
    if version > FORMAT_VERSION:
        return f"{have} It was written by a newer stated: run that version, or upgrade this one"
    return f"{have} No stated ever wrote version {version}: the header was overwritten"


def parse_upgrading_header(buf, size: int, key: int) -> Header:
    """Validate the header of a format-1 segment, or of one an interrupted upgrade left between the
    formats: everything parse_header checks, except that `header_crc` may match the header with
    `format_version` 1 or 2 (the two are separate stores, so a crash can leave either one new).
    Raises CorruptSegment when neither matches: then it is damage, not an upgrade."""
    where = f"segment at key {key:#010x}"
    if size < SCHEMA_OFFSET:
        raise CorruptSegment(f"{where} is {size} bytes, too small for a stated header")
    so, ss = struct.unpack_from("<II", buf, OFF_SCHEMA_OFFSET)
    if so != SCHEMA_OFFSET or ss == 0 or so + ss > size or ss > 1 << 20:
        raise CorruptSegment(f"{where}: schema blob [{so}, +{ss}) is outside the segment")
    copy = bytearray(buf[0:so + ss])
    (crc,) = struct.unpack_from("<I", copy, OFF_CRC)
    for version in (V1_FORMAT_VERSION, FORMAT_VERSION):
        struct.pack_into("<I", copy, OFF_FORMAT_VERSION, version)
        if header_crc(copy) == crc:
            break
    else:
        raise CorruptSegment(f"{where}: header checksum mismatch as format version {V1_FORMAT_VERSION} and as "
                             f"{FORMAT_VERSION}; the header was overwritten")
    struct.pack_into("<I", copy, OFF_FORMAT_VERSION, FORMAT_VERSION)     # the rest as a version-2 header
    struct.pack_into("<I", copy, OFF_CRC, header_crc(copy))
    return parse_header(copy, size, key)


def header_crc(buf) -> int:
    """crc32(header[0:120] + schema blob) of a header whose schema fields are already validated."""
    so, ss = struct.unpack_from("<II", buf, OFF_SCHEMA_OFFSET)
    return zlib.crc32(bytes(buf[0:HEADER.size]) + bytes(buf[so:so + ss]))


def parse_header(buf, size: int, key: int) -> Header:
    """Validate a segment's header; raise CorruptSegment (naming the key) on any doubt.

    `buf` is the segment's buffer and `size` its size as the kernel reports it.
    Every offset is checked against `size` before anything at that offset is read.
    """
    where = f"segment at key {key:#010x}"
    fix = "Run `stated destroy` and restart the daemon (it restores from snapshot), or use the right key."
    if size < SCHEMA_OFFSET:
        raise CorruptSegment(f"{where} is {size} bytes, too small for a stated header. {fix}")
    vals = dict(zip(HEADER_FIELDS, HEADER.unpack_from(buf, 0)))
    if vals["magic"] != MAGIC:
        raise CorruptSegment(f"{where} does not start with stated's magic (found {vals['magic']!r}): "
                             f"another program owns this key. Choose another key in the config.")
    if vals["format_version"] != FORMAT_VERSION:
        raise UnsupportedVersion(version_message(where, vals["format_version"]))
    so, ss = vals["schema_offset"], vals["schema_size"]
    if so != SCHEMA_OFFSET or ss == 0 or so + ss > size or ss > 1 << 20:
        raise CorruptSegment(f"{where}: schema blob [{so}, +{ss}) is outside the segment. {fix}")
    blob = bytes(buf[so:so + ss])
    (crc,) = struct.unpack_from("<I", buf, OFF_CRC)
    if zlib.crc32(bytes(buf[0:120]) + blob) != crc:
        raise CorruptSegment(f"{where}: header checksum mismatch; the header was overwritten. {fix}")
    try:
        lay = layout_mod.compute(from_wire(msgpack.unpackb(blob, raw=False)))
    except (SchemaError, ValueError, msgpack.UnpackException, TypeError) as e:
        raise CorruptSegment(f"{where}: schema blob is unreadable ({e}). {fix}") from None
    cap = vals["capacity"]
    if lay.hash != vals["layout_hash"] or lay.record_size != vals["record_size"]:
        raise CorruptSegment(f"{where}: layout hash/record size disagree with its own schema. {fix}")
    if not 1 <= cap <= 1 << 26:
        raise CorruptSegment(f"{where}: capacity {cap} is out of range. {fix}")
    r = regions(cap, lay.record_size, ss)
    expect = dict(header_size=r.header_size, total_size=r.total_size, slots_offset=r.slots_offset,
                  free_offset=r.free_offset, index_offset=r.index_offset,
                  records_offset=r.records_offset, index_capacity=r.index_capacity,
                  owners_offset=r.owners_offset, owners_capacity=r.owners_capacity, slot_size=SLOT_SIZE)
    for k, v in expect.items():
        if vals[k] != v:
            raise CorruptSegment(f"{where}: {k} is {vals[k]}, expected {v} for capacity {cap}. {fix}")
    if r.total_size != size:
        raise CorruptSegment(f"{where}: header says {r.total_size} bytes but the segment has {size} "
                             f"(size mismatch). {fix}")
    return Header(key=key, layout_hash=lay.hash, record_size=lay.record_size, capacity=cap,
                  regions=r, layout=lay, created_at=vals["created_at"], format_version=FORMAT_VERSION)


# --- word indexes: the allocator block and counters as indexes into u32/u64 views of the header ---
W_FREE_TOP, W_USED, W_INTENT_OP, W_INTENT_SLOT = A_FREE_TOP // 4, A_USED // 4, A_INTENT_OP // 4, A_INTENT_SLOT // 4
W_INTENT_OWNER, W_INTENT_PID, W_INDEX_SEQ = A_INTENT_OWNER // 4, A_INTENT_PID // 4, A_INDEX_SEQ // 4
W_LOCK_SEQ, W_INDEX_COUNT = A_LOCK_SEQ // 4, A_INDEX_COUNT // 4
Q_INTENT_ENTITY, Q_INTENT_COUNT, Q_INTENT_COUNT2 = A_INTENT_ENTITY // 8, A_INTENT_COUNT // 8, A_INTENT_COUNT2 // 8
Q_LOCK = A_LOCK // 8
C = {name: i for i, name in enumerate(COUNTERS)}          # counter name -> index into SegmentViews.counters
U32, U64 = (1 << 32) - 1, (1 << 64) - 1                    # shared words wrap as C unsigned arithmetic does


class SegmentViews:
    """Named views over one attached segment: the only place where the format's offsets become
    indexes, so no other module spells an offset.

    Every slot-table field is a strided column: `v.state[i]` is slot i's state, `v.generation[i]`
    its generation, and `v.state.tobytes()` copies the whole column at C speed (scans use that, through
    copy_column when the copy may be long: a million slots).
    The allocator block is `h32`/`h64` indexed by the `W_*`/`Q_*` constants, the counters are
    `counters[C[name]]`, owner entry fields are columns indexed by `owner index - 1`, and the
    entity index is two columns (`index_entity`, `index_slot1`: slot + 1, 0 = empty).

    Reading a column element or storing one is a single aligned load or store (what the
    seqlock and the intent protocol rely on; see docs/format.md "Memory ordering").
    """

    def __init__(self, buf: memoryview, header: Header):
        r, cap = header.regions, header.capacity
        self.capacity, self.index_capacity, self.record_size = cap, r.index_capacity, header.record_size
        head = buf[0:SCHEMA_OFFSET]
        self.h32, self.h64 = head.cast("I"), head.cast("Q")
        self.counters = buf[OFF_COUNTERS:OFF_COUNTERS + 8 * len(COUNTERS)].cast("Q")
        slots = buf[r.slots_offset:r.slots_offset + cap * SLOT_SIZE]
        s8, s16, s32, s64 = slots.cast("B"), slots.cast("H"), slots.cast("I"), slots.cast("Q")
        self.seq = s32[S_SEQ // 4::SLOT_SIZE // 4]
        self.seq_low = s8[S_SEQ::SLOT_SIZE]          # byte 0 of the little-endian seq: its parity
        self.generation = s32[S_GEN // 4::SLOT_SIZE // 4]
        self.entity = s64[S_ENTITY // 8::SLOT_SIZE // 8]
        self.owner = s16[S_OWNER // 2::SLOT_SIZE // 2]
        self.state = s8[S_STATE::SLOT_SIZE]
        self.flags = s8[S_FLAGS::SLOT_SIZE]
        self.dirty = s8[S_DIRTY::SLOT_SIZE]
        self.pinned = s8[S_PINNED::SLOT_SIZE]
        self.snap_pending = s8[S_SNAP_PENDING::SLOT_SIZE]     # daemon only: stated/shm/marks.py
        self.store_pending = s8[S_STORE_PENDING::SLOT_SIZE]
        self.free = buf[r.free_offset:r.free_offset + 4 * cap].cast("I")
        self.index = buf[r.index_offset:r.index_offset + r.index_capacity * INDEX_ENTRY_SIZE]
        self.index_entity = self.index.cast("Q")[0::INDEX_ENTRY_SIZE // 8]
        self.index_slot1 = self.index.cast("I")[8 // 4::INDEX_ENTRY_SIZE // 4]
        owners = buf[r.owners_offset:r.owners_offset + OWNERS_CAPACITY * OWNER_SIZE]
        o32, o64 = owners.cast("I"), owners.cast("Q")
        self.owner_pid = o32[O_PID // 4::OWNER_SIZE // 4]
        self.owner_state = o32[O_STATE // 4::OWNER_SIZE // 4]
        self.owner_slots = o32[O_SLOTS // 4::OWNER_SIZE // 4]
        self.owner_since_ms = o64[O_SINCE // 8::OWNER_SIZE // 8]
        self.records = buf[r.records_offset:r.records_offset + cap * header.record_size]
        self._all = [self.h32, self.h64, self.counters, self.seq, self.seq_low, self.generation, self.entity,
                     self.owner, self.state, self.flags, self.dirty, self.pinned, self.snap_pending,
                     self.store_pending, s8, s16, s32, s64, slots,
                     self.free, self.index_entity, self.index_slot1, self.index, self.owner_pid,
                     self.owner_state, self.owner_slots, self.owner_since_ms, o32, o64, owners, self.records,
                     head]

    def release(self) -> None:
        """Release every view (the segment can then be detached)."""
        for v in self._all:
            v.release()

    def bump(self, counter: str) -> None:
        """counters[name] += 1, wrapping at 2^64."""
        i = C[counter]
        self.counters[i] = (self.counters[i] + 1) & U64

    def marked_slots(self) -> int:
        """How many slots the next snapshot copies: dirty, harvested into snap_pending, or pinned (three
        C-speed column copies, in blocks: see copy_column)."""
        marks = (int.from_bytes(copy_column(self.dirty), "little") | int.from_bytes(copy_column(self.pinned), "little")
                 | int.from_bytes(copy_column(self.snap_pending), "little"))
        return self.capacity - marks.to_bytes(self.capacity, "little").count(0)


COPY_BLOCK = 1 << 16    # elements per C call when a whole column is copied or cleared


def copy_column(col: memoryview) -> bytes:
    """A copy of a whole (strided) column, made COPY_BLOCK elements per C call: the same bytes as
    col.tobytes(), but a thread copying a million-slot column lets another (the daemon's event loop)
    take the GIL between blocks instead of waiting out one long copy."""
    if len(col) <= COPY_BLOCK:
        return col.tobytes()
    return b"".join([col[i:i + COPY_BLOCK].tobytes() for i in range(0, len(col), COPY_BLOCK)])


def clear_column(col: memoryview, lo: int = 0, hi: int | None = None) -> None:
    """Zero col[lo:hi] (a byte column), COPY_BLOCK elements per C call (see copy_column)."""
    hi = len(col) if hi is None else hi
    for i in range(lo, hi, COPY_BLOCK):
        j = min(hi, i + COPY_BLOCK)
        col[i:j] = bytes(j - i)


def schema_blob_of(h: Header) -> bytes:
    """The schema blob a header was validated with (derived again from its layout)."""
    return layout_mod.schema_blob(h.layout)


def read_state(buf) -> int:
    return struct.unpack_from("<I", buf, OFF_STATE)[0]


def write_state(buf, state: int) -> None:
    struct.pack_into("<I", buf, OFF_STATE, state)
