"""The store wired into the daemon: workers claim, flush and release through the control socket;
host loss and handoff between two daemons; SIGTERM's final flush; start-up with a bad or absent
database; metrics and the `stated store` commands. Real daemons, real PostgreSQL."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import STATED, DaemonProc, metrics_text, pg_exec, pg_rows, remove_key, spawn

import stated
from stated.errors import OwnedElsewhere, StoreError


def store_config(write_config, dsn: str, host_id: str, name: str = "stated.toml", tables=None, **store) -> Path:
    store = {"dsn": dsn, "host_id": host_id, "flush_interval": 0.2, "lease_ttl": 1.0, "timeout": 2.0, **store}
    p = write_config(tables=tables or {"players": {"capacity": 200}}, name=name)
    lines = ["[store]"] + [f"{k} = {json.dumps(v)}" for k, v in store.items()]
    text = p.read_text()
    p.write_text("\n".join(lines) + "\n" + text)      # before [daemon]: a top-level table
    return p


def metrics(d: DaemonProc) -> str:
    return metrics_text(d.metrics_port())


def stated_cli(cfg: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*STATED, *args, "--config", str(cfg)], capture_output=True, text=True, timeout=60)


def test_claim_flush_release_through_the_daemon(write_config, pg_dsn, procs):
    cfg = store_config(write_config, pg_dsn, "host-a",
                       tables={"players": {"capacity": 100}, "world": {"capacity": 10, "store": False}})
    d = DaemonProc(procs, cfg)
    d.wait_for("ready:")
    d.wait_for("store: connected")
    t = stated.attach("players", owner="zone-1", config=str(cfg))
    w = stated.attach("world", owner="zone-1", config=str(cfg))
    try:
        with pytest.raises(StoreError, match="needs an entity"):
            t.alloc()
        with pytest.raises(StoreError, match="not stored"):
            w.claim(1)
        h = t.claim(42)
        assert t.get(h, "hp") == 100 and t.lookup(42) == h           # defaults: no row yet
        with t.write(h) as p:
            p.name, p.gold = "alice", 5
        t.flush(h)                                                     # committed when it returns
        row = asyncio.run(pg_rows(pg_dsn))[42]
        assert (row["name"], row["gold"]) == ("alice", 5)
        t.set(h, "gold", 6)
        t.release(h)
        assert asyncio.run(pg_rows(pg_dsn))[42]["gold"] == 6
        assert t.lookup(42) is None and not t.valid(h)
        lease = asyncio.run(pg_exec(pg_dsn, "SELECT host_id FROM stated.leases WHERE entity = 42"))[0]
        assert lease["host_id"] == ""
        h = t.claim(42)                                                # back again: the row comes with it
        assert (t.get(h, "gold"), t.read(h).name) == (6, "alice")
        v = t.record(h)                                                # live-view writes reach the database
        v.gold = 77
        deadline = time.monotonic() + 5
        while asyncio.run(pg_rows(pg_dsn))[42]["gold"] != 77:
            assert time.monotonic() < deadline, "pinned write never reached the database"
            time.sleep(0.1)
        del v
        m = metrics(d)
        assert "stated_store_up 1.0" in m and 'stated_leases{table="players"} 1.0' in m
        assert 'stated_store_flushed_records_total{table="players"}' in m
        assert "stated_store_flush_duration_seconds_count" in m
        st = stated_cli(cfg, "store", "status", "--json")
        assert st.returncode == 0, st.stderr
        assert json.loads(st.stdout)["tables"]["players"]["leases"] == 1 and "stated-pw" not in st.stdout
        ex = stated_cli(cfg, "store", "export", "players", "42")
        assert ex.returncode == 0, ex.stderr
        assert json.loads(ex.stdout)["gold"] == 77 and json.loads(ex.stdout)["entity"] == 42
        sql = stated_cli(cfg, "store", "init", "--print-sql")
        assert sql.returncode == 0 and 'CREATE TABLE IF NOT EXISTS "stated"."players"' in sql.stdout
        assert '"world"' not in sql.stdout
    finally:
        t.close(), w.close()
    assert d.stop() == 0
    assert any("every record is saved" in ln for ln in d.log)


def test_host_loss_another_host_claims_every_player_after_the_leases_expire(write_config, pg_dsn, procs, tmp_path):
    """Host A (daemon + worker) is SIGKILLed, its segments, semaphores and state_dir deleted. A daemon
    with another host_id and an empty state_dir claims every player once A's leases expire and finds
    every write A acknowledged."""
    ttl = 4.0                               # long enough that B's first claim lands inside it on a loaded machine
    cfg_a = store_config(write_config, pg_dsn, "host-a", name="a.toml", lease_ttl=ttl)
    a = DaemonProc(procs, cfg_a)
    a.wait_for("store: connected")
    w = spawn(procs, "store_worker", cfg_a, "zone-a", 40, 1000)
    time.sleep(0.5)
    for p in (w, a.p):
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
    import tomllib
    ka = tomllib.loads(cfg_a.read_text())["tables"]["players"]["key"]
    remove_key(ka)
    shutil.rmtree(tmp_path / "var")
    lost_at = time.monotonic()

    (tmp_path / "b").mkdir()
    cfg_b = store_config(write_config, pg_dsn, "host-b", name="b/b.toml", lease_ttl=ttl)
    b = DaemonProc(procs, cfg_b)
    b.wait_for("store: connected")
    t = stated.attach("players", owner="zone-b", config=str(cfg_b))
    try:
        assert time.monotonic() - lost_at < ttl - 1, "B started too slowly to see A's lease"
        with pytest.raises(OwnedElsewhere, match="host 'host-a'"):
            t.claim(1)
        deadline = time.monotonic() + ttl + 10
        got = {}
        while len(got) < 40 and time.monotonic() < deadline:
            for e in range(1, 41):
                if e in got:
                    continue
                try:
                    got[e] = t.get(t.claim(e), "gold")
                except OwnedElsewhere:
                    time.sleep(0.05)
        assert len(got) == 40
        assert all(v in (1000, 1001) for v in got.values()), got     # acknowledged 1000; 1001 if it was flushed
    finally:
        t.close()
    assert b.stop() == 0


def test_sigterm_final_flush_and_unsaved_count(write_config, pg_private, procs):
    pg_private.psql("CREATE DATABASE game OWNER stated")
    dsn = pg_private.dsn("game")
    cfg = store_config(write_config, dsn, "host-a", flush_interval=60.0, lease_ttl=180.0)
    d = DaemonProc(procs, cfg)
    d.wait_for("store: connected")
    t = stated.attach("players", owner="zone-1", config=str(cfg))
    hs = [t.alloc(entity=e) for e in range(1, 31)]          # allocated here: new entities, no claim needed
    for h in hs:
        t.set(h, "gold", 3)
    t.close()
    assert d.stop() == 0                                     # nothing flushed yet (60 s interval): the final flush
    assert any("every record is saved" in ln for ln in d.log), "".join(d.log)
    assert len(asyncio.run(pg_rows(dsn))) == 30

    d2 = DaemonProc(procs, cfg)
    d2.wait_for("store: connected")
    t = stated.attach("players", owner="zone-1", config=str(cfg))
    for h in t.owned():
        t.set(h, "gold", 4)
    t.close()
    pg_private.stop("immediate")                             # the database is gone at shutdown
    t0 = time.monotonic()
    assert d2.stop() == 0
    assert time.monotonic() - t0 < 15
    line = d2.wait_for("records not saved to the database at shutdown")
    assert "30 records" in line


def test_bad_database_settings_at_start(write_config, pg_cluster, pg_dsn, procs):
    # a malformed DSN: refuse to start with one clear line (exit 78), no password in it
    cfg = store_config(write_config, "postgresql://stated:hunter2@db:notaport/game", "host-a", name="bad.toml")
    r = subprocess.run([*STATED, "run", "--config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 78, r.stderr
    assert "malformed dsn" in r.stderr and "hunter2" not in r.stderr
    # unreachable at start: start, log, retry (the game runs, snapshots go on)
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = store_config(write_config, f"postgresql://stated:hunter2@127.0.0.1:{port}/game", "host-a",
                       name="down.toml")
    d = DaemonProc(procs, cfg)
    d.wait_for("ready:")
    d.wait_for("unavailable")
    assert "stated_store_up 0.0" in metrics(d)
    assert not any("hunter2" in ln for ln in d.log)
    t = stated.attach("players", owner="zone-1", config=str(cfg))
    t0 = time.monotonic()
    from stated.errors import StoreUnavailable
    with pytest.raises(StoreUnavailable):
        t.claim(1)
    assert time.monotonic() - t0 < 6
    h = t.alloc(entity=5)                                    # the game keeps running
    t.set(h, "gold", 1)
    t.close()
    assert d.stop() == 0
    # a wrong password: clear error in the log and in `stated store status`, the daemon runs on
    cfg = store_config(write_config, pg_dsn.replace("stated-pw", "wrong-pw"), "host-a", name="pw.toml")
    d = DaemonProc(procs, cfg)
    d.wait_for("password authentication failed")
    st = stated_cli(cfg, "store", "status")
    assert st.returncode == 1 and "DOWN" in st.stdout and "password authentication failed" in st.stdout
    assert "wrong-pw" not in st.stdout and not any("wrong-pw" in ln for ln in d.log)
    assert d.stop() == 0


def test_restored_or_recreated_tables_queue_every_record(write_config, pg_dsn, procs):
    """Marks live in shared memory: when the daemon rebuilds a table (segment removed under it and
    recreated from a snapshot, or restored after a reboot), every record is queued for the database
    again, so nothing the lost memory had marked is skipped. Versions make the repeats harmless."""
    import tomllib

    import sysv_ipc
    cfg = store_config(write_config, pg_dsn, "host-a")
    text = cfg.read_text().replace("[daemon]", "[daemon]\nrepair_interval = 0.3")
    cfg.write_text(text)
    key = tomllib.loads(text)["tables"]["players"]["key"]
    d = DaemonProc(procs, cfg)
    d.wait_for("store: connected")
    t = stated.attach("players", owner="zone-1", config=str(cfg))
    for e in range(1, 21):
        t.set(t.alloc(entity=e), "gold", e)
    t.close()

    def versions(n_expected=20, newer_than=None, timeout=10.0):
        deadline = time.monotonic() + timeout
        while True:
            rows = asyncio.run(pg_rows(pg_dsn))
            v = {e: r["version"] for e, r in rows.items()}
            if len(v) == n_expected and (newer_than is None or all(v[e] > newer_than[e] for e in v)):
                return v
            assert time.monotonic() < deadline, (v, newer_than)
            time.sleep(0.1)
    v1 = versions()
    sysv_ipc.SharedMemory(key).remove()                       # ipcrm -M under the running daemon
    d.wait_for("recreated")
    v2 = versions(newer_than=v1)                              # every record written again
    assert d.stop() == 0
    remove_key(key)                                           # a reboot: memory gone, snapshots stay
    d = DaemonProc(procs, cfg)
    d.wait_for("restored from snapshots: 20 records queued")
    v3 = versions(newer_than=v2)
    assert all(v3[e] >> 32 > v2[e] >> 32 for e in v3)        # a new daemon life: a new epoch
    assert {e: r["gold"] for e, r in asyncio.run(pg_rows(pg_dsn)).items()} == {e: e for e in range(1, 21)}
    assert d.stop() == 0


def test_sigkill_of_the_daemon_mid_flush_loses_no_mark(write_config, pg_dsn, procs):
    """`stated run` SIGKILLed while it writes 20k records behind: every record is either committed or
    still marked in shared memory, and the next daemon writes the rest."""
    import tomllib

    from stated.format import segment as fmt
    from stated.shm import segment as seg_mod
    cfg = store_config(write_config, pg_dsn, "host-a", tables={"players": {"capacity": 25000}}, batch=1000)
    key = tomllib.loads(cfg.read_text())["tables"]["players"]["key"]
    d = DaemonProc(procs, cfg)
    d.wait_for("store: connected")
    t = stated.attach("players", owner="zone-1", config=str(cfg))
    n = 20000
    hs = []
    for e in range(1, n + 1):
        h = t.alloc(entity=e)
        t.set(h, "gold", e)
        hs.append(h)

    def count() -> int:
        return asyncio.run(pg_exec(pg_dsn, "SELECT count(*) AS n FROM stated.players"))[0]["n"]
    deadline = time.monotonic() + 60
    while count() < 2000:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(d.p.pid, signal.SIGKILL)
    d.p.wait(10)
    rows = asyncio.run(pg_rows(pg_dsn))
    assert len(rows) < n, "the kill came too late to be mid-flush"
    seg = seg_mod.open(key, table="players")
    try:
        v = fmt.SegmentViews(seg.buf, seg.header)
        for e, h in zip(range(1, n + 1), hs):
            marked = v.store_pending[h.slot] or v.dirty[h.slot]
            assert marked or rows.get(e, {}).get("gold") == e, e
        v.release()
    finally:
        seg.detach()
    d2 = DaemonProc(procs, cfg)
    d2.wait_for("store: connected")
    deadline = time.monotonic() + 60
    while count() < n:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert all(r["gold"] == e for e, r in asyncio.run(pg_rows(pg_dsn)).items())
    t.close()
    assert d2.stop() == 0


def test_handoff_between_two_daemons(write_config, pg_dsn, procs, tmp_path):
    """Zone on host A releases players while writing others; host B claims each one right after and
    sees A's last write; A allocating one of them again later (no claim) gets its writes refused and
    counted (stated_store_stale_writes_total on A)."""
    cfg_a = store_config(write_config, pg_dsn, "host-a", name="a.toml")
    (tmp_path / "b").mkdir()
    cfg_b = store_config(write_config, pg_dsn, "host-b", name="b/b.toml")
    a, b = DaemonProc(procs, cfg_a), DaemonProc(procs, cfg_b)
    a.wait_for("store: connected")
    b.wait_for("store: connected")
    ta = stated.attach("players", owner="zone-a", config=str(cfg_a))
    tb = stated.attach("players", owner="zone-b", config=str(cfg_b))
    try:
        hs = {e: ta.claim(e) for e in range(1, 31)}
        for rnd in range(1, 4):
            for e, h in hs.items():
                ta.set(h, "gold", rnd * 100 + e)
        for e in list(hs):
            h = hs.pop(e)
            last = ta.get(h, "gold")
            for other in hs.values():                      # the zone keeps playing meanwhile
                ta.set(other, "hp", ta.get(other, "hp") - 1)
            ta.release(h)
            hb = tb.claim(e)
            assert tb.get(hb, "gold") == last, e
            with pytest.raises(OwnedElsewhere):             # B holds it now: A cannot take it back
                ta.claim(e)
        h = ta.alloc(entity=7)                              # a bug in zone A: no claim
        ta.set(h, "gold", 999)
        deadline = time.monotonic() + 10
        while 'stated_store_stale_writes_total{table="players"} 1.0' not in metrics(a):
            assert time.monotonic() < deadline, metrics(a)
            time.sleep(0.1)
        assert asyncio.run(pg_rows(pg_dsn))[7]["gold"] == 307
    finally:
        ta.close(), tb.close()
    assert a.stop() == 0 and b.stop() == 0
