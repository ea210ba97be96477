"""Layout migration: convert a table to a new schema, field by field, by name.

One path for both cases: a live segment is first saved as a full safety
snapshot, and the table is then rebuilt from that snapshot in the new layout —
exactly what happens when the daemon restores an old-layout snapshot after a
reboot. Slots, generations, owners, entities and counters are kept.

Allowed without asking: new fields (they get their defaults), reordering,
widening (u8->u16, i32->i64, u16->i32, f32->f64, ints->f64, longer strings,
bytes or arrays), more capacity. Everything else is lossy and refused unless
`allow_lossy`: removed fields, narrowed or sign-changing types, shorter
strings/arrays, kind changes; with it, values are clamped or truncated.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..format.layout import Layout
from ..format.schema import Field, int_range
from ..shm.records import default_record, record_class

log = logging.getLogger("stated.migrate")


def _widening(a: Field, b: Field) -> bool:
    if a.array != b.array:
        return False
    if a.array and b.count < a.count:
        return False
    if a.is_string or b.is_string:
        return a.type == b.type and b.count >= a.count
    if a.type == b.type:
        return True
    if a.type == "bool":
        return b.type[0] in "iu"
    if a.type[0] in "iu" and b.type[0] in "iu":
        lo_a, hi_a = int_range(a.type)
        lo_b, hi_b = int_range(b.type)
        return lo_b <= lo_a and hi_a <= hi_b
    if a.type[0] in "iu" and b.type == "f64":
        return int(a.type[1:]) <= 32
    if a.type == "f32" and b.type == "f64":
        return True
    return False


@dataclass(frozen=True)
class LossyChange:
    """One change that would lose data. `kind` decides what may allow it (never the message's words):
    "removed" and "narrowed" fields are allowed by --allow-lossy; "capacity" (allocated slots would be
    dropped) never is."""

    kind: str                   # "removed" | "narrowed" | "capacity"
    field: str | None           # the field's name; None for capacity
    old: str                    # old type, or old capacity
    new: str                    # new type ("" when removed), or new capacity
    slot: int | None = None     # capacity: the highest allocated slot

    @property
    def allowed_with_flag(self) -> bool:
        return self.kind != "capacity"

    def __str__(self) -> str:
        if self.kind == "removed":
            return f"field {self.field!r} ({self.old}) is removed"
        if self.kind == "narrowed":
            return f"field {self.field!r} changes {self.old} -> {self.new} (narrowing or kind change)"
        return f"capacity {self.old} -> {self.new} would drop allocated slot {self.slot}"


def _type_of(f: Field) -> str:
    return f.decl.split(" = ")[0].split(": ")[1]


def lossy_changes(old: Layout, new: Layout, old_capacity: int, new_capacity: int,
                  highest_slot: int) -> list[LossyChange]:
    """Every change that would lose data; [] when the migration is safe. str() of each describes it."""
    problems = []
    new_fields = {f.name: f.field for f in new.fields}
    for fl in old.fields:
        f = fl.field
        nf = new_fields.get(f.name)
        if nf is None:
            problems.append(LossyChange("removed", f.name, f.decl, ""))
        elif not _widening(f, nf):
            problems.append(LossyChange("narrowed", f.name, _type_of(f), _type_of(nf)))
    if new_capacity <= highest_slot:
        problems.append(LossyChange("capacity", None, str(old_capacity), str(new_capacity), highest_slot))
    return problems


def converter(old: Layout, new: Layout) -> Callable[[bytes], bytes]:
    """A function mapping one old record's bytes to the new layout's bytes (clamping lossy values)."""
    old_cls, new_cls = record_class(old, "old"), record_class(new, "new")
    init = default_record(new_cls)
    common = [(fl.name, fl.field, new[fl.name].field) for fl in old.fields if fl.name in new.names()]

    def convert(data: bytes) -> bytes:
        o = old_cls.from_buffer_copy(data)
        n = new_cls.from_buffer_copy(init)
        for name, fo, fn in common:
            setattr(n, name, _fit(getattr(o, name), fo, fn))
        return bytes(n)
    return convert


def _fit(v: Any, fo: Field, fn: Field) -> Any:
    if fn.array:
        vals = list(v) if fo.array else [v]
        return [_scalar(x, fn) for x in vals[:fn.count]]
    if fo.array:
        v = v[0]
    if fn.is_string:
        if fn.type == "str":
            s = v if isinstance(v, str) else bytes(v).rstrip(b"\0").decode("utf-8", "replace")
            raw = s.encode()[:fn.count]
            return raw.decode("utf-8", "ignore")
        b = v.encode() if isinstance(v, str) else bytes(v)
        return b[:fn.count]
    if fo.is_string:
        return fn.zero()
    return _scalar(v, fn)


def _scalar(v: Any, fn: Field) -> Any:
    if fn.type == "bool":
        return bool(v)
    if fn.type[0] in "iu":
        lo, hi = int_range(fn.type)
        try:
            iv = int(v)
        except (ValueError, OverflowError):
            iv = 0
        return max(lo, min(hi, iv))
    return float(v)
