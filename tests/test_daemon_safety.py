"""The daemon under attack and under operator mistakes, as real processes.

- connection floods (as uid nobody on /metrics, as a group member on the control socket) against a
  daemon with a small descriptor limit: live workers keep every slot, the daemon keeps answering,
  idle connections are closed;
- one daemon per config and per state_dir: the loser exits naming the holder and never removes
  the holder's socket;
- config mistakes are refused before anything is created, one line, exit code 78 (EX_CONFIG);
- a table segment removed with `ipcrm -M` is noticed, snapshotted and recreated;
- READY/RELOADING/STOPPING reach a notify socket whose queue is full.
"""
from __future__ import annotations

import collections
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sysv_ipc
from helpers import (
    UNIT,
    NotifySocket,
    ctl,
    fork_child,
    metric,
    metrics_port,
    popen_daemon,
    scrape_port,
    spawn,
    unit_settings,
    wait_child,
)

import stated
from stated.format import config as config_mod

EX_CONFIG = 78


# ---------------------------------------------------------------------------------------- helpers

def _limit_fds(n: int, hard: int | None = None):
    def pre() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n if hard is None else hard))
    return pre


def start_logged(procs, cfg: Path, *, nofile: int | None = None, hard: int | None = None, env=None) -> tuple:
    """Start `stated run`; returns (process, log path). stderr goes to a file: a pipe could fill up."""
    log = Path(f"{cfg}.{len(procs)}.log")
    with open(log, "w") as f:
        p = popen_daemon(procs, cfg, stderr=f, stdout=subprocess.DEVNULL, env=env,
                         preexec_fn=_limit_fds(nofile, hard) if nofile else None)
    return p, log


def wait_log(p, log: Path, pattern: str, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text()
        if re.search(pattern, text):
            return text
        if p.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"no {pattern!r} in the daemon's log (exit code {p.poll()}):\n{log.read_text()}")


def ready(p, log: Path) -> str:
    return wait_log(p, log, r" ready: ")


def _flood_tcp(port: int, seconds: float, hold: int) -> int:
    """Keep up to `hold` idle connections open to the metrics port, opening new ones nonstop."""
    socks: collections.deque = collections.deque()
    end = time.monotonic() + seconds
    opened = 0
    while time.monotonic() < end:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(0.2)
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            s.close()
            continue
        opened += 1
        socks.append(s)
        if len(socks) > hold:
            socks.popleft().close()
    print(f"flooder {os.getpid()}: {opened} connections opened", file=sys.stderr)
    return 0 if opened >= 40 else 7      # 7: the flood never got going (a 64-descriptor daemon holds fewer)


def _closed_by_peer(s: socket.socket) -> bool:
    s.settimeout(0.05)
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


def owners_of(cfg: Path) -> dict:
    return {o["name"]: o for o in ctl(cfg, "status")["tables"][0]["owners"]}


# ------------------------------------------------------------------------ floods and liveness

def test_metrics_flood_as_nobody_never_frees_a_live_workers_slots(write_config, procs):
    """Two uid-nobody processes flood /metrics with idle connections against a daemon limited to 64
    descriptors. The live worker keeps its 25 slots under dead_owner="release" with a short grace,
    the daemon keeps answering its control socket and /metrics, and nothing is logged as died."""
    cfg = write_config({"players": {"capacity": 100, "dead_owner": "release", "dead_owner_grace": 0.3}},
                       daemon={"reap_interval": 0.1, "repair_interval": 0.2, "snapshot_interval": 0.5,
                               "idle_timeout": 1.0})
    d, log = start_logged(procs, cfg, nofile=64)
    ready(d, log)
    key = config_mod.load(cfg).tables["players"].key
    w = spawn(procs, "write_players", key, "zone-1", 25)
    port = metrics_port(cfg)
    assert owners_of(cfg)["zone-1"]["state"] == "attached"

    flooders = [fork_child(_flood_tcp, port, 3.0, 150, as_nobody=True) for _ in range(2)]
    procs.extend(flooders)
    pings = scrapes = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3.0:
        try:
            ctl(cfg, "ping", timeout=2)
            pings += 1
        except (OSError, stated.StatedError):
            pass
        try:
            scrape_port(port, timeout=2)
            scrapes += 1
        except OSError:
            pass
        time.sleep(0.1)
    assert [wait_child(f, procs=procs, timeout=30) for f in flooders] == [0, 0]
    assert pings >= 3 and scrapes >= 1, (pings, scrapes)
    time.sleep(1.5)         # idle timeout, several reap passes, more than the grace period
    assert w.poll() is None
    o = owners_of(cfg)["zone-1"]
    assert (o["state"], o["pid"], o["slots"]) == ("attached", w.pid, 25), o
    ms = scrape_port(port)
    assert metric(ms, "stated_reaped_slots_total", table="players") == 0
    assert metric(ms, "stated_slots", table="players", state="allocated") == 25
    with stated.attach(key=key, readonly=True) as t:
        assert all(t.lookup(1000 + i) is not None for i in range(25))
    text = log.read_text()
    assert "died" not in text and "released" not in text, text
    assert d.poll() is None


