"""Layout -> SQL: typed columns, DDL, the versioned upserts, the COPY column plan, row -> record.

Records go to the database as binary COPY built in C (stated.shm._native.CopyPlan, from the plan
`copy_plan` derives once per table); rows come back (claim) through `TableMapping.encode`.

One SQL table per stated table, in the configured schema (default `stated`):

    entity       bigint PRIMARY KEY   -- the slot's u64 entity, as two's complement (>= 2^63 is negative)
    version      bigint NOT NULL      -- (lease epoch << 32) | write counter: only a higher one replaces a row
    layout_hash  text NOT NULL        -- hex layout hash of the writer (as `stated status` prints it)
    updated_at   timestamptz NOT NULL -- the database's clock at the write
    "<field>"    <type> ...           -- one typed column per field, in declaration order

Field types: i8 u8 i16 -> smallint, u16 i32 -> integer, u32 i64 -> bigint, u64 -> numeric(20,0),
f32 -> real, f64 -> double precision, bool -> boolean, str[N] -> text (UTF-8, at most N bytes),
bytes[N] -> bytea (at most N bytes), T[N] -> the element's type as an array of at most N elements.
Unsigned ranges, string byte lengths and array lengths are CHECK constraints, so an operator fixing a
player with plain SQL cannot write a value the record cannot hold. NULLs, shorter strings and shorter
arrays load as the field's default / zero padding.

The lease table (`leases`: tbl, entity, host_id, epoch, lease_until), the hosts' heartbeats (`hosts`:
host_id, alive_until) and a registry of stored layouts (`tables`: name, layout_hash, schema) live in the
same schema.
"""
from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...errors import StoreError
from ...format.layout import Layout
from ...format.schema import Field, check_value, from_wire, int_range, to_wire
from ...shm._native import CopyPlan

# scalar type -> SQL type
SQL_TYPES = {"i8": "smallint", "u8": "smallint", "i16": "smallint", "u16": "integer", "i32": "integer",
             "u32": "bigint", "i64": "bigint", "u64": "numeric(20,0)", "f32": "real", "f64": "double precision",
             "bool": "boolean", "str": "text", "bytes": "bytea"}
# the SQL types in widening order, to tell whether ALTER COLUMN TYPE widens
_RANK = {"smallint": 1, "integer": 2, "bigint": 3, "numeric(20,0)": 4, "real": 1, "double precision": 2}
META_COLUMNS = ("entity", "version", "layout_hash", "updated_at")
U64 = 1 << 64


def ident(name: str) -> str:
    """A quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def literal(v: Any) -> str:
    """A SQL literal for a default value (never user input at run time: defaults come from the config)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "'NaN'"
        if math.isinf(v):
            return "'Infinity'" if v > 0 else "'-Infinity'"
        return repr(v)
    if isinstance(v, str):
        return "'" + v.replace("'", "''") + "'"
    if isinstance(v, (bytes, bytearray)):
        return "'\\x" + bytes(v).hex() + "'::bytea"
    raise TypeError(v)


def entity_to_sql(e: int) -> int:
    """u64 entity -> bigint (two's complement)."""
    return e - U64 if e >= 1 << 63 else e


def entity_from_sql(e: int) -> int:
    return e + U64 if e < 0 else e


@dataclass(frozen=True)
class Column:
    name: str
    type: str              # SQL type, "integer[]" for arrays
    default: str           # SQL literal
    check: str | None      # CHECK expression, or None
    field: Field


def column_for(f: Field) -> Column:
    base = SQL_TYPES[f.type]
    col = ident(f.name)
    checks = []
    if f.is_string:
        checks.append(f"{'octet_length' if f.type == 'str' else 'length'}({col}) <= {f.count}")
    elif f.type[0] == "u":
        lo, hi = int_range(f.type)
        if f.array:
            checks.append(f"{lo} <= ALL({col}) AND {hi} >= ALL({col})")
        else:
            checks.append(f"{col} BETWEEN {lo} AND {hi}")
    if f.array:
        checks.append(f"cardinality({col}) <= {f.count} AND array_ndims({col}) = 1")
    z = f.zero()
    if f.array:
        typ = base + "[]"
        default = f"ARRAY[{', '.join(literal(x) for x in z)}]::{typ}"
    else:
        typ = base
        default = literal(z)
    return Column(f.name, typ, default, " AND ".join(checks) if checks else None, f)


