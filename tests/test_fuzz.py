"""Hostile input, property-based: schema blobs, config files and control frames.

Everything stated parses that it did not write itself must fail with its own error type
(SchemaError/ConfigError, ValueError for control frames) or succeed with something usable;
never another exception, never a hang. Segment headers: test_fuzz_segment.py; snapshot
files: test_fuzz_snapshot.py. Budgets are fixed and derandomized so CI is reproducible.

Budgets, time bounds and the strategies the fuzzers share (FUZZ, bounded, names, types, wire_schema,
nested, ...) live in helpers.py.
"""
from __future__ import annotations

import math
import signal
import socket
import struct
from pathlib import Path

import msgpack
import pytest
from helpers import (
    FUZZ,
    TYPE_NAMES,
    NotifySocket,
    bounded,
    ctl,
    names,
    nested,
    start,
    toml_str,
    toml_value,
    types,
    wire_schema,
)
from hypothesis import example, given
from hypothesis import strategies as st

from stated.daemon import control
from stated.errors import ConfigError, SchemaError
from stated.format import config as config_mod
from stated.format import layout as layout_mod
from stated.format.schema import from_wire, parse_field
from stated.shm.records import default_record, record_class


def deep(n: int, leaf=1):
    """A list nested n deep: [[[...[leaf]...]]]."""
    v = leaf
    for _ in range(n):
        v = [v]
    return v


def assert_usable_schema(fields) -> None:
    """What consumers do with an accepted schema must work: lay it out, build its record class."""
    assert isinstance(fields, tuple) and fields
    for f in fields:
        assert f.type in TYPE_NAMES and f.name.isidentifier() and f.name.isascii()
        assert parse_field(f.decl.split(" = ")[0]).name == f.name
    lay = layout_mod.compute(fields)
    default_record(record_class(lay))
    layout_mod.schema_blob(lay)


# ---- 2. schema blobs -------------------------------------------------------------------------------
@FUZZ(500)
@given(st.one_of(st.binary(max_size=120),
                 wire_schema.map(lambda s: msgpack.packb(s, use_bin_type=True)),
                 st.tuples(wire_schema, st.binary(max_size=4), st.integers(0, 50)).map(
                     lambda t: (lambda b: b[:t[2]] + t[1] + b[t[2]:])(msgpack.packb(t[0], use_bin_type=True)))))
@example(b"\x91" * 1000 + b"\x01")                                       # nesting deeper than repr allows
@example(msgpack.packb([["a\u00b2", "u8", 1, False, None]]))              # not an identifier: exec() fails
@example(msgpack.packb([["x: u8 = {[]: 1} #", "u8", 1, False, None]]))    # literal_eval raising TypeError
def test_schema_blob_from_msgpack(blob):
    try:
        data = msgpack.unpackb(blob, raw=False)
    except (msgpack.UnpackException, ValueError, TypeError):
        return          # not the parser under test: parse_header/read_file turn these into their own errors
    try:
        fields = from_wire(data)
    except SchemaError:
        return
    assert_usable_schema(fields)


@FUZZ(500)
@given(st.one_of(wire_schema, nested, st.lists(nested, max_size=5)))
@example([["x", "f32", 1, False, 2**64 - 1]])
def test_schema_from_random_structures(data):
    try:
        fields = from_wire(data)
    except SchemaError:
        return
    assert_usable_schema(fields)


@pytest.mark.parametrize("data", [deep(3000), [deep(990)], [["a", "u8", 1, False, None], deep(995)]],
                         ids=["deep3000", "entry990", "second-entry995"])
def test_schema_deep_nesting_regression(data):
    """repr() of a malformed entry nested ~1000 deep raised RecursionError (hypothesis cannot print these)."""
    with pytest.raises(SchemaError, match="malformed"):
        from_wire(data)


decl_defaults = st.one_of(st.sampled_from(["1", "-1", "1.5", "true", "False", "'abc'", "b'ab'", "[1, 2]", "{[]: 1}",
                                           "{{}}", "'\\ud800'", "9" * 400, "-" * 5000 + "1", "(" * 300 + "1",
                                           "1e400", "nan", "None", "1 #", "__import__('os')", "lambda: 1"]),
                          st.text(max_size=12))