def test_idle_control_flood_from_a_group_member(write_config, procs):
    """~200 idle control connections (the socket's own group may connect) against 64 descriptors: the
    daemon still answers `ping`, and idle connections on both listeners are closed after idle_timeout."""
    cfg = write_config({"players": {"capacity": 10}}, daemon={"idle_timeout": 1.0})
    d, log = start_logged(procs, cfg, nofile=64)
    ready(d, log)
    path = str(config_mod.load(cfg).daemon.control_socket)
    port = metrics_port(cfg)
    held = []
    try:
        for _ in range(200):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(2)
            try:
                s.connect(path)
            except OSError:
                s.close()
                continue
            held.append(s)
        for _ in range(5):
            assert ctl(cfg, "ping", timeout=3)["pid"] == d.pid
        for s in held:
            s.close()
        held.clear()
        # a few idle connections, fewer than any cap: closed by the idle timeout, not by eviction
        for _ in range(3):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            held.append(s)
            t = socket.create_connection(("127.0.0.1", port), timeout=2)
            held.append(t)
        time.sleep(0.3)
        assert not any(_closed_by_peer(s) for s in held)
        time.sleep(1.5)
        assert all(_closed_by_peer(s) for s in held)
    finally:
        for s in held:
            s.close()
    assert ctl(cfg, "ping")["pid"] == d.pid and d.poll() is None


def test_soft_descriptor_limit_raised_to_the_hard_one(write_config, procs):
    cfg = write_config({"players": {"capacity": 10}})
    d, log = start_logged(procs, cfg, nofile=64, hard=4096)
    ready(d, log)
    limits = Path(f"/proc/{d.pid}/limits").read_text()
    line = next(ln for ln in limits.splitlines() if ln.startswith("Max open files"))
    assert line.split()[3:5] == ["4096", "4096"], line


# ------------------------------------------------------------------------------- one daemon only

def _two_configs(write_config, new_key, shared_config: bool):
    key = new_key()
    a = write_config({"players": {"capacity": 50, "key": key}}, name="a.toml")
    if shared_config:
        return a, a
    b = write_config({"players": {"capacity": 50, "key": key}}, name="b.toml",
                     daemon={"control_socket": "var/b.sock"})      # same state_dir ("var"), other socket and port
    return a, b


@pytest.mark.parametrize("shared_config", [True, False], ids=["same-config", "same-state-dir"])
def test_second_daemon_refused_and_never_removes_the_first_ones_socket(write_config, new_key, procs,
                                                                      shared_config):
    a, b = _two_configs(write_config, new_key, shared_config)
    d1, log1 = start_logged(procs, a)
    ready(d1, log1)
    for _ in range(3):
        d2, log2 = start_logged(procs, b)
        assert d2.wait(timeout=15) != 0
        err = log2.read_text()
        assert f"pid {d1.pid}" in err, err
        assert ctl(a, "ping")["pid"] == d1.pid
    assert d1.poll() is None


@pytest.mark.parametrize("first", ["a", "b"])
def test_two_daemons_started_together(write_config, new_key, procs, first):
    a, b = _two_configs(write_config, new_key, shared_config=False)
    order = (a, b) if first == "a" else (b, a)
    ps = [start_logged(procs, c) for c in order]
    t0 = time.monotonic()
    while time.monotonic() - t0 < 15 and all(p.poll() is None for p, _ in ps):
        time.sleep(0.05)
    losers = [(p, log, c) for (p, log), c in zip(ps, order) if p.poll() is not None]
    assert len(losers) == 1, [log.read_text() for _, log in ps]
    loser, loser_log, _ = losers[0]
    (winner, winner_log), winner_cfg = next(((p, log), c) for (p, log), c in zip(ps, order) if p is not loser)
    assert loser.returncode != 0
    assert f"pid {winner.pid}" in loser_log.read_text(), loser_log.read_text()
    ready(winner, winner_log)
    assert ctl(winner_cfg, "ping")["pid"] == winner.pid


# ------------------------------------------------------------------------------ config mistakes

