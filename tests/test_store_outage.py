"""Database outages and crashes mid-flush, against a real PostgreSQL that we stop and kill.

Nothing on the worker path waits for the database; dirty marks in shared memory are the queue; no
mark is lost when the server stops mid-flush (`pg_ctl stop -m immediate`) or when the flushing
process is SIGKILLed; replaying is harmless.
"""
from __future__ import annotations

import asyncio
import os
import signal
import time
from asyncio import run

import pytest
from helpers import StoreHost, pg_exec, pg_rows, spawn

import stated
from stated.errors import StoreUnavailable


def fill(t, n, base=1):
    hs = []
    for i in range(n):
        h = t.alloc(entity=base + i)
        t.set(h, "gold", i)
        hs.append(h)
    return hs


def db_matches_memory(t, hs, rows, base=1):
    bad = [i for i, h in enumerate(hs) if rows.get(base + i, {}).get("gold") != t.get(h, "gold")]
    return bad


def test_immediate_stop_mid_flush_loses_no_mark(make_segment, pg_private):
    key = make_segment(30000)
    t = stated.attach(key=key, owner="w")
    hs = fill(t, 25000)
    pg_private.psql("CREATE DATABASE game OWNER stated")
    dsn = pg_private.dsn("game")
    host = StoreHost(key, dsn, "host-a", batch=1000)
    v = host.alloc.views

    async def go():
        assert await host.store.ensure_connected()
        task = asyncio.create_task(host.store.tick())
        while host.ts.flushed < 3000:                     # some batches committed, more to come
            await asyncio.sleep(0.005)
        await asyncio.to_thread(pg_private.stop, "immediate")
        r = await asyncio.wait_for(task, 30)
        assert not host.store.up and host.store.errors["unavailable"] == 1
        done = r.get("players")
        # every slot is either in the database (mark cleared) or still marked
        rows = {}
        await asyncio.to_thread(pg_private.start)
        rows = await pg_rows(dsn)
        for i, h in enumerate(hs):
            marked = v.store_pending[h.slot] or v.dirty[h.slot]
            assert marked or rows.get(1 + i, {}).get("gold") == i, i
        assert 0 < len(rows) < 25000
        # the game kept going during all that; reconnection backs off, then catches up
        t.set(hs[0], "gold", -1 & 0xFFFF)
        deadline = time.monotonic() + 30
        while host.ts.dirty_count() and time.monotonic() < deadline:
            await host.store.tick()
            await asyncio.sleep(0.05)
        assert host.ts.dirty_count() == 0
        assert db_matches_memory(t, hs, await pg_rows(dsn)) == []
        return done
    try:
        run(go())
    finally:
        run(host.store.close())
        host.close(), t.close()


def test_sigkill_of_the_flusher_mid_flush_loses_no_mark(make_segment, pg_dsn, procs):
    key = make_segment(30000)
    t = stated.attach(key=key, owner="w")
    hs = fill(t, 25000)
    p = spawn(procs, "store_flush", hex(key), pg_dsn, "host-a")

    async def count():
        return (await pg_exec(pg_dsn, "SELECT count(*) AS n FROM stated.players"))[0]["n"]
    deadline = time.monotonic() + 60
    while run(count()) < 4000 and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(10)
    n = run(count())
    assert 0 < n < 25000, n
    host = StoreHost(key, pg_dsn, "host-a")                 # the next daemon life on the same host

    async def go():
        for _ in range(10):
            await host.store.tick()
            if not host.ts.dirty_count():
                break
        assert host.ts.dirty_count() == 0
        assert db_matches_memory(t, hs, await pg_rows(pg_dsn)) == []
    try:
        run(go())
    finally:
        run(host.store.close())
        host.close(), t.close()


def test_database_down_worker_calls_fail_fast_and_the_game_runs_on(make_segment, pg_private):
    key = make_segment(100)
    t = stated.attach(key=key, owner="w")
    pg_private.psql("CREATE DATABASE game OWNER stated")
    dsn = pg_private.dsn("game")
    host = StoreHost(key, dsn, "host-a", timeout=1.0)

    async def go():
        h = await host.store.claim("players", 1, t._owner)
        pg_private.stop("immediate")
        for i in range(100):                                # the game never waits for the database
            t.set(h, "gold", i)
        for call in (lambda: host.store.claim("players", 2, t._owner), lambda: host.store.flush_handle("players", *h)):
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await call()
            assert time.monotonic() - t0 < 2 * 1.0 + 0.5
        r = await host.store.tick()                         # the flush loop just backs off
        assert r == {} and not host.store.up
        backoffs = []
        for _ in range(4):
            host.store.next_try = 0
            await host.store.tick()
            backoffs.append(host.store.backoff)
        assert backoffs == sorted(backoffs) and backoffs[-1] <= 10.0
        assert host.ts.dirty_count() == 1 and host.ts.lag(time.monotonic()) > 0
        pg_private.start()
        host.store.next_try = 0
        await host.store.tick()
        assert host.store.up and host.ts.dirty_count() == 0 and host.store.backoff == 0.1
        assert (await pg_rows(dsn))[1]["gold"] == 99
        await host.store.flush_handle("players", *h)
    try:
        run(go())
    finally:
        run(host.store.close())
        host.close(), t.close()


def test_unreachable_database_at_start_is_retried(make_segment):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]                            # nothing listens there
    key = make_segment(10)
    host = StoreHost(key, f"postgresql://stated:pw@127.0.0.1:{port}/game", "host-a", timeout=0.5)
    try:
        assert run(host.store.tick()) == {}
        st = host.store.status()
        assert not st["up"] and st["errors"] == {"unavailable": 1} and "pw@" not in str(st)
        assert "unavailable" in st["last_error"]
    finally:
        host.close()


def test_max_rate_caps_catch_up(make_segment, pg_dsn):
    key = make_segment(3000)
    t = stated.attach(key=key, owner="w")
    fill(t, 2000)
    clock = [100.0]
    host = StoreHost(key, pg_dsn, "host-a", max_rate=500.0)
    host.store.clock = lambda: clock[0]
    host.store._rate_t = clock[0]

    async def go():
        assert await host.store.ensure_connected()
        clock[0] += 1.0
        r = await host.store.tick()
        assert r["players"].written == 500
        clock[0] += 0.5
        assert (await host.store.tick())["players"].written == 250
        clock[0] += 10                                        # allowance carries over at most 1 s worth
        assert (await host.store.tick())["players"].written == 500
    try:
        run(go())
    finally:
        run(host.store.close())
        host.close(), t.close()
