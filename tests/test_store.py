"""The durable store against a real PostgreSQL: schema mapping, write-behind, versions, marks.

Each test gets a fresh database on the session cluster (`pg_dsn`), real segments (`make_segment`),
an in-process worker (`stated.attach`) and the daemon-side store objects (`StoreHost`).
"""
from __future__ import annotations

import math
from asyncio import run

import pytest
from helpers import StoreHost, pg_exec, pg_expire, pg_rows, player_layout

import stated
from stated.errors import ConfigError, DuplicateEntity, StoreError
from stated.format import store_config
from stated.format.config import DaemonConfig, TableConfig
from stated.persist.saver import Saver
from stated.persist.store.schema import TableMapping, ddl

ALL_TYPES = ["a: i8 = -5", "b: u8 = 200", "c: i16", "d: u16 = 65535", "e: i32", "f: u32", "g: i64", "h: u64",
             "k: f32 = 1.5", "m: f64", "n: bool = true", "s: str[8] = 'hé'", "y: bytes[4]", "arr: u32[3]",
             "farr: f64[2]", "barr: bool[2]", "i8arr: i8[2]", "u8arr: u8[3]", "u16arr: u16[2]", "i16arr: i16[2]",
             "i32arr: i32[2]", "f32arr: f32[2]", "i64arr: i64[2]", "u64arr: u64[2]"]


def write_player(t, h, i):
    with t.write(h) as p:
        p.name = f"player-{i}"
        p.hp = 100 - i
        p.gold = 10 ** 18 + i
        p.inventory = [i, i + 1, 2 ** 32 - 1]
        p.x = i * 0.5


# ---- schema mapping ------------------------------------------------------------------------------------
def test_every_type_round_trips_through_the_database(make_segment, pg_dsn):
    """Typed columns for every field type; a record written behind and claimed on another host comes
    back byte for byte (u64 max, negative ints, NaN-free floats, UTF-8, bytes, arrays)."""
    ka, kb = make_segment(10, ALL_TYPES), make_segment(10, ALL_TYPES)
    t = stated.attach(key=ka, owner="w")
    h = t.alloc(entity=2 ** 64 - 1)           # the largest entity maps to bigint -1
    with t.write(h) as p:
        p.a, p.b, p.c, p.d, p.e, p.f = -128, 255, -32768, 65535, -2 ** 31, 2 ** 32 - 1
        p.g, p.h, p.k, p.m, p.n = -2 ** 63, 2 ** 64 - 1, -0.25, math.pi, False
        p.s, p.y, p.arr, p.farr, p.barr, p.i8arr = "añb", b"\x00\xff\x01", [0, 7, 2 ** 32 - 1], [1e300, -2.5], \
            [True, False], [-1, 127]
        p.u8arr, p.u16arr, p.i16arr, p.i32arr = [0, 255, 7], [65535, 1], [-32768, 32767], [-2 ** 31, 2 ** 31 - 1]
        p.f32arr, p.i64arr, p.u64arr = [1.5, -0.0], [-2 ** 63, 2 ** 63 - 1], [2 ** 64 - 1, 10 ** 8]
    before = bytes(t._rec[h.slot * t.record_size:(h.slot + 1) * t.record_size])
    a, b = StoreHost(ka, pg_dsn, "host-a"), StoreHost(kb, pg_dsn, "host-b")
    tb = stated.attach(key=kb, owner="w")

    async def go():
        r = await a.store.tick()
        assert r["players"].written == 1
        rows = await pg_rows(pg_dsn)
        row = rows[-1]
        assert (row["h"], row["d"], row["s"], row["y"], row["arr"]) == (2 ** 64 - 1, 65535, "añb",
                                                                         b"\x00\xff\x01\x00", [0, 7, 2 ** 32 - 1])
        cols = {r["column_name"]: r["data_type"] for r in await pg_exec(
            pg_dsn, "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'players'")}
        assert cols["h"] == "numeric" and cols["a"] == "smallint" and cols["f"] == "bigint" and cols["k"] == "real"
        assert cols["arr"] == "ARRAY" and cols["s"] == "text" and cols["y"] == "bytea" and cols["n"] == "boolean"
        assert (row["u8arr"], row["u16arr"], row["i16arr"], row["i32arr"], row["i64arr"], row["barr"]) == (
            [0, 255, 7], [65535, 1], [-32768, 32767], [-2 ** 31, 2 ** 31 - 1], [-2 ** 63, 2 ** 63 - 1], [True, False])
        assert row["u64arr"] == [2 ** 64 - 1, 10 ** 8] and row["f32arr"] == [1.5, -0.0] and row["i8arr"] == [-1, 127]
        await b.store.ensure_connected()
        await pg_expire(pg_dsn)
        slot, gen = await b.store.claim("players", 2 ** 64 - 1, tb._owner)
        return slot, gen
    try:
        slot, gen = run(go())
        after = bytes(tb._rec[slot * tb.record_size:(slot + 1) * tb.record_size])
        assert after == before
    finally:
        run(a.store.close()), run(b.store.close())
        a.close(), b.close(), t.close(), tb.close()


