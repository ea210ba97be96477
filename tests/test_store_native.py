"""The store's native flush path (stated/native/_native.c, the store's section): the binary COPY
encoder against a real PostgreSQL, and the dirty-mark harvest on real segments.

The encoder builds PostgreSQL's binary wire format by hand, so the server is the judge: every
field type goes through the real flush path into a real table, is read back with SQL, and comes back
byte for byte through a claim on another host.
"""
from __future__ import annotations

import ctypes
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import sysconfig
import time
from asyncio import run
from pathlib import Path

import pytest
from helpers import StoreHost, fork_child, pg_exec, pg_expire, pg_rows, player_layout, wait_child

import stated
from stated.format.segment import SegmentViews
from stated.persist.store.schema import SQL_TYPES, TableMapping, copy_plan
from stated.shm import _native, segment
from stated.shm.marks import count_marked, harvest, marked

ROOT = Path(__file__).resolve().parent.parent

FIELDS = ["a: i8", "b: u8", "c: i16", "d: u16", "e: i32", "f: u32", "g: i64", "h: u64", "k: f32", "m: f64",
          "n: bool", "s: str[8]", "y: bytes[4]", "ai8: i8[2]", "au8: u8[2]", "ai16: i16[2]", "au16: u16[2]",
          "ai32: i32[2]", "au32: u32[3]", "ai64: i64[2]", "au64: u64[3]", "af32: f32[3]", "af64: f64[3]",
          "ab: bool[3]", "one: u64[1]"]
NAN, INF = float("nan"), float("inf")
F32_MAX = 3.4028234663852886e38

# entity -> field values (what a game writes through a write section)
RECORDS = {
    1: dict(a=-128, b=0, c=-32768, d=0, e=-2 ** 31, f=0, g=-2 ** 63, h=0, k=-INF, m=-INF, n=False, s="", y=b"",
            ai8=[-128, -1], au8=[0, 0], ai16=[-32768, -1], au16=[0, 0], ai32=[-2 ** 31, -1], au32=[0, 0, 0],
            ai64=[-2 ** 63, -1], au64=[0, 0, 0], af32=[NAN, -0.0, 1e-45], af64=[NAN, -0.0, 5e-324],
            ab=[False, False, False], one=[0]),
    2 ** 63: dict(a=127, b=255, c=32767, d=65535, e=2 ** 31 - 1, f=2 ** 32 - 1, g=2 ** 63 - 1, h=2 ** 64 - 1, k=INF,
                  m=NAN, n=True, s="éééé", y=b"\xff\x00\xfe\x01", ai8=[127, 0], au8=[255, 254],
                  ai16=[32767, 0], au16=[65535, 1], ai32=[2 ** 31 - 1, 0], au32=[2 ** 32 - 1, 1, 2],
                  ai64=[2 ** 63 - 1, 0], au64=[2 ** 64 - 1, 2 ** 63, 10 ** 19], af32=[F32_MAX, INF, -INF],
                  af64=[1.7976931348623157e308, INF, NAN], ab=[True, False, True], one=[2 ** 64 - 1]),
    2 ** 64 - 1: dict(a=-1, b=1, c=1, d=1, e=1, f=1, g=1, h=10 ** 8, k=1.5, m=-2.5, n=True, s="añb€", y=b"\x01",
                      ai8=[1, 2], au8=[3, 4], ai16=[5, 6], au16=[7, 8], ai32=[9, 10], au32=[11, 12, 13],
                      ai64=[14, 15], au64=[9999, 10000, 10 ** 16 + 1], af32=[0.1, -2.5, 0.0],
                      af64=[math.pi, -0.0, 1e300],
                      ab=[True, True, True], one=[99990000]),
}


def f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def same(got, want) -> bool:
    """Equal values, NaN equal to NaN and -0.0 told from 0.0."""
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(same(g, w) for g, w in zip(got, want))
    if isinstance(want, float):
        g = float(got)
        return (math.isnan(g) and math.isnan(want)) or (g == want and math.copysign(1, g) == math.copysign(1, want))
    if isinstance(want, int) and not isinstance(want, bool):
        return int(got) == want           # numeric(20,0) reads back as Decimal
    return got == want