decls = st.one_of(
    st.tuples(names, types, st.one_of(st.none(), st.integers(-1, 40).map(str), st.sampled_from(["\u0661", "1 2", ""])),
              st.one_of(st.none(), decl_defaults)).map(
        lambda t: f"{t[0]}: {t[1]}" + ("" if t[2] is None else f"[{t[2]}]") + ("" if t[3] is None else f" = {t[3]}")),
    st.text(max_size=40),
)


@FUZZ(500)
@given(decls)
@example("x: u8 = {[]: 1}")                  # literal_eval: TypeError (unhashable)
@example("x: f64 = " + "9" * 400)            # float(int) overflows
@example("x: bytes[4] = '\\ud800'")          # a lone surrogate cannot be encoded
@example("x: u8 = " + "-" * 100000 + "1")    # literal_eval: MemoryError from the parser
@example("x: u8 = " + "~" * 5000 + "1")      # literal_eval: RecursionError
@example("a\u00b2: u8")                        # \w is Unicode: not an identifier
@example("x: u8[\u0661\u0662]")              # Arabic-Indic digits
def test_field_declarations(decl):
    try:
        f = parse_field(decl)
    except SchemaError:
        return
    assert_usable_schema((f,))
    if not (isinstance(f.default, float) and not math.isfinite(f.default)):
        assert parse_field(f.decl) == f         # the canonical text parses back to the same field


# ---- 5. config files -------------------------------------------------------------------------------
def toml_text(doc: dict) -> str:
    """A document {"daemon": {...}, "tables": {name: {...}}, other: {...}} as TOML text."""
    lines = []
    for top, body in doc.items():
        if top == "tables" and isinstance(body, dict):
            for name, t in body.items():
                if isinstance(t, dict):
                    lines.append(f"[tables.{toml_str(name)}]")
                    lines += [f"{toml_str(k)} = {toml_value(v)}" for k, v in t.items()]
                else:
                    lines.append(f"tables.{toml_str(name)} = {toml_value(t)}")
        elif isinstance(body, dict):
            lines.append(f"[{toml_str(top)}]")
            lines += [f"{toml_str(k)} = {toml_value(v)}" for k, v in body.items()]
        else:
            lines.insert(0, f"{toml_str(top)} = {toml_value(body)}")
    return "\n".join(lines) + "\n"


toml_scalars = st.one_of(st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(), st.text(max_size=12))
toml_any = st.recursive(toml_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=4), c,
                                                                                         max_size=3), max_leaves=12)
toml_ints = st.one_of(st.sampled_from([0, 1, -1, 0o600, 0o660, 0o770, 0o777, 0x7FFFFFFF, 0x80000000, 1 << 26,
                                       (1 << 26) + 1, 2**63 - 1, -(2**63)]), st.integers(-(2**63), 2**63 - 1))
toml_nums = st.one_of(toml_ints, st.floats(), st.sampled_from([0.0, -0.0, 1e-9, 0.5]))
paths = st.one_of(st.sampled_from(["var", "/tmp/x", "a\0b", "../..", "", ".", "x" * 5000, "~"]), st.text(max_size=10))


def _maybe(strategy):
    return st.one_of(strategy, strategy, strategy, toml_any)     # mostly the right type, sometimes anything


daemon_tables = st.fixed_dictionaries({}, optional={
    "state_dir": _maybe(paths), "control_socket": _maybe(paths), "group": _maybe(st.text(max_size=8)),
    "mode": _maybe(toml_ints), "lock_timeout": _maybe(toml_nums), "repair_interval": _maybe(toml_nums),
    "reap_interval": _maybe(toml_nums), "snapshot_interval": _maybe(toml_nums), "snapshots_keep": _maybe(toml_ints),
    "full_every": _maybe(toml_ints), "base_key": _maybe(toml_ints), "bogus": toml_any,
    "metrics_address": _maybe(st.one_of(st.sampled_from(["127.0.0.1:0", "localhost:9474", ":80", "host:",
                                                         "a:\u00b2", "a:\u0661", "[::1]:65535", "h:65536", "h:-1",
                                                         "h: 1", "h:+1", "h:1_0"]), st.text(max_size=12))),
})
table_names = st.one_of(st.sampled_from(["players", "world", "a" * 31, "a" * 32, "Players", "x-y", "p\n", "1p", ""]),
                        st.text(max_size=8))
