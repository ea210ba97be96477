"""Record classes: ctypes structures derived from a Layout, used as live views.

A view is a ctypes structure laid over the record's bytes in shared memory, so
`p.x += p.vx * dt` costs what raw ctypes costs. Field kinds:

- f32/f64/bool: plain ctypes fields (fastest; f32 overflow becomes inf as in C);
- integers: a CheckedInt descriptor (stated.shm._native, C) for the raw ctypes
  field: reads and writes go straight to the record's bytes (faster than the
  ctypes field itself), writes range-checked first, so `p.hp = 2**40` raises
  ValueError and writes nothing instead of wrapping like C would (any other
  value is accepted or refused exactly as Python's `lo <= v <= hi` followed by
  the ctypes store would: tests/test_records.py);
- str[N]/bytes[N]: properties that encode/decode and refuse oversized values;
- T[N] arrays: the ctypes array itself (live, indexable, sliceable; element
  writes have C semantics); assigning a sequence to the field is checked.

The same class, instantiated with `from_buffer_copy`, is the detached record a
consistent read returns: same attributes, no link to shared memory.

Memory ordering: a view's attribute access is one plain load or store. The
seqlock around them (write sections, consistent reads) is the native core's,
with the fences it needs on any CPU (docs/format.md "Memory ordering"); a
single aligned field of <= 8 bytes is atomic on its own, a whole record written
through a view outside a section is not.
"""
from __future__ import annotations

import ctypes
import operator
from typing import Any

from ..format.layout import Layout
from ..format.schema import Field, check_value, int_range
from ._native import CheckedInt

_CTYPES: dict[str, Any] = {
    "i8": ctypes.c_int8, "u8": ctypes.c_uint8, "i16": ctypes.c_int16, "u16": ctypes.c_uint16,
    "i32": ctypes.c_int32, "u32": ctypes.c_uint32, "i64": ctypes.c_int64, "u64": ctypes.c_uint64,
    "f32": ctypes.c_float, "f64": ctypes.c_double, "bool": ctypes.c_bool,
}


def _str_property(raw: str, f: Field) -> property:
    n = f.count
    if f.type == "str":
        def get(self):
            return getattr(self, raw).decode("utf-8", "replace")   # ctypes stops at the first NUL

        def put(self, v):
            check_value(f, v)
            setattr(self, raw, v.encode("utf-8").ljust(n, b"\0"))
    else:
        def get(self):
            return bytes(getattr(self, raw))

        def put(self, v):
            check_value(f, v)
            getattr(self, raw)[:] = bytes(v).ljust(n, b"\0")
    return property(get, put, doc=f"{f.decl}")


def _array_property(raw: str, f: Field) -> property:
    def put(self, v):
        vals = list(v)
        if len(vals) > f.count:
            raise ValueError(f"field {f.name!r} is {f.type}[{f.count}]: {len(vals)} values given")
        for x in vals:
            check_value(f, x)
        arr = getattr(self, raw)
        arr[:] = vals + [0] * (f.count - len(vals))
    return property(operator.attrgetter(raw), put, doc=f"{f.decl}")


class RecordBase(ctypes.Structure):
    """Methods every generated record class has."""

    _layout: Layout

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for fl in self._layout.fields:
            v = getattr(self, fl.name)
            out[fl.name] = list(v) if fl.field.array else v
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RecordBase):
            return bytes(self) == bytes(other)
        if isinstance(other, dict):
            return self.to_dict() == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