def test_print_sql_is_what_a_dba_applies(pg_cluster, pg_dsn):
    """The DDL printed for a DBA applies with psql, twice (idempotent), and holds CHECKs operators hit."""
    m = TableMapping("players", player_layout(), "stated")
    sql = ddl([m])
    db = pg_dsn.rsplit("/", 1)[1]
    pg_cluster.psql(sql, db)
    pg_cluster.psql(sql, db)
    pg_cluster.psql("INSERT INTO stated.players (entity, version) VALUES (1, 1)", db)
    assert pg_cluster.psql("SELECT level, hp, name, cardinality(inventory) FROM stated.players", db).strip() \
        == "1|100||32"                        # defaults from the layout
    for bad in ("level = 70000", "name = repeat('x', 33)", "inventory = array_fill(1::bigint, ARRAY[33])",
                "inventory[1] = -1", "gold = -1"):
        with pytest.raises(RuntimeError, match="violates check constraint"):
            pg_cluster.psql(f"UPDATE stated.players SET {bad}", db)


def test_store_config_refuses_bad_settings_with_one_clear_line():
    ok = store_config.parse({"dsn": "postgresql://u:secret@h/db"}, "x.toml", env={}, hostname="box")
    assert ok.host_id == "box" and ok.flush_interval == 1.0 and ok.batch == 5000 and ok.schema == "stated"
    assert "secret" not in repr(ok) and "secret" not in str(ok)
    assert store_config.parse({}, env={"STATED_STORE_DSN": "postgres://h/db"}, hostname="b").dsn == "postgres://h/db"
    for d, msg in [({"dsn": "mysql://u:secret@h/db"}, "scheme"),
                   ({"dsn": "postgresql://u:secret@h:99999/db"}, "(?i)port"),
                   ({"dsn": "postgresql://u:secret@/db"}, "no host"), ({"dsn": "postgresql://u:secret@h"}, "database"),
                   ({"dsn": "not a dsn"}, "scheme"), ({}, "no database"),
                   ({"dsn": "postgresql://h/d", "batch": 0}, "batch"),
                   ({"dsn": "postgresql://h/d", "host_id": "a b"}, "host_id"),
                   ({"dsn": "postgresql://h/d", "schema": "Bad-Name"}, "schema"),
                   ({"dsn": "postgresql://h/d", "lease_ttl": 1.0}, "lease_ttl"),
                   ({"dsn": "postgresql://h/d", "bogus": 1}, "unknown")]:
        with pytest.raises(ConfigError, match=msg) as ei:
            store_config.parse(d, "x.toml", env={}, hostname="box")
        assert "secret" not in str(ei.value) and "\n" not in str(ei.value)


