"""Leases, epochs and handoff between hosts, against a real PostgreSQL.

A "host" here is a segment plus the daemon-side store objects (`StoreHost`) with its own host_id;
two hosts share one database, as a fleet does.
"""
from __future__ import annotations

import asyncio
import time
from asyncio import run

import pytest
from helpers import StoreHost, pg_exec, pg_expire, pg_rows, remove_key, two_hosts

import stated
from stated.errors import OwnedElsewhere


def test_claim_is_refused_while_another_host_holds_the_lease(make_segment, pg_dsn):
    with two_hosts(make_segment, pg_dsn) as (a, b, ta, tb):
        async def go():
            await a.store.claim("players", 42, ta._owner)
            held = r"entity 42 is held by host 'host-a' until .* \(in [23]\d\.\ds\)"
            with pytest.raises(OwnedElsewhere, match=held) as ei:
                await b.store.claim("players", 42, tb._owner)
            assert ei.value.holder == "host-a" and ei.value.lease_until > time.time() + 20
            assert tb.lookup(42) is None
            await pg_expire(pg_dsn, "host-a")
            await b.store.claim("players", 42, tb._owner)
            lease = (await pg_exec(pg_dsn, "SELECT host_id, epoch FROM stated.leases WHERE entity = 42"))[0]
            assert (lease["host_id"], lease["epoch"]) == ("host-b", 2)     # every claim bumps the epoch
        run(go())


def test_handoff_under_load_b_sees_a_last_write_and_a_late_writes_are_rejected(make_segment, pg_dsn):
    """A claims 100 players and writes them continuously while it releases them one by one; B claims
    each right after its release and must see exactly A's last write. Afterwards A allocating one of
    them again (no claim) writes nothing: refused, counted and logged."""
    with two_hosts(make_segment, pg_dsn, 300, flush_interval=0.05, lease_ttl=3.0) as (a, b, ta, tb):
        n = 100

        async def go():
            handles = {}
            for e in range(1, n + 1):
                handles[e] = await a.store.claim("players", e, ta._owner)
            stop = False
            writes = 0

            async def load():                       # the game on host A: writes every player it holds
                nonlocal writes
                while not stop:
                    for e, h in list(handles.items()):
                        with ta.write(h) as p:
                            p.gold += 1
                            p.hp = e
                        writes += 1
                    await asyncio.sleep(0)

            async def flusher():                    # host A's write-behind
                while not stop:
                    await a.store.tick()
                    await asyncio.sleep(0.05)
            tasks = [asyncio.create_task(load()), asyncio.create_task(flusher())]
            await asyncio.sleep(0.3)
            last = {}
            for e in range(1, n + 1):
                h = handles.pop(e)
                last[e] = ta.get(h, "gold")         # the game stops writing e before releasing it
                await a.store.release("players", h[0], h[1], ta._owner)
                hb = await b.store.claim("players", e, tb._owner)
                assert tb.get(hb, "gold") == last[e] and tb.get(hb, "hp") == e, e
                await asyncio.sleep(0)
            stop = True
            await asyncio.gather(*tasks)
            assert writes > n
            # A allocates player 1 again without claiming (a bug in the game): its writes never land
            h = ta.alloc(entity=1)
            ta.set(h, "gold", 10 ** 9)
            r = await a.store.tick()
            assert r["players"].stale == 1 and a.ts.stale >= 1 and 1 in a.ts.lost
            rows = await pg_rows(pg_dsn)
            assert rows[1]["gold"] == last[1]
            ta.set(h, "gold", 10 ** 9 + 1)
            assert (await a.store.tick())["players"].written == 0
        run(go())


def test_a_host_whose_lease_expired_and_was_claimed_elsewhere_cannot_overwrite(make_segment, pg_dsn, caplog):
    with two_hosts(make_segment, pg_dsn) as (a, b, ta, tb):
        async def go():
            ha = await a.store.claim("players", 7, ta._owner)
            ta.set(ha, "gold", 1)
            assert (await a.store.tick())["players"].written == 1
            await pg_expire(pg_dsn, "host-a")                 # A was partitioned and did not renew
            hb = await b.store.claim("players", 7, tb._owner)
            assert tb.get(hb, "gold") == 1
            tb.set(hb, "gold", 2)
            assert (await b.store.tick())["players"].written == 1
            ta.set(ha, "gold", 666)                               # A comes back and writes on
            r = await a.store.tick()
            assert (r["players"].written, r["players"].stale) == (0, 1)
            assert (await pg_rows(pg_dsn))[7]["gold"] == 2
            assert "write refused, host 'host-b' holds the lease" in caplog.text
            ta.set(ha, "gold", 667)
            r = await a.store.tick()
            assert r["players"].written == 0 and (await pg_rows(pg_dsn))[7]["gold"] == 2
            with pytest.raises(OwnedElsewhere):
                await a.store.flush_handle("players", *ha)
            # renewal notices too: B holds it, so A's renew reports it lost (no exception, logged)
            a.store.next_renew = 0
            await a.store.tick()
            assert a.store.status()["tables"]["players"]["lost"] == 1
        run(go())


