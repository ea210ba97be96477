"""The daemon as a service, end to end: notify socket, metrics scrape, reload, SIGTERM, reaper, ipcrm."""
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest
from helpers import STATED, ctl, fork_child, kill9, metric, scrape, spawn, start, tagged_churn

import stated
from stated.daemon import control
from stated.format import segment as fmt


def test_end_to_end_service(write_config, notify, procs, tmp_path):
    cfg = write_config({"players": {"capacity": 500}}, daemon={"repair_interval": 0.2, "reap_interval": 0.2})
    d = start(procs, cfg, notify, watchdog_usec=400_000)
    ctl(cfg, "ping")
    notify.wait_for("WATCHDOG=1")
    key = ctl(cfg, "status")["tables"][0]["key"]
    w1 = spawn(procs, "write_players", key, "zone-1", 120)
    w2 = spawn(procs, "write_players_offset", key, "zone-2", 30)
    with stated.attach(key=key, owner="zone-3") as t:
        hs = [t.alloc() for _ in range(10)]
        for h in hs[:4]:
            t.free(h)
        with pytest.raises(stated.DuplicateEntity):
            t.alloc(entity=1000)
        time.sleep(0.5)       # a repair pass refreshes the dirty count
        ms = scrape(cfg)
    assert metric(ms, "stated_capacity_slots", table="players") == 500
    assert metric(ms, "stated_allocations_total", table="players") == 160
    assert metric(ms, "stated_frees_total", table="players") == 4
    assert metric(ms, "stated_slots", table="players", state="allocated") == 156
    assert metric(ms, "stated_slots", table="players", state="free") == 344
    assert metric(ms, "stated_alloc_failures_total", table="players", reason="duplicate") == 1
    assert metric(ms, "stated_owners", table="players", state="alive") == 3
    assert metric(ms, "stated_attached_processes", table="players") >= 3
    assert metric(ms, "stated_dirty_slots", table="players") == 160     # 156 written + 4 freed (deltas record frees)
    assert metric(ms, "stated_build_info", version=stated.__version__, format_version=str(fmt.FORMAT_VERSION)) == 1
    assert ms[("stated_housekeeping_duration_seconds_count", (("pass", "repair"),))] >= 1
    if shutil.which("promtool"):
        r = subprocess.run(["promtool", "check", "metrics"], input=ms["_text"], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr

    # SIGHUP with a broken config: the daemon keeps running on the old one
    good = cfg.read_text()
    cfg.write_text(good + "\n[tables.broken\n")
    d.send_signal(signal.SIGHUP)
    notify.wait_for("RELOADING=1")
    notify.wait_for("READY=1")
    assert d.poll() is None
    assert metric(scrape(cfg), "stated_allocations_total", table="players") == 160
    with pytest.raises(stated.DaemonError, match="invalid"):
        ctl(cfg, "reload")
    cfg.write_text(good)
    assert ctl(cfg, "reload")["tables"] == ["players"]
    out = subprocess.run([*STATED, "reload", "--config", str(cfg)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr

    # SIGTERM: exit 0 within 5 s, STOPPING=1, segments still there
    t0 = time.monotonic()
    d.send_signal(signal.SIGTERM)
    notify.wait_for("STOPPING=1")
    assert d.wait(timeout=5) == 0 and time.monotonic() - t0 < 5
    out = subprocess.run([*STATED, "status", "--config", str(cfg), "--json"], capture_output=True, text=True)
    assert out.returncode == 0 and '"used": 156' in out.stdout and '"daemon": null' in out.stdout

    # start again: adopts, counters continue
    start(procs, cfg, notify)
    ms = scrape(cfg)
    assert metric(ms, "stated_allocations_total", table="players") == 160
    assert metric(ms, "stated_slots", table="players", state="allocated") == 150
    assert metric(ms, "stated_slots", table="players", state="orphaned") == 6     # zone-3 detached
    for w in (w1, w2):
        kill9(w)


def test_dead_owner_release_after_grace(write_config, notify, procs):
    cfg = write_config({"players": {"capacity": 100, "dead_owner": "release", "dead_owner_grace": 0.5}},
                       daemon={"reap_interval": 0.1})
    start(procs, cfg, notify)
    key = ctl(cfg, "status")["tables"][0]["key"]
    w = spawn(procs, "write_players", key, "zone-7", 25)
    kill9(w)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 10:
        ms = scrape(cfg)
        if metric(ms, "stated_reaped_slots_total", table="players") == 25:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("slots of the dead owner were not released")
    assert time.monotonic() - t0 >= 0.4          # not before the grace period
    assert metric(ms, "stated_slots", table="players", state="free") == 100
    assert metric(ms, "stated_frees_total", table="players") == 25
    assert metric(ms, "stated_owners", table="players", state="dead") == 0
    with stated.attach(key=key, owner="check") as t:
        assert t.lookup(1000) is None and t.verify() == []


def test_dead_owner_keep_then_restart_takes_all_back(write_config, notify, procs):
    cfg = write_config({"players": {"capacity": 100, "dead_owner": "keep", "dead_owner_grace": 0}},
                       daemon={"reap_interval": 0.1})
    start(procs, cfg, notify)
    key = ctl(cfg, "status")["tables"][0]["key"]
    w = spawn(procs, "write_players", key, "zone-8", 25)
    kill9(w)
    time.sleep(0.5)
    ms = scrape(cfg)
    assert metric(ms, "stated_slots", table="players", state="orphaned") == 25
    assert metric(ms, "stated_owners", table="players", state="dead") == 1
    assert metric(ms, "stated_reaped_slots_total", table="players") == 0
    with stated.attach(key=key, owner="zone-8") as t:
        assert len(t.owned()) == 25
        assert sorted(t.read(h).name for h in t.owned()) == sorted(f"player-{i}" for i in range(25))
        ms = scrape(cfg)
        assert metric(ms, "stated_slots", table="players", state="orphaned") == 0


def test_semaphore_removed_while_workers_run(write_config, notify, procs):
    import sysv_ipc
    cfg = write_config({"players": {"capacity": 32}}, daemon={"repair_interval": 0.1})
    start(procs, cfg, notify)
    key = ctl(cfg, "status")["tables"][0]["key"]
    pids = [fork_child(tagged_churn, key, f"w{i}", 20000, i) for i in range(3)]
    procs.extend(pids)
    time.sleep(0.3)
    semid = sysv_ipc.Semaphore(key).id
    subprocess.run(["ipcrm", "-s", str(semid)], check=True)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 5:
        try:
            if sysv_ipc.Semaphore(key).id != semid:
                break
        except sysv_ipc.ExistentialError:
            pass
        time.sleep(0.02)
    else:
        raise AssertionError("daemon did not recreate the semaphore")
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        procs.remove(pid)
        assert os.waitstatus_to_exitcode(status) == 0, "a slot was handed out twice, or a worker failed"
    with stated.attach(key=key, owner="check") as t:
        assert t.verify() == [] and len(t) == 0


def test_malformed_control_frames_never_crash_the_daemon(write_config, notify, procs):
    from stated.format import config as config_mod
    cfg = write_config({"players": {"capacity": 10}})
    d = start(procs, cfg, notify)
    path = str(config_mod.load(cfg).daemon.control_socket)
    assert os.stat(path).st_mode & 0o777 == 0o660
    for frame in (b"\x00\x00\x00\x03abc", b"\xff\xff\xff\xff", b"\x00\x00\x00\x01\xc1",
                  b"\x00\x00\x00\x02\x91\x01", control.encode({"op": "format-disk"}), control.encode([1, 2]),
                  b"\x00\x00"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(path)
            s.sendall(frame)
            s.shutdown(socket.SHUT_WR)
            s.recv(65536)
    assert d.poll() is None and ctl(cfg, "ping")["pid"] == d.pid


def test_kernel_limits_refused_with_the_sysctl_to_set(write_config, tmp_path):
    from stated.daemon.kernel import KernelLimitError, check
    from stated.daemon.lifecycle import Daemon
    from stated.format import config as config_mod
    cfg = config_mod.load(write_config({"players": {"capacity": 1000}}))
    root = tmp_path / "sys"
    (root / "kernel").mkdir(parents=True)
    (root / "kernel" / "shm_rmid_forced").write_text("1\n")
    with pytest.raises(KernelLimitError, match="kernel.shm_rmid_forced"):
        check(cfg, root)
    (root / "kernel" / "shm_rmid_forced").write_text("0\n")
    (root / "kernel" / "shmmax").write_text("4096\n")
    with pytest.raises(KernelLimitError, match="kernel.shmmax"):
        check(cfg, root)
    (root / "kernel" / "shmmax").write_text("18446744073692774399\n")
    (root / "kernel" / "shmall").write_text("2\n")
    with pytest.raises(KernelLimitError, match="kernel.shmall"):
        check(cfg, root)
    (root / "kernel" / "shmall").write_text("18446744073692774399\n")
    (root / "kernel" / "shmmni").write_text("0\n")
    with pytest.raises(KernelLimitError, match="kernel.shmmni"):
        check(cfg, root)
    (root / "kernel" / "shmmni").write_text("4096\n")
    check(cfg, root)
    assert Daemon(config_mod.load(None), sysctl_root=str(root)).sysctl_root == str(root)


def test_tables_larger_than_memory_refused(write_config, tmp_path):
    from stated.daemon.kernel import KernelLimitError, check, segment_size
    from stated.errors import ConfigError
    from stated.format import config as config_mod
    cfg = config_mod.load(write_config({"players": {"capacity": 1000}, "world": {"capacity": 1000}}))
    size = segment_size(cfg.tables["players"])
    root = tmp_path / "sys"
    (root / "kernel").mkdir(parents=True)
    mem = tmp_path / "meminfo"
    mem.write_text(f"MemTotal:       {size // 1024 - 1} kB\nMemFree:        1 kB\n")
    with pytest.raises(KernelLimitError, match="table 'players' needs .* memory") as ei:
        check(cfg, root, meminfo=mem)
    assert isinstance(ei.value, ConfigError)           # a config mistake: `stated run` exits 78
    mem.write_text(f"MemTotal:       {size * 3 // 2 // 1024} kB\n")      # each fits, both do not
    with pytest.raises(KernelLimitError, match="together"):
        check(cfg, root, meminfo=mem)
    mem.write_text(f"MemTotal:       {size * 3 // 1024} kB\n")
    check(cfg, root, meminfo=mem)
    mem.write_text("garbage\n")                         # unreadable: not a reason to refuse
    check(cfg, root, meminfo=mem)
