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
from importlib import resources
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
                    ("lock_seq", "uint32_t", 0, fmt.A_LOCK_SEQ),
                    ("index_count", "uint32_t", 0, fmt.A_INDEX_COUNT),
                    ("intent_count", "uint64_t", 0, fmt.A_INTENT_COUNT),
                    ("intent_count2", "uint64_t", 0, fmt.A_INTENT_COUNT2),
                    ("lock", "uint64_t", 0, fmt.A_LOCK)]
    alloc_size = fmt.OFF_COUNTERS - fmt.OFF_ALLOC
    a("/* ---- the allocator block (header offset %d, %d bytes) ----------------------------" % (
        fmt.OFF_ALLOC, alloc_size))
    a(" * Written only by the holder of the table lock, the `lock` word (see docs/format.md,")
    a(" * \"Taking and releasing the lock\"). Readers may look at free_top/used/index_count for stats.")
    a(" * lock: 0 free; else the holder's pid (bits 0-21), its start time in clock ticks since boot")
    a(" * (the next 41 bits) and STATED_LOCK_WAITERS (bit 63: someone may sleep on the semaphore). */")
    a(f"#define STATED_LOCK_PID_BITS {fmt.LOCK_PID_BITS}u")
    a(f"#define STATED_LOCK_START_BITS {fmt.LOCK_START_BITS}u")
    a(f"#define STATED_LOCK_WAITERS UINT64_C({fmt.LOCK_WAITERS:#x})")
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
    L += _package_text("stated_common.inc.h").strip("\n").split("\n")
    a("")
    a(f"#endif /* STATED_COMMON_FORMAT_{fmt.FORMAT_VERSION}_H */")
    return L







def _package_text(name: str) -> str:
    """A C source fragment shipped in stated/native/ (package data): C code lives in C files."""
    return resources.files("stated").joinpath("native", name).read_text()


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
    L += _package_text("stated_table.inc.h").replace("@T@", name).replace("@U@", U).rstrip("\n").split("\n")
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
 *     python -c "from stated.tools import cheader; print(cheader.format_header(), end='')" \\
 *         > stated/native/stated_format.h
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
    own = f'#ifndef STATED_COMMON_FORMAT_{fmt.FORMAT_VERSION}_H\n#include "stated_format.h"\n#endif\n'
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
    for name, _key, _lay in tables:
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