def copy_plan(layout: Layout) -> list[tuple[int, str, int, bool, str]]:
    """The column plan of the native COPY encoder (stated.shm._native.CopyPlan): per field, in column
    order, (record offset, stated type, count, is_array, SQL base type). The SQL type comes from
    SQL_TYPES, the one mapping; the encoder refuses a pair that could not hold every value."""
    return [(fl.offset, fl.field.type, fl.field.count, fl.field.array, SQL_TYPES[fl.field.type])
            for fl in layout.fields]


class TableMapping:
    """Everything SQL about one stated table: DDL, the temp table, the upserts, the COPY plan, row -> record."""

    def __init__(self, name: str, layout: Layout, schema: str = "stated"):
        self.name, self.layout, self.schema = name, layout, schema
        self.columns = [column_for(fl.field) for fl in layout.fields]
        self.qualified = f"{ident(schema)}.{ident(name)}"
        self.leases = f"{ident(schema)}.leases"
        self.temp_name = f"_stated_in_{name}"      # raw name, for the driver's COPY
        self.temp = ident(self.temp_name)
        self.layout_hex = f"{layout.hash:016x}"
        self.copy_columns = ["entity", "version", "layout_hash", *(c.name for c in self.columns)]
        self._plan = CopyPlan(copy_plan(layout), layout.record_size, self.layout_hex)

    # ---- DDL -----------------------------------------------------------------------------------
    def constraint(self, c: Column) -> str:
        return ident(f"{self.name}_{c.name}_check"[:63])

    def create_sql(self) -> list[str]:
        cols = ["entity bigint PRIMARY KEY", "version bigint NOT NULL DEFAULT 0",
                f"layout_hash text NOT NULL DEFAULT {literal(self.layout_hex)}",
                "updated_at timestamptz NOT NULL DEFAULT now()"]
        for c in self.columns:
            cols.append(f"{ident(c.name)} {c.type} DEFAULT {c.default}"
                        + (f" CONSTRAINT {self.constraint(c)} CHECK ({c.check})" if c.check else ""))
        body = ",\n    ".join(cols)
        return [f"CREATE TABLE IF NOT EXISTS {self.qualified} (\n    {body}\n)",
                f"COMMENT ON TABLE {self.qualified} IS "
                f"{literal(f'stated table {self.name}, layout {self.layout_hex}; written by the stated daemon')}",
                self.register_sql()]

    def register_sql(self) -> str:
        blob = json.dumps(to_wire(self.layout.schema), default=lambda b: {"hex": bytes(b).hex()})
        return (f"INSERT INTO {ident(self.schema)}.tables (name, layout_hash, schema) VALUES "
                f"({literal(self.name)}, {literal(self.layout_hex)}, {literal(blob)}) "
                f"ON CONFLICT (name) DO UPDATE SET layout_hash = EXCLUDED.layout_hash, schema = EXCLUDED.schema, "
                f"updated_at = now()")

    def temp_sql(self) -> str:
        cols = ["entity bigint", "version bigint", "layout_hash text"]
        cols += [f"{ident(c.name)} {c.type}" for c in self.columns]
        return f"CREATE TEMPORARY TABLE IF NOT EXISTS {self.temp} ({', '.join(cols)}) ON COMMIT DELETE ROWS"

    def _on_conflict(self) -> str:
        fields = [ident(c.name) for c in self.columns]
        sets = ", ".join(f"{n} = EXCLUDED.{n}" for n in [ident("version"), ident("layout_hash"),
                                                         ident("updated_at"), *fields])
        return f"ON CONFLICT (entity) DO UPDATE SET {sets}\nWHERE t.version < EXCLUDED.version"

    def write_one_sql(self, release: bool) -> str:
        """One statement for flush(h) and release(h), after the record was COPYed into the temporary
        table in the same transaction: $1 table name, $2 host_id, $3 entity (bigint), $4 the lease epoch
        the version carries.

        The lease row is checked (flush: locked FOR SHARE, as the batch upsert does) or released
        (release: host_id '' and expired now; its row lock orders it after any write in flight and
        before any claim) only if this host holds it at that epoch, and the record is upserted only
        joined to that lease row: a release's last write and its lease drop commit together or not at
        all, and the fencing answer comes with the write (no second query). Returns held (1: the lease
        was ours at $4; 0: fenced, nothing written) and written (0 with held 1: the database has a
        newer version already)."""
        fields = [ident(c.name) for c in self.columns]
        where = "tbl = $1 AND entity = $3 AND host_id = $2 AND epoch = $4"
        lease = (f"UPDATE {self.leases} SET host_id = '', lease_until = now() WHERE {where} RETURNING entity"
                 if release else f"SELECT entity FROM {self.leases} WHERE {where} FOR SHARE")
        return (f"WITH l AS ({lease}),\n"
                f"w AS (INSERT INTO {self.qualified} AS t (entity, version, layout_hash, updated_at, "
                f"{', '.join(fields)})\n"
                f"  SELECT s.entity, s.version, s.layout_hash, now(), {', '.join('s.' + f for f in fields)}\n"
                f"  FROM {self.temp} s JOIN l ON l.entity = s.entity WHERE (s.version >> 32) = $4\n"
                f"  {self._on_conflict()}\n  RETURNING 1)\n"
                f"SELECT (SELECT count(*) FROM l) AS held, (SELECT count(*) FROM w) AS written")

    def upsert_sql(self) -> str:
        """$1 table name, $2 host_id. Accepts a row only if this host holds the entity's lease at the
        row's epoch (fencing) and the row's version is newer than the stored one (order, idempotence).
        FOR SHARE on the lease row: a concurrent claim waits for this write, or this write sees the claim."""
        names = [ident(c) for c in self.copy_columns]
        fields = [ident(c.name) for c in self.columns]
        return (f"INSERT INTO {self.qualified} AS t (entity, version, layout_hash, updated_at, {', '.join(fields)})\n"
                f"SELECT s.entity, s.version, s.layout_hash, now(), {', '.join('s.' + f for f in fields)}\n"
                f"FROM {self.temp} s JOIN {self.leases} l ON l.tbl = $1 AND l.entity = s.entity\n"
                f"  AND l.host_id = $2 AND l.epoch = (s.version >> 32)\n"
                f"ORDER BY s.entity FOR SHARE OF l\n"
                f"{self._on_conflict()}") if names else ""

    def fenced_sql(self) -> str:
        """Rows of the temp table whose lease this host does not hold at their epoch (stale writes)."""
        return (f"SELECT s.entity, l.host_id, l.epoch, s.version >> 32 AS mine FROM {self.temp} s "
                f"LEFT JOIN {self.leases} l ON l.tbl = $1 AND l.entity = s.entity "
                f"WHERE l.host_id IS DISTINCT FROM $2 OR l.epoch IS DISTINCT FROM (s.version >> 32)")

    def select_sql(self) -> str:
        return (f"SELECT entity, version, layout_hash, updated_at, "
                f"{', '.join(ident(c.name) for c in self.columns)} FROM {self.qualified} WHERE entity = $1")

    # ---- codec -----------------------------------------------------------------------------------
    def copy_data(self, items: Sequence[tuple], epochs: dict[int, int], counter: int) -> bytes:
        """Copied records -> one complete binary COPY payload (copy_columns order), encoded in C
        (stated/native/_native.c, the store's section: the format's facts are written there).

        `items` are flush.py's Items (slot, generation, seq, entity, data, pinned); each row's version
        is `epochs[entity] << 32 | counter`. KeyError for an entity without an epoch."""
        return self._plan.encode(items, epochs, counter)

    def encode(self, row: dict, init: bytes) -> bytes:
        """A database row (column name -> value) -> record bytes. Missing/NULL columns keep `init`'s
        bytes (the defaults). Raises StoreError naming the column when a value does not fit."""
        buf = bytearray(init)
        for fl in self.layout.fields:
            f = fl.field
            if f.name not in row:
                raise StoreError(f"table {self.qualified}: column {f.name!r} is missing; the SQL table does not "
                                 f"match the layout (run the daemon with --migrate)")
            v = row[f.name]
            if v is None:
                continue
            try:
                _pack_field(buf, fl.offset, f, v)
            except (ValueError, TypeError, OverflowError, struct.error) as e:
                raise StoreError(f"table {self.qualified} entity {row.get('entity')}: column {f.name!r} holds "
                                 f"{_short(v)}, which does not fit {f.decl.split(' = ')[0]}: {e}") from None
        return bytes(buf)

    def to_json(self, row: dict) -> dict:
        """A row as plain JSON-able data (stated store export)."""
        out: dict[str, Any] = {}
        for k, v in row.items():
            if k == "entity":
                v = entity_from_sql(v)
            if hasattr(v, "isoformat"):
                v = v.isoformat()
            elif isinstance(v, (bytes, bytearray, memoryview)):
                v = bytes(v).hex()
            elif isinstance(v, list):
                v = [int(x) if hasattr(x, "as_integer_ratio") and not isinstance(x, float) else x for x in v]
            elif v is not None and not isinstance(v, (int, float, str, bool)):
                v = int(v) if str(v).lstrip("-").isdigit() else str(v)
            out[k] = v
        return out


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _pack_field(buf: bytearray, off: int, f: Field, v: Any) -> None:
    if f.is_string:
        if f.type == "str":
            check_value(f, v)
            buf[off:off + f.count] = v.encode("utf-8").ljust(f.count, b"\0")
        else:
            v = bytes(v)
            check_value(f, v)
            buf[off:off + f.count] = v.ljust(f.count, b"\0")
        return
    code = "<" + f.code
    vals = list(v) if f.array else [v]
    if not f.array and isinstance(v, (list, tuple)):
        raise ValueError("an array where a scalar is expected")
    if len(vals) > f.count:
        raise ValueError(f"{len(vals)} elements, at most {f.count} fit")
    size = f.elem_size
    for i, x in enumerate(vals):
        if x is None:
            continue
        if f.type[0] in "iu" and not isinstance(x, int):
            if hasattr(x, "as_integer_ratio") and x == int(x):     # numeric -> Decimal
                x = int(x)
        if f.type[0] == "f" and not isinstance(x, float):
            x = float(x)
        check_value(f, x)
        struct.pack_into(code, buf, off + i * size, x)
    for i in range(len(vals), f.count):
        struct.pack_into(code, buf, off + i * size, 0)


