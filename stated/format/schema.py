"""Field declarations: parsing `"name: type[N] = default"` into typed fields.

A schema is an ordered tuple of Fields. It is the single source of truth: the
record layout (layout.py) and every view over records derive from it.
"""
from __future__ import annotations

import ast
import keyword
import math
import re
import reprlib
from dataclasses import dataclass
from typing import Any

from ..errors import SchemaError

# scalar type name -> (size in bytes, struct/memoryview format code, C type)
SCALARS: dict[str, tuple[int, str, str]] = {
    "i8": (1, "b", "int8_t"), "u8": (1, "B", "uint8_t"),
    "i16": (2, "h", "int16_t"), "u16": (2, "H", "uint16_t"),
    "i32": (4, "i", "int32_t"), "u32": (4, "I", "uint32_t"),
    "i64": (8, "q", "int64_t"), "u64": (8, "Q", "uint64_t"),
    "f32": (4, "f", "float"), "f64": (8, "d", "double"),
    "bool": (1, "?", "bool"),
}
# byte-string kinds: size is N, alignment 1
STRINGS = ("str", "bytes")

# Names a record view already uses for itself.
RESERVED = frozenset({"handle", "slot", "generation", "to_dict", "table"})

_DECL = re.compile(r"^\s*([A-Za-z_]\w*)\s*:\s*([a-z]+\d*)\s*(?:\[\s*(\d+)\s*\])?\s*(?:=\s*(.+?))?\s*\Z",
                   re.ASCII)   # names become Python and C identifiers


@dataclass(frozen=True)
class Field:
    """One field of a record. `count` > 1 (or declared [N]) makes a numeric an array.

    For str/bytes, `count` is the byte length N and the field is never an array.
    """

    name: str
    type: str          # "u16", "f32", "bool", "str", "bytes"
    count: int = 1     # array length for numerics, byte length for str/bytes
    array: bool = False
    default: Any = None

    @property
    def is_string(self) -> bool:
        return self.type in STRINGS

    @property
    def elem_size(self) -> int:
        return 1 if self.is_string else SCALARS[self.type][0]

    @property
    def size(self) -> int:
        return self.elem_size * self.count

    @property
    def align(self) -> int:
        return self.elem_size

    @property
    def code(self) -> str:
        """struct/memoryview format code of one element ('s' for strings)."""
        return "s" if self.is_string else SCALARS[self.type][1]

    @property
    def decl(self) -> str:
        """Canonical declaration text (what `parse_field` accepts)."""
        t = f"{self.type}[{self.count}]" if (self.array or self.is_string) else self.type
        d = "" if self.default is None else f" = {self.default!r}"
        return f"{self.name}: {t}{d}"

    def zero(self) -> Any:
        """The value a fresh record holds for this field (its default, else zero)."""
        if self.is_string:
            base: Any = self.default if self.default is not None else ("" if self.type == "str" else b"")
            return base
        d = self.default
        if d is None:
            d = False if self.type == "bool" else (0.0 if self.type[0] == "f" else 0)
        return [d] * self.count if self.array else d


def int_range(type_name: str) -> tuple[int, int]:
    """Inclusive value range of an integer type name like 'u16'."""
    bits = int(type_name[1:])
    if type_name[0] == "u":
        return 0, (1 << bits) - 1
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def check_value(field: Field, value: Any) -> None:
    """Raise ValueError (naming the field) when `value` does not fit one element of `field`."""
    t = field.type
    if t == "bool":
        if not isinstance(value, (bool, int)):
            raise ValueError(f"field {field.name!r} is bool; got {value!r}")
    elif t[0] in "iu":
        if not isinstance(value, int):
            raise ValueError(f"field {field.name!r} is {t}; got non-integer {value!r}")
        lo, hi = int_range(t)
        if not lo <= value <= hi:
            raise ValueError(f"field {field.name!r} is {t}: {value} is outside [{lo}, {hi}]")
    elif t[0] == "f":
        if not isinstance(value, (int, float)):
            raise ValueError(f"field {field.name!r} is {t}; got {value!r}")
        try:
            fv = float(value)
        except OverflowError:
            fv = math.inf
        if t == "f32" and abs(fv) > 3.4028234663852886e38 and not (isinstance(value, float) and math.isinf(value)):
            raise ValueError(f"field {field.name!r} is f32: {value} is too large")
    elif t == "str":
        if not isinstance(value, str):
            raise ValueError(f"field {field.name!r} is str[{field.count}]; got {type(value).__name__}")
        n = len(value.encode("utf-8"))
        if n > field.count:
            raise ValueError(f"field {field.name!r} is str[{field.count}]: "
                             f"{value!r} is {n} bytes in UTF-8, at most {field.count} fit")
    elif t == "bytes":
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise ValueError(f"field {field.name!r} is bytes[{field.count}]; got {type(value).__name__}")
        if len(value) > field.count:
            raise ValueError(f"field {field.name!r} is bytes[{field.count}]: "
                             f"{len(value)} bytes given, at most {field.count} fit")


