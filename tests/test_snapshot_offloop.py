"""A full snapshot of a big table never stalls the daemon: /metrics, the control socket and the
systemd watchdog answer within 100 ms throughout (issue 10). A real daemon, a real table, real scrapes."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import threading
import time
import urllib.request

import pytest
from helpers import STATED, DaemonProc

import stated
from stated.daemon import control
from stated.format import config as config_mod
from stated.shm import segment

LIMIT = 0.100          # seconds: the most any answer may take while the snapshot runs
POLL = 0.010           # seconds between two requests of one poller


class Poller(threading.Thread):
    """Calls `ask` every POLL seconds until stopped; keeps (start, latency) of each answer, and the errors."""

    def __init__(self, ask):
        super().__init__(daemon=True)
        self.ask, self.samples, self.errors = ask, [], []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                self.ask()
            except Exception as e:  # noqa: BLE001 - reported by the test
                self.errors.append(repr(e))
            self.samples.append((t0, time.monotonic() - t0))
            self.stop.wait(POLL)


class Watchdog(threading.Thread):
    """The systemd end of NOTIFY_SOCKET: the arrival time of every WATCHDOG=1."""

    def __init__(self, path: str):
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.pings: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                m = self.sock.recv(4096)
            except TimeoutError:
                continue
            if b"WATCHDOG=1" in m.split(b"\n"):
                self.pings.append(time.monotonic())
        self.sock.close()


def _fill(key: int, n: int) -> None:
    with stated.attach(key=key, owner="filler") as t:
        for i in range(n):
            h = t.alloc(entity=1_000_000 + i)
            if i % 64 == 0:
                t.set(h, "hp", i)


def _check_daemon_answers_during_full_snapshot(write_config, procs, tmp_path, records: int) -> None:
    cfg = write_config({"players": {"capacity": records}},
                       daemon={"snapshot_interval": 3600, "repair_interval": 1.0})
    c = config_mod.load(cfg)
    key = c.tables["players"].key
    wd = Watchdog(str(tmp_path / "notify.sock"))
    wd.start()
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify.sock"), WATCHDOG_USEC="40000")   # every 20 ms
    d = DaemonProc(procs, cfg, env=env)
    pollers: list[Poller] = []
    try:
        d.wait_for(" ready")
        _fill(key, records)
        port = control.request(c.daemon.control_socket, "status")["daemon"]["metrics_port"]
        url = f"http://127.0.0.1:{port}/metrics"
        pollers = [Poller(lambda: urllib.request.urlopen(url, timeout=5).read()),
                   Poller(lambda: control.request(c.daemon.control_socket, "ping", timeout=5))]
        for p in pollers:
            p.start()
        time.sleep(0.3)
        cli = subprocess.run([*STATED, "snapshot", "--config", str(cfg), "--json"], capture_output=True,
                             text=True, timeout=120)
        done = time.monotonic()
        time.sleep(0.1)
    finally:
        for p in pollers:
            p.stop.set()
        for p in pollers:
            p.join(timeout=10)
        wd.stop.set()
        wd.join(timeout=5)
    assert cli.returncode == 0, cli.stderr
    saved = json.loads(cli.stdout)["tables"]["players"]
    assert saved["kind"] == "full" and saved["records"] == records, saved
    # the save ran inside [start, done] (done: after the CLI printed its reply and exited); what counts is
    # every answer whose request overlapped that window, with a margin for the CLI's own round trip
    start, end = done - saved["seconds"] - 0.1, done
    for p, what in zip(pollers, ("/metrics", "control ping")):
        assert not p.errors, (what, p.errors[:3])
        during = [lat for t0, lat in p.samples if t0 <= end and t0 + lat >= start]
        worst = max(during)
        print(f"{records} records, full snapshot in {saved['seconds']:.2f}s: {what} answered {len(during)} "
              f"requests during it, the slowest in {worst * 1000:.1f} ms")
        assert worst < LIMIT, f"{what}: an answer took {worst * 1000:.0f} ms during a {saved['seconds']:.2f}s save"
        assert len(during) >= max(3, int(saved["seconds"] / (LIMIT + POLL)) // 2), (what, saved, len(during))
    pings = [t for t in wd.pings if start <= t <= end + 0.1]
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert len(pings) >= 3, (wd.pings[-5:], start, done)
    print(f"watchdog: {len(pings)} pings during the save, the longest gap {max(gaps) * 1000:.1f} ms")
    assert max(gaps) < 0.020 + LIMIT, f"watchdog silent for {max(gaps) * 1000:.0f} ms during the save"
    assert d.stop() == 0
    assert any("full snapshot" in line and f"{records} records" in line for line in d.log), "".join(d.log[-20:])
    segment.destroy(key)


def test_daemon_answers_within_100ms_during_a_full_snapshot(write_config, procs, tmp_path):
    _check_daemon_answers_during_full_snapshot(write_config, procs, tmp_path, 200_000)


@pytest.mark.slow
def test_daemon_answers_within_100ms_during_a_full_snapshot_of_1m_records(write_config, procs, tmp_path):
    _check_daemon_answers_during_full_snapshot(write_config, procs, tmp_path, 1_000_000)


# ---- one save at a time per table; SIGTERM's and the reaper's saves complete; shutdown stays bounded -----
def _newest_records(state_dir, layout, field: str) -> dict[int, int]:
    """slot -> `field` of each allocated slot as the newest chain has it."""
    from stated.persist import snapshot as snap
    off, size = layout[field].offset, layout[field].size
    out: dict[int, int] = {}
    chain = snap.chain(state_dir / "players")
    for f in chain.files:
        for c in f.chunks:
            for i in range(c.n):
                rec = c.record(i)
                out[c.slots[i]] = int.from_bytes(rec[off:off + size], "little", signed=True)
    return out


def test_snapshots_asked_for_together_are_taken_one_after_the_other(write_config, procs):
    """Three `stated snapshot` at once: three valid full files with consecutive seqs (two saves of one
    table at a time would race on the saver's sequence, its dirty marks and its files)."""
    from stated.persist import snapshot as snap
    cfg = write_config({"players": {"capacity": 50_000}}, daemon={"snapshot_interval": 3600})
    c = config_mod.load(cfg)
    d = DaemonProc(procs, cfg)
    d.wait_for(" ready")
    _fill(c.tables["players"].key, 50_000)
    clis = [subprocess.Popen([*STATED, "snapshot", "--config", str(cfg), "--json"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(3)]
    procs.extend(clis)
    outs = [p.communicate(timeout=120) for p in clis]
    assert all(p.returncode == 0 for p in clis), [e for _o, e in outs]
    paths = sorted(json.loads(o)["tables"]["players"]["path"] for o, _e in outs)
    seqs = [snap.parse_name(os.path.basename(p))[1] for p in paths]
    assert seqs == list(range(seqs[0], seqs[0] + 3)), paths
    for p in paths:
        f = snap.read_file(pathlib.Path(p))
        assert f.header.kind == "full" and f.records == 50_000
    assert d.stop() == 0


def test_sigterm_during_a_save_waits_for_it_and_saves_once_more(write_config, procs):
    """SIGTERM while `stated snapshot` saves a big table: the running save completes (its requester gets
    its answer), then the final save runs, then the daemon exits 0; a change made after SIGTERM was sent
    but before the final save is in the newest chain."""
    cfg = write_config({"players": {"capacity": 200_001}}, daemon={"snapshot_interval": 3600})
    c = config_mod.load(cfg)
    key = c.tables["players"].key
    d = DaemonProc(procs, cfg)
    d.wait_for(" ready")
    _fill(key, 200_000)
    with stated.attach(key=key, owner="late") as t:
        h = t.alloc(entity=7)
        t.set(h, "hp", 1)
        tdir = c.daemon.state_dir / "players"
        cli = subprocess.Popen([*STATED, "snapshot", "--config", str(cfg), "--json"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        procs.append(cli)
        deadline = time.monotonic() + 30
        while not any(n.startswith(".") and n.endswith(".tmp") for n in os.listdir(tdir)):    # the save is writing
            assert time.monotonic() < deadline and cli.poll() is None, "the save was never seen running"
            time.sleep(0.002)
        n_logged = len(d.log)
        d.p.send_signal(signal.SIGTERM)
        t.set(h, "hp", 4242)          # the final save (after the running one) must have it
        out, err = cli.communicate(timeout=120)
        assert cli.returncode == 0, err
        assert d.p.wait(timeout=60) == 0
    saves = [ln for ln in d.log[n_logged - 5:] if "snapshot players." in ln]
    assert len(saves) >= 2, "".join(d.log[-20:])          # the requested full, then the final save
    assert any("stopped; segments left in place" in ln for ln in d.log)
    assert _newest_records(c.daemon.state_dir, c.tables["players"].layout, "hp")[h.slot] == 4242


def test_shutdown_does_not_wait_forever_for_a_stuck_save(write_config, caplog):
    """A save that never returns (an fsync on a dead disk, simulated by a saver that blocks): the final
    snapshot gives up after final_save_timeout, and the stuck table's memory is not detached under it."""
    import asyncio

    from stated.daemon.lifecycle import Daemon
    cfg = write_config({"players": {"capacity": 100}})
    dmn = Daemon(config_mod.load(cfg))
    dmn.startup()
    ts = dmn.tables["players"]
    real = ts.saver
    gate = threading.Event()

    class HungDisk:
        def save(self, kind=None):
            gate.wait(30)
            return real.save(kind)

    ts.saver = HungDisk()
    dmn.final_save_timeout = 0.3
    loop = asyncio.new_event_loop()
    try:
        t0 = time.monotonic()
        loop.run_until_complete(dmn._final_snapshot())
        assert time.monotonic() - t0 < 2.0
        assert dmn.saves.running("players")
        assert any("final snapshot did not finish within 0.3s" in m and "players" in m for m in caplog.messages)
        alloc = ts.alloc
        dmn._detach_all()                               # skips the table whose save still runs
        assert alloc.used() == 0                        # its views are still there to be read
    finally:
        gate.set()
        deadline = time.monotonic() + 10
        while dmn.saves.running("players") and time.monotonic() < deadline:
            loop.run_until_complete(asyncio.sleep(0.01))
        loop.close()
        dmn.saves.shutdown()
        real.close()
        ts.alloc.release_views()
        ts.seg.detach()
        dmn._unlock()
        segment.destroy(config_mod.load(cfg).tables["players"].key)