def expected_row(vals: dict) -> dict:
    """What SQL reads back: f32 values rounded to f32, bytes[N] at full length."""
    out = dict(vals)
    out["k"] = f32(vals["k"])
    out["af32"] = [f32(x) for x in vals["af32"]]
    out["y"] = vals["y"].ljust(4, b"\0")
    return out


def replaced(raw: bytes, n: int) -> str:
    """Invalid UTF-8 from a C writer: up to the first NUL, U+FFFD replacements, at most n bytes."""
    s = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
    while len(s.encode()) > n:
        s = s[:-1]
    return s


def test_every_field_type_round_trips_through_the_copy_encoder(make_segment, pg_dsn):
    """Extremes of every type (u64 max, i64 min, NaN, +-inf, -0.0, f32 max and subnormals, empty and full
    str[N]/bytes[N], every array kind, entities 2^63 and 2^64-1) go through the real flush (the native
    COPY encoder) into the server, read back as the values written, and come back byte for byte through
    a claim on another host. A C writer's invalid UTF-8 and bool bytes other than 0/1 do not fail the
    batch: the strings arrive with U+FFFD replacements cut to N bytes, the bools as true."""
    ka, kb = make_segment(10, FIELDS), make_segment(10, FIELDS)
    t = stated.attach(key=ka, owner="w")
    tb = stated.attach(key=kb, owner="w")
    hs = {}
    for e, vals in RECORDS.items():
        hs[e] = t.alloc(entity=e)
        with t.write(hs[e]) as p:
            for name, v in vals.items():
                setattr(p, name, v)
    off = {fl.name: fl.offset for fl in t.layout.fields}
    scribbles = {7: b"ab\xffcdefg", 8: b"\xed\xa0\x80xyz\0\0", 9: b"ok\xe2\x82\0\0\0\0"}   # bad byte, surrogate, cut
    for e, raw in scribbles.items():
        hs[e] = t.alloc(entity=e)
        with t.write(hs[e]):                 # what a C writer may store: bytes, not Python values
            t._rec[hs[e].slot * t.record_size + off["s"]:][:8] = raw
            t._rec[hs[e].slot * t.record_size + off["ab"]:][:3] = b"\x02\x00\xff"
            t._rec[hs[e].slot * t.record_size + off["n"]:][:1] = b"\x07"
    before = {e: bytes(t._rec[h.slot * t.record_size:(h.slot + 1) * t.record_size]) for e, h in hs.items()}
    a, b = StoreHost(ka, pg_dsn, "host-a"), StoreHost(kb, pg_dsn, "host-b")

    async def go():
        r = await a.store.tick()
        assert r["players"].written == len(hs) and r["players"].cleared == len(hs)
        rows = await pg_rows(pg_dsn)
        for e, vals in RECORDS.items():
            row = rows[e - 2 ** 64 if e >= 2 ** 63 else e]        # entity: bigint, two's complement
            assert row["layout_hash"] == f"{t.layout.hash:016x}" and row["version"] >> 32 == 1
            for name, want in expected_row(vals).items():
                assert same(row[name], want), (e, name, row[name], want)
        for e, raw in scribbles.items():
            row = rows[e]
            assert row["s"] == replaced(raw, 8) and len(row["s"].encode()) <= 8
            assert row["ab"] == [True, False, True] and row["n"] is True
        # NULL-free and typed: what an operator's SQL sees
        nulls = await pg_exec(pg_dsn, "SELECT count(*) AS n FROM stated.players p WHERE NOT (p IS NOT NULL)")
        assert nulls[0]["n"] == 0
        big = await pg_exec(pg_dsn, "SELECT h::text AS h, au64[1]::text AS a, cardinality(au64) AS c "
                                    "FROM stated.players WHERE entity = -9223372036854775808")
        assert (big[0]["h"], big[0]["a"], big[0]["c"]) == ("18446744073709551615", "18446744073709551615", 3)
        await b.store.ensure_connected()
        await pg_expire(pg_dsn)
        return {e: await b.store.claim("players", e, tb._owner) for e in hs}
    try:
        got = run(go())
        for e in RECORDS:
            slot = got[e][0]
            assert bytes(tb._rec[slot * tb.record_size:(slot + 1) * tb.record_size]) == before[e], e
        for e, raw in scribbles.items():
            h = stated.Handle(*got[e])
            assert tb.get(h, "s") == replaced(raw, 8) and list(tb.get(h, "ab")) == [True, False, True]
    finally:
        run(a.store.close()), run(b.store.close())
        a.close(), b.close(), t.close(), tb.close()


