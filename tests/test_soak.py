"""The soak run (bench/soak.py) and the example zone worker (examples/zone_worker.py).

test_soak_45s runs the fault-injection soak for 45 s as part of the suite: zones and the daemon
SIGKILLed at random moments (zones also inside write sections and allocator operations), every
segment and semaphore removed with ipcrm and restored from snapshots; it must report 0 violations.
The seed is random and printed on failure; STATED_SOAK_SEED=N reruns one. The 10-minute variant is
marked slow (`make test-slow`).
"""
from __future__ import annotations

import ctypes
import faulthandler
import json
import mmap
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import PLAYER_FIELDS, ROOT, fork_lock_holder, index_home, key_in_use, popen_daemon

import stated
from stated.daemon import control
from stated.format import config as config_mod
from stated.format import segment as fmt

SOAK = ROOT / "bench" / "soak.py"
ZONE = ROOT / "examples" / "zone_worker.py"
SUMMARY = re.compile(r"kills=(?P<kw>\d+)/(?P<kd>\d+) \(workers/daemon\) restarts=(?P<restarts>\d+) "
                     r"restores=(?P<restores>\d+) ops=(?P<ops>\d+) .*violations=(?P<violations>\d+)")


def run_soak(tmp_path: Path, key: int, duration: float, timeout: float) -> tuple[dict, str, float]:
    seed = int(os.environ.get("STATED_SOAK_SEED") or random.SystemRandom().randrange(1 << 31))
    cmd = [sys.executable, str(SOAK), "--duration", str(duration), "--key", hex(key), "--seed", str(seed),
           "--dir", str(tmp_path)]
    t0 = time.monotonic()
    # its own session: if it ever hangs, the whole group (soak, daemon, zones) is stopped below
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGTERM)          # soak.py cleans up on SIGTERM
        try:
            out, _ = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, _ = p.communicate()
        pytest.fail(f"soak.py --duration {duration} --seed {seed} did not finish within {timeout}s:\n{out[-6000:]}")
    elapsed = time.monotonic() - t0
    m = SUMMARY.search(out)
    assert m, f"no summary line (seed {seed}, exit {p.returncode}):\n{out[-6000:]}"
    s = {k: int(v) for k, v in m.groupdict().items()}
    assert p.returncode == 0 and s["violations"] == 0, f"seed {seed}: exit {p.returncode}:\n{out[-8000:]}"
    assert not list(tmp_path.glob("stated-soak-*")), "soak.py left its directory behind"
    assert not key_in_use(key), f"soak.py left IPC objects on {key:#x}"
    return s, out, elapsed


def test_soak_45s(tmp_path, new_key):
    s, out, elapsed = run_soak(tmp_path, new_key(), 45, timeout=120)
    assert s["kw"] >= 5 and s["kd"] >= 1 and s["restores"] >= 1 and s["ops"] > 100_000, out
    assert s["restarts"] >= s["kw"], out
    assert elapsed < 80, f"the 45 s soak took {elapsed:.0f}s:\n{out[-3000:]}"


@pytest.mark.slow
def test_soak_10min(tmp_path, new_key):
    s, out, _ = run_soak(tmp_path, new_key(), 600, timeout=720)
    assert s["kw"] >= 100 and s["kd"] >= 20 and s["restores"] >= 5, out


# ---- the zone worker on its own --------------------------------------------------------------------
def _start_daemon(procs, cfg: Path) -> subprocess.Popen:
    with open(str(cfg) + ".log", "a") as log:
        d = popen_daemon(procs, cfg, stderr=log)
    sock = config_mod.load(cfg).daemon.control_socket
    deadline = time.monotonic() + 15
    while not control.ping(sock):
        assert d.poll() is None and time.monotonic() < deadline, Path(str(cfg) + ".log").read_text()
        time.sleep(0.05)
    return d


def _zone(procs, cfg: Path, ack: Path, **kw) -> subprocess.Popen:
    w = subprocess.Popen([sys.executable, str(ZONE), "--config", str(cfg), "--zone", "7", "--players", "60",
                          "--ack-file", str(ack), "--seed", "7"], stdout=subprocess.PIPE, text=True, **kw)
    procs.append(w)
    return w