table_bodies = st.fixed_dictionaries({}, optional={
    "key": _maybe(toml_ints), "capacity": _maybe(toml_ints), "fields": _maybe(st.lists(decls, max_size=5)),
    "dead_owner": _maybe(st.sampled_from(["keep", "release", "KEEP", ""])), "dead_owner_grace": _maybe(toml_nums),
    "extra": toml_any,
})
config_docs = st.fixed_dictionaries(
    {"tables": st.dictionaries(table_names, table_bodies, max_size=3)},
    optional={"daemon": daemon_tables, "other": st.dictionaries(st.text(max_size=4), toml_scalars, max_size=2)})

VALID_CFG = ('[daemon]\nstate_dir = "var"\n[tables.players]\ncapacity = 10\nkey = 0x5E000001\n'
             'fields = ["id: u64", "name: str[8]"]\n')


def check_config(text: str) -> None:
    try:
        cfg = config_mod.loads(text, "fuzz.toml", Path("/tmp"))
    except ConfigError as e:
        assert "fuzz.toml" in str(e)
        return
    d = cfg.daemon
    assert d.state_dir.is_absolute() and d.control_socket.is_absolute()
    for p in (str(d.state_dir), str(d.control_socket), d.group or ""):
        assert "\0" not in p
    host, _, port = d.metrics_address.rpartition(":")
    assert 0 <= int(port) <= 65535 and port.isascii()
    assert d.mode & 0o600 == 0o600 and not d.mode & ~0o770
    keys = set()
    for _name, tc in cfg.tables.items():
        assert 1 <= tc.key <= 0x7FFFFFFF and tc.key not in keys and 1 <= tc.capacity <= 1 << 26
        keys.add(tc.key)
        assert tc.dead_owner in ("keep", "release")
        assert_usable_schema(tc.layout.schema)


@FUZZ(600)
@given(st.one_of(st.text(max_size=300),
                 st.lists(st.sampled_from(["[daemon]", "[tables.players]", "[tables.p]", "capacity = 10",
                                           'fields = ["a: u8"]', "key = 0x5E000001", 'state_dir = "var"',
                                           "mode = 0o660",
                                           "x = [", "= 1", "[[tables]]", "a.b.c = 1", '"\\u0000" = 1', "fields = []",
                                           'metrics_address = "h:\u00b2"']) | st.text(max_size=20),
                          max_size=12).map("\n".join),
                 st.tuples(st.just(VALID_CFG), st.integers(0, len(VALID_CFG)), st.text(max_size=5)).map(
                     lambda t: t[0][:t[1]] + t[2] + t[0][t[1]:])))
@example("x = " + "[" * 3000)                # tomllib: RecursionError
@example("x = " + "1" * 5000)                # tomllib: int() digit limit, ValueError
@example(VALID_CFG)
def test_config_random_text(text):
    with bounded(10, "config.loads"):
        check_config(text)


@FUZZ(400)
@given(config_docs)
@example({"daemon": {"state_dir": "a\0b"}, "tables": {"p": {"capacity": 1, "fields": ["a: u8"]}}})
@example({"daemon": {"control_socket": "a\0b"}, "tables": {"p": {"capacity": 1, "fields": ["a: u8"]}}})
@example({"daemon": {"group": "a\0b"}, "tables": {"p": {"capacity": 1, "fields": ["a: u8"]}}})
@example({"daemon": {"metrics_address": "h:\u00b2"}, "tables": {"p": {"capacity": 1, "fields": ["a: u8"]}}})
@example({"tables": {"p": {"capacity": 1, "fields": ["a: f64 = " + "9" * 400]}}})
@example({"tables": {"p": {"capacity": 1, "fields": ["\u00e9: u8"]}}})
def test_config_structured(doc):
    with bounded(10, "config.loads"):
        check_config(toml_text(doc))


