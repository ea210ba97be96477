"""`stated run` as a real process: creates, adopts after SIGKILL, refuses foreign segments."""
import subprocess

import pytest
import sysv_ipc
from helpers import STATED, DaemonProc, by_table, kill9, spawn, stated_status

import stated


def test_run_creates_then_adopts_after_sigkill(write_config, procs):
    cfg = write_config({"players": {"capacity": 300}, "world": {"capacity": 4, "fields": ["tick: u64"]}})
    d = DaemonProc(procs, cfg)
    d.wait_for(" ready", timeout=10)
    rc, st = stated_status(cfg)
    assert rc == 0
    players = st["tables"][0]
    shmid, key = players["shmid"], players["key"]
    assert players["capacity"] == 300 and players["used"] == 0 and players["mode"] == "0660"

    w = spawn(procs, "write_players", key, "zone-1", 100)
    kill9(w)
    kill9(d.p)                                 # the daemon dies too
    d2 = DaemonProc(procs, cfg)
    d2.wait_for(" ready", timeout=10)
    assert any("adopted" in ln for ln in d2.log)
    rc, st = stated_status(cfg)
    assert st["tables"][0]["shmid"] == shmid and st["tables"][0]["used"] == 100
    with stated.attach("players", owner="zone-1", config=str(cfg)) as t:
        hs = t.owned()
        assert len(hs) == 100
        assert sorted(t.read(h).name for h in hs) == sorted(f"player-{i}" for i in range(100))
    assert d2.stop(timeout=5) == 0
    # SIGTERM leaves the segments in place
    assert sysv_ipc.SharedMemory(key).id == shmid
    out = subprocess.run([*STATED, "destroy", "--config", str(cfg), "--yes"], capture_output=True, text=True)
    assert out.returncode == 0 and "removed" in out.stdout
    with pytest.raises(sysv_ipc.ExistentialError):
        sysv_ipc.SharedMemory(key)


def test_run_refuses_foreign_segment_and_serves_the_rest(write_config, new_key, procs):
    key = new_key()
    shm = sysv_ipc.SharedMemory(key, sysv_ipc.IPC_CREX, 0o600, 8192)
    shm.write(b"somebody else's")
    shm.detach()
    cfg = write_config({"players": {"capacity": 10, "key": key}, "world": {"capacity": 4, "fields": ["tick: u64"]}})
    d = DaemonProc(procs, cfg)
    d.wait_for(" ready", timeout=10)
    lines = "".join(d.log)
    assert "another program" in lines and f"{key:#010x}" in lines
    rc, st = stated_status(cfg)
    rows = by_table(st)
    assert "not served" in rows["players"]["error"] and rows["world"]["capacity"] == 4
    assert sysv_ipc.SharedMemory(key).read(15) == b"somebody else's"
    assert d.stop(timeout=10) == 0


def test_status_and_destroy_cli(write_config):
    cfg = write_config({"players": {"capacity": 10}})
    rc, st = stated_status(cfg)
    assert rc == 1 and "SegmentNotFound" in st["tables"][0]["error"]
    out = subprocess.run([*STATED, "destroy", "--config", str(cfg)], capture_output=True, text=True)
    assert out.returncode == 2 and "--yes" in out.stderr
    out = subprocess.run([*STATED, "status", "--config", "/nonexistent.toml"], capture_output=True, text=True)
    assert out.returncode == 1 and "/nonexistent.toml" in out.stderr


def test_run_reuses_its_own_leftover_semaphore(write_config, new_key, procs):
    key = new_key()
    sem = sysv_ipc.Semaphore(key, sysv_ipc.IPC_CREX, 0o600, 7)   # ours (root's), segment gone
    cfg = write_config({"players": {"capacity": 10, "key": key}})
    d = DaemonProc(procs, cfg)
    d.wait_for(" ready", timeout=10)
    lines = "".join(d.log)
    assert "reusing the semaphore" in lines
    assert sem.value == 0                      # stale wake-ups dropped (the lock is a word in the segment)
    with stated.attach("players", owner="w", config=str(cfg)) as t:
        t.alloc()
    assert d.stop(timeout=10) == 0


