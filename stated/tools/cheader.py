"""`stated header`: one self-contained C11 header for C (and C++-via-C) game workers.

`generate([(name, key, layout), ...])` returns the text of a header that needs
only <stdint.h>, <stdbool.h>, <stddef.h> and <string.h>. It holds:

- the segment format (header, allocator block, counters, slot, owner and index
  entries) as structs, every offset pinned by `_Static_assert` to the numbers in
  format.py, so a header and a segment can never silently disagree;
- per table: `struct stated_<table>` with fields at exactly the Layout offsets,
  the key, layout hash and record size, accessors and a header check;
- seqlock helpers and a lock-free entity lookup that follow docs/format.md.

Everything is derived from format.py and the Layout objects at generation time;
nothing here restates an offset by hand. Output is deterministic (no dates), so
regenerating an unchanged config gives an identical file.
"""
from __future__ import annotations

import hashlib
import re
import struct
from pathlib import Path

from ..format import segment as fmt
from ..format.layout import Layout
from ..format.schema import SCALARS
from ..shm.records import default_record, record_class

__all__ = ["generate", "format_header", "core_parts"]

# struct-module codes used by format.py -> (C type, size)
_CODES = {"B": ("uint8_t", 1), "H": ("uint16_t", 2), "I": ("uint32_t", 4), "Q": ("uint64_t", 8),
          "s": ("char", 1)}

# Words a field may not be called in C: keywords, plus names <stdbool.h>/<stddef.h>
# define as macros, plus macros GCC predefines in its default GNU modes.
_C_RESERVED = frozenset("""
auto break case char const continue default do double else enum extern float for goto if inline int long
register restrict return short signed sizeof static struct switch typedef union unsigned void volatile while
bool true false NULL offsetof alignas alignof noreturn static_assert thread_local asm typeof
typeof_unqual constexpr nullptr linux unix i386 errno
""".split())

# Errors returned by the generated helpers (0 is success).
ERRORS = [
    ("MAGIC", "not a stated segment (magic mismatch)"),
    ("VERSION", "unsupported segment format version"),
    ("LAYOUT", "layout hash differs: the segment was created from another schema; regenerate the header"),
    ("RECORD_SIZE", "record size differs from the compiled-in layout"),
    ("SIZE", "segment size disagrees with its header (truncated or wrong segment)"),
    ("CRC", "header checksum mismatch (header overwritten)"),
    ("REGIONS", "header region offsets disagree with the format's placement rules"),
    ("STATE", "segment is not ready (initialising, migrating or retired)"),
    ("FREE", "slot is not allocated (or was freed/reused while reading)"),
    ("TORN", "could not get a consistent copy (a writer is mid-write or died mid-write)"),
    ("RANGE", "slot index outside [0, capacity)"),
    ("NOT_FOUND", "no such entity"),
    # the native core (stated/native/stated_core.h); never renumber: codes are an ABI
    ("FULL", "table is full: every slot is allocated"),
    ("DUPLICATE", "entity already has a slot"),
    ("STALE", "stale handle: the slot was freed (and maybe reused)"),
    ("NOT_OWNER", "the slot belongs to another owner (or no owner name was given)"),
    ("OWNER_BUSY", "a live process already holds this owner name"),
    ("OWNERS_EXHAUSTED", "every owner entry is taken by owners that still hold slots"),
    ("LOCK_TIMEOUT", "allocator lock not obtained within the lock timeout"),
    ("CORRUPT", "allocator state still inconsistent after a rebuild (corrupt segment)"),
    ("READONLY", "attached read-only"),
    ("NO_SEGMENT", "no segment or semaphore at the key (is the daemon running?)"),
    ("FOREIGN", "segment or semaphore created by an untrusted user or with too wide a mode"),
    ("PERMISSION", "permission denied (run in the daemon's group)"),
    ("SYSTEM", "system call failed (see errno)"),
    ("INVAL", "invalid argument"),
    ("INTERRUPTED", "interrupted by a signal"),
    ("NESTED", "already inside a write section (write sections do not nest)"),
]


def _struct_fields(st: struct.Struct, names: tuple[str, ...]) -> list[tuple[str, str, int, int]]:
    """(name, C type, array length or 0, offset) for a little-endian struct.Struct of format.py."""
    f = st.format
    assert f[0] == "<", f
    toks = re.findall(r"(\d*)([a-zA-Z?])", f[1:])
    assert len(toks) == len(names), (f, names)
    out, off = [], 0
    for (n, code), name in zip(toks, names):
        ctype, size = _CODES[code]
        if code == "s":
            count = int(n or 1)
            out.append((name, ctype, count, off))
            off += count
        else:
            assert not n, f"repeat counts are not used in format structs ({f})"
            if off % size:
                raise AssertionError(f"format field {name} at {off} is not naturally aligned; C would pad")
            out.append((name, ctype, 0, off))
            off += size
    assert off == st.size
    return out


def _decl(name: str, ctype: str, count: int) -> str:
    return f"{ctype} {name}[{count}];" if count else f"{ctype} {name};"


def _struct(tag: str, fields: list[tuple[str, str, int, int]], size: int, indent: str = "    ") -> list[str]:
    """A struct definition with explicit padding, plus offsetof/sizeof static asserts."""
    lines = [f"struct {tag} {{"]
    end = 0
    for name, ctype, count, off in fields:
        if off > end:
            lines.append(f"{indent}uint8_t _pad_{end}[{off - end}];")
        lines.append(f"{indent}{_decl(name, ctype, count)}")
        end = off + (_CODES_SIZE.get(ctype, 1) * (count or 1))
    if size > end:
        lines.append(f"{indent}uint8_t _pad_{end}[{size - end}];")
    lines.append("};")
    lines += _asserts(tag, fields, size)
    return lines


