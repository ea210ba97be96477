import ctypes

from helpers import PLAYER_FIELDS

from stated.format import layout
from stated.format.schema import parse_fields
from stated.shm.records import record_class


def test_players_layout_is_c_compatible():
    lay = layout.compute(parse_fields(PLAYER_FIELDS))
    offs = {f.name: f.offset for f in lay.fields}
    assert offs == {"id": 0, "name": 8, "level": 40, "hp": 44, "x": 48, "y": 52, "z": 56, "zone": 60,
                    "gold": 64, "inventory": 72}
    assert lay.record_size == 200


def test_padding_alignment_and_size_rounding():
    lay = layout.compute(parse_fields(["a: u8", "b: u64", "c: u8", "d: u16[3]", "e: bool"]))
    offs = {f.name: f.offset for f in lay.fields}
    assert offs == {"a": 0, "b": 8, "c": 16, "d": 18, "e": 24}
    assert lay.record_size == 32
    assert layout.compute(parse_fields(["a: u8"])).record_size == 8


def test_ctypes_agrees_with_layout():
    fields = ["a: i8", "b: f64", "c: str[5]", "d: u32[3]", "e: bool", "f: bytes[3]", "g: i64", "h: f32"]
    lay = layout.compute(parse_fields(fields))
    cls = record_class(lay)
    assert ctypes.sizeof(cls) == lay.record_size


def test_hash_depends_on_layout_not_defaults():
    a = layout.compute(parse_fields(["hp: i32 = 100", "x: f32"]))
    b = layout.compute(parse_fields(["hp: i32 = 50", "x: f32"]))
    c = layout.compute(parse_fields(["x: f32", "hp: i32"]))
    d = layout.compute(parse_fields(["hp: i64", "x: f32"]))
    assert a.hash == b.hash
    assert len({a.hash, c.hash, d.hash}) == 3
