"""`stated run` as a real process: creates, adopts after SIGKILL, refuses foreign segments."""
import json
import subprocess
import sys
import time

import pytest
import sysv_ipc
from test_table import kill9, spawn

import stated

STATED = [sys.executable, "-m", "stated"]


def start_daemon(procs, cfg, *extra, env=None):
    p = subprocess.Popen([*STATED, "run", "--config", str(cfg), *extra], stderr=subprocess.PIPE, text=True,
                         env=env)
    procs.append(p)
    return p


def wait_ready(p, timeout=10.0):
    """Read the daemon's log until it says ready; return the lines seen."""
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = p.stderr.readline()
        if not line:
            break
        lines.append(line)
        if " ready" in line:
            return lines
    raise AssertionError("daemon not ready:\n" + "".join(lines))


def status(cfg):
    out = subprocess.run([*STATED, "status", "--config", str(cfg), "--json"], capture_output=True, text=True)
    return out.returncode, json.loads(out.stdout) if out.stdout else None


def test_run_creates_then_adopts_after_sigkill(write_config, procs):
    cfg = write_config({"players": {"capacity": 300}, "world": {"capacity": 4, "fields": ["tick: u64"]}})
    d = start_daemon(procs, cfg)
    wait_ready(d)
    rc, st = status(cfg)
    assert rc == 0
    players = st["tables"][0]
    shmid, key = players["shmid"], players["key"]
    assert players["capacity"] == 300 and players["used"] == 0 and players["mode"] == "0660"

    w = spawn(procs, "write_players", key, "zone-1", 100)
    kill9(w)
    kill9(d)                                   # the daemon dies too
    d2 = start_daemon(procs, cfg)
    lines = wait_ready(d2)
    assert any("adopted" in ln for ln in lines)
    rc, st = status(cfg)
    assert st["tables"][0]["shmid"] == shmid and st["tables"][0]["used"] == 100
    with stated.attach("players", owner="zone-1", config=str(cfg)) as t:
        hs = t.owned()
        assert len(hs) == 100
        assert sorted(t.read(h).name for h in hs) == sorted(f"player-{i}" for i in range(100))
    d2.terminate()
    assert d2.wait(timeout=5) == 0
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
    d = start_daemon(procs, cfg)
    lines = "".join(wait_ready(d))
    assert "another program" in lines and f"{key:#010x}" in lines
    rc, st = status(cfg)
    rows = {r["table"]: r for r in st["tables"]}
    assert "not served" in rows["players"]["error"] and rows["world"]["capacity"] == 4
    assert sysv_ipc.SharedMemory(key).read(15) == b"somebody else's"
    d.terminate()
    assert d.wait(timeout=10) == 0


def test_status_and_destroy_cli(write_config):
    cfg = write_config({"players": {"capacity": 10}})
    rc, st = status(cfg)
    assert rc == 1 and "SegmentNotFound" in st["tables"][0]["error"]
    out = subprocess.run([*STATED, "destroy", "--config", str(cfg)], capture_output=True, text=True)
    assert out.returncode == 2 and "--yes" in out.stderr
    out = subprocess.run([*STATED, "status", "--config", "/nonexistent.toml"], capture_output=True, text=True)
    assert out.returncode == 1 and "/nonexistent.toml" in out.stderr


def test_run_reuses_its_own_leftover_semaphore(write_config, new_key, procs):
    key = new_key()
    sem = sysv_ipc.Semaphore(key, sysv_ipc.IPC_CREX, 0o600, 7)   # ours (root's), segment gone
    cfg = write_config({"players": {"capacity": 10, "key": key}})
    d = start_daemon(procs, cfg)
    lines = "".join(wait_ready(d))
    assert "reusing the semaphore" in lines
    assert sem.value == 1                      # a mutex: clamped back to 1
    with stated.attach("players", owner="w", config=str(cfg)) as t:
        t.alloc()
    d.terminate()
    assert d.wait(timeout=10) == 0