_CODES_SIZE = {"uint8_t": 1, "int8_t": 1, "char": 1, "bool": 1, "uint16_t": 2, "int16_t": 2,
               "uint32_t": 4, "int32_t": 4, "float": 4, "uint64_t": 8, "int64_t": 8, "double": 8}


def _asserts(tag: str, fields, size: int) -> list[str]:
    out = [f"_Static_assert(sizeof(struct {tag}) == {size}, \"struct {tag} must be {size} bytes\");"]
    for name, _ctype, _count, off in fields:
        out.append(f"_Static_assert(offsetof(struct {tag}, {name}) == {off}, "
                   f"\"{tag}.{name} must sit at offset {off}\");")
    return out


def _cname(field: str) -> str:
    """The C member name of a field: C keywords and macro names get a trailing underscore."""
    return field + "_" if field in _C_RESERVED or field.startswith("STATED_") else field


def _common() -> list[str]:
    """Everything that depends only on the segment format (shared by all tables)."""
    L: list[str] = []
    a = L.append
    magic_u64 = int.from_bytes(fmt.MAGIC, "little")
    a(f"#ifndef STATED_COMMON_FORMAT_{fmt.FORMAT_VERSION}_H")
    a(f"#define STATED_COMMON_FORMAT_{fmt.FORMAT_VERSION}_H")
    a("")
    a("#if !defined(__GNUC__)")
    a("#error \"stated headers use the GCC/Clang __atomic builtins\"")
    a("#endif")
    a("#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__")
    a("#error \"stated segments are little-endian; this target is not\"")
    a("#endif")
    a("_Static_assert(sizeof(bool) == 1 && sizeof(float) == 4 && sizeof(double) == 8,")
    a("               \"stated records need 1-byte bool, 4-byte float, 8-byte double\");")
    a("_Static_assert(_Alignof(uint64_t) == 8 && _Alignof(double) == 8,")
    a("               \"stated layouts assume 8-byte alignment of 64-bit types (a 64-bit ABI)\");")
    a("")
    a("/* ---- segment format constants ------------------------------------------------ */")
    a(f"#define STATED_MAGIC \"{fmt.MAGIC.decode()}\"          /* 8 bytes at offset 0, no NUL */")
    a(f"#define STATED_MAGIC_U64 0x{magic_u64:016X}ULL  /* the same bytes read as a little-endian u64 */")
    a(f"#define STATED_FORMAT_VERSION {fmt.FORMAT_VERSION}u")
    a(f"#define STATED_PAGE {fmt.PAGE}u")
    a(f"#define STATED_HEADER_FIXED_SIZE {fmt.HEADER.size}u   /* bytes covered by header_crc (plus the schema blob) */")
    a(f"#define STATED_SCHEMA_OFFSET {fmt.SCHEMA_OFFSET}u")
    a(f"#define STATED_SLOT_SIZE {fmt.SLOT_SIZE}u")
    a(f"#define STATED_OWNER_SIZE {fmt.OWNER_SIZE}u")
    a(f"#define STATED_OWNER_NAME_MAX {_struct_fields(fmt.OWNER, fmt.OWNER_FIELDS)[0][2]}u")
    a(f"#define STATED_OWNERS_CAPACITY {fmt.OWNERS_CAPACITY}u  /* owner indexes 1..255; 0 = no owner */")
    a(f"#define STATED_INDEX_ENTRY_SIZE {fmt.INDEX_ENTRY_SIZE}u")
    a(f"#define STATED_MAX_CAPACITY {1 << 26}u")
    a(f"#define STATED_MAX_SCHEMA_SIZE {1 << 20}u")
    a(f"#define STATED_HASH_MUL 0x{fmt.HASH_MUL:016X}ULL  /* Fibonacci hashing multiplier */")
    a("")
    a("/* segment state word (header.state) */")
    for v, n in sorted(fmt.STATE_NAMES.items()):
        a(f"#define STATED_STATE_{n.upper()} {v}u")
    a("/* slot states (stated_slot.state) and flags (stated_slot.flags) */")
    a(f"#define STATED_SLOT_FREE {fmt.SLOT_FREE}u")
    a(f"#define STATED_SLOT_ALLOCATED {fmt.SLOT_ALLOCATED}u")
    a(f"#define STATED_FLAG_HAS_ENTITY {fmt.FLAG_HAS_ENTITY}u")
    a("/* owner entry states (stated_owner.state) */")
    for v, n in sorted(fmt.OWNER_STATE_NAMES.items()):
        a(f"#define STATED_OWNER_{n.upper()} {v}u")
    a("/* allocator intent ops (stated_allocator.intent_op); 0 = no mutation in progress */")
    intents = ("NONE", "ALLOC", "FREE", "OWNER", "REAP", "REPAIR", "RESTORE")
    for n in intents:
        a(f"#define STATED_INTENT_{n} {getattr(fmt, 'INTENT_' + n)}u")
    a("/* indexes into stated_segment_header.counters[] (u64 each, written under the allocator lock) */")
    for i, n in enumerate(fmt.COUNTERS):
        a(f"#define STATED_COUNTER_{n.upper()} {i}u")
    n_counter_slots = (fmt.SCHEMA_OFFSET - fmt.OFF_COUNTERS) // 8
    a(f"#define STATED_COUNTER_COUNT {len(fmt.COUNTERS)}u")
    a(f"#define STATED_COUNTER_SLOTS {n_counter_slots}u   /* room reserved before the schema blob */")
    a("")
    a("/* return codes of the helpers below: 0 = success */")
    a("#define STATED_OK 0")
    for i, (n, _) in enumerate(ERRORS, 1):
        a(f"#define STATED_ERR_{n} (-{i})")
    a("")

    # ---- segment header -------------------------------------------------------------
    hdr = _struct_fields(fmt.HEADER, fmt.HEADER_FIELDS)
    alloc_fields = [("free_top", "uint32_t", 0, fmt.A_FREE_TOP), ("used", "uint32_t", 0, fmt.A_USED),
                    ("intent_op", "uint32_t", 0, fmt.A_INTENT_OP),
                    ("intent_slot", "uint32_t", 0, fmt.A_INTENT_SLOT),
                    ("intent_entity", "uint64_t", 0, fmt.A_INTENT_ENTITY),
                    ("intent_owner", "uint32_t", 0, fmt.A_INTENT_OWNER),
                    ("intent_pid", "uint32_t", 0, fmt.A_INTENT_PID),
                    ("index_seq", "uint32_t", 0, fmt.A_INDEX_SEQ),
                    ("holder_pid", "uint32_t", 0, fmt.A_HOLDER_PID),
                    ("index_count", "uint32_t", 0, fmt.A_INDEX_COUNT),
                    ("intent_count", "uint64_t", 0, fmt.A_INTENT_COUNT),
                    ("intent_count2", "uint64_t", 0, fmt.A_INTENT_COUNT2)]
    alloc_size = fmt.OFF_COUNTERS - fmt.OFF_ALLOC
    a("/* ---- the allocator block (header offset %d, %d bytes) ----------------------------" % (
        fmt.OFF_ALLOC, alloc_size))
    a(" * Written only by the holder of the table's semaphore (see docs/format.md,")
    a(" * \"Allocator protocol\"). Readers may look at free_top/used/index_count for stats. */")
    a_rel = [(n, t, c, off - fmt.OFF_ALLOC) for n, t, c, off in alloc_fields]
    L += _struct("stated_allocator", a_rel, alloc_size)
    a("")
    a("/* ---- segment header: bytes [0, %d) of every segment ------------------------------" % fmt.SCHEMA_OFFSET)
    a(" * [0, %d) is immutable after creation and covered by header_crc together with the" % fmt.HEADER.size)
    a(" * schema blob at [schema_offset, schema_offset + schema_size). */")
    full = list(hdr) + [("header_crc", "uint32_t", 0, fmt.OFF_CRC), ("state", "uint32_t", 0, fmt.OFF_STATE)]
    lines = ["struct stated_segment_header {"]
    for name, ctype, count, _off in full:
        lines.append(f"    {_decl(name, ctype, count)}")
    lines.append("    struct stated_allocator alloc;")
    lines.append(f"    uint64_t counters[{n_counter_slots}];")
    lines.append("};")
    L += lines
    L += _asserts("stated_segment_header",
                  full + [("alloc", "", 0, fmt.OFF_ALLOC), ("counters", "", 0, fmt.OFF_COUNTERS)],
                  fmt.SCHEMA_OFFSET)
    for n, _t, _c, off in alloc_fields:
        a(f"_Static_assert(offsetof(struct stated_segment_header, alloc) + offsetof(struct stated_allocator, "
          f"{n}) == {off}, \"allocator.{n} must sit at header offset {off}\");")
    for n, off in fmt.COUNTER_OFF.items():
        a(f"_Static_assert(offsetof(struct stated_segment_header, counters) + 8 * STATED_COUNTER_{n.upper()} "
          f"== {off}, \"counter {n} must sit at header offset {off}\");")
    a("")
    a("/* ---- slot table entry (%d bytes; slot i at slots_offset + i * %d) ------------------" % (
        fmt.SLOT_SIZE, fmt.SLOT_SIZE))
    a(" * seq: record seqlock (odd while a writer is inside a write section)")
    a(" * generation: bumped on every alloc and free; a (slot, generation) handle is valid")
    a(" *   while generation matches and state == STATED_SLOT_ALLOCATED")
    a(" * entity: valid when flags & STATED_FLAG_HAS_ENTITY; owner: owner index 1..255 (0 none)")
    a(" * dirty: 1 = record changed since the last snapshot; pinned: 1 = copy on every snapshot */")
    L += _struct("stated_slot", _struct_fields(fmt.SLOT, fmt.SLOT_FIELDS), fmt.SLOT_SIZE)
    a("")
    a("/* ---- owner table entry (%d bytes; owner index k (1-based) at owners_offset + (k-1)*%d) ----" % (
        fmt.OWNER_SIZE, fmt.OWNER_SIZE))
    a(" * name: UTF-8, NUL-padded, not NUL-terminated when 32 bytes long; start_time: clock")
    a(" * ticks since boot (/proc/<pid>/stat field 22) identifying pid; since_ms: unix time in milliseconds. */")
    L += _struct("stated_owner", _struct_fields(fmt.OWNER, fmt.OWNER_FIELDS), fmt.OWNER_SIZE)
    a("")
    a("/* ---- entity index entry (%d bytes; open addressing, index_capacity entries) ------------" %
      fmt.INDEX_ENTRY_SIZE)
    a(" * slot_plus_one == 0 marks an empty entry. */")
    L += _struct("stated_index_entry",
                 _struct_fields(fmt.INDEX_ENTRY, ("entity", "slot_plus_one", "reserved")),
                 fmt.INDEX_ENTRY_SIZE)
    a("")
    L += _COMMON_CODE.strip("\n").split("\n")
    a("")
    a(f"#endif /* STATED_COMMON_FORMAT_{fmt.FORMAT_VERSION}_H */")
    return L