# ---- write-behind ------------------------------------------------------------------------------------------
def test_flush_writes_dirty_records_and_clears_only_the_store_mark(make_segment, pg_dsn):
    key = make_segment(200)
    t = stated.attach(key=key, owner="w")
    hs = [t.alloc(entity=1000 + i) for i in range(150)]
    for i, h in enumerate(hs):
        write_player(t, h, i)
    host = StoreHost(key, pg_dsn, "host-a")

    async def go():
        r = await host.store.tick()
        assert (r["players"].written, r["players"].cleared) == (150, 150)
        rows = await pg_rows(pg_dsn)
        assert len(rows) == 150
        assert rows[1007]["name"] == "player-7" and rows[1007]["gold"] == 10 ** 18 + 7
        assert rows[1007]["inventory"][:3] == [7, 8, 2 ** 32 - 1] and rows[1007]["hp"] == 93
        assert rows[1007]["version"] >> 32 == 1 and rows[1007]["layout_hash"] == f"{t.layout.hash:016x}"
        v = host.alloc.views
        assert all(v.store_pending[h.slot] == 0 for h in hs)
        assert all(v.snap_pending[h.slot] == 1 for h in hs)   # the snapshot still needs them
        r = await host.store.tick()
        assert r["players"].written == 0                                   # nothing changed: nothing written
        t.set(hs[3], "hp", 1)
        r = await host.store.tick()
        assert r["players"].written == 1 and (await pg_rows(pg_dsn))[1003]["hp"] == 1
        t.free(hs[4])                                                      # a logout is not a deletion
        await host.store.tick()
        assert 1004 in await pg_rows(pg_dsn)
    try:
        run(go())
    finally:
        run(host.store.close())
        host.close(), t.close()


def test_a_write_between_copy_and_commit_stays_marked(make_segment, pg_dsn):
    """Clear a mark only if the record did not change since it was copied: scalar set() (no seq bump),
    write sections, even a write that the snapshot saver harvested in between."""
    key = make_segment(20)
    t = stated.attach(key=key, owner="w")
    hs = [t.alloc(entity=i + 1) for i in range(3)]
    host = StoreHost(key, pg_dsn, "host-a")
    st, ts = host.store, host.ts
    tc = TableConfig("players", key, 20, t.layout)

    async def go(tmp):
        assert await st.ensure_connected()
        from stated.persist.store.flush import FlushResult
        res = FlushResult()
        items, counter = await st._collect(ts, ts.pending(0.0), res)
        assert len(items) == 3
        t.set(hs[0], "hp", 7)                       # scalar store: seq unchanged
        with t.write(hs[1]) as p:                   # write section
            p.name = "late"
        saver = Saver(tc, host.seg, host.alloc, DaemonConfig(state_dir=tmp))
        saver.save("delta")                         # harvests the new dirty marks meanwhile
        saver.close()
        await st._write(st.bulk, ts, items, counter, res)
        v = host.alloc.views
        assert [v.store_pending[h.slot] for h in hs] == [1, 1, 0]
        r = await st.tick()
        assert r["players"].written == 2
        rows = await pg_rows(pg_dsn)
        assert rows[1]["hp"] == 7 and rows[2]["name"] == "late"
        assert [v.store_pending[h.slot] for h in hs] == [0, 0, 0]
    try:
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            from pathlib import Path
            run(go(Path(tmp)))
    finally:
        run(st.close())
        host.close(), t.close()


