"""Record views' field contract: what an integer field accepts, what it refuses and how.

Integer fields range-check on assignment (an out-of-range value raises ValueError naming the field and
its range, and writes nothing, instead of wrapping like C); everything else follows Python's comparison
and ctypes' own conversion. These tests pin that contract down value by value on live views, write
sections and detached read() copies, so that how the check is implemented can change without what it
does changing. f32/f64/bool fields are plain ctypes fields (C semantics), checked here too.
"""
import enum
import math
from decimal import Decimal
from fractions import Fraction

import pytest
from helpers import FUZZ
from hypothesis import given
from hypothesis import strategies as st

import stated
from stated.errors import ReadOnlyTable, StaleHandle, StatedError
from stated.shm import _native

INT_TYPES = ["i8", "u8", "i16", "u16", "i32", "u32", "i64", "u64"]
FIELDS = [f"{t}_f: {t}" for t in INT_TYPES] + ["hp: i32 = 100", "x: f32", "d: f64", "alive: bool",
                                               "inventory: u32[4]"]
INT_NAMES = [f"{t}_f" for t in INT_TYPES]


def bounds(t: str) -> tuple[int, int]:
    bits = int(t[1:])
    return (0, (1 << bits) - 1) if t[0] == "u" else (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)


def outside(name: str, t: str, v) -> str:
    lo, hi = bounds(t)
    return f"field {name!r} is {t}: {v!r} is outside [{lo}, {hi}]"


class Zone(enum.IntEnum):
    NORTH = 3


class IndexOnly:
    """Has __index__ but no ordering: the range check's comparison refuses it."""

    def __index__(self) -> int:
        return 4


@pytest.fixture(autouse=True, params=["direct", "ctypes-field"])
def field_path(request):
    """Every test runs on both paths of an integer field: straight to the record's bytes (the normal one)
    and through the ctypes field (what is used if ctypes' object layout ever fails the module's check)."""
    was = _native.direct_field_access()
    _native.direct_field_access(request.param == "direct")
    yield request.param
    _native.direct_field_access(was)


@pytest.fixture
def rec(make_segment):
    key = make_segment(capacity=4, fields=FIELDS)
    t = stated.attach(key=key, owner="me")
    h = t.alloc()
    yield t, h
    t.close()


def targets(t, h):
    """(label, assign) pairs: the three ways a field is written through a record object."""
    def live(name, v):
        setattr(t.record(h), name, v)

    def section(name, v):
        with t.write(h) as p:
            setattr(p, name, v)

    copy = t.read(h)

    def detached(name, v):
        setattr(copy, name, v)
    return [("live", live), ("section", section), ("detached", detached)], copy