_COMMON_CODE = r"""
/* ---- RULES FOR C CODE ----------------------------------------------------------------
 *
 * 1. Validate before trusting anything: stated_validate(base, shm_size) (structure,
 *    crc, size, state) and stated_<table>_check(base) (magic, version, layout hash and
 *    record size compiled into this header). shm_size is shm_segsz from
 *    shmctl(IPC_STAT). A non-zero result means: do not read the segment.
 * 2. Slots and records: slot i's record is at records_offset + i * record_size. Use a
 *    slot only when stated_slot.state == STATED_SLOT_ALLOCATED, and remember its
 *    generation: it changes on free and on reuse.
 * 3. Writing: a C writer must only write slots its owner owns (stated_slot.owner equals
 *    its owner index, see stated_owner_find) - never another worker's slots. Bracket
 *    writes with stated_write_begin()/stated_write_end() (seqlock; write_end sets
 *    dirty = 1), or, for single aligned scalar stores outside a section, call
 *    stated_mark_dirty() after writing. A write that leaves dirty = 0 may be missing
 *    from the next snapshot (and lost on a restore).
 * 4. Do not nest write sections, and keep them short: readers spin while seq is odd;
 *    a writer that dies mid-section leaves seq odd until the owner re-attaches or
 *    the slot is freed (Python readers then raise TornRecord).
 * 5. Allocation, free, owner claims and the entity index belong to the allocator:
 *    use the native core at the end of this header (stated_open, stated_alloc,
 *    stated_free, stated_lookup, ...: compiled in the one translation unit that
 *    defines STATED_IMPLEMENTATION), or the Python API. Never mutate allocator state
 *    (slot states, free stack, index, owners) by hand.
 * 6. Reading: stated_read_begin()/stated_read_retry() around a copy give a consistent
 *    record (see stated_read_record for the full loop with generation and state
 *    checks). Fields written by Python through live views (table.record(h)) are plain
 *    stores outside any section: each aligned scalar <= 8 bytes is atomic, a whole
 *    record is not.
 * 7. str[N] fields are UTF-8, NUL-padded, and NOT NUL-terminated when N bytes long:
 *    print with "%.*s" and strnlen-like loops. bytes[N] are raw. bool is 0 or 1.
 * 8. Memory ordering: these helpers use __atomic builtins and are correct on any CPU.
 *    The Python side's seqlock relies on x86-64 total store order; on weakly ordered
 *    CPUs (ARM) Python writers are not fenced (docs/format.md, "Memory ordering").
 * ------------------------------------------------------------------------------------ */

/* ---- segment-level helpers ----------------------------------------------------------- */
static inline struct stated_segment_header *stated_header(void *base)
{
    return (struct stated_segment_header *)base;
}

static inline struct stated_slot *stated_slot_at(void *base, uint32_t slot)
{
    const struct stated_segment_header *h = (const struct stated_segment_header *)base;
    return (struct stated_slot *)((unsigned char *)base + h->slots_offset + (size_t)slot * STATED_SLOT_SIZE);
}

/* owner index 1..STATED_OWNERS_CAPACITY (as stored in stated_slot.owner) */
static inline struct stated_owner *stated_owner_at(void *base, uint32_t owner_index)
{
    const struct stated_segment_header *h = (const struct stated_segment_header *)base;
    return (struct stated_owner *)((unsigned char *)base + h->owners_offset
                                   + (size_t)(owner_index - 1u) * STATED_OWNER_SIZE);
}

static inline struct stated_index_entry *stated_index_at(void *base, uint32_t entry)
{
    const struct stated_segment_header *h = (const struct stated_segment_header *)base;
    return (struct stated_index_entry *)((unsigned char *)base + h->index_offset
                                         + (size_t)entry * STATED_INDEX_ENTRY_SIZE);
}

/* zlib-compatible CRC-32 (IEEE 802.3, reflected, init/xorout 0xFFFFFFFF); chain with crc = 0 first */
static inline uint32_t stated_crc32(uint32_t crc, const void *data, size_t len)
{
    const unsigned char *p = (const unsigned char *)data;
    crc = ~crc;
    while (len--) {
        crc ^= *p++;
        for (int k = 0; k < 8; k++)
            crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
    }
    return ~crc;
}

static inline uint64_t stated_round_up(uint64_t n, uint64_t a)
{
    return (n + a - 1u) / a * a;
}

/* index_capacity for a capacity: the power of two >= 2 * capacity, at least 16 */
static inline uint64_t stated_index_capacity_for(uint64_t capacity)
{
    unsigned bits = 0;
    for (uint64_t v = 2u * capacity - 1u; v; v >>= 1)
        bits++;
    if (bits < 4u)
        bits = 4u;
    return (uint64_t)1 << bits;
}

/* Structural validation of a segment of `size` bytes (shm_segsz); 0 or STATED_ERR_*.
 * Applies every rule of docs/format.md "Validation" except decoding the schema blob
 * (the per-table layout hash check stands in for it). */
static inline int stated_validate(const void *base, size_t size)
{
    const struct stated_segment_header *h = (const struct stated_segment_header *)base;
    const unsigned char *b = (const unsigned char *)base;
    if (size < STATED_SCHEMA_OFFSET)
        return STATED_ERR_SIZE;
    if (memcmp(h->magic, STATED_MAGIC, 8) != 0)
        return STATED_ERR_MAGIC;
    if (h->format_version != STATED_FORMAT_VERSION)
        return STATED_ERR_VERSION;
    if (h->schema_offset != STATED_SCHEMA_OFFSET || h->schema_size == 0u
        || h->schema_size > STATED_MAX_SCHEMA_SIZE || (uint64_t)h->schema_offset + h->schema_size > size)
        return STATED_ERR_REGIONS;
    uint32_t crc = stated_crc32(0u, b, STATED_HEADER_FIXED_SIZE);
    crc = stated_crc32(crc, b + h->schema_offset, h->schema_size);
    if (crc != h->header_crc)
        return STATED_ERR_CRC;
    uint64_t cap = h->capacity;
    if (cap < 1u || cap > STATED_MAX_CAPACITY || h->record_size == 0u || h->record_size % 8u != 0u
        || h->slot_size != STATED_SLOT_SIZE)
        return STATED_ERR_REGIONS;
    uint64_t owners = stated_round_up((uint64_t)STATED_SCHEMA_OFFSET + h->schema_size, 64u);
    uint64_t header_size = stated_round_up(owners + (uint64_t)STATED_OWNERS_CAPACITY * STATED_OWNER_SIZE,
                                           STATED_PAGE);
    uint64_t slots = header_size;
    uint64_t free_ = stated_round_up(slots + cap * STATED_SLOT_SIZE, 64u);
    uint64_t index = stated_round_up(free_ + cap * 4u, 64u);
    uint64_t icap = stated_index_capacity_for(cap);
    uint64_t records = stated_round_up(index + icap * STATED_INDEX_ENTRY_SIZE, STATED_PAGE);
    uint64_t total = records + cap * h->record_size;
    if (h->owners_offset != owners || h->owners_capacity != STATED_OWNERS_CAPACITY
        || h->header_size != header_size || h->slots_offset != slots || h->free_offset != free_
        || h->index_offset != index || h->index_capacity != icap || h->records_offset != records
        || h->total_size != total)
        return STATED_ERR_REGIONS;
    if (total != size)
        return STATED_ERR_SIZE;
    if (__atomic_load_n(&h->state, __ATOMIC_ACQUIRE) != STATED_STATE_READY)
        return STATED_ERR_STATE;
    return STATED_OK;
}

static inline const char *stated_strerror(int code)
{
    switch (code) {
    case STATED_OK: return "ok";
@ERRORS@
    default: return "unknown error";
    }
}

/* Owner index (1..255) of the owner entry named `name`, or 0 when there is none.
 * A plain read of the owner table: the allocator lock holder may change it meanwhile. */
static inline uint32_t stated_owner_find(void *base, const char *name)
{
    const struct stated_segment_header *h = (const struct stated_segment_header *)base;
    size_t n = strlen(name);
    if (n == 0u || n > STATED_OWNER_NAME_MAX)
        return 0u;
    for (uint32_t k = 1; k <= h->owners_capacity && k <= STATED_OWNERS_CAPACITY; k++) {
        const struct stated_owner *o = stated_owner_at(base, k);
        if (o->state != STATED_OWNER_EMPTY && memcmp(o->name, name, n) == 0
            && (n == STATED_OWNER_NAME_MAX || o->name[n] == '\0'))
            return k;
    }
    return 0u;
}

/* ---- record seqlock ----------------------------------------------------------------------
 * Writer (only the slot's owner):            Reader (anyone):
 *   stated_write_begin(s);                      do { seq = stated_read_begin(s);
 *   ... store fields ...                             copy the record;
 *   stated_write_end(s);   (sets dirty = 1)      } while (stated_read_retry(s, seq));
 * A reader must also compare s->generation before and after (stated_read_record does),
 * because alloc and free change the slot without touching seq. */
static inline void stated_write_begin(struct stated_slot *s)
{
    uint32_t seq = __atomic_load_n(&s->seq, __ATOMIC_RELAXED);
    /* even -> odd; an odd seq left by a writer that died mid-section is moved on to the next odd */
    __atomic_store_n(&s->seq, (seq + 1u) | 1u, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);   /* seq is odd before any field store is visible */
}

static inline void stated_write_end(struct stated_slot *s)
{
    uint32_t seq = __atomic_load_n(&s->seq, __ATOMIC_RELAXED);
    __atomic_store_n(&s->seq, seq + 1u, __ATOMIC_RELEASE);   /* field stores are visible before seq */
    __atomic_store_n(&s->dirty, (uint8_t)1, __ATOMIC_RELEASE);
}

/* after plain stores outside a write section */
static inline void stated_mark_dirty(struct stated_slot *s)
{
    __atomic_store_n(&s->dirty, (uint8_t)1, __ATOMIC_RELEASE);
}

static inline uint32_t stated_read_begin(const struct stated_slot *s)
{
    return __atomic_load_n(&s->seq, __ATOMIC_ACQUIRE);
}

/* true when the copy made since stated_read_begin() returned `seq` must be discarded */
static inline bool stated_read_retry(const struct stated_slot *s, uint32_t seq)
{
    __atomic_thread_fence(__ATOMIC_ACQUIRE);   /* the copy's loads complete before seq is re-read */
    return (seq & 1u) != 0u || __atomic_load_n(&s->seq, __ATOMIC_RELAXED) != seq;
}

/* Consistent copy of slot `slot`'s record (record_size bytes) into `out`.
 * Returns 0 (and *generation when non-NULL), STATED_ERR_RANGE, STATED_ERR_FREE (not
 * allocated), STATED_ERR_RECORD_SIZE, or STATED_ERR_TORN after max_tries attempts. */
static inline int stated_read_record(void *base, uint32_t slot, void *out, size_t record_size,
                                     uint32_t *generation, uint32_t max_tries)
{
    const struct stated_segment_header *h = (const struct stated_segment_header *)base;
    if (slot >= h->capacity)
        return STATED_ERR_RANGE;
    if (record_size != h->record_size)
        return STATED_ERR_RECORD_SIZE;
    const struct stated_slot *s = stated_slot_at(base, slot);
    const unsigned char *rec = (const unsigned char *)base + h->records_offset + (size_t)slot * record_size;
    for (uint32_t i = 0; i < max_tries; i++) {
        uint32_t seq = stated_read_begin(s);
        uint32_t gen = __atomic_load_n(&s->generation, __ATOMIC_ACQUIRE);
        if (__atomic_load_n(&s->state, __ATOMIC_ACQUIRE) != STATED_SLOT_ALLOCATED)
            return STATED_ERR_FREE;
        if (seq & 1u)
            continue;
        memcpy(out, rec, record_size);
        if (stated_read_retry(s, seq) || __atomic_load_n(&s->generation, __ATOMIC_RELAXED) != gen)
            continue;
        if (generation)
            *generation = gen;
        return STATED_OK;
    }
    return STATED_ERR_TORN;
}

/* Home entry of an entity: ((entity * STATED_HASH_MUL) mod 2^64) >> (64 - log2(index_capacity)) */
static inline uint64_t stated_index_home(uint64_t entity, uint64_t index_capacity)
{
    unsigned bits = 0;
    while (((uint64_t)1 << bits) < index_capacity)
        bits++;
    return (entity * STATED_HASH_MUL) >> (64u - bits);
}

/* Lock-free entity lookup over a mapped segment (the index seqlock of docs/format.md), for
 * readers that do not use the core's stated_lookup(stated_table *, ...). 0 and *slot (and
 * *generation) when found, STATED_ERR_NOT_FOUND, or STATED_ERR_TORN when the index kept
 * changing for max_tries attempts (the core then takes the lock; a reader may simply retry). */
static inline int stated_index_lookup(void *base, uint64_t entity, uint32_t *slot, uint32_t *generation,
                                uint32_t max_tries)
{
    const struct stated_segment_header *h = (const struct stated_segment_header *)base;
    uint64_t icap = h->index_capacity, mask = icap - 1u;
    for (uint32_t t = 0; t < max_tries; t++) {
        uint32_t seq = __atomic_load_n(&h->alloc.index_seq, __ATOMIC_ACQUIRE);
        if (seq & 1u)
            continue;
        int64_t found = -1;
        uint64_t e = stated_index_home(entity, icap);
        for (uint64_t n = 0; n < icap; n++, e = (e + 1u) & mask) {
            const struct stated_index_entry *ie = stated_index_at(base, (uint32_t)e);
            uint32_t sp1 = __atomic_load_n(&ie->slot_plus_one, __ATOMIC_RELAXED);
            if (sp1 == 0u)
                break;
            if (__atomic_load_n(&ie->entity, __ATOMIC_RELAXED) == entity) {
                found = (int64_t)sp1 - 1;
                break;
            }
        }
        uint32_t gen = 0;
        bool ok = false;
        if (found >= 0 && (uint64_t)found < h->capacity) {
            const struct stated_slot *s = stated_slot_at(base, (uint32_t)found);
            gen = __atomic_load_n(&s->generation, __ATOMIC_ACQUIRE);
            ok = __atomic_load_n(&s->state, __ATOMIC_ACQUIRE) == STATED_SLOT_ALLOCATED
                 && (__atomic_load_n(&s->flags, __ATOMIC_RELAXED) & STATED_FLAG_HAS_ENTITY)
                 && __atomic_load_n(&s->entity, __ATOMIC_RELAXED) == entity;
        }
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_load_n(&h->alloc.index_seq, __ATOMIC_RELAXED) != seq)
            continue;
        if (found < 0)
            return STATED_ERR_NOT_FOUND;
        if (!ok)
            continue;   /* index and slot table disagree for a moment (mid-free): look again */
        if (slot)
            *slot = (uint32_t)found;
        if (generation)
            *generation = gen;
        return STATED_OK;
    }
    return STATED_ERR_TORN;
}
"""