def test_numeric_digit_branches_are_what_the_server_reads(pg_dsn):
    """u64 -> numeric(20,0) by hand: zero, every digit count 1..5, trailing zero base-10000 digits
    (left out: weight keeps the magnitude), 2^63 and 2^64-1; as scalars and as array elements."""
    layout = player_layout(["v: u64", "arr: u64[2]"])
    m = TableMapping("n", layout, "public")
    vals = [0, 1, 9999, 10000, 10001, 99990000, 99999999, 10 ** 8, 10 ** 8 + 1, 10 ** 12, 99990000000000,
            10 ** 16, 10 ** 16 + 1, 12345678901234567, 2 ** 63, 2 ** 64 - 1, 10 ** 19]
    rows = [(0, 0, 0, i, struct.pack("<QQQ", v, v, vals[-1 - i])) for i, v in enumerate(vals)]

    async def go():
        import asyncpg
        c = await asyncpg.connect(pg_dsn)
        try:
            await c.execute(m.create_sql()[0])
            await c.copy_to_table("n", source=memoryview(m.copy_data(rows, {i: 5 for i in range(len(vals))}, 9)),
                                  columns=m.copy_columns, format="binary")
            return await c.fetch("SELECT entity, version, v::text AS v, arr::text[] AS arr FROM n ORDER BY entity")
        finally:
            await c.close()
    got = run(go())
    assert [int(r["v"]) for r in got] == vals
    assert [[int(x) for x in r["arr"]] for r in got] == [[v, vals[-1 - i]] for i, v in enumerate(vals)]
    assert {r["version"] for r in got} == {5 << 32 | 9}


def test_copy_plan_refuses_lossy_columns_and_malformed_rows():
    """The plan is checked once: a type pair that could not hold every value, a field outside the
    record, an unknown type. A row is checked as it is encoded: record size, epoch present and in range,
    entity a u64. Every refusal is an exception, never a partial payload."""
    ok = _native.CopyPlan([(0, "u16", 1, False, "integer")], 2, "00ff")
    assert ok.columns == 4
    for col, msg in [((0, "u16", 1, False, "smallint"), "without loss"),
                     ((0, "u64", 1, False, "bigint"), "without loss"),
                     ((0, "i64", 1, False, "numeric(20,0)"), "without loss"),
                     ((0, "f64", 1, False, "real"), "without loss"),
                     ((0, "str", 2, True, "text"), "does not fit"),
                     ((0, "u32", 1, False, "bigint"), "does not fit"),          # 4 bytes in a 2-byte record
                     ((1, "u16", 1, False, "integer"), "does not fit"),
                     ((-1, "u8", 1, False, "smallint"), "does not fit"),
                     ((0, "u8", 2, False, "smallint"), "does not fit"),          # a scalar has one element
                     ((0, "u128", 1, False, "numeric(20,0)"), "unknown type"),
                     ((0, "u8", 1, False, "money"), "unknown type")]:
        with pytest.raises(ValueError, match=msg):
            _native.CopyPlan([col], 2, "00ff")
    with pytest.raises(TypeError):
        _native.CopyPlan([(0, "u8")], 2, "00ff")
    with pytest.raises(ValueError, match="layout_hash"):
        _native.CopyPlan([], 2, "x" * 65)
    rec = b"\x01\x00"
    assert ok.encode([(0, 0, 0, 5, rec)], {5: 1}, 2).startswith(b"PGCOPY\n\xff\r\n\x00")
    with pytest.raises(ValueError, match="must be 2 bytes"):
        ok.encode([(0, 0, 0, 5, b"\x01")], {5: 1}, 2)
    with pytest.raises(KeyError):
        ok.encode([(0, 0, 0, 6, rec)], {5: 1}, 2)
    with pytest.raises(OverflowError, match="epoch"):
        ok.encode([(0, 0, 0, 5, rec)], {5: 2 ** 31}, 2)
    with pytest.raises(OverflowError):
        ok.encode([(0, 0, 0, -5, rec)], {-5: 1}, 2)
    with pytest.raises(OverflowError):
        ok.encode([(0, 0, 0, 5, rec)], {5: 1}, 2 ** 32)
    with pytest.raises(TypeError):
        ok.encode([(0, 0, 5, rec)], {5: 1}, 2)