def _refused(procs, cfg: Path, key: int, words: str) -> str:
    d, log = start_logged(procs, cfg)
    assert d.wait(timeout=15) == EX_CONFIG, log.read_text()
    err = log.read_text()
    errors = [ln for ln in err.splitlines() if " ERROR " in ln]
    assert len(errors) == 1 and words in errors[0], err
    assert "Traceback" not in err, err
    with pytest.raises(sysv_ipc.ExistentialError):
        sysv_ipc.SharedMemory(key)                      # nothing created
    with pytest.raises(sysv_ipc.ExistentialError):
        sysv_ipc.Semaphore(key)
    return errors[0]


def test_control_socket_on_a_regular_file_refused(write_config, new_key, procs, tmp_path):
    key = new_key()
    (tmp_path / "notes.txt").write_text("precious\n")
    cfg = write_config({"players": {"capacity": 10, "key": key}}, daemon={"control_socket": "notes.txt"})
    line = _refused(procs, cfg, key, "control_socket")
    assert "not a socket" in line
    assert (tmp_path / "notes.txt").read_text() == "precious\n"


@pytest.mark.parametrize("state_dir", ["state", "state/sub"])
def test_state_dir_that_is_a_file_refused(write_config, new_key, procs, tmp_path, state_dir):
    key = new_key()
    (tmp_path / "state").write_text("oops\n")
    cfg = write_config({"players": {"capacity": 10, "key": key}},
                       daemon={"state_dir": state_dir, "control_socket": "run/stated.sock"})
    line = _refused(procs, cfg, key, "state_dir")
    assert "not a directory" in line
    assert (tmp_path / "state").read_text() == "oops\n" and not (tmp_path / "run" / "stated.sock").exists()


def test_table_too_large_for_memory_refused(write_config, new_key, procs):
    key = new_key()
    cfg = write_config({"huge": {"capacity": 1 << 26, "key": key, "fields": ["blob: bytes[4096]"]}})
    line = _refused(procs, cfg, key, "huge")
    assert "memory" in line


def test_missing_group_refused(write_config, new_key, procs):
    key = new_key()
    cfg = write_config({"players": {"capacity": 10, "key": key}}, daemon={"group": "no-such-group-stated"})
    _refused(procs, cfg, key, "no-such-group-stated")


def test_invalid_config_exits_78(write_config, new_key, procs, tmp_path):
    key = new_key()
    cfg = write_config({"players": {"capacity": 10, "key": key}})
    cfg.write_text(cfg.read_text() + "\n[tables.broken\n")
    _refused(procs, cfg, key, "not valid TOML")


def test_exit_codes_match_the_cli():
    from stated.daemon import lifecycle as daemon
    from stated.tools import cli
    assert cli.EXIT_CONFIG == daemon.EXIT_CONFIG == EX_CONFIG
    assert len({cli.EXIT_OK, cli.EXIT_ERROR, cli.EXIT_USAGE, cli.EXIT_NOT_RUNNING, cli.EXIT_CONFIG}) == 5


# ------------------------------------------------------------------------- a removed segment

def test_removed_segment_is_snapshotted_and_recreated(write_config, procs, tmp_path):
    cfg = write_config({"players": {"capacity": 100}}, daemon={"repair_interval": 0.2, "snapshot_interval": 3600})
    d, log = start_logged(procs, cfg)
    ready(d, log)
    key = config_mod.load(cfg).tables["players"].key
    port = metrics_port(cfg)
    w = spawn(procs, "write_players", key, "zone-1", 25)
    ms = scrape_port(port)
    assert metric(ms, "stated_table_up", table="players") == 1
    assert metric(ms, "stated_table_segment_lost_total", table="players") == 0
    old_id = sysv_ipc.SharedMemory(key).id
    snaps = tmp_path / "var" / "players"
    before = set(snaps.iterdir()) if snaps.is_dir() else set()
    subprocess.run(["ipcrm", "-M", hex(key)], check=True)
    text = wait_log(d, log, r"ERROR .*table=players.*removed", timeout=5)
    wait_log(d, log, r"table=players.*recreated", timeout=5)
    new = set(snaps.iterdir()) - before
    assert any("full" in p.name for p in new), (new, text)
    shm = sysv_ipc.SharedMemory(key)
    assert shm.id != old_id
    shm.detach()
    ms = scrape_port(port)
    assert metric(ms, "stated_table_up", table="players") == 1
    assert metric(ms, "stated_table_segment_lost_total", table="players") == 1
    with stated.attach(key=key, owner="zone-9") as t:       # new workers can attach again
        assert all(t.lookup(1000 + i) is not None for i in range(25))
        assert sorted(t.read(t.lookup(1000 + i)).name for i in range(25)) == sorted(f"player-{i}" for i in range(25))
        t.alloc(entity=1)
    # the worker still attached to the removed copy keeps its owner name while it lives
    assert w.poll() is None
    with pytest.raises(stated.OwnerBusy):
        stated.attach(key=key, owner="zone-1")
    assert d.poll() is None