_TABLE_CODE = r"""
static inline struct stated_@T@ *stated_@T@_at(void *base, uint32_t slot)
{
    const struct stated_segment_header *h = (const struct stated_segment_header *)base;
    return (struct stated_@T@ *)((unsigned char *)base + h->records_offset
                                 + (size_t)slot * STATED_@U@_RECORD_SIZE);
}

static inline struct stated_slot *stated_@T@_slot(void *base, uint32_t slot)
{
    return stated_slot_at(base, slot);
}

/* 0 when the segment at `base` holds this table's layout; STATED_ERR_MAGIC,
 * STATED_ERR_VERSION, STATED_ERR_LAYOUT or STATED_ERR_RECORD_SIZE otherwise.
 * Call stated_validate(base, shm_size) as well to check structure, crc and state. */
static inline int stated_@T@_check(const void *base)
{
    const struct stated_segment_header *h = (const struct stated_segment_header *)base;
    if (memcmp(h->magic, STATED_MAGIC, 8) != 0)
        return STATED_ERR_MAGIC;
    if (h->format_version != STATED_FORMAT_VERSION)
        return STATED_ERR_VERSION;
    if (h->layout_hash != STATED_@U@_LAYOUT_HASH)
        return STATED_ERR_LAYOUT;
    if (h->record_size != STATED_@U@_RECORD_SIZE)
        return STATED_ERR_RECORD_SIZE;
    return STATED_OK;
}

/* Attach this table with the native core (key, layout hash and field defaults compiled in);
 * owner NULL: read-only observer. See stated_open_ex. */
static inline int stated_open_@T@(const char *owner, stated_table *t)
{
    stated_options o;
    stated_options_init(&o);
    o.name = "@T@";
    o.layout_hash = STATED_@U@_LAYOUT_HASH;
    o.init = stated_@T@_defaults();
    return stated_open_ex((stated_key_t)STATED_@U@_KEY, owner, &o, t);
}

/* consistent copy of one record; see stated_read_record */
static inline int stated_@T@_read(void *base, uint32_t slot, struct stated_@T@ *out, uint32_t *generation,
                                  uint32_t max_tries)
{
    return stated_read_record(base, slot, out, sizeof *out, generation, max_tries);
}
"""