def _wait_ack(ack: Path, w: subprocess.Popen, cond=lambda d: True, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            d = json.loads(ack.read_text())
        except FileNotFoundError:
            d = {}
        if d.get("pid") == w.pid and cond(d):
            return d
        assert w.poll() is None, f"zone worker exited with {w.returncode}"
        time.sleep(0.02)
    raise AssertionError(f"no acknowledgement from pid {w.pid} matching the condition; last: {d}")


def _held(cfg: Path) -> dict[int, int]:
    """entity -> writes of every allocated record (only zone-7 allocates here)."""
    with stated.attach("players", config=str(cfg)) as t:
        return {t.entity(h): t.get(h, "writes") for h in t.handles()}


def test_zone_worker_resumes_its_players_after_kill_9(write_config, procs, tmp_path):
    cfg = write_config({"players": {"capacity": 200, "fields": PLAYER_FIELDS + ["writes: u64"]}},
                       daemon={"snapshot_interval": 0.5})
    d = _start_daemon(procs, cfg)
    ack = tmp_path / "zone-7.ack.json"
    w = _zone(procs, cfg, ack)
    assert w.stdout.readline().startswith("zone-7: resumed 0 players")
    _wait_ack(ack, w, lambda d: d["tick"] >= 40 and len(d["players"]) == 60)
    time.sleep(random.uniform(0, 0.05))
    w.kill()
    w.wait()
    doc = json.loads(ack.read_text())
    held = _held(cfg)
    acked = {int(e): n for e, n in doc["players"].items()}
    assert all(e // 1_000_000 == 7 for e in held)
    assert set(acked) - set(doc["pending_logout"]) <= set(held), "an acknowledged player is gone"
    assert set(held) <= set(acked) | set(doc["pending_login"]), "a player nobody announced is there"
    assert all(held[e] >= n for e, n in acked.items() if e in held), "a write counter went back"
    assert not set(doc["logged_out"]) & set(held), "a logged-out player is still there"

    w2 = _zone(procs, cfg, ack)
    assert w2.stdout.readline() == f"zone-7: resumed {len(held)} players (pid {w2.pid})\n"
    first = _wait_ack(ack, w2)
    assert first["resumed"] == {"players": len(held), "entity_sum": sum(held), "writes_sum": sum(held.values())}
    _wait_ack(ack, w2, lambda d: d["tick"] >= 20)
    w2.send_signal(signal.SIGTERM)
    assert w2.wait(timeout=10) == 0
    assert w2.stdout.readline().startswith("zone-7: stopped after")
    final = json.loads(ack.read_text())
    assert final["state"] == "stopped" and final["violations"] == 0
    assert not final["pending_login"] and not final["pending_logout"]
    assert _held(cfg) == {int(e): n for e, n in final["players"].items()}
    with stated.attach("players", config=str(cfg)) as t:
        o = next(o for o in t.owners() if o.name == "zone-7")
        assert o.state_name == "detached" and o.slots == len(final["players"]) and t.verify() == []
    d.send_signal(signal.SIGTERM)
    assert d.wait(timeout=10) == 0


# ---- regression tests for bugs the soak run found in stated/ (fixed) ---------------------------------------


def _entity_on_own_index_page(t: stated.Table) -> tuple[int, int, int]:
    """(entity, lo, hi): an entity whose home entry of the entity index lies in [lo, hi), the whole
    pages of the index region (offsets into the segment; no slot, free stack or record byte there)."""
    r = t._seg.header.regions
    end = r.index_offset + r.index_capacity * fmt.INDEX_ENTRY_SIZE
    lo, hi = -(-r.index_offset // fmt.PAGE) * fmt.PAGE, end // fmt.PAGE * fmt.PAGE
    assert hi > lo, "the index region spans no whole page: use a larger capacity"
    ent = next(e for e in range(7, 10**6)
               if lo <= r.index_offset + index_home(e, r.index_capacity) * fmt.INDEX_ENTRY_SIZE < hi)
    return ent, lo, hi


def _die_inside(key: int, op: str) -> int:
    """A child attached as owner 'w' dies inside the core's alloc (after the slot is marked allocated)
    or free (after it is marked free), before the allocator counts the operation: the child maps the
    entity index's pages read-only, so the core's first store into the index (the insert of alloc,
    the delete of free) faults there, holding the lock with its intent mark set. Returns the entity."""
    with stated.attach(key=key) as t:
        ent, lo, hi = _entity_on_own_index_page(t)
    pid = os.fork()
    if pid == 0:
        try:
            faulthandler.disable()                          # die of the fault, quietly
            t = stated.attach(key=key, owner="w")
            h = t.lookup(ent)
            libc = ctypes.CDLL(None, use_errno=True)
            libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
            if libc.mprotect(t._seg.shm.address + lo, hi - lo, mmap.PROT_READ) != 0:
                os._exit(4)
            if op == "alloc":
                t.alloc(entity=ent)
            else:
                t.free(h)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV, os.waitstatus_to_exitcode(status)
    return ent


def test_allocation_counters_agree_with_used_after_a_death_mid_alloc_or_free(make_segment):
    key = make_segment(capacity=1024)
    for op, intent, state in (("alloc", fmt.INTENT_ALLOC, fmt.SLOT_ALLOCATED),
                              ("free", fmt.INTENT_FREE, fmt.SLOT_FREE)):
        with stated.attach(key=key) as t:
            before = t.counters()
        ent = _die_inside(key, op)
        with stated.attach(key=key) as t:
            v = t.views
            slot = v.h32[fmt.W_INTENT_SLOT]
            assert v.h32[fmt.W_INTENT_OP] == intent and v.state[slot] == state, "did not die mid-operation"
            assert t.verify() == []                 # takes the lock: repairs after the dead holder
            c = t.counters()
            assert c["allocations"] - c["frees"] == len(t), (op, c["allocations"], c["frees"], len(t))
            counted = "allocations" if op == "alloc" else "frees"    # the op took effect: counted once
            assert c[counted] == before[counted] + 1, (op, before, c)
            assert (t.lookup(ent) is not None) == (op == "alloc") and t.counters()["lock_repairs"] >= 1


def test_readonly_lookup_never_misses_a_present_entity_under_churn(make_segment):
    key = make_segment(capacity=64)
    with stated.attach(key=key, owner="stable") as t:
        t.alloc(entity=42)
    pid = os.fork()
    if pid == 0:
        try:
            t = stated.attach(key=key, owner="churn")
            end = time.monotonic() + 1.5
            i = 0
            while time.monotonic() < end:
                t.free(t.alloc(entity=1000 + i % 20))
                i += 1
        finally:
            os._exit(0)
    try:
        with stated.attach(key=key, readonly=True) as ro:
            end = time.monotonic() + 1.2
            misses = n = 0
            while time.monotonic() < end:
                n += 1
                misses += ro.lookup(42) is None
    finally:
        os.waitpid(pid, 0)
    assert misses == 0, f"{misses} of {n} readonly lookups of a present entity returned None"


def test_daemon_keeps_working_when_its_notify_socket_is_not_read(write_config, procs, tmp_path):
    import socket
    cfg = write_config({"players": {"capacity": 10}}, daemon={"repair_interval": 0.05})
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))      # bound, never read: a stuck service manager
    try:
        with open(str(cfg) + ".log", "a") as log:
            d = popen_daemon(procs, cfg, stderr=log, env=dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify.sock")))
        path = config_mod.load(cfg).daemon.control_socket
        deadline = time.monotonic() + 15
        while not path.exists():
            assert time.monotonic() < deadline and d.poll() is None
            time.sleep(0.05)
        time.sleep(1.5)                              # > net.unix.max_dgram_qlen STATUS datagrams unread
        assert control.request(path, "ping", timeout=3)["pid"] == d.pid
        d.send_signal(signal.SIGTERM)
        assert d.wait(timeout=10) == 0
    finally:
        sock.close()


def test_a_signal_during_the_lock_wait_does_not_fail_alloc(make_segment):
    key = make_segment(capacity=16)
    holder = fork_lock_holder(key, 1.0)              # holds the allocator lock for 1 s
    waiter = os.fork()
    if waiter == 0:                                  # a worker with a signal handler, waiting for the lock
        code = 1
        try:
            signal.signal(signal.SIGUSR1, lambda *_: None)
            t = stated.attach(key=key, owner="waiter", lock_timeout=5.0)
            t.alloc(entity=1)
            code = 0
        except BaseException as e:  # noqa: BLE001 - report and exit: never return into pytest
            print(f"waiter: {type(e).__module__}.{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        finally:
            os._exit(code)
    try:
        time.sleep(0.3)                              # the waiter is inside semtimedop now
        os.kill(waiter, signal.SIGUSR1)              # a handled signal: EINTR
        time.sleep(0.1)
        os.kill(waiter, signal.SIGSTOP)              # stop + continue: EINTR too (signal(7))
        os.kill(waiter, signal.SIGCONT)
    finally:
        _, status = os.waitpid(waiter, 0)
        os.waitpid(holder, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "alloc() failed when a signal interrupted its lock wait"