def test_flush_and_release_of_a_lease_lost_meanwhile_write_nothing(make_segment, pg_dsn):
    """flush(h) and release(h) check the lease in the statement that writes (or drops it): a host that
    lost it without noticing yet gets OwnedElsewhere, writes nothing, keeps its slot, and counts it once."""
    with two_hosts(make_segment, pg_dsn) as (a, b, ta, tb):
        async def go():
            ha = await a.store.claim("players", 7, ta._owner)
            await pg_expire(pg_dsn, "host-a")
            hb = await b.store.claim("players", 7, tb._owner)
            tb.set(hb, "gold", 2)
            await b.store.flush_handle("players", *hb)
            ta.set(ha, "gold", 666)
            with pytest.raises(OwnedElsewhere, match="refused"):
                await a.store.flush_handle("players", *ha)
            assert a.store.status()["tables"]["players"]["stale"] == 1 and a.ts.lost == {7}
            with pytest.raises(OwnedElsewhere):
                await a.store.release("players", ha[0], ha[1], ta._owner)
            assert ta.lookup(7) == ha                                    # not freed: the game decides
            assert (await pg_rows(pg_dsn))[7]["gold"] == 2
            lease = (await pg_exec(pg_dsn, "SELECT host_id FROM stated.leases WHERE entity = 7"))[0]
            assert lease["host_id"] == "host-b"
            await b.store.release("players", hb[0], hb[1], tb._owner)    # B's release: write and lease drop at once
            assert (await pg_exec(pg_dsn, "SELECT host_id FROM stated.leases WHERE entity = 7"))[0]["host_id"] == ""
        run(go())


def test_host_loss_every_acknowledged_write_is_claimed_elsewhere(make_segment, pg_dsn, new_key):
    """Host A claims and writes 100 players; its flushes commit; then A vanishes (its segment removed,
    no release, no final flush). Host B, empty, claims every player once A's leases expire and finds
    every write A's store acknowledged."""
    ka, kb = make_segment(200), make_segment(200)
    ta, tb = stated.attach(key=ka, owner="wa"), stated.attach(key=kb, owner="wb")
    a = StoreHost(ka, pg_dsn, "host-a", flush_interval=0.2, lease_ttl=3.0)
    b = StoreHost(kb, pg_dsn, "host-b", flush_interval=0.2, lease_ttl=3.0)
    acked = {}

    async def go():
        hs = {e: await a.store.claim("players", e, ta._owner) for e in range(1, 101)}
        for rnd in range(3):
            for e, h in hs.items():
                ta.set(h, "gold", rnd * 1000 + e)
            await a.store.tick()                              # committed: acknowledged
            acked.update({e: rnd * 1000 + e for e in hs})
        for h in hs.values():
            ta.set(h, "gold", 99999)                          # written, never flushed: lost with the host
        a.store.bulk.abort(), a.store.fast.abort()            # the host dies: connections cut, no goodbye
        with pytest.raises(OwnedElsewhere):
            await b.store.claim("players", 1, tb._owner)
        await asyncio.sleep(3.2)                              # A's leases expire
        for e in range(1, 101):
            hb = await b.store.claim("players", e, tb._owner)
            assert tb.get(hb, "gold") == acked[e]
    try:
        run(go())
    finally:
        a.close()
        ta.close()
        remove_key(ka)
        run(b.store.close())
        b.close(), tb.close()


def test_a_restarted_daemon_bumps_its_epochs_and_keeps_writing(make_segment, pg_dsn):
    key = make_segment(10)
    t = stated.attach(key=key, owner="w")
    a = StoreHost(key, pg_dsn, "host-a")

    async def go1():
        h = await a.store.claim("players", 3, t._owner)
        t.set(h, "gold", 1)
        await a.store.tick()
        await a.store.close()
        return h
    h = run(go1())
    a.close()
    a2 = StoreHost(key, pg_dsn, "host-a")                     # same host, new daemon life

    async def go2():
        t.set(h, "gold", 2)
        assert (await a2.store.tick())["players"].written == 1
        row = (await pg_rows(pg_dsn))[3]
        assert row["gold"] == 2 and row["version"] >> 32 == 2 and row["version"] & 0xFFFFFFFF == 1
        await a2.store.close()
    try:
        run(go2())
    finally:
        a2.close(), t.close()