def _table(name: str, key: int, lay: Layout) -> list[str]:
    U = name.upper()
    tag = f"stated_{name}"
    guard = f"STATED_TABLE_{U}_{lay.hash:016X}_{key:08X}"
    L = [f"/* ==== table {name}: key 0x{key:08X}, layout 0x{lay.hash:016x}, "
         f"{lay.record_size}-byte records ==== */"]
    for fl in lay.fields:
        L.append(f"/*   {fl.offset:6d}  {fl.field.decl.replace('*/', '* /')} */")
    L += [f"#ifndef {guard}", f"#define {guard}", ""]
    L.append(f"#define STATED_{U}_KEY 0x{key:08X}")
    L.append(f"#define STATED_{U}_LAYOUT_HASH 0x{lay.hash:016X}ULL")
    L.append(f"#define STATED_{U}_RECORD_SIZE {lay.record_size}u")
    L.append(f"#define STATED_{U}_FIELD_COUNT {len(lay.fields)}u")
    L.append("")
    names = {fl.name for fl in lay.fields}
    for fl in lay.fields:
        c = _cname(fl.name)
        if c != fl.name and c in names:
            raise ValueError(f"table {name!r}: field {fl.name!r} is a C keyword and its C name {c!r} is "
                             f"taken by another field; rename one of them")
    fields = []
    L.append(f"struct {tag} {{")
    end = 0
    for i, fl in enumerate(lay.fields):
        f = fl.field
        if fl.offset > end:
            L.append(f"    uint8_t _pad{i}[{fl.offset - end}];")
        cname = _cname(f.name)
        if f.type == "str":
            ctype, count = "char", f.count
        elif f.type == "bytes":
            ctype, count = "uint8_t", f.count
        else:
            ctype, count = SCALARS[f.type][2], (f.count if f.array else 0)
        note = f"  /* field \"{f.name}\" (renamed: C keyword or macro) */" if cname != f.name else ""
        L.append(f"    {_decl(cname, ctype, count)}{note}")
        fields.append((cname, ctype, count, fl.offset))
        end = fl.offset + f.size
    if lay.record_size > end:
        L.append(f"    uint8_t _pad{len(lay.fields)}[{lay.record_size - end}];")
    L.append("};")
    L += _asserts(tag, fields, lay.record_size)
    L.append(f"_Static_assert(sizeof(struct {tag}) == STATED_{U}_RECORD_SIZE, \"record size\");")
    L += ["", "/* the bytes of a fresh record: every field at its default (what alloc writes) */",
          f"static inline const void *stated_{name}_defaults(void)", "{",
          f"    static const unsigned char d[{lay.record_size}] = {{"]
    L += _c_bytes(default_record(record_class(lay, name)))
    L += ["    };", "    return d;", "}"]
    L += _TABLE_CODE.replace("@T@", name).replace("@U@", U).rstrip("\n").split("\n")
    L += ["", f"#endif /* {guard} */", ""]
    return L