# ---- 4. control frames -----------------------------------------------------------------------------
OPS = {"ping", "status", "reload", "reap", "snapshot"}
requests = st.one_of(
    st.dictionaries(st.one_of(st.sampled_from(["op", "kind", "args"]), st.text(max_size=4)),
                    st.one_of(st.sampled_from(sorted(OPS)), nested), max_size=4),
    st.fixed_dictionaries({"op": st.one_of(st.sampled_from(sorted(OPS)), nested)},
                          optional={"kind": nested, "x": nested}),
    nested,
)


def _bodies():
    packed = requests.map(lambda o: msgpack.packb(o, use_bin_type=True))
    return st.one_of(st.binary(max_size=200), packed,
                     st.tuples(packed, st.binary(max_size=3), st.integers(0, 40)).map(
                         lambda t: t[0][:t[2]] + t[1] + t[0][t[2]:]))


@FUZZ(600)
@given(_bodies())
@example(b"\x81\x01\x02")                             # int map key (strict_map_key)
@example(b"\x91" * 2000)                              # nesting beyond msgpack's stack
@example(msgpack.packb({"op": "ping"}) + b"\x00")     # trailing data
@example(b"\xd6\xff\x00\x00\x00\x00" )                # timestamp ext
def test_decode_request(body):
    try:
        req = control.decode_request(body, OPS)
    except ValueError:
        return
    assert isinstance(req, dict) and req["op"] in OPS


# ---- 4b. a live daemon under random frames ---------------------------------------------------------
def _exchange(path: str, data: bytes, close_early: bool) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return b""      # the daemon hung up first (oversized frame): fine
        if close_early:
            return b""
        s.shutdown(socket.SHUT_WR)
        out = bytearray()
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
        return bytes(out)


def _replies(raw: bytes) -> list:
    out, pos = [], 0
    while pos + 4 <= len(raw):
        (n,) = struct.unpack_from(">I", raw, pos)
        out.append(msgpack.unpackb(raw[pos + 4:pos + 4 + n], raw=False))
        pos += 4 + n
    assert pos == len(raw), "a reply frame was cut"
    return out


_frames = st.one_of(
    _bodies().map(lambda b: struct.pack(">I", len(b)) + b),                                  # well-framed garbage
    st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=64)).map(lambda t: struct.pack(">I", t[0]) + t[1]),
    st.tuples(st.integers(control.MAX_FRAME + 1, 2**32 - 1), st.binary(max_size=64)).map(
        lambda t: struct.pack(">I", t[0]) + t[1]),                                           # oversized
    st.binary(max_size=6),                                                                   # not even a header
    st.just(control.encode({"op": "ping"})),
    st.sampled_from(["status", "reap"]).map(lambda op: control.encode({"op": op, "x": 1})),
)
_batches = st.lists(st.tuples(st.lists(_frames, min_size=1, max_size=3).map(b"".join), st.booleans()),
                    min_size=10, max_size=14)


def test_daemon_survives_random_control_frames(write_config, procs, tmp_path):
    cfg = write_config({"players": {"capacity": 10}})
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        d = start(procs, cfg, notify)
    finally:
        notify.close()
    path = str(config_mod.load(cfg).daemon.control_socket)
    sent = 0

    @FUZZ(20)
    @given(_batches)
    def batch(frames):
        nonlocal sent
        for data, close_early in frames:
            with bounded(15, "control exchange"):
                for r in _replies(_exchange(path, data, close_early)):
                    assert isinstance(r, dict) and isinstance(r.get("ok"), bool)
            sent += 1
        assert d.poll() is None, "the daemon exited"
        assert ctl(cfg, "ping")["pid"] == d.pid

    batch()
    print(f"{sent} connections to the daemon")
    assert sent >= 200
    d.send_signal(signal.SIGTERM)
    assert d.wait(timeout=10) == 0
    log = Path(str(cfg) + ".log").read_text()
    assert "control request failed" not in log and "Traceback" not in log, log[-3000:]
