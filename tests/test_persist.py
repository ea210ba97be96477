"""Persistence end to end: reboot simulation through the daemon, and SIGKILL during snapshots."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import sysv_ipc

import stated
from stated import snapshot as snap
from stated import config as config_mod

from test_service import NotifySocket, ctl, start
from test_table import kill9, spawn

STATED = [sys.executable, "-m", "stated"]


@pytest.fixture
def notify(tmp_path):
    n = NotifySocket(tmp_path / "notify.sock")
    yield n
    n.close()


def ipcrm_everything(key):
    subprocess.run(["ipcrm", "-M", hex(key)], check=True)
    subprocess.run(["ipcrm", "-S", hex(key)], check=True)


def test_reboot_simulation(write_config, notify, procs):
    cfg = write_config({"players": {"capacity": 12000}}, daemon={"snapshot_interval": 3600})
    d = start(procs, cfg, notify)
    key = ctl(cfg, "status")["tables"][0]["key"]
    workers = [spawn(procs, "write_players", key, f"zone-{z}", 2500, 100_000 * (z + 1)) for z in range(4)]
    assert ctl(cfg, "snapshot")["tables"]["players"]["records"] == 10000
    for w in workers:
        kill9(w)
    with stated.attach(key=key, owner="zone-0") as t:       # further writes, captured by a delta
        hs = t.owned()
        for h in hs[:300]:
            t.set(h, "gold", 777)
        for h in hs[300:400]:
            t.free(h)
        extra = [t.alloc(entity=900_000 + i) for i in range(50)]
        with t.write(extra[0]) as p:
            p.name = "late"
    from stated import control
    control.request(config_mod.load(cfg).daemon.control_socket, "snapshot", kind="delta")
    with stated.attach(key=key, owner="zone-1") as t:      # and more, caught by SIGTERM's final save
        for h in t.owned()[:10]:
            t.set(h, "hp", -5)

    with stated.attach(key=key, readonly=True) as ro:
        before = {ro.entity(h): (h, bytes(ro.read(h)), ro._s16[16 * h.slot + 8]) for h in ro.handles()}
        owners_before = {o.index: o.name for o in ro.owners() if o.slots}
        counters_before = ro.counters()
    d.send_signal(signal.SIGTERM)
    assert d.wait(timeout=10) == 0
    ipcrm_everything(key)                                    # the reboot
    with pytest.raises(sysv_ipc.ExistentialError):
        sysv_ipc.SharedMemory(key)

    start(procs, cfg, notify)
    with stated.attach(key=key, readonly=True) as ro:
        after = {ro.entity(h): (h, bytes(ro.read(h)), ro._s16[16 * h.slot + 8]) for h in ro.handles()}
        assert after == before                               # records, entities, generations, owners
        assert {o.index: o.name for o in ro.owners() if o.slots} == owners_before
        assert ro.counters()["allocations"] == counters_before["allocations"]
        assert ro.verify() == []
    for z in range(4):
        with stated.attach(key=key, owner=f"zone-{z}") as t:
            mine = {h for h, _, ow in before.values() if owners_before.get(ow) == f"zone-{z}"}
            assert set(t.owned()) == mine
            new = [t.alloc() for _ in range(5)]               # allocation continues without collision
            assert not {h.slot for h in new} & {h.slot for h, _, _ in before.values()}


def test_sigkill_during_snapshots_never_breaks_the_previous(write_config, notify, procs):
    cfg = write_config({"players": {"capacity": 30000}}, daemon={"snapshot_interval": 0.05, "full_every": 1})
    d = start(procs, cfg, notify)
    key = ctl(cfg, "status")["tables"][0]["key"]
    w = spawn(procs, "write_players", key, "zone-1", 20000)
    kill9(w)
    sdir = config_mod.load(cfg).daemon.state_dir / "players"
    rnd = random.Random(3)
    kills = 0
    for i in range(12):
        time.sleep(rnd.uniform(0.05, 0.6))
        kill9(d)
        kills += 1
        chain, warnings = snap.chain(sdir)
        assert chain, warnings          # a valid snapshot always survives
        for p, h, *_ in chain:
            assert not p.name.startswith(".")
        d = start(procs, cfg, notify)
    assert kills == 12
    d.send_signal(signal.SIGTERM)
    assert d.wait(timeout=10) == 0
    assert not list(sdir.glob(".*.tmp")), "temporaries of killed writers are cleaned at start-up"
    chain, _ = snap.chain(sdir)
    assert sum(c["n"] for _, _, _, cs in chain[:1] for c in cs) == 20000


def test_snapshot_failure_is_loud_and_the_daemon_keeps_running(write_config, notify, procs, tmp_path):
    from test_service import m, scrape
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    cfg = write_config({"players": {"capacity": 50}}, daemon={"state_dir": str(blocker / "state")})
    d = start(procs, cfg, notify)
    key = ctl(cfg, "status")["tables"][0]["key"]
    spawn(procs, "write_players", key, "zone-1", 5)
    with pytest.raises(stated.DaemonError, match="snapshot failed"):
        ctl(cfg, "snapshot")
    ms = scrape(cfg)
    assert m(ms, "stated_snapshot_failures_total", table="players") == 1
    assert d.poll() is None
    d.send_signal(signal.SIGTERM)                 # the final snapshot fails too, the exit is still clean
    assert d.wait(timeout=10) == 0
    assert "snapshot failed" in open(str(cfg) + ".log").read()


def test_restore_cli_refuses_live_segment_unless_forced(write_config, notify, procs):
    cfg = write_config({"players": {"capacity": 50}})
    d = start(procs, cfg, notify)
    key = ctl(cfg, "status")["tables"][0]["key"]
    w = spawn(procs, "write_players", key, "zone-1", 10)
    first = ctl(cfg, "snapshot")["tables"]["players"]["path"]
    kill9(w)
    with stated.attach(key=key, owner="zone-1") as t:
        for h in t.owned()[:5]:
            t.free(h)
    d.send_signal(signal.SIGTERM)
    assert d.wait(timeout=10) == 0
    run = lambda *a: subprocess.run([*STATED, "restore", "--config", str(cfg), "--from", first, *a],  # noqa: E731
                                    capture_output=True, text=True)
    out = run()
    assert out.returncode == 1 and "--force" in out.stderr
    out = run("--force")
    assert out.returncode == 0 and "restored 10 records" in out.stdout and "safety snapshot" in out.stdout
    with stated.attach(key=key, readonly=True) as ro:
        assert len(ro) == 10
    ok = subprocess.run([*STATED, "snapshot", "--verify", first], capture_output=True, text=True)
    assert ok.returncode == 0
