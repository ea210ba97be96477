"""Record layout: C-compatible field offsets, record size and the layout hash.

Computed once from a schema; the Python accessors, the C header, snapshots and
migration all read offsets from here and never re-derive them.

Rules (the C compiler's, on every 64-bit ABI we target): each field is aligned
to its element size (strings and bytes to 1), fields are placed in declaration
order, and the record size is rounded up to a multiple of 8 so that records
placed back to back keep every field aligned. Byte order is little-endian.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import msgpack

from .schema import Field, to_wire

RECORD_ALIGN = 8


@dataclass(frozen=True)
class FieldLayout:
    field: Field
    offset: int

    @property
    def name(self) -> str:
        return self.field.name

    @property
    def size(self) -> int:
        return self.field.size


@dataclass(frozen=True)
class Layout:
    fields: tuple[FieldLayout, ...]
    record_size: int
    hash: int  # 64-bit

    def __getitem__(self, name: str) -> FieldLayout:
        for fl in self.fields:
            if fl.name == name:
                return fl
        raise KeyError(name)

    @property
    def schema(self) -> tuple[Field, ...]:
        return tuple(fl.field for fl in self.fields)

    def names(self) -> list[str]:
        return [fl.name for fl in self.fields]


def _round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def canonical(fields: tuple[FieldLayout, ...], record_size: int) -> bytes:
    """The bytes the layout hash is taken over: names, types, counts and offsets.

    Defaults are left out on purpose: changing a default changes no byte in
    memory, so it must not force a migration.
    """
    body = [1, record_size, [[fl.name, fl.field.type, fl.field.count, fl.field.array, fl.offset]
                             for fl in fields]]
    return msgpack.packb(body, use_bin_type=True)


def compute(schema: tuple[Field, ...]) -> Layout:
    """Lay out a schema. Pure function of the schema; cheap; deterministic."""
    off = 0
    placed = []
    for f in schema:
        off = _round_up(off, f.align)
        placed.append(FieldLayout(f, off))
        off += f.size
    record_size = max(_round_up(off, RECORD_ALIGN), RECORD_ALIGN)
    fls = tuple(placed)
    digest = hashlib.blake2b(canonical(fls, record_size), digest_size=8).digest()
    return Layout(fls, record_size, int.from_bytes(digest, "little"))


def schema_blob(layout: Layout) -> bytes:
    """msgpack encoding of the schema, as stored in segment headers and snapshots."""
    return msgpack.packb(to_wire(layout.schema), use_bin_type=True)
