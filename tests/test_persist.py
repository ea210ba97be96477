"""Persistence end to end: reboot simulation through the daemon, and SIGKILL during snapshots."""
import os
import random
import signal
import subprocess
import time

import pytest
import sysv_ipc
from helpers import PLAYER_FIELDS, STATED, ctl, kill9, metric, scrape, spawn, start

import stated
from stated.format import config as config_mod
from stated.persist import snapshot as snap


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
    from stated.daemon import control
    control.request(config_mod.load(cfg).daemon.control_socket, "snapshot", kind="delta")
    with stated.attach(key=key, owner="zone-1") as t:      # and more, caught by SIGTERM's final save
        for h in t.owned()[:10]:
            t.set(h, "hp", -5)

    with stated.attach(key=key, readonly=True) as ro:
        before = {ro.entity(h): (h, bytes(ro.read(h)), ro.views.owner[h.slot]) for h in ro.handles()}
        owners_before = {o.index: o.name for o in ro.owners() if o.slots}
        counters_before = ro.counters()
    d.send_signal(signal.SIGTERM)
    assert d.wait(timeout=10) == 0
    ipcrm_everything(key)                                    # the reboot
    with pytest.raises(sysv_ipc.ExistentialError):
        sysv_ipc.SharedMemory(key)

    start(procs, cfg, notify)
    with stated.attach(key=key, readonly=True) as ro:
        after = {ro.entity(h): (h, bytes(ro.read(h)), ro.views.owner[h.slot]) for h in ro.handles()}
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
    for _i in range(12):
        time.sleep(rnd.uniform(0.05, 0.6))
        kill9(d)
        kills += 1
        chain = snap.chain(sdir)
        assert chain, chain.warnings    # a valid snapshot always survives
        assert not any(name.startswith(".") for name in chain.names())
        d = start(procs, cfg, notify)
    assert kills == 12
    d.send_signal(signal.SIGTERM)
    assert d.wait(timeout=10) == 0
    assert not list(sdir.glob(".*.tmp")), "temporaries of killed writers are cleaned at start-up"
    assert snap.chain(sdir).full.records == 20000


def test_snapshot_failure_is_loud_and_the_daemon_keeps_running(write_config, notify, procs, tmp_path):
    cfg = write_config({"players": {"capacity": 50}})
    d = start(procs, cfg, notify)      # a state_dir that is not a directory is refused at start: break it now
    blocker = tmp_path / "var" / "players"
    if blocker.is_dir():
        blocker.rmdir()
    blocker.write_text("x")
    key = ctl(cfg, "status")["tables"][0]["key"]
    spawn(procs, "write_players", key, "zone-1", 5)
    with pytest.raises(stated.DaemonError, match="snapshot failed"):
        ctl(cfg, "snapshot")
    ms = scrape(cfg)
    assert metric(ms, "stated_snapshot_failures_total", table="players") == 1
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


def _save_full(tc, dc):
    from stated.persist import saver as persist
    from stated.shm import segment
    from stated.shm.allocator import Allocator
    seg = segment.open(tc.key, table=tc.name)
    a = Allocator(seg, table=tc.name)
    s = persist.Saver(tc, seg, a, dc)
    try:
        return s.save("full").path
    finally:
        s.close()
        a.release_views()
        seg.detach()


def _fill(key, n, base, owner="zone-1"):
    with stated.attach(key=key, owner=owner) as t:
        for i in range(n):
            h = t.alloc(entity=base + i)
            with t.write(h) as p:
                p.name = f"p{base + i}"
                p.hp = base + i


def _image(key):
    with stated.attach(key=key, readonly=True) as ro:
        return {ro.entity(h): ro.read(h).to_dict() for h in ro.handles()}