def _defined(text: str) -> set[tuple[str, str]]:
    """(namespace, identifier) pairs a chunk of generated C defines: struct tags, typedefs,
    functions (static inline, and the core's extern declarations), macros."""
    out = {("tag", m) for m in re.findall(r"^(?:typedef )?struct (\w+) \{", text, re.M)}
    out |= {("ident", m) for m in re.findall(r"^static inline [^(]*?\b(\w+)\(", text, re.M)}
    out |= {("ident", m) for m in re.findall(r"^(?!static|typedef|#)[A-Za-z_][\w *]*?\b(stated_\w+)\(", text, re.M)}
    out |= {("ident", m) for m in re.findall(r"^\} (\w+);", text, re.M)}
    out |= {("ident", m) for m in re.findall(r"^typedef [^;(]*?\b(\w+);", text, re.M)}
    out |= {("ident", m) for m in re.findall(r"^typedef [^;(]*\(\*(\w+)\)", text, re.M)}
    out |= {("ident", m) for m in re.findall(r"^#define (\w+)", text, re.M)}
    return out


def _check_names(tables) -> None:
    """Refuse tables whose generated C names collide with the format's or with each other's."""
    def defined(lines: list[str]) -> set[tuple[str, str]]:
        text = "\n".join(lines)
        guards = set(re.findall(r"^#ifndef (\w+)", text, re.M))
        return {n for n in _defined(text) if n[1] not in guards}

    owner = {n: "the segment format" for n in defined(_common())}
    for n in defined(core_parts()[0].split("\n")):
        owner.setdefault(n, "the native core")
    for name, key, lay in tables:
        for n in defined(_table(name, key, lay)):
            if n in owner:
                raise ValueError(f"table {name!r} would define the C name {n[1]!r}, which {owner[n]} already "
                                 f"defines; rename the table")
            owner[n] = f"table {name!r}"