# ---- schema-wide DDL ---------------------------------------------------------------------------------
def common_sql(schema: str = "stated") -> list[str]:
    s = ident(schema)
    return [
        f"CREATE SCHEMA IF NOT EXISTS {s}",
        f"CREATE TABLE IF NOT EXISTS {s}.leases (\n"
        f"    tbl text NOT NULL,\n"
        f"    entity bigint NOT NULL,\n"
        f"    host_id text NOT NULL,             -- '' once released\n"
        f"    epoch bigint NOT NULL,             -- +1 on every claim; the high half of each write's version\n"
        f"    lease_until timestamptz NOT NULL,  -- set at claim; the lease lives until this or the host's\n"
        f"                                       -- heartbeat (hosts.alive_until), whichever is later\n"
        f"    PRIMARY KEY (tbl, entity)\n)",
        f"CREATE TABLE IF NOT EXISTS {s}.hosts (\n"
        f"    host_id text PRIMARY KEY,\n"
        f"    alive_until timestamptz NOT NULL,  -- the daemon's heartbeat renews every lease it holds at once\n"
        f"    started_at timestamptz NOT NULL DEFAULT now()\n)",
        f"CREATE INDEX IF NOT EXISTS leases_host ON {s}.leases (host_id, tbl)",
        f"CREATE TABLE IF NOT EXISTS {s}.tables (\n"
        f"    name text PRIMARY KEY,\n"
        f"    layout_hash text NOT NULL,\n"
        f"    schema text NOT NULL,              -- the stated schema as JSON [[name, type, count, array, default]]\n"
        f"    updated_at timestamptz NOT NULL DEFAULT now()\n)",
    ]