def test_a_write_behind_batch_copied_before_a_flush_never_overwrites_it(make_segment, pg_dsn):
    """Versions follow the order of the copies: a write-behind batch copied before a worker's flush(h) and
    committed after it is refused as older; the flushed record stays in the database (it was overwritten
    by the older copy, whose version counter was taken later, and the mark was already cleared: lost)."""
    key = make_segment(20)
    t = stated.attach(key=key, owner="w")
    h = t.alloc(entity=5)
    t.set(h, "gold", 1)
    host = StoreHost(key, pg_dsn, "host-a")
    st, ts = host.store, host.ts

    async def go():
        from stated.persist.store.flush import FlushResult
        assert await st.ensure_connected()
        await st.tick()
        t.set(h, "gold", 2)
        res = FlushResult()
        items, counter = await st._collect(ts, ts.pending(0.0), res)   # the write-behind copies gold = 2 ...
        t.set(h, "gold", 3)                                     # ... the game writes again and flushes
        assert await st.flush_handle("players", h.slot, h.generation) is True
        assert (await pg_rows(pg_dsn))[5]["gold"] == 3
        await st._write(st.bulk, ts, items, counter, res)       # the pass commits its older copy last
        assert (await pg_rows(pg_dsn))[5]["gold"] == 3
        assert res.written == 0 and res.older == 1
        assert host.alloc.views.store_pending[h.slot] == 0 and (await st.tick())["players"].written == 0
    try:
        run(go())
    finally:
        run(st.close())
        host.close(), t.close()


def test_snapshot_and_store_each_get_every_change(make_segment, pg_dsn, tmp_path):
    """The saver no longer hides a change from the store (and vice versa): both consume their own mark."""
    key = make_segment(20)
    t = stated.attach(key=key, owner="w")
    h = t.alloc(entity=5)
    host = StoreHost(key, pg_dsn, "host-a")
    tc = TableConfig("players", key, 20, t.layout)
    saver = Saver(tc, host.seg, host.alloc, DaemonConfig(state_dir=tmp_path))

    async def go():
        assert saver.save("full").records == 1
        t.set(h, "gold", 5)
        assert saver.save("delta").records == 1          # the saver first: it harvested the mark
        assert (await host.store.tick())["players"].written == 1
        assert (await pg_rows(pg_dsn))[5]["gold"] == 5
        t.set(h, "gold", 6)
        assert (await host.store.tick())["players"].written == 1   # the store first this time
        assert saver.save("delta").records == 1
        assert saver.save("delta").records == 0
    try:
        run(go())
    finally:
        saver.close()
        run(host.store.close())
        host.close(), t.close()


def test_records_written_through_live_views_reach_the_database(make_segment, pg_dsn):
    key = make_segment(20)
    t = stated.attach(key=key, owner="w")
    h = t.alloc(entity=9)
    views = [t.record(h)]                            # pins the slot: view writes leave no dirty mark
    host = StoreHost(key, pg_dsn, "host-a")

    async def go():
        p = views[0]
        await host.store.tick()
        p.x = 12.5
        p.gold = 99
        assert host.alloc.views.dirty[h.slot] == 0
        assert (await host.store.tick())["players"].written == 1
        row = (await pg_rows(pg_dsn))[9]
        assert (row["x"], row["gold"]) == (12.5, 99)
        assert (await host.store.tick())["players"].written == 0    # unchanged pinned record: not rewritten
        p.gold = 100
        assert (await host.store.tick())["players"].written == 1
        assert (await pg_rows(pg_dsn))[9]["gold"] == 100
    try:
        run(go())
    finally:
        run(host.store.close())
        views.clear()
        host.close(), t.close()