def test_removed_segment_whose_key_is_taken_stays_down(write_config, procs, tmp_path):
    """The key is taken by somebody else's segment right after the removal: the daemon cannot recreate
    the table; it says so, exports stated_table_up 0, saves what it still holds and keeps trying."""
    cfg = write_config({"players": {"capacity": 100}}, daemon={"repair_interval": 0.5, "snapshot_interval": 3600})
    d, log = start_logged(procs, cfg)
    ready(d, log)
    key = config_mod.load(cfg).tables["players"].key
    port = metrics_port(cfg)
    w = spawn(procs, "write_players", key, "zone-1", 25)
    subprocess.run(["ipcrm", "-M", hex(key)], check=True)
    foreign = sysv_ipc.SharedMemory(key, sysv_ipc.IPC_CREX, 0o600, 8192)
    foreign.write(b"somebody else's")
    wait_log(d, log, r"ERROR .*table=players.*removed", timeout=5)
    wait_log(d, log, r"table=players.*cannot recreate", timeout=5)
    ms = scrape_port(port)
    assert metric(ms, "stated_table_up", table="players") == 0
    snaps = tmp_path / "var" / "players"
    assert any("full" in p.name for p in snaps.iterdir())
    assert foreign.read(15) == b"somebody else's"
    foreign.detach()
    foreign.remove()
    wait_log(d, log, r"table=players.*recreated", timeout=5)
    assert metric(scrape_port(port), "stated_table_up", table="players") == 1
    with stated.attach(key=key, owner="zone-9") as t:
        assert all(t.lookup(1000 + i) is not None for i in range(25))
    assert w.poll() is None and d.poll() is None


# ------------------------------------------------------------------------------ systemd notify

class FullNotifySocket(NotifySocket):
    """systemd's notify socket, with its receive queue filled up by other senders."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.fillers: list[socket.socket] = []

    def fill(self) -> None:
        for _ in range(10_000):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            s.setblocking(False)
            try:
                s.sendto(b"X=1", self.path)
            except BlockingIOError:
                s.close()
                return                 # even a fresh socket cannot send: the queue is full
            self.fillers.append(s)
            try:
                while True:
                    s.sendto(b"X=1", self.path)
            except BlockingIOError:
                pass
        raise AssertionError("could not fill the notify socket's queue")

    def drain_until(self, line: str, timeout: float = 10.0) -> list[str]:
        seen = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                m = self.sock.recv(4096).decode()
            except TimeoutError:
                break
            if m != "X=1":
                seen.append(m)
            if line in m.split("\n"):
                return seen
        raise AssertionError(f"no {line!r} reached the notify socket; got {seen}")

    def close(self) -> None:
        for s in self.fillers:
            s.close()
        self.sock.close()


def test_ready_reloading_stopping_survive_a_full_notify_queue(write_config, procs, tmp_path):
    cfg = write_config({"players": {"capacity": 10}})
    n = FullNotifySocket(tmp_path / "notify.sock")
    try:
        n.fill()
        d, log = start_logged(procs, cfg, env=dict(os.environ, NOTIFY_SOCKET=n.path))
        ready(d, log)
        time.sleep(0.5)                   # the daemon has tried to send READY=1 into the full queue
        n.drain_until("READY=1")
        n.fill()
        d.send_signal(signal.SIGHUP)
        time.sleep(0.5)                   # RELOADING=1 waits for room in the queue
        n.drain_until("RELOADING=1")
        wait_log(d, log, r"reloaded")
        n.fill()
        d.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        n.drain_until("STOPPING=1")
        assert d.wait(timeout=15) == 0
    finally:
        n.close()


def test_unit_descriptor_limit_fits_and_config_errors_do_not_restart():
    from stated.daemon.conns import fit_limit
    from stated.format.config import DaemonConfig
    settings = unit_settings(UNIT)
    nofile = int(settings["LimitNOFILE"][-1].split(":")[-1])
    default = DaemonConfig(state_dir=Path("var")).max_connections
    assert fit_limit(default, nofile) == default          # the defaults fit without clamping
    assert fit_limit(default, 1024) == default            # and so they would in systemd's default soft limit
    assert "78" in settings["RestartPreventExitStatus"][-1].split()