def record_class(layout: Layout, name: str = "record") -> type[RecordBase]:
    """Build the ctypes class for a layout; checks its offsets against the layout."""
    fields: list[tuple[str, Any]] = []
    ns: dict[str, Any] = {"_layout": layout, "__slots__": ()}
    checked: list[tuple[str, Field]] = []       # integer fields: a CheckedInt over the raw field, below
    end = 0
    for i, fl in enumerate(layout.fields):
        f = fl.field
        if fl.offset > end:
            fields.append((f"_pad{i}", ctypes.c_uint8 * (fl.offset - end)))
        if f.is_string:
            raw = f"_raw_{f.name}"
            fields.append((raw, (ctypes.c_char if f.type == "str" else ctypes.c_uint8) * f.count))
            ns[f.name] = _str_property(raw, f)
        elif f.array:
            raw = f"_raw_{f.name}"
            fields.append((raw, _CTYPES[f.type] * f.count))
            ns[f.name] = _array_property(raw, f)
        elif f.type[0] in "iu":
            raw = f"_raw_{f.name}"
            fields.append((raw, _CTYPES[f.type]))
            checked.append((raw, f))
        else:
            fields.append((f.name, _CTYPES[f.type]))
        end = fl.offset + f.size
    if layout.record_size > end:
        fields.append(("_tail", ctypes.c_uint8 * (layout.record_size - end)))
    ns["_fields_"] = fields
    cls = type(name, (RecordBase,), ns)
    for raw, f in checked:      # the raw CFields exist once ctypes has built the class
        setattr(cls, f.name, CheckedInt(cls.__dict__[raw], cls, f.name, f.type, *int_range(f.type), f.decl))
    # the layout is the truth; ctypes must agree with it byte for byte
    assert ctypes.sizeof(cls) == layout.record_size, (name, ctypes.sizeof(cls), layout.record_size)
    for fl in layout.fields:
        raw = fl.name if (not fl.field.is_string and not fl.field.array and fl.field.type[0] not in "iu") \
            else f"_raw_{fl.name}"
        assert getattr(cls, raw).offset == fl.offset, (name, fl.name)
    return cls


class FrozenArray(tuple):
    """An array field read through a read-only view: a copy whose item assignment raises.

    A live ctypes array over a SHM_RDONLY mapping would accept `a[0] = 5` and the store
    would fault (SIGSEGV); a copy cannot write to shared memory at all.
    """

    __slots__ = ()

    def __setitem__(self, i: Any, v: Any) -> None:
        from ..errors import ReadOnlyTable
        raise ReadOnlyTable("cannot set an array element: the table was attached readonly=True")


def _frozen_array_property(raw: str, decl: str) -> property:
    def get(self: RecordBase) -> FrozenArray:
        return FrozenArray(getattr(self, raw))
    return property(get, doc=decl)


def readonly_class(cls: type[RecordBase]) -> type[RecordBase]:
    """A subclass for read-only attaches: reads as fast, every write raises."""
    from ..errors import ReadOnlyTable

    def refuse(self, k, v):
        raise ReadOnlyTable(f"cannot set {k!r}: the table was attached readonly=True")
    ns: dict[str, Any] = {"__setattr__": refuse, "__slots__": ()}
    for fl in cls._layout.fields:
        if fl.field.array:
            raw = f"_raw_{fl.name}"
            ns[fl.name] = _frozen_array_property(raw, fl.field.decl)
    return type(cls.__name__ + "_ro", (cls,), ns)


def dead_class(cls: type[RecordBase], error: type[Exception], message: str) -> type[RecordBase]:
    """A subclass a view is switched to (by assigning __class__) when it must not be used any
    more: its table was closed or its slot freed. Any attribute use raises `error(message)`;
    the live path pays nothing for this, since only dead views change class."""

    def refuse(self, *args):
        raise error(message)
    ns = {"__getattribute__": refuse, "__setattr__": refuse, "__bytes__": refuse, "__slots__": (),
          "__repr__": lambda self: f"<dead {cls.__name__} view>"}
    return type(cls.__name__ + "_dead", (cls,), ns)


def default_record(cls: type[RecordBase]) -> bytes:
    """Bytes of a fresh record: every field at its default (zero when none)."""
    r = cls()
    for fl in cls._layout.fields:
        f = fl.field
        if f.default is None:
            continue
        setattr(r, fl.name, f.zero())
    return bytes(r)