def test_replaying_a_batch_leaves_the_database_unchanged(make_segment, pg_dsn):
    key = make_segment(50)
    t = stated.attach(key=key, owner="w")
    hs = [t.alloc(entity=i + 1) for i in range(40)]
    for i, h in enumerate(hs):
        write_player(t, h, i)
    host = StoreHost(key, pg_dsn, "host-a")
    st, ts = host.store, host.ts

    async def go():
        from stated.persist.store.flush import FlushResult
        assert await st.ensure_connected()
        res = FlushResult()
        items, _ = await st._collect(ts, ts.pending(0.0), res)
        await st._write(st.bulk, ts, items, 6, res)       # version counter 6
        first = await pg_rows(pg_dsn)
        res2 = FlushResult()
        await st._write(st.bulk, ts, items, 6, res2)      # the very same batch again
        assert (res2.written, res2.older) == (0, 40)
        t.set(hs[0], "hp", -5)
        res3 = FlushResult()
        await st._write(st.bulk, ts, items, 3, res3)      # an older batch (counter 3 < 6)
        assert res3.written == 0
        assert await pg_rows(pg_dsn) == first             # not even updated_at moved
    try:
        run(go())
    finally:
        run(st.close())
        host.close(), t.close()


def test_layout_change_needs_migrate_then_adds_and_widens_columns(make_segment, pg_dsn):
    old_fields = ["hp: i16 = 100", "name: str[8]", "gone: u8"]
    new_fields = ["hp: i32 = 100", "name: str[16]", "gone: u8", "mana: u16 = 50"]
    ko, kn = make_segment(10, old_fields), make_segment(10, new_fields)
    to = stated.attach(key=ko, owner="w")
    h = to.alloc(entity=1)
    to.set(h, "hp", 77)
    old = StoreHost(ko, pg_dsn, "host-a")
    run(old.store.tick())
    run(old.store.close())
    old.close(), to.close()

    new = StoreHost(kn, pg_dsn, "host-a")
    assert run(new.store.ensure_connected()) is False
    assert "--migrate" in new.store.status()["last_error"]
    new.close()
    mig = StoreHost(kn, pg_dsn, "host-a", migrate=True)
    assert run(mig.store.ensure_connected()) is True
    run(mig.store.close())
    mig.close()
    row = run(pg_rows(pg_dsn))[1]
    assert (row["hp"], row["mana"]) == (77, 50)
    lossy = StoreHost(ko, pg_dsn, "host-a", migrate=True)       # back to the narrower layout
    assert run(lossy.store.ensure_connected()) is False
    assert "lose data" in lossy.store.status()["last_error"] and "hp" in lossy.store.status()["last_error"]
    lossy.close()


# ---- bad input --------------------------------------------------------------------------------------------
def test_wrong_password_and_missing_database_are_clear_and_lose_nothing(make_segment, pg_cluster, pg_dsn):
    key = make_segment(10)
    t = stated.attach(key=key, owner="w")
    h = t.alloc(entity=3)
    t.set(h, "hp", 3)
    for dsn, msg in [(pg_cluster.dsn(pg_dsn.rsplit("/", 1)[1], password="wrong-secret"), "password authentication"),
                     (pg_cluster.dsn("no_such_db"), "does not exist")]:
        host = StoreHost(key, dsn, "host-a")
        assert run(host.store.ensure_connected()) is False
        st = host.store.status()
        assert msg in st["last_error"] and "wrong-secret" not in st["last_error"] and "stated-pw" not in str(st)
        assert st["errors"] == {"refused": 1}
        host.ts.pending(0.0)
        assert host.ts.dirty_count() == 1                   # still queued
        host.close()
    host = StoreHost(key, pg_dsn, "host-a")
    assert run(host.store.tick())["players"].written == 1   # nothing was lost
    run(host.store.close())
    host.close(), t.close()


