"""Hostile snapshot files: byte damage, and frames rewritten with valid checksums but lying contents.

read_file must raise CorruptSnapshot and nothing else, or return data that passes every check
its consumers rely on (persist.verify_file, persist.restore). MemoryError, struct.error,
TypeError, KeyError, OverflowError, ... out of read_file are bugs.
"""
from __future__ import annotations

import copy
import struct
from array import array
from pathlib import Path

import msgpack
import pytest
from helpers import FUZZ, Raw, bounded, edit_column, encode_frames, nested, player_layout, wire_schema
from hypothesis import event, example, given
from hypothesis import strategies as st

import stated
from stated.errors import StatedError
from stated.format import layout as layout_mod
from stated.format import segment as fmt
from stated.format.config import DaemonConfig, TableConfig
from stated.format.schema import from_wire, to_wire
from stated.persist import saver as persist
from stated.persist import snapshot as snap
from stated.shm import segment

LAY = player_layout(["id: u64", "name: str[8]", "hp: i32 = 100", "x: f32", "inv: u16[3]"])
CAP = 16
RS = LAY.record_size


def make_chunk(slots, states=None, rs=RS):
    n = len(slots)
    return {"n": n, "slots": array("I", slots).tobytes(), "gens": array("I", [s + 1 for s in slots]).tobytes(),
            "owners": array("H", [1 + s % 2 for s in slots]).tobytes(),
            "entities": array("Q", [100 + s for s in slots]).tobytes(),
            "states": bytes(states or [fmt.SLOT_ALLOCATED] * n), "flags": bytes([fmt.FLAG_HAS_ENTITY] * n),
            "records": bytes((7 * i) & 0xFF for i in range(n * rs))}


HEADER = {"format": snap.VERSION, "kind": "full", "table": "players", "key": 0x5E000001, "schema": to_wire(LAY.schema),
          "layout_hash": LAY.hash, "record_size": RS, "capacity": CAP, "seq": 3, "base": 3, "prev": 2,
          "time": 1700000000.5, "counters": {"allocations": 9, "frees": 2}}
OWNERS = [[1, "zone-1", fmt.OWNER_ATTACHED, 1000], [2, "w", fmt.OWNER_DETACHED, 2000]]
CHUNKS = [make_chunk([0, 3, 5, 9]), make_chunk([15], states=[fmt.SLOT_FREE]), make_chunk([])]
FRAMES = [HEADER, OWNERS, *CHUNKS, {"end": True, "records": 5, "chunks": 3}]


# The fuzz tests' own text says `encode`: derandomized hypothesis seeds each test from its source, so the
# tests keep their text (and their examples) and the name points at the one implementation.
encode = encode_frames


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    d = tmp_path_factory.mktemp("snap")
    p = d / snap.file_name("players", 3, "full")
    header = snap.SnapshotHeader.from_wire(p, copy.deepcopy(HEADER))
    owners = snap.decode_owners(p, copy.deepcopy(OWNERS))
    assert snap.write_file(p, header, owners, iter(copy.deepcopy(CHUNKS))) == 5
    data = p.read_bytes()
    assert data == encode(FRAMES)            # the hand-built encoding is the writer's encoding
    return data, snap.read_file(p)


def assert_valid(f: snap.SnapshotFile) -> None:
    """Everything read_file promises about a file it accepts."""
    h = f.header
    for k, t in {"format": int, "kind": str, "table": str, "key": int, "schema": list, "layout_hash": int,
                 "record_size": int, "capacity": int, "seq": int, "base": int, "prev": int, "time": (int, float),
                 "counters": dict}.items():
        assert isinstance(getattr(h, k), t), k
    assert h.kind in ("full", "delta") and 1 <= h.capacity <= 1 << 26
    lay = layout_mod.compute(from_wire(h.schema))
    assert lay.hash == h.layout_hash and lay.record_size == h.record_size
    for c in f.chunks:
        n = c.n
        assert isinstance(n, int) and n >= 0
        for k, w in {"slots": 4, "gens": 4, "owners": 2, "entities": 8, "states": 1, "flags": 1,
                     "records": lay.record_size}.items():
            col = getattr(c, k)
            assert (col.nbytes if isinstance(col, memoryview) else len(col)) == w * n, k
        assert all(s < h.capacity for s in c.slots)
    for o in f.owners:      # what persist._apply uses
        assert isinstance(o, snap.SavedOwner) and 1 <= o.index <= fmt.OWNERS_CAPACITY and o.name, o