def test_the_plan_covers_every_stated_type():
    """copy_plan maps each field through SQL_TYPES, and the encoder accepts every mapping it makes."""
    layout = player_layout([f"x{i}: {t}" + ("[8]" if t in ("str", "bytes") else "") for i, t in enumerate(SQL_TYPES)]
                           + [f"a{i}: {t}[3]" for i, t in enumerate(SQL_TYPES) if t not in ("str", "bytes")])
    plan = copy_plan(layout)
    assert [p[4] for p in plan[:len(SQL_TYPES)]] == list(SQL_TYPES.values())
    assert _native.CopyPlan(plan, layout.record_size, "00").columns == 3 + len(layout.fields)


# ---- dirty marks -------------------------------------------------------------------------------------------
def test_harvest_moves_every_dirty_mark_to_both_consumers(make_segment):
    key = make_segment(64)
    t = stated.attach(key=key, owner="w")
    try:
        hs = [t.alloc(entity=i + 1) for i in range(10)]
        seg = segment.open(key)
        v = SegmentViews(seg.buf, seg.header)
        try:
            assert marked(v.dirty) == [h.slot for h in hs]          # alloc marks
            v.dirty[40] = 2                                          # a scribbled mark still counts
            assert count_marked(v.dirty) == 11 and count_marked(v.dirty, v.store_pending) == 11
            assert harvest(v) == 11
            assert marked(v.dirty) == [] and marked(v.snap_pending) == marked(v.store_pending) \
                == sorted([h.slot for h in hs] + [40])
            assert harvest(v) == 0
            t.set(hs[3], "hp", 1)
            assert marked(v.dirty) == [hs[3].slot] and harvest(v) == 1 and marked(v.dirty) == []
            with pytest.raises(ValueError, match="differ in length"):
                _native.harvest(v.dirty, v.snap_pending[:3], v.store_pending)
            with pytest.raises(TypeError, match="1-D buffer of bytes"):
                _native.marked(v.seq)
            with pytest.raises(BufferError):
                _native.harvest(bytes(64), bytearray(64), bytearray(64))   # read-only: cannot clear
        finally:
            v.release()
            seg.detach()
    finally:
        t.close()


# ---- record copies and settles (store_copy / store_settle) -------------------------------------------------------
def test_store_copies_and_settles_records(make_segment):
    """Copies carry (slot, generation, seq, entity, bytes, pinned): -1 for an allocation without an entity,
    the last entity for a freed slot, pinned only for a live view's slot. A slot inside a write section is
    left for later; settle clears the store mark only of records unchanged since their copy."""
    from stated.persist.store.flush import Item
    from stated.shm.allocator import Allocator
    key = make_segment(16)
    t = stated.attach(key=key, owner="w")
    seg = segment.open(key)
    alloc = Allocator(seg, table="players")
    core = alloc.core
    try:
        a, b, c, d = t.alloc(entity=2 ** 64 - 1), t.alloc(), t.alloc(entity=7), t.alloc(entity=9)
        t.set(a, "hp", 5)
        t.record(d).hp = 6                   # a live view pins the slot
        t.free(c)
        harvest(alloc.views)
        items, later = _native.store_copy(core, [a.slot, b.slot, c.slot, d.slot], Item, 8)
        assert later == [] and all(type(it) is Item for it in items)
        got = {it.slot: it for it in items}
        assert (got[a.slot].entity, got[a.slot].gen, got[a.slot].pinned) == (2 ** 64 - 1, a.generation, False)
        assert got[b.slot].entity == -1 and got[c.slot].entity == 7 and got[c.slot].pinned is False
        assert got[d.slot].pinned is True and got[d.slot].seq == alloc.views.seq[d.slot]
        rs = t.record_size
        assert got[a.slot].data == bytes(t._rec[a.slot * rs:(a.slot + 1) * rs])
        with t.write(a) as p:                # mid-write: left for later, every round
            p.hp = 9
            assert _native.store_copy(core, [a.slot, b.slot], Item, 3)[1] == [a.slot]
        t.set(b, "hp", 1)                    # changed after its copy: the mark stays
        changed = _native.store_settle(core, items)
        assert [it.slot for it in changed] == [a.slot, b.slot]
        assert marked(alloc.views.store_pending) == [a.slot, b.slot]
        with pytest.raises(stated.SlotOutOfRange):
            _native.store_copy(core, [16], Item, 1)
        with pytest.raises(ValueError, match="tries"):
            _native.store_copy(core, [1], Item, 0)
        with pytest.raises(TypeError, match="tuple subclass"):
            _native.store_copy(core, [1], list, 1)
    finally:
        alloc.release_views()
        seg.detach()
        t.close()
    with pytest.raises(stated.StatedError, match="closed"):
        _native.store_copy(core, [0], Item, 1)