def test_a_row_that_does_not_fit_the_layout_is_refused_by_claim(make_segment, pg_dsn):
    key = make_segment(10)
    t = stated.attach(key=key, owner="w")
    host = StoreHost(key, pg_dsn, "host-a")

    async def go():
        assert await host.store.ensure_connected()
        await pg_exec(pg_dsn, "ALTER TABLE stated.players DROP CONSTRAINT players_level_check")
        await pg_exec(pg_dsn, "INSERT INTO stated.players (entity, version, level) VALUES (8, 1, 70000)")
        with pytest.raises(StoreError, match=r"entity 8: column 'level' holds 70000, which does not fit level: u16"):
            await host.store.claim("players", 8, t._owner)
        assert t.lookup(8) is None
        lease = (await pg_exec(pg_dsn, "SELECT host_id FROM stated.leases WHERE entity = 8"))[0]
        assert lease["host_id"] == ""                    # the refused claim did not keep the lease
        with pytest.raises(StoreError, match="not stored"):
            await host.store.claim("world", 1, t._owner)
        h = t.alloc(entity=9)
        with pytest.raises(DuplicateEntity, match="already allocated on this host"):
            await host.store.claim("players", 9, t._owner)
        await pg_exec(pg_dsn, "UPDATE stated.players SET level = 5 WHERE entity = 8")   # the operator fixes it
        slot, gen = await host.store.claim("players", 8, t._owner)
        assert t.get((slot, gen), "level") == 5 and t.get((slot, gen), "hp") == 100
        return h
    try:
        run(go())
    finally:
        run(host.store.close())
        host.close(), t.close()


def test_a_flush_the_database_refuses_is_a_clear_error_and_nothing_is_lost(make_segment, pg_dsn):
    """flush(h) of a record a DBA's CHECK refuses: StoreError naming the constraint, the mark stays, and the
    next flushes (of the fixed record, and of another one) go through."""
    key = make_segment(10)
    t = stated.attach(key=key, owner="w")
    h1, h2 = t.alloc(entity=1), t.alloc(entity=2)
    host = StoreHost(key, pg_dsn, "host-a")
    st = host.store

    async def go():
        assert (await st.tick())["players"].written == 2
        await pg_exec(pg_dsn, "ALTER TABLE stated.players ADD CONSTRAINT dba_gold CHECK (gold < 1000000)")
        t.set(h1, "gold", 5_000_000)
        with pytest.raises(StoreError, match="dba_gold"):
            await st.flush_handle("players", *h1)
        assert host.alloc.views.store_pending[h1.slot] == 1
        t.set(h1, "gold", 7)
        t.set(h2, "gold", 8)
        assert await st.flush_handle("players", *h1) and await st.flush_handle("players", *h2)
        rows = await pg_rows(pg_dsn)
        assert (rows[1]["gold"], rows[2]["gold"]) == (7, 8) and host.alloc.views.store_pending[h1.slot] == 0
    try:
        run(go())
    finally:
        run(st.close())
        host.close(), t.close()


def test_a_record_the_database_refuses_does_not_stop_the_others(make_segment, pg_dsn, caplog):
    """A DBA adds a CHECK that one record violates: that record is isolated (the batch is halved until
    found), logged and counted; every other record is written; the refused one keeps its mark and is
    written once it changes to something the database accepts."""
    key = make_segment(100)
    t = stated.attach(key=key, owner="w")
    hs = [t.alloc(entity=i + 1) for i in range(50)]
    host = StoreHost(key, pg_dsn, "host-a")

    async def go():
        assert await host.store.ensure_connected()
        await pg_exec(pg_dsn, "ALTER TABLE stated.players ADD CONSTRAINT dba_gold CHECK (gold < 1000000)")
        for i, h in enumerate(hs):
            t.set(h, "gold", 5_000_000 if i == 17 else i)
        r = await host.store.tick()
        assert (r["players"].written, r["players"].skipped) == (49, 1)
        assert host.store.errors["rejected_row"] == 1 and "entity=18" in caplog.text
        assert host.alloc.views.store_pending[hs[17].slot] == 1     # nothing lost: still marked
        r = await host.store.tick()
        assert r["players"].written == 0 and host.store.errors["rejected_row"] == 1   # not retried unchanged
        t.set(hs[17], "gold", 17)
        r = await host.store.tick()
        assert r["players"].written == 1 and (await pg_rows(pg_dsn))[18]["gold"] == 17
    try:
        run(go())
    finally:
        run(host.store.close())
        host.close(), t.close()