def ddl(mappings: list[TableMapping], schema: str = "stated") -> str:
    """The whole DDL as one script (`stated store init --print-sql`)."""
    stmts = common_sql(schema)
    for m in mappings:
        stmts += m.create_sql()
    return "BEGIN;\n" + "".join(s + ";\n" for s in stmts) + "COMMIT;\n"


def layout_from_registry(schema_json: str) -> tuple[Field, ...]:
    """The stored schema of a table from the registry row (validated: the database is another process)."""
    try:
        data = json.loads(schema_json)
    except (ValueError, TypeError) as e:
        raise StoreError(f"the layout registry holds unreadable JSON: {e}") from None
    if isinstance(data, list):
        for item in data:
            if isinstance(item, list) and len(item) == 5 and isinstance(item[4], dict) and "hex" in item[4]:
                item[4] = bytes.fromhex(item[4]["hex"])
    try:
        return from_wire(data)
    except Exception as e:  # noqa: BLE001 - SchemaError and anything from_wire meets in foreign data
        raise StoreError(f"the layout registry holds an invalid schema: {e}") from None


def migration_sql(mapping: TableMapping, old: Layout) -> tuple[list[str], list[Any]]:
    """(statements, problems) to take the SQL table from `old`'s columns to mapping's layout.

    New fields are added with their defaults; widened types are altered in place (smallint ->
    integer ..., longer strings/arrays only relax a CHECK). Anything lossy (removed field, narrowing,
    kind change) is a problem: refused exactly as for segments (stated/migrate.py) unless allowed, and
    then: a removed field's column stays (stated stops writing it; a DBA may drop it), narrowed
    integers are clamped, other narrowings keep their rows and the new CHECK applies to new writes."""
    from ..migrate import lossy_changes
    problems = lossy_changes(old, mapping.layout, 1, 1, -1)
    stmts: list[str] = []
    old_fields = {fl.name: fl.field for fl in old.fields}
    q = mapping.qualified
    for c in mapping.columns:
        of = old_fields.get(c.name)
        if of is None:
            stmts.append(f"ALTER TABLE {q} ADD COLUMN IF NOT EXISTS {ident(c.name)} {c.type} DEFAULT {c.default}")
        else:
            oc = column_for(of)
            if oc.type == c.type and oc.check == c.check:
                continue
            stmts.append(f"ALTER TABLE {q} DROP CONSTRAINT IF EXISTS {mapping.constraint(c)}")
            if oc.type != c.type:
                using = f"{ident(c.name)}::{c.type}"
                f = c.field
                if f.type[0] in "iu" and not f.array and oc.type in _RANK and c.type in _RANK:
                    lo, hi = int_range(f.type)          # narrowing (allowed only with --allow-lossy): clamp
                    using = f"LEAST(GREATEST({ident(c.name)}, {lo}), {hi})::{c.type}"
                stmts.append(f"ALTER TABLE {q} ALTER COLUMN {ident(c.name)} TYPE {c.type} USING {using}")
                stmts.append(f"ALTER TABLE {q} ALTER COLUMN {ident(c.name)} SET DEFAULT {c.default}")
        if c.check:
            stmts.append(f"ALTER TABLE {q} DROP CONSTRAINT IF EXISTS {mapping.constraint(c)}")
            # NOT VALID: rows already there are not rechecked (a narrowed string may not fit; claim()
            # refuses such a row with a clear error naming the column); every new write is checked
            stmts.append(f"ALTER TABLE {q} ADD CONSTRAINT {mapping.constraint(c)} CHECK ({c.check}) NOT VALID")
    stmts.append(mapping.register_sql())
    return stmts, problems