@pytest.mark.parametrize("t", INT_TYPES)
def test_int_bounds_are_accepted_and_read_back(rec, t):
    table, h = rec
    name = f"{t}_f"
    lo, hi = bounds(t)
    ways, copy = targets(table, h)
    for label, assign in ways:
        for v in (lo, hi, 0, 1, hi // 2):
            assign(name, v)
            got = getattr(copy if label == "detached" else table.record(h), name)
            assert got == v and type(got) is int, (label, v, got)
            if label != "detached":
                assert table.get(h, name) == v and getattr(table.read(h), name) == v


@pytest.mark.parametrize("t", INT_TYPES)
def test_int_out_of_range_raises_value_error_naming_field_and_range(rec, t):
    table, h = rec
    name = f"{t}_f"
    lo, hi = bounds(t)
    table.set(h, name, hi)                              # a non-zero value that must survive
    before = bytes(table.read(h))
    ways, copy = targets(table, h)
    copy_before = bytes(copy)
    bad = [lo - 1, hi + 1, lo - 2**70, hi + 2**70, -2**200, 2**200, 2**64, -2**63 - 1, 1e20, -1e20,
           float("inf"), float("-inf"), float("nan")]
    for label, assign in ways:
        for v in bad:
            with pytest.raises(ValueError) as e:
                assign(name, v)
            assert str(e.value) == outside(name, t, v), (label, v)
            assert type(e.value) is ValueError
    assert bytes(table.read(h)) == before and bytes(copy) == copy_before
    assert table.verify() == []                         # the sections that raised still ended (seq even)


@pytest.mark.parametrize("t", INT_TYPES)
def test_int_wrong_types_raise_type_error_and_write_nothing(rec, t):
    table, h = rec
    name = f"{t}_f"
    table.set(h, name, 1)
    before = bytes(table.read(h))
    ways, copy = targets(table, h)
    not_ordered = [("5", "str"), (None, "NoneType"), (b"5", "bytes"), ([1], "list"), (IndexOnly(), "IndexOnly")]
    not_integers = [(5.0, "'float' object"), (0.5, "'float' object"), (Fraction(3, 1), "'Fraction' object"),
                    (Decimal(3), "'decimal.Decimal' object")]
    for label, assign in ways:
        for v, tname in not_ordered:
            with pytest.raises(TypeError) as e:
                assign(name, v)
            assert str(e.value) == f"'<=' not supported between instances of 'int' and '{tname}'", (label, v)
        for v, what in not_integers:          # in range: compared fine, refused by ctypes' conversion
            with pytest.raises(TypeError) as e:
                assign(name, v)
            assert str(e.value) == f"{what} cannot be interpreted as an integer", (label, v)
    assert bytes(table.read(h)) == before and getattr(copy, name) == 1


@pytest.mark.parametrize("t", INT_TYPES)
def test_int_accepts_bools_and_int_subclasses(rec, t):
    table, h = rec
    name = f"{t}_f"
    ways, copy = targets(table, h)
    for label, assign in ways:
        for v, want in ((True, 1), (False, 0), (Zone.NORTH, 3)):
            assign(name, v)
            got = getattr(copy if label == "detached" else table.record(h), name)
            assert got == want and type(got) is int, (label, v)


@FUZZ(300)
@given(t=st.sampled_from(INT_TYPES), v=st.integers(-2**66, 2**66) | st.sampled_from(
    sorted({b + d for t in INT_TYPES for b in bounds(t) for d in (-1, 0, 1)})))
def test_int_accepts_exactly_its_range(make_segment, t, v):
    """Any int: stored and read back when lo <= v <= hi, else ValueError and nothing written (the
    boundaries of every type and ints far outside 64 bits included)."""
    key = make_segment(capacity=1, fields=FIELDS)
    with stated.attach(key=key, owner="me") as table:
        h = table.alloc()
        p = table.record(h)
        name = f"{t}_f"
        lo, hi = bounds(t)
        if lo <= v <= hi:
            setattr(p, name, v)
            assert getattr(p, name) == v and table.get(h, name) == v
        else:
            before = bytes(table.read(h))
            with pytest.raises(ValueError, match=r"is outside \["):
                setattr(p, name, v)
            assert bytes(table.read(h)) == before


def test_deleting_an_int_field_raises_attribute_error(rec):
    table, h = rec
    p = table.record(h)
    for name in [*INT_NAMES, "hp"]:
        with pytest.raises(AttributeError):
            delattr(p, name)
    assert p.hp == 100


def test_int_fields_on_the_class_document_their_declaration(rec):
    table, h = rec
    cls = type(table.record(h))
    assert cls.hp.__doc__ == "hp: i32 = 100" and cls.u64_f.__doc__ == "u64_f: u64"


def test_int_fields_take_the_direct_path_here(rec, field_path):
    """On this CPython the module's check of ctypes' object layout passes: integer fields read and write
    the record's bytes directly (if this fails, views still work, through the ctypes field, but slower)."""
    table, h = rec
    cls = type(table.record(h))
    assert all(getattr(cls, n).direct == (field_path == "direct") for n in [*INT_NAMES, "hp"])


def test_int_descriptor_refuses_foreign_objects(rec):
    """A manual __get__/__set__ on an object that is not one of the record class's instances raises
    TypeError (it must not read or write at that object's address plus the field's offset)."""
    import ctypes
    table, h = rec
    p = table.record(h)
    desc = type(p).__dict__["u64_f"]

    class Small(ctypes.Structure):
        _fields_ = [("a", ctypes.c_uint8)]
    for other in (Small(), ctypes.c_uint64(1), object(), 5):
        with pytest.raises(TypeError, match="doesn't apply"):
            desc.__get__(other, type(other))
        with pytest.raises(TypeError, match="doesn't apply"):
            desc.__set__(other, 1)
    assert desc.__get__(p, type(p)) == p.u64_f == 0 and desc.__get__(None, type(p)) is desc
    desc.__set__(p, 2**64 - 1)
    assert table.get(h, "u64_f") == 2**64 - 1


def test_float_and_bool_fields_keep_c_semantics(rec):
    """Plain ctypes fields: f32 overflow becomes inf, a bool stores truthiness, ints go into floats."""
    table, h = rec
    p = table.record(h)
    p.x = 1e39
    assert p.x == math.inf
    p.x, p.d = 2, 2**80
    assert p.x == 2.0 and p.d == float(2**80)
    p.alive = 5
    assert p.alive is True
    with pytest.raises(TypeError):
        p.x = "1.5"
    with pytest.raises(TypeError):
        p.d = None


def test_readonly_view_refuses_every_write(rec):
    table, h = rec
    table.set(h, "hp", 55)
    ro = stated.attach(key=table.key, readonly=True)
    try:
        p = ro.record(h)
        assert p.hp == 55 and p.u64_f == 0
        for name, v in (("hp", 1), ("hp", 2**40), ("hp", "x"), ("u64_f", 2**64 - 1), ("x", 1.0), ("alive", True)):
            with pytest.raises(ReadOnlyTable, match="readonly"):
                setattr(p, name, v)
        with pytest.raises(AttributeError):          # deleting a field is refused on any view
            del p.hp
        assert table.get(h, "hp") == 55 and p.hp == 55
    finally:
        ro.close()


def test_view_of_a_freed_slot_raises_stale_on_get_and_set(rec):
    table, h = rec
    p = table.record(h)
    table.free(h)
    h2 = table.alloc()
    assert h2.slot == h.slot
    for action in (lambda: p.hp, lambda: p.u64_f, lambda: p.x, lambda: setattr(p, "hp", 5),
                   lambda: setattr(p, "hp", 2**40), lambda: setattr(p, "x", 1.0)):
        with pytest.raises(StaleHandle, match="was freed"):
            action()
    assert table.get(h2, "hp") == 100                # nothing reached the slot's new record


def test_view_of_a_closed_table_raises_on_get_and_set(make_segment):
    key = make_segment(capacity=4, fields=FIELDS)
    t = stated.attach(key=key, owner="me")
    p = t.record(t.alloc())
    t.close()
    for action in (lambda: p.hp, lambda: p.i8_f, lambda: setattr(p, "hp", 5), lambda: setattr(p, "i8_f", 999)):
        with pytest.raises(StatedError, match="closed"):
            action()


# ---- write sections: every way Python drives the context-manager protocol ---------------------------------
def seq_of(table, h) -> int:
    return table.views.seq[h.slot]


def test_write_section_protocol_every_way(rec):
    """`with`, explicit __enter__/__exit__ calls, the unbound type methods (contextlib.ExitStack uses them),
    methods taken once and called later: each makes the seq odd then even and marks the slot dirty."""
    import contextlib
    table, h = rec
    view = table.record(h)
    s = table.write(h)
    seq = seq_of(table, h)
    with s as p:
        assert p is view and seq_of(table, h) == seq + 1
        p.hp = 1
    assert seq_of(table, h) == seq + 2 and table.get(h, "hp") == 1
    assert s.__enter__() is view and seq_of(table, h) == seq + 3
    assert s.__exit__(None, None, None) is False and seq_of(table, h) == seq + 4
    enter, exit_ = type(s).__enter__, type(s).__exit__
    assert enter(s) is view and exit_(s, None, None, None) is False and seq_of(table, h) == seq + 6
    bound_enter, bound_exit = s.__enter__, s.__exit__          # taken once, called later (twice)
    for _ in range(2):
        assert bound_enter() is view
        bound_exit(None, None, None)
    assert seq_of(table, h) == seq + 10
    with contextlib.ExitStack() as stack:
        assert stack.enter_context(table.write(h)) is view and seq_of(table, h) == seq + 11
    assert seq_of(table, h) == seq + 12
    table.views.dirty[h.slot] = 0
    with table.write(h) as p:
        p.hp = 2
    assert table.views.dirty[h.slot] == 1 and table.read(h).hp == 2 and table.verify() == []


def test_write_section_exception_in_body_propagates_and_ends_the_section(rec):
    table, h = rec
    seq = seq_of(table, h)
    with pytest.raises(KeyError):
        with table.write(h) as p:
            p.hp = 7
            raise KeyError("body")
    assert seq_of(table, h) == seq + 2 and table.read(h).hp == 7      # ended: never torn, stores kept
    with pytest.raises(ValueError, match="outside"):
        with table.write(h) as p:
            p.hp = 2**40
    assert seq_of(table, h) == seq + 4 and table.read(h).hp == 7


def test_write_section_methods_refuse_bad_calls(rec):
    table, h = rec
    s = table.write(h)
    with pytest.raises(TypeError):
        s.__enter__(1)
    with pytest.raises(TypeError):
        type(s).__enter__(5)
    with pytest.raises(TypeError):
        type(s).__exit__()
    assert seq_of(table, h) % 2 == 0 and table.verify() == []


def test_write_section_methods_outlive_a_freed_slot(rec):
    """A section's methods taken before its slot was freed raise StaleHandle (enter) or do nothing (exit),
    even after the section itself was dropped by the table."""
    import gc
    table, h = rec
    s = table.write(h)
    enter, exit_ = s.__enter__, s.__exit__
    del s
    table.free(h)
    gc.collect()
    h2 = table.alloc()
    seq = seq_of(table, h2)
    with pytest.raises(StaleHandle, match="freed"):
        enter()
    assert exit_(None, None, None) is False and seq_of(table, h2) == seq


def test_a_freed_slots_section_and_view_go_without_the_gc(rec):
    """The Core lets go of a dropped section's bound __enter__/__exit__ (which refer back to it), so the
    section and the view it holds are freed by reference counting alone, as before."""
    import gc
    import weakref
    table, h = rec
    with table.write(h) as p:
        p.hp = 1
    gone = weakref.ref(p)
    del p
    gc.disable()
    try:
        table.free(h)
        assert gone() is None
    finally:
        gc.enable()


def test_no_reference_leaks_in_the_c_paths(rec):
    """Every path of the integer descriptor and of the section's with-protocol, a thousand times: the
    objects passed in and handed out keep their reference counts (a leak of one per call shows as 1000)."""
    import contextlib
    import sys
    table, h = rec
    p = table.record(h)
    s = table.write(h)
    big, flt, huge_u, enum_v, text = 2**100, 5.0, 2**64 - 1, Zone.NORTH, "5"
    objs = [big, flt, huge_u, enum_v, text, p, s, type(p).hp, type(p).u64_f]

    def paths():
        p.hp = 5
        p.u64_f = huge_u
        p.i8_f = enum_v
        p.i8_f = True
        _ = (p.hp, p.u64_f, p.i8_f, type(p).hp.lo, type(p).hp.field)
        for bad in (big, flt, text):
            with contextlib.suppress(ValueError, TypeError):
                p.hp = bad
        with contextlib.suppress(AttributeError):
            del p.hp
        with s as q:
            q.hp = 6
        with contextlib.suppress(ValueError):
            with table.write(h) as q:
                q.hp = big
        s.__enter__()
        s.__exit__(None, None, None)
        type(s).__enter__(s)
        type(s).__exit__(s, None, None, None)
        with contextlib.suppress(TypeError):
            s.__enter__(1)
        with contextlib.ExitStack() as st:
            st.enter_context(s)

    paths()                                            # first use: the bound methods are made and kept
    before = [sys.getrefcount(o) for o in objs]
    for _ in range(1000):
        paths()
    assert [sys.getrefcount(o) for o in objs] == before