def parse_field(decl: str) -> Field:
    """Parse one declaration such as ``"inventory: u32[32]"`` or ``"level: u16 = 1"``."""
    if not isinstance(decl, str):
        raise SchemaError(f"a field must be a string like \"hp: i32 = 100\", got {reprlib.repr(decl)}")
    m = _DECL.match(decl)
    if not m:
        raise SchemaError(f"cannot parse {decl!r}; expected \"name: type\", \"name: type[N]\" "
                          f"or \"name: type = default\"")
    name, t, n, default_text = m.groups()
    if name.startswith("_") or keyword.iskeyword(name) or name in RESERVED:
        raise SchemaError(f"{name!r} cannot be a field name (reserved, keyword or leading underscore)",
                          field=name)
    if t not in SCALARS and t not in STRINGS:
        raise SchemaError(f"unknown type {t!r}; use one of {', '.join([*SCALARS, 'str[N]', 'bytes[N]'])}",
                          field=name)
    if t in STRINGS and n is None:
        raise SchemaError(f"{t} needs a byte length, e.g. {t}[32]", field=name)
    count = int(n) if n is not None else 1
    if count < 1 or count > 1 << 20:
        raise SchemaError(f"length {count} is out of range (1..{1 << 20})", field=name)
    f = Field(name=name, type=t, count=count, array=(n is not None and t not in STRINGS))
    if default_text is None:
        return f
    try:
        default = ast.literal_eval(default_text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        low = default_text.strip().lower()
        if low in ("true", "false"):
            default = low == "true"
        else:
            raise SchemaError(f"cannot parse default {default_text!r}", field=name) from None
    try:
        if t == "bytes" and isinstance(default, str):
            default = default.encode()
        if t[0] == "f" and isinstance(default, int) and not isinstance(default, bool):
            default = float(default)
        check_value(f, default)
    except (ValueError, OverflowError) as e:
        raise SchemaError(f"bad default: {e}", field=name) from None
    return Field(name=name, type=t, count=count, array=f.array, default=default)


def parse_fields(decls: list[str]) -> tuple[Field, ...]:
    """Parse an ordered field list; names must be unique and the list non-empty."""
    if not isinstance(decls, list) or not decls:
        raise SchemaError("fields must be a non-empty list of strings like \"hp: i32 = 100\"")
    fields = tuple(parse_field(d) for d in decls)
    seen: set[str] = set()
    for f in fields:
        if f.name in seen:
            raise SchemaError("declared twice", field=f.name)
        seen.add(f.name)
    return fields


def to_wire(fields: tuple[Field, ...]) -> list[list[Any]]:
    """Plain-data form of a schema (stored as msgpack in the segment header and snapshots)."""
    return [[f.name, f.type, f.count, f.array, f.default] for f in fields]


def from_wire(data: Any) -> tuple[Field, ...]:
    """Inverse of to_wire, validating everything: the data came from shared memory or a file."""
    if not isinstance(data, list) or not data:
        raise SchemaError("schema blob is not a non-empty list")
    out = []
    for item in data:
        if not (isinstance(item, list) and len(item) == 5):
            raise SchemaError(f"schema entry {reprlib.repr(item)} is malformed")
        name, t, count, array, default = item
        if not (isinstance(name, str) and isinstance(t, str) and isinstance(count, int)
                and isinstance(array, bool)):
            raise SchemaError(f"schema entry {reprlib.repr(item)} is malformed")
        decl = f"{name}: {t}[{count}]" if (array or t in STRINGS) else f"{name}: {t}"
        f = parse_field(decl)
        if default is not None:
            try:
                check_value(f, default)
            except ValueError as e:
                raise SchemaError(f"schema entry {name!r}: {e}") from None
        out.append(Field(f.name, f.type, f.count, f.array, default))
    names = [f.name for f in out]
    if len(set(names)) != len(names):
        raise SchemaError("schema blob declares a field twice")
    return tuple(out)