def generate(tables: list[tuple[str, int, Layout]]) -> str:
    """The C11 header for `tables`, a list of (table name, SysV key, Layout)."""
    seen: set[str] = set()
    for name, key, lay in tables:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise ValueError(f"table name {name!r} is not a lower-case C identifier")
        if name in seen:
            raise ValueError(f"table {name!r} is listed twice")
        seen.add(name)
        if not 0 <= key <= 0xFFFFFFFF:
            raise ValueError(f"table {name!r}: key {key:#x} does not fit a 32-bit key_t")
        if not isinstance(lay, Layout):
            raise TypeError(f"table {name!r}: expected a Layout, got {type(lay).__name__}")
    _check_names(tables)

    digest = hashlib.blake2b(repr([(n, k, lay.hash) for n, k, lay in tables]).encode(),
                             digest_size=8).hexdigest().upper()
    guard = f"STATED_TABLES_{digest}_H"
    top = [
        "/* Generated by `stated header` from the table schemas; do not edit.",
        " * Regenerate after any schema change:  stated header --config PATH [TABLE ...] > stated_tables.h",
        f" * Segment format version {fmt.FORMAT_VERSION}; the format is described in docs/format.md.",
        " * Requires C11 and GCC/Clang (__atomic builtins) on a little-endian 64-bit target.",
        " * Tables: " + (", ".join(f"{n} (key 0x{k:08X})" for n, k, _ in tables) or "none"),
        " */",
        f"#ifndef {guard}",
        f"#define {guard}",
        "",
        "#include <stdbool.h>",
        "#include <stddef.h>",
        "#include <stdint.h>",
        "#include <string.h>",
        "",
    ]
    decl, impl = core_parts()
    body = top + _common_lines() + ["", decl.rstrip("\n"), ""]
    for name, key, lay in tables:
        body += _table(name, key, lay)
    body += _registry(digest, tables)
    body += ["", impl.rstrip("\n"), ""]
    body.append(f"#endif /* {guard} */")
    return "\n".join(body) + "\n"