def test_heartbeat_keeps_leases_alive_and_freed_entities_are_released(make_segment, pg_dsn):
    """Leases live on the host's heartbeat (one row per host, not one per entity); an entity freed
    without release() has its lease released by the next renewal, so another host can claim it."""
    key, kb = make_segment(10), make_segment(10)
    t, tb = stated.attach(key=key, owner="w"), stated.attach(key=kb, owner="wb")
    a = StoreHost(key, pg_dsn, "host-a", flush_interval=0.1, lease_ttl=1.0)
    b = StoreHost(kb, pg_dsn, "host-b", flush_interval=0.1, lease_ttl=1.0)

    async def go():
        await a.store.claim("players", 1, t._owner)
        h2 = await a.store.claim("players", 2, t._owner)
        t.set(h2, "gold", 22)
        t.free(h2)                                          # freed without release
        for _ in range(8):                                  # 1.6 s: past every lease's own deadline
            await a.store.tick()
            await asyncio.sleep(0.2)
        rows = {r["entity"]: r for r in await pg_exec(pg_dsn, "SELECT entity, host_id FROM stated.leases")}
        assert rows[1]["host_id"] == "host-a" and rows[2]["host_id"] == ""
        assert a.store.status()["tables"]["players"]["leases"] == 1
        await a.store.renew()                               # a fresh heartbeat: the claim below is within it
        with pytest.raises(OwnedElsewhere):                 # alive through the heartbeat
            await b.store.claim("players", 1, tb._owner)
        hb = await b.store.claim("players", 2, tb._owner)   # released: free to take, with its last write
        assert tb.get(hb, "gold") == 22
    try:
        run(go())
    finally:
        for h in (a, b):
            run(h.store.close())
            h.close()
        t.close(), tb.close()


def test_flush_of_a_new_entity_takes_its_lease_and_a_lost_pinned_record_is_counted_once_per_change(
        make_segment, pg_dsn):
    with two_hosts(make_segment, pg_dsn) as (a, b, ta, tb):
        async def go():
            h = ta.alloc(entity=5)                          # a new character, never flushed
            ta.set(h, "gold", 10)
            assert await a.store.flush_handle("players", *h)   # takes the lease, then commits
            assert (await pg_rows(pg_dsn))[5]["gold"] == 10
            p = ta.record(h)                                # pinned: written through a live view
            await pg_expire(pg_dsn, "host-a")
            await b.store.claim("players", 5, tb._owner)    # B takes it over
            p.gold = 11
            r1 = await a.store.tick()
            r2 = await a.store.tick()                       # unchanged since: not counted again
            assert (r1["players"].stale, r2["players"].stale) == (1, 0)
            p.gold = 12
            assert (await a.store.tick())["players"].stale == 1
            assert (await pg_rows(pg_dsn))[5]["gold"] == 10
            with pytest.raises(OwnedElsewhere):
                await a.store.flush_handle("players", *h)
            del p
        run(go())


def test_orphaned_leases_of_this_host_are_swept(make_segment, pg_dsn):
    """A claim whose answer was lost (COMMIT done, connection gone) leaves a lease held by this host for
    an entity it does not have; the heartbeat would keep it alive forever. The first renewal of a
    connection (then every 10th) releases such leases once their own deadline passed; leases of
    entities this host has, and claims in progress (deadline still ahead), are kept."""
    key = make_segment(10)
    t = stated.attach(key=key, owner="w")
    a = StoreHost(key, pg_dsn, "host-a")

    async def go():
        h = await a.store.claim("players", 1, t._owner)
        await pg_exec(pg_dsn, "INSERT INTO stated.leases VALUES ('players', 2, 'host-a', 4, now() - interval '1 s'),"
                              " ('players', 3, 'host-a', 1, now() + interval '30 s')")
        await pg_exec(pg_dsn, "UPDATE stated.leases SET lease_until = now() - interval '1 s' WHERE entity = 1")
        a.store._renewals = 0
        await a.store.renew()
        rows = {r["entity"]: r["host_id"] for r in await pg_exec(pg_dsn, "SELECT entity, host_id FROM stated.leases")}
        assert rows == {1: "host-a", 2: "", 3: "host-a"}
        t.set(h, "gold", 1)
        assert (await a.store.tick())["players"].written == 1      # the kept lease still writes
    try:
        run(go())
    finally:
        run(a.store.close())
        a.close(), t.close()