def _word_writer(key: int, ready_w: int) -> None:
    """Rewrites record 88 word by word (interpreted: a wide window) with one counter per write section."""
    t = stated.attach(key=key, owner="ww")
    h = t.alloc(entity=88)
    words = t.record_size // 4
    arr = (ctypes.c_uint32 * words).from_buffer(t._rec, h.slot * t.record_size)
    section = t._core.section(h.slot, arr)
    v = 0
    while True:
        v = (v + 1) & 0xFFFFFFFF
        with section as p:
            for i in range(words):
                p[i] = v
        if v == 1:                           # the defaults before the first section are not all-equal words
            os.write(ready_w, b"x")


def test_store_copies_of_a_record_under_constant_writes_are_never_torn(make_segment, procs):
    """Another process rewrites a record in sections as fast as it can; every copy the store accepts holds one
    section's values (all words equal), and the copies see the writes progress."""
    from stated.persist.store.flush import Item
    from stated.shm.allocator import Allocator
    key = make_segment(4)
    r, w = os.pipe()
    pid = fork_child(_word_writer, key, w)
    procs.append(pid)
    os.read(r, 1)
    seg = segment.open(key)
    alloc = Allocator(seg, table="players")
    try:
        slot = alloc.core.lookup(88)[0]
        copies = later = torn = 0
        seen = set()
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            items, left = _native.store_copy(alloc.core, [slot] * 50, Item, 2)
            later += len(left)
            for it in items:
                copies += 1
                torn += it.data != it.data[:4] * (len(it.data) // 4)
                seen.add(it.data[:4])
    finally:
        os.kill(pid, signal.SIGKILL)
        wait_child(pid, procs=procs)
        alloc.release_views()
        seg.detach()
    assert torn == 0 and copies > 1000 and len(seen) > 10, (copies, later, torn, len(seen))


@pytest.mark.parametrize("cc", ["gcc", "clang"])
def test_the_extension_compiles_with_warnings_as_errors(cc, tmp_path):
    """stated/native/_native.c (the store's section included) under -Wall -Wextra -Werror, gcc and clang."""
    if shutil.which(cc) is None:
        pytest.skip(f"{cc} is not installed (.ci/system-deps installs it)")
    r = subprocess.run([cc, "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-fno-strict-aliasing", "-fPIC", "-c",
                        "-I", str(ROOT / "stated" / "native"), "-I", sysconfig.get_paths()["include"],
                        "-o", str(tmp_path / "native.o"), str(ROOT / "stated" / "native" / "_native.c")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def test_bench_store_imports():
    """bench/bench_store.py imports its helpers from tests/helpers.py (it imported them from conftest,
    which stopped re-exporting them, and the bench no longer ran)."""
    r = subprocess.run([sys.executable, "-c", "import sys; sys.path[:0] = ['bench']; import bench_store"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