def test_restore_force_saves_the_live_table_in_its_own_layout(write_config, new_key, tmp_path):
    """The safety snapshot of a live segment whose layout differs from the config's is taken with
    the segment's layout (as live migration does), so it restores to exactly what was there."""
    from stated.persist import saver as persist
    from stated.shm import segment
    key = new_key()
    new_fields = PLAYER_FIELDS + ["mana: i32 = 50"]
    cfg_new = write_config({"players": {"capacity": 50, "key": key, "fields": new_fields}}, name="new.toml")
    cfg_old = write_config({"players": {"capacity": 80, "key": key}}, name="old.toml")
    new, old = config_mod.load(cfg_new), config_mod.load(cfg_old)
    seg = segment.create(key, 50, new.tables["players"].layout, mode=0o660)   # the file to restore: new layout
    seg.detach()
    _fill(key, 10, 100)
    restored_image = _image(key)
    source = _save_full(new.tables["players"], new.daemon)
    segment.destroy(key)
    seg = segment.create(key, 80, old.tables["players"].layout, mode=0o660)   # the live table: old layout
    seg.detach()
    _fill(key, 20, 500)
    live_image = _image(key)

    out = subprocess.run([*STATED, "restore", "--config", str(cfg_new), "--from", str(source), "--force", "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    import json
    safety = json.loads(out.stdout)["safety_snapshot"]
    h = snap.read_file(safety).header
    assert h.layout_hash == old.tables["players"].layout.hash and h.capacity == 80
    assert _image(key) == restored_image
    # the safety snapshot gives back the table that was live, in its own layout
    segment.destroy(key)
    seg, n = persist.restore(old.tables["players"], old.daemon, persist.chain_for(safety))
    seg.detach()
    assert n == 20 and _image(key) == live_image
    segment.destroy(key)
    # and the restored state is the newest chain: a reboot right after `stated restore` keeps it
    chain = snap.chain(new.daemon.state_dir / "players")
    assert chain.full.header.layout_hash == new.tables["players"].layout.hash, chain.warnings
    seg, n = persist.restore(new.tables["players"], new.daemon, chain)
    seg.detach()
    assert _image(key) == restored_image


def test_restore_refuses_before_touching_the_live_table_when_the_file_does_not_fit(write_config, new_key):
    from stated.shm import segment
    key = new_key()
    cfg_a = write_config({"players": {"capacity": 50, "key": key, "fields": PLAYER_FIELDS + ["mana: i32"]}},
                         name="a.toml")
    cfg_b = write_config({"players": {"capacity": 50, "key": key}}, name="b.toml")
    a, _b = config_mod.load(cfg_a), config_mod.load(cfg_b)
    seg = segment.create(key, 50, a.tables["players"].layout, mode=0o660)
    seg.detach()
    _fill(key, 5, 100)
    source = _save_full(a.tables["players"], a.daemon)
    _fill(key, 3, 900, owner="zone-2")
    before = _image(key)
    out = subprocess.run([*STATED, "restore", "--config", str(cfg_b), "--from", str(source), "--force"],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "layout" in out.stderr
    assert _image(key) == before                 # the live table is untouched


def test_fifo_named_like_the_newest_snapshot_does_not_hang_start_up(write_config, notify, procs):
    from stated.shm import segment
    cfg = write_config({"players": {"capacity": 50}})
    c = config_mod.load(cfg)
    tc = c.tables["players"]
    seg = segment.create(tc.key, tc.capacity, tc.layout, mode=0o660)
    seg.detach()
    _fill(tc.key, 7, 100)
    _save_full(tc, c.daemon)
    fifo = c.daemon.state_dir / "players" / snap.file_name("players", 2, "full")
    os.mkfifo(fifo, 0o660)
    ipcrm_everything(tc.key)                                  # the reboot
    d = start(procs, cfg, notify)                             # READY, not a hang
    assert ctl(cfg, "status")["tables"][0]["used"] == 7       # restored from the snapshot before it
    assert ctl(cfg, "snapshot")["tables"]["players"]["records"] == 7     # and it keeps saving
    d.send_signal(signal.SIGTERM)
    assert d.wait(timeout=10) == 0
    log = open(str(cfg) + ".log").read()
    assert fifo.name in log and "not a regular file" in log


def test_table_dir_replaced_by_a_symlink_is_refused_at_start_up(write_config, notify, procs, tmp_path):
    """Nothing is read or pruned through it: that table is not served (its snapshots may be elsewhere)
    and the daemon serves the others."""
    cfg = write_config({"players": {"capacity": 50}, "world": {"capacity": 10}})
    c = config_mod.load(cfg)
    victim = tmp_path / "victim"
    victim.mkdir()
    for seq in range(1, 8):
        (victim / snap.file_name("world", seq, "full")).write_bytes(b"not yours")
    c.daemon.state_dir.mkdir(mode=0o770)
    os.symlink(victim, c.daemon.state_dir / "world")
    d = start(procs, cfg, notify)
    rows = {r["table"]: r for r in ctl(cfg, "status")["tables"]}
    assert "error" not in rows["players"] and "symlink" in rows["world"]["error"], rows
    assert ctl(cfg, "snapshot")["tables"]["players"]["records"] == 0
    d.send_signal(signal.SIGTERM)
    assert d.wait(timeout=10) == 0
    assert sorted(p.name for p in victim.iterdir()) == [snap.file_name("world", s, "full") for s in range(1, 8)]
    assert all(p.read_bytes() == b"not yours" for p in victim.iterdir())