_FORMAT_TOP = """/* stated_format.h: the stated segment format (version {v}) for C: structs with every offset
 * pinned by _Static_assert, constants, validation and seqlock helpers. The native core
 * (stated_core.h, next to this file) builds on it.
 *
 * GENERATED by stated.tools.cheader.format_header() from stated/format/segment.py; do not edit. After a
 * change to either regenerate it with
 *     python -c "from stated.tools import cheader; print(cheader.format_header(), end='')" > stated/native/stated_format.h
 * (tests/test_native_core.py fails while it is out of date). */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
"""


def _common_lines() -> list[str]:
    errs = "\n".join(f"    case STATED_ERR_{n}: return \"{msg}\";" for n, msg in ERRORS)
    return [ln if ln != "@ERRORS@" else errs for ln in _common()]


def format_header() -> str:
    """stated/native/stated_format.h: the format part of every generated header, on its own, for
    building the native core without a config (the CPython extension, C tests)."""
    return _FORMAT_TOP.format(v=fmt.FORMAT_VERSION) + "\n" + "\n".join(_common_lines()) + "\n"


CORE_PATH = Path(__file__).resolve().parent.parent / "native" / "stated_core.h"
_CORE_MARK = "/* ==== STATED_IMPLEMENTATION ==== */"


def core_parts() -> tuple[str, str]:
    """(declarations, implementation) of the native core, split at its implementation marker:
    a generated header puts the declarations before the tables and the implementation after
    their registry."""
    text = CORE_PATH.read_text()
    decl, mark, impl = text.partition(_CORE_MARK)
    if not mark:
        raise RuntimeError(f"{CORE_PATH} lacks the line {_CORE_MARK!r}")
    # in a generated header the format part precedes the core: drop the core's own include of it
    own = '#ifndef STATED_COMMON_FORMAT_1_H\n#include "stated_format.h"\n#endif\n'
    if own not in decl:
        raise RuntimeError(f"{CORE_PATH}: the include of stated_format.h is not where cheader expects it")
    return decl.replace(own, ""), mark + impl


def _c_bytes(data: bytes, indent: str = "        ") -> list[str]:
    if not any(data):
        return [indent + "0"]
    return [indent + ", ".join(f"0x{b:02x}" for b in data[i:i + 16]) + ","
            for i in range(0, len(data), 16)]


def _registry(digest: str, tables) -> list[str]:
    """stated_known_table_<digest>(key, &info): what stated_open(key, ...) checks and initialises
    records with, for the tables of this header; the first header that compiles the core provides it."""
    fn = f"stated_known_table_{digest}"
    L = ["/* ---- the tables of this header, for stated_open(key, ...) ---------------------------------- */",
         f"static inline int {fn}(uint32_t key, stated_table_info *info)", "{"]
    for name, _key, lay in tables:
        U = name.upper()
        L += [f"    if (key == (uint32_t)STATED_{U}_KEY) {{",
              f"        info->name = \"{name}\";",
              "        info->key = key;",
              f"        info->layout_hash = STATED_{U}_LAYOUT_HASH;",
              f"        info->record_size = STATED_{U}_RECORD_SIZE;",
              f"        info->defaults = stated_{name}_defaults();",
              "        return 1;",
              "    }"]
    L += ["    (void)key;", "    (void)info;", "    return 0;", "}",
          "#if defined(STATED_IMPLEMENTATION) && !defined(STATED_KNOWN_TABLE_FN)",
          f"#define STATED_KNOWN_TABLE_FN {fn}",
          "#endif"]
    return L