def read(tmp_path: Path, data: bytes):
    p = tmp_path / "fuzz.snap"
    p.write_bytes(data)
    with bounded(10, "read_file"):
        try:
            out = snap.read_file(p)
        except snap.CorruptSnapshot as e:
            assert str(p) in str(e)
            event("refused")
            return None
    assert_valid(out)
    with bounded(10, "verify_file"):
        persist.verify_file(p)
    event("accepted")
    return out


# ---- byte-level damage ------------------------------------------------------------------------------
damage = st.lists(st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(0, 7)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.floats(0, 1), st.integers(1, 40)),
    st.tuples(st.just("overwrite"), st.floats(0, 1), st.binary(min_size=1, max_size=8)),
), min_size=1, max_size=4)


def apply_damage(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for op, where, *arg in ops:
        i = min(int(where * len(b)), max(len(b) - 1, 0))
        if op == "truncate":
            del b[i:]
        elif op == "flip" and b:
            b[i] ^= 1 << arg[0]
        elif op == "insert":
            b[i:i] = arg[0]
        elif op == "delete":
            del b[i:i + arg[0]]
        elif op == "overwrite":
            b[i:i + len(arg[0])] = arg[0]
    return bytes(b)


@FUZZ(500)
@given(ops=damage)
@example(ops=[("truncate", 0.0)])
@example(ops=[("truncate", 0.999)])
@example(ops=[("overwrite", 16 / 600, b"\xff\xff\xff\x7f")])     # first frame length near 2 GiB
def test_byte_damage(pristine, tmp_path, ops):
    data, parsed = pristine
    out = read(tmp_path, apply_damage(data, ops))
    if out is not None:
        # a checksum cannot be fooled by random damage: only a no-op passes
        assert (out.header, out.owners, out.chunks) == (parsed.header, parsed.owners, parsed.chunks)


# ---- frames with valid checksums and lying contents --------------------------------------------------
SELECT = ["header", "owners", "chunk0", "chunk1", "chunk2", "end"]
_IDX = {name: i for i, name in enumerate(SELECT)}
header_keys = st.one_of(st.sampled_from(sorted(HEADER)), st.text(max_size=4))
chunk_keys = st.one_of(st.sampled_from(sorted(CHUNKS[0])), st.text(max_size=4))
targeted = st.one_of(
    st.sampled_from([-1, 0, 1, CAP - 1, CAP, 2**32 - 1, 2**32, 2**63 - 1, -(2**63), 2**64 - 1, True, False, 1.5,
                     float("nan"), None, "", "full", "delta", b"", [], {}]),
    st.integers(-(2**63), 2**64 - 1), st.binary(max_size=64),
)
values = st.one_of(targeted, nested)
mutations = st.lists(st.one_of(
    st.tuples(st.just("set"), st.sampled_from(["header", "end"]), header_keys | st.sampled_from(["end", "records",
                                                                                                 "chunks"]), values),
    st.tuples(st.just("set"), st.sampled_from(["chunk0", "chunk1", "chunk2"]), chunk_keys, values),
    st.tuples(st.just("del"), st.sampled_from(["header", "chunk0", "end"]), header_keys | chunk_keys),
    st.tuples(st.just("resize"), st.integers(0, 2), st.sampled_from(sorted(set(CHUNKS[0]) - {"n"})),
              st.integers(-9, 9)),
    st.tuples(st.just("slot"), st.integers(0, 1), st.integers(0, 3),
              st.one_of(st.integers(CAP, 2**32 - 1), st.integers(0, 2**32 - 1))),
    st.tuples(st.just("n"), st.integers(0, 2), st.one_of(st.integers(-5, 10), st.sampled_from([-(2**63), 2**63 - 1]))),
    st.tuples(st.just("renumber"), st.integers(0, 2), st.integers(-3, 6)),     # n and columns agree, totals do not
    st.tuples(st.just("owner"), st.integers(0, 2), values),
    st.tuples(st.just("schema"), wire_schema, st.booleans()),
    st.tuples(st.just("frame"), st.sampled_from(SELECT), values),
    st.tuples(st.just("raw"), st.sampled_from(SELECT), st.binary(max_size=40)),
    st.tuples(st.just("drop"), st.sampled_from(SELECT)),
    st.tuples(st.just("dup"), st.sampled_from(SELECT)),
    st.tuples(st.just("swap"), st.sampled_from(SELECT), st.sampled_from(SELECT)),
), min_size=1, max_size=3)


def mutate(muts):
    frames = copy.deepcopy(FRAMES)

    def at(i):
        return frames[i] if i < len(frames) else None

    for kind, *a in muts:
        target = at(_IDX[a[0]]) if kind in ("set", "del", "frame", "raw", "drop", "dup") else \
            at(2 + a[0]) if kind in ("resize", "slot", "n", "renumber") else None
        if kind == "set" and isinstance(target, dict):
            target[a[1]] = a[2]
        elif kind == "del" and isinstance(target, dict):
            target.pop(a[1], None)
        elif kind == "resize" and isinstance(target, dict) and isinstance(target.get(a[1]), bytes):
            col = target[a[1]]
            target[a[1]] = col[:len(col) + a[2]] if a[2] < 0 else col + bytes(a[2])
        elif kind == "slot" and isinstance(target, dict) and isinstance(target.get("slots"), bytes) \
                and len(target["slots"]) >= 4 * (a[1] + 1):
            b = bytearray(target["slots"])
            struct.pack_into("<I", b, 4 * a[1], a[2])
            target["slots"] = bytes(b)
        elif kind == "n" and isinstance(target, dict):
            target["n"] = a[1]
        elif kind == "renumber" and target is not None:
            frames[2 + a[0]] = make_chunk(list(range(max(a[1], 0))))
            if a[1] < 0:
                frames[2 + a[0]]["n"] = a[1]
        elif kind == "owner" and isinstance(at(1), list) and a[0] < len(frames[1]):
            frames[1][a[0]] = a[1]
        elif kind == "schema" and isinstance(at(0), dict):
            frames[0]["schema"] = a[0]
            if a[1]:                # make the header agree with its new schema (and the chunks with it)
                try:
                    lay = layout_mod.compute(from_wire(a[0]))
                except StatedError:
                    continue
                frames[0]["layout_hash"], frames[0]["record_size"] = lay.hash, lay.record_size
                for c in frames[2:]:
                    if isinstance(c, dict) and isinstance(c.get("n"), int) and c["n"] >= 0 and "records" in c:
                        c["records"] = bytes(c["n"] * lay.record_size)
        elif kind in ("frame", "raw") and target is not None:
            frames[_IDX[a[0]]] = a[1] if kind == "frame" else Raw(a[1])
        elif kind == "drop" and target is not None:
            del frames[_IDX[a[0]]]
        elif kind == "dup" and target is not None:
            frames.insert(_IDX[a[0]], copy.deepcopy(target))
        elif kind == "swap" and max(_IDX[a[0]], _IDX[a[1]]) < len(frames):
            i, j = _IDX[a[0]], _IDX[a[1]]
            frames[i], frames[j] = frames[j], frames[i]
    return frames


@FUZZ(500)
@given(muts=mutations)
@example(muts=[("slot", 0, 1, CAP)])                              # slot beyond capacity
@example(muts=[("n", 0, -1)])                                     # n negative
@example(muts=[("renumber", 2, -3)])                              # n negative, empty columns
@example(muts=[("set", "end", "records", 6)])                     # end frame total lying
@example(muts=[("set", "header", "capacity", 2**63 - 1)])
@example(muts=[("schema", [["x: u8 = {[]: 1} #", "u8", 1, False, None]], False)])     # TypeError from the schema
@example(muts=[("schema", [[[[1]]]], False)])
@example(muts=[("owner", 0, [1, "x"])])                           # persist._apply unpacks 4 values
@example(muts=[("owner", 0, 7)])
@example(muts=[("set", "chunk0", "n", True)])
@example(muts=[("set", "header", "kind", ["full"])])              # unhashable in a membership test
def test_rechecksummed_malicious_frames(tmp_path, muts):
    read(tmp_path, encode(mutate(muts)))


def test_deeply_nested_schema_regression(tmp_path):
    """A header whose schema is nested ~1000 deep: from_wire's repr() raised RecursionError. Outside
    hypothesis on purpose (it raises the recursion limit while a test runs, which hides this)."""
    h = dict(HEADER, schema=[123456789])
    body = msgpack.packb(h, use_bin_type=True).replace(msgpack.packb([123456789]), b"\x91" * 1000 + b"\x01")
    frames = copy.deepcopy(FRAMES)
    frames[0] = Raw(body)
    p = tmp_path / "deep.snap"
    p.write_bytes(encode(frames))
    with pytest.raises(snap.CorruptSnapshot, match="schema unreadable"):
        snap.read_file(p)


# ---- what read_file accepts, restore must survive ------------------------------------------------------
benign = st.lists(st.one_of(
    st.tuples(st.just("col"), st.integers(0, 1), st.sampled_from(["gens", "owners", "entities", "states", "flags"]),
              st.integers(0, 255)),
    st.tuples(st.just("slots"), st.integers(0, 1), st.lists(st.integers(0, CAP - 1), min_size=4, max_size=4)),
    st.tuples(st.just("owners"), st.lists(st.one_of(
        st.tuples(st.integers(-2, 300), st.text(max_size=40), st.integers(-1, 5), st.integers(-1, 2**63)).map(list),
        nested), max_size=4)),
    st.tuples(st.just("counters"), st.dictionaries(st.sampled_from(["allocations", "frees", "lock_repairs", "x"]),
                                                   st.one_of(st.integers(-(2**63), 2**64 - 1), nested), max_size=3)),
), min_size=1, max_size=4)


@pytest.fixture
def restore_key(new_key):
    return new_key()


@FUZZ(80)
@given(muts=benign)
@example(muts=[("owners", [[1, "x"]])])
@example(muts=[("owners", [[0, "zero", 1, 0], [256, "big", 1, 0], [1, "\u00e9" * 40, 1, 0]])])
@example(muts=[("slots", 0, [3, 3, 3, 3])])
def test_accepted_files_restore(tmp_path, restore_key, muts):
    frames = copy.deepcopy(FRAMES)
    for kind, *a in muts:
        if kind == "col":
            c = frames[2 + a[0]]
            c[a[1]] = bytes((a[2] + 37 * i) & 0xFF for i in range(len(c[a[1]])))
        elif kind == "slots":
            frames[2 + a[0]]["slots"] = array("I", a[1][:frames[2 + a[0]]["n"]]).tobytes()
        elif kind == "owners":
            frames[1] = a[0]
        elif kind == "counters":
            frames[0]["counters"] = a[0]
    out = read(tmp_path, encode(frames))
    if out is None:
        return
    tc = TableConfig("players", restore_key, CAP, LAY)
    dc = DaemonConfig(state_dir=tmp_path / "var", control_socket=tmp_path / "s.sock")
    try:
        with bounded(10, "persist.restore"):
            try:
                seg, n = persist.restore(tc, dc, snap.Chain([out]))
            except StatedError:
                event("restore refused")
                return
        seg.detach()
        with stated.attach(key=restore_key, readonly=True) as t:
            assert t.verify() == []
            assert len(t.handles()) == n
    finally:
        segment.destroy(restore_key)


# ---- semantic lies: every frame well-formed and checksummed, the contents impossible -------------------
# Each lie alone must get the file refused (CorruptSnapshot naming it), whatever else is true of it.
# CHUNKS[0] holds allocated slots 0, 3, 5, 9 with entities; CHUNKS[1] a free slot 15.
def _col_set(c, name, code, i, v):
    edit_column(c, name, code, lambda a: a.__setitem__(i, v))


lies = st.one_of(
    st.tuples(st.just("counter"), st.sampled_from(["allocations", "frees", "lock_repairs", "x"]),
              st.one_of(st.integers(snap.MAX_COUNTER + 1, 2**64 - 1), st.integers(-(2**63), -1),
                        st.sampled_from([2**64 - 1, 2**63, -1, True, 1.0, None, "1"]))),
    st.tuples(st.just("dup_slot_in_chunk"), st.integers(0, 3), st.integers(1, 3)),
    st.tuples(st.just("dup_slot_across_chunks"), st.integers(0, 3)),
    st.tuples(st.just("dup_entity"), st.integers(0, 3), st.integers(1, 3)),
    st.tuples(st.just("state"), st.integers(0, 3), st.integers(2, 255)),
    st.tuples(st.just("flags"), st.integers(0, 3), st.integers(0, 255).filter(lambda v: v & ~snap.KNOWN_FLAGS)),
    st.tuples(st.just("owner_index"), st.integers(0, 3), st.integers(fmt.OWNERS_CAPACITY + 1, 0xFFFF)),
    st.tuples(st.just("seq"), st.sampled_from([(0, 0, 0), (3, 1, 2), (3, 3, 3), (3, 3, 4), (3, 4, 2),
                                               (-1, -1, -2), (2**62, 2**62, 1), (3, 3, True)])),
    st.tuples(st.just("delta_seq"), st.sampled_from([(3, 3, 2), (3, 2, 1), (3, 1, 3), (3, 0, 2)])),
    st.tuples(st.just("owners"), st.sampled_from(["dup", "zero", "big", "empty_name", "long_name", "neg_since",
                                                  "bool_index", "many"])),
    st.tuples(st.just("time"), st.sampled_from([float("nan"), float("inf"), float("-inf"), -1.0])),
    st.tuples(st.just("format"), st.sampled_from([0, 2, snap.VERSION + 1])),
    st.tuples(st.just("table"), st.sampled_from(["", "a/b", ".hidden", "x\0y", "t" * 300])),
    st.tuples(st.just("key"), st.sampled_from([2**32, -(2**31) - 1, 2**63])),
    st.tuples(st.just("chunk_n"), st.just(snap.CHUNK + 1)),
)
# harmless truths mixed in, so the lie is not always alone in an otherwise pristine file
truths = st.lists(st.one_of(
    st.tuples(st.just("record_bytes"), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("gens"), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("counters_ok"), st.integers(0, snap.MAX_COUNTER)),
), max_size=2)


def tell_lie(frames, lie) -> None:
    h, owners, c0, c1 = frames[0], frames[1], frames[2], frames[3]
    kind, *a = lie
    if kind == "counter":
        h["counters"][a[0]] = a[1]
    elif kind == "dup_slot_in_chunk":
        i, j = a[0], (a[0] + a[1]) % 4
        _col_set(c0, "slots", "I", j, array("I", c0["slots"])[i])
    elif kind == "dup_slot_across_chunks":
        _col_set(c1, "slots", "I", 0, array("I", c0["slots"])[a[0]])
    elif kind == "dup_entity":
        i, j = a[0], (a[0] + a[1]) % 4
        _col_set(c0, "entities", "Q", j, array("Q", c0["entities"])[i])
    elif kind == "state":
        c0["states"] = c0["states"][:a[0]] + bytes([a[1]]) + c0["states"][a[0] + 1:]
    elif kind == "flags":
        c0["flags"] = c0["flags"][:a[0]] + bytes([a[1]]) + c0["flags"][a[0] + 1:]
    elif kind == "owner_index":
        _col_set(c0, "owners", "H", a[0], a[1])
    elif kind == "seq":
        h["seq"], h["base"], h["prev"] = a[0]
    elif kind == "delta_seq":
        h["kind"] = "delta"
        h["seq"], h["base"], h["prev"] = a[0]
    elif kind == "owners":
        what = a[0]
        if what == "dup":
            owners.append(list(owners[0]))
        elif what == "zero":
            owners[0][0] = 0
        elif what == "big":
            owners[0][0] = fmt.OWNERS_CAPACITY + 1
        elif what == "empty_name":
            owners[0][1] = ""
        elif what == "long_name":
            owners[0][1] = "n" * (snap.MAX_OWNER_NAME + 1)
        elif what == "neg_since":
            owners[0][3] = -1
        elif what == "bool_index":
            owners[0][0] = True
        elif what == "many":
            owners[:] = [[i % 255 + 1, f"o{i}", 1, 0] for i in range(fmt.OWNERS_CAPACITY + 1)]
    elif kind == "time":
        h["time"] = a[0]
    elif kind == "format":
        h["format"] = a[0]
    elif kind == "table":
        h["table"] = a[0]
    elif kind == "key":
        h["key"] = a[0]
    elif kind == "chunk_n":
        frames[2] = make_chunk(list(range(a[0])))
        frames[-1]["records"] = sum(c["n"] for c in frames[2:-1])
        h["capacity"] = a[0] + 1


def tell_truths(frames, ts) -> None:
    for kind, v in ts:
        c0 = frames[2]
        if kind == "record_bytes":
            c0["records"] = v + c0["records"][len(v):]
        elif kind == "gens":
            _col_set(c0, "gens", "I", 0, v)
        elif kind == "counters_ok":
            frames[0]["counters"]["frees"] = v


@FUZZ(400)
@given(lie=lies, ts=truths)
@example(lie=("counter", "allocations", 2**64 - 1), ts=[])        # the tracker's example
@example(lie=("dup_slot_in_chunk", 0, 1), ts=[])                 # "5 records became 1"
@example(lie=("dup_entity", 0, 1), ts=[])
@example(lie=("counter", "frees", True), ts=[])
def test_semantic_lies_are_refused(tmp_path, lie, ts):
    frames = copy.deepcopy(FRAMES)
    tell_truths(frames, ts)
    tell_lie(frames, lie)
    p = tmp_path / "fuzz.snap"
    p.write_bytes(encode(frames))
    with bounded(10, "read_file"):
        with pytest.raises(snap.CorruptSnapshot) as ei:
            snap.read_file(p)
    assert str(p) in str(ei.value)
    with bounded(10, "verify_file"):
        with pytest.raises(snap.CorruptSnapshot):
            persist.verify_file(p)


@FUZZ(60)
@given(seq=st.integers(1, 10**6), kind=st.sampled_from(["full", "delta"]), table=st.sampled_from(["players", "zone"]),
       other_seq=st.integers(1, 10**6), other_kind=st.sampled_from(["full", "delta"]))
def test_a_file_must_be_what_its_name_says(tmp_path, seq, kind, table, other_seq, other_kind):
    frames = copy.deepcopy(FRAMES)
    frames[0].update(seq=other_seq, base=other_seq if other_kind == "full" else 1,
                     prev=other_seq - 1 if other_seq > 1 else 0, kind=other_kind, table=table)
    if other_kind == "delta" and other_seq == 1:
        return                                  # no such delta (base <= prev < seq)
    p = tmp_path / snap.file_name("players", seq, kind)
    p.write_bytes(encode(frames))
    if (table, other_seq, other_kind) == ("players", seq, kind):
        snap.read_file(p)
    else:
        with pytest.raises(snap.CorruptSnapshot, match="its name"):
            snap.read_file(p)


# ---- chains: a delta must continue its own full -------------------------------------------------------
@FUZZ(60)
@given(field=st.sampled_from(["key", "capacity", "layout"]), value=st.integers(1, 2**26), schema=wire_schema)
def test_a_delta_that_does_not_continue_its_full_ends_the_chain(tmp_path, restore_key, field, value, schema):
    import tempfile
    root = Path(tempfile.mkdtemp(dir=tmp_path))     # tmp_path is shared by the examples
    d = root / "var" / "players"
    d.mkdir(parents=True)
    full = copy.deepcopy(FRAMES)
    (d / snap.file_name("players", 3, "full")).write_bytes(encode(full))
    delta = copy.deepcopy(FRAMES)
    delta[0].update(kind="delta", seq=4, base=3, prev=3)
    if field == "key":
        delta[0]["key"] = (HEADER["key"] + value) % 2**32
    elif field == "capacity":
        if value == CAP:
            return
        delta[0]["capacity"] = value
        for c in delta[2:-1]:
            if c["n"] and max(array("I", c["slots"])) >= value:
                return                          # would be refused on its own, not for the chain
    else:
        try:
            lay = layout_mod.compute(from_wire(schema))
        except StatedError:
            return
        if lay.hash == LAY.hash:
            return
        delta[0].update(schema=schema, layout_hash=lay.hash, record_size=lay.record_size)
        for c in delta[2:-1]:
            c["records"] = bytes(c["n"] * lay.record_size)
    dp = d / snap.file_name("players", 4, "delta")
    dp.write_bytes(encode(delta))
    snap.read_file(dp)                          # fine on its own
    with bounded(10, "chain"):
        chain = snap.chain(d)
    assert chain.names() == [snap.file_name("players", 3, "full")]
    assert any(dp.name in w and "differs from its full" in w for w in chain.warnings), chain.warnings
    tc = TableConfig("players", restore_key, CAP, LAY)
    dc = DaemonConfig(state_dir=root / "var", control_socket=root / "s.sock")
    try:
        seg, n = persist.restore(tc, dc, chain)
        seg.detach()
        assert n == 4
    finally:
        segment.destroy(restore_key)
