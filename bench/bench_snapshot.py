"""Snapshot benchmark: full saves against a plain copy of the same segment, a 1% delta, restore, and how
long a daemon takes to answer while it saves.

    .venv/bin/python bench/bench_snapshot.py [--sizes 100000 1000000] [--repeats 5] [--no-daemon] [--json PATH]

For each size N (records of the default players layout, every slot allocated):

- plain vs full, in this process: `bytes(segment) -> write -> fsync` of the whole segment into the
  snapshot directory, then `Saver.save("full")`, alternately, --repeats times each. The ratio is the
  median of the per-pair ratios of their rates over the same segment bytes (plain seconds / full
  seconds): both ran within a second of each other, so the machine's drift cancels out.
- a 1% delta, then a restore of full + delta into a fresh segment.
- a daemon (`stated run`, a real subprocess) with a table of N records: `stated snapshot` while two
  threads request /metrics and a control-socket ping every 10 ms; the slowest answer of each during
  the save is reported, with the longest pause between the daemon's watchdog notifications.

Creates its own tables on free keys in a temp state_dir, removes both at the end (SIGTERM/SIGHUP too).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sysv_ipc
from _common import ROOT, exit_on_signals

import stated
from stated.daemon import control
from stated.format import config as config_mod
from stated.persist import saver as persist
from stated.persist import snapshot as snap
from stated.shm import segment
from stated.shm.allocator import Allocator
from stated.shm.table import Table

CONFIG = ROOT / "config" / "stated.toml"
POLL = 0.010


def free_key() -> int:
    base = 0x5F400000 | ((os.getpid() & 0xFFF) << 8)
    for k in range(base, base + 256):
        try:
            sysv_ipc.SharedMemory(k).detach()
        except sysv_ipc.ExistentialError:
            return k
    raise SystemExit("no free key")


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def plain_copy(seg: segment.Segment, d: Path) -> float:
    """Seconds for bytes(segment) -> write -> fsync of the whole segment into directory `d`."""
    t0 = time.perf_counter()
    data = bytes(seg.buf)
    fd = os.open(d / ".plain-copy", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        done = 0
        while done < len(data):
            done += os.write(fd, view[done:done + (1 << 24)])
        os.fsync(fd)
    finally:
        os.close(fd)
    took = time.perf_counter() - t0
    os.unlink(d / ".plain-copy")
    return took


def run(n: int, tmp: Path, repeats: int) -> dict:
    players = config_mod.load(str(CONFIG)).tables["players"]
    key = free_key()
    tc = config_mod.TableConfig("players", key, n, players.layout)
    dc = config_mod.DaemonConfig(state_dir=tmp / f"s{n}", snapshots_keep=repeats + 1, full_every=100)
    out: dict = {"records": n}
    seg = segment.create(key, n, tc.layout, mode=0o600)
    try:
        t = Table(segment.open(key), name="players", owner="bench")
        t0 = time.perf_counter()
        hs = [t.alloc(entity=(i * 2654435761) % (1 << 48) + 1) for i in range(n)]
        out["fill_s"] = time.perf_counter() - t0
        alloc = Allocator(seg, table="players")
        saver = persist.Saver(tc, seg, alloc, dc)
        seg_bytes = seg.header.regions.total_size
        plains, fulls, ratios = [], [], []
        rss0 = rss_mb()
        rss_full = rss0
        for _ in range(repeats):
            p = plain_copy(seg, saver.dir)
            r = saver.save("full")
            rss_full = max(rss_full, rss_mb())
            plains.append(p)
            fulls.append(r.seconds)
            ratios.append(p / r.seconds)
        out.update(segment_bytes=seg_bytes, full_bytes=r.bytes, plain_s=statistics.median(plains),
                   full_s=statistics.median(fulls), ratio=statistics.median(ratios), ratios=ratios,
                   plain_mb_s=seg_bytes / statistics.median(plains) / 1e6,
                   full_mb_s=seg_bytes / statistics.median(fulls) / 1e6,
                   full_file_mb_s=r.bytes / statistics.median(fulls) / 1e6, rss_during_full_mb=rss_full)
        rnd = random.Random(1)
        for h in rnd.sample(hs, n // 100):
            t.set(h, "hp", 7)
        d = saver.save("delta")
        out.update(delta_records=d.records, delta_s=d.seconds, delta_bytes=d.bytes,
                   delta_vs_full=d.seconds / out["full_s"])
        chain = snap.chain(saver.dir)
        saver.close()
        alloc.release_views()
        t.close()
        seg.detach()
        segment.destroy(key)
        t0 = time.perf_counter()
        seg2, restored = persist.restore(tc, dc, chain)
        took = time.perf_counter() - t0
        out.update(restore_s=took, restored=restored, rss_after_restore_mb=rss_mb(),
                   restore_mb_s=(r.bytes + d.bytes) / took / 1e6)
        seg2.detach()
    finally:
        segment.destroy(key)
    return out


# ---- a daemon saving while it is asked things -------------------------------------------------------
class Poller(threading.Thread):
    def __init__(self, ask):
        super().__init__(daemon=True)
        self.ask, self.samples, self.errors = ask, [], []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                self.ask()
            except Exception as e:  # noqa: BLE001 - counted and printed
                self.errors.append(repr(e))
            self.samples.append((t0, time.monotonic() - t0))
            self.stop.wait(POLL)


class Watchdog(threading.Thread):
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


def daemon_latency(n: int, tmp: Path) -> dict:
    d = tmp / f"daemon{n}"
    d.mkdir()
    key = free_key()
    fields = tomllib.loads(CONFIG.read_text())["tables"]["players"]["fields"]
    cfg = d / "stated.toml"
    cfg.write_text("\n".join([
        "[daemon]", f'state_dir = "{d / "var"}"', f'control_socket = "{d / "stated.sock"}"',
        'metrics_address = "127.0.0.1:0"', "snapshot_interval = 3600", "repair_interval = 5",
        "[tables.players]", f"key = {key}", f"capacity = {n}", f"fields = {json.dumps(fields)}", ""]))
    sock = d / "stated.sock"
    wd = Watchdog(str(d / "notify.sock"))
    wd.start()
    env = dict(os.environ, NOTIFY_SOCKET=str(d / "notify.sock"), WATCHDOG_USEC="40000")
    daemon = subprocess.Popen([sys.executable, "-m", "stated", "run", "--config", str(cfg)], env=env,
                              stderr=open(d / "daemon.log", "w"), cwd=ROOT)
    pollers: list[Poller] = []
    try:
        deadline = time.monotonic() + 30
        while not control.ping(sock):
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the daemon did not start:\n{(d / 'daemon.log').read_text()}")
            time.sleep(0.05)
        with stated.attach(key=key, owner="bench") as t:
            for i in range(n):
                t.alloc(entity=(i * 2654435761) % (1 << 48) + 1)
        port = control.request(sock, "status")["daemon"]["metrics_port"]
        url = f"http://127.0.0.1:{port}/metrics"
        pollers = [Poller(lambda: urllib.request.urlopen(url, timeout=10).read()),
                   Poller(lambda: control.request(sock, "ping", timeout=10))]
        for p in pollers:
            p.start()
        time.sleep(0.3)
        cli = subprocess.run([sys.executable, "-m", "stated", "snapshot", "--config", str(cfg), "--json",
                              "--timeout", "300"], capture_output=True, text=True, cwd=ROOT)
        done = time.monotonic()
        time.sleep(0.1)
    finally:
        for p in pollers:
            p.stop.set()
        for p in pollers:
            p.join(timeout=10)
        wd.stop.set()
        wd.join(timeout=5)
        daemon.terminate()
        try:
            daemon.wait(timeout=120)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        segment.destroy(key)
    if cli.returncode != 0:
        raise SystemExit(f"stated snapshot failed: {cli.stderr}")
    saved = json.loads(cli.stdout)["tables"]["players"]
    start, end = done - saved["seconds"] - 0.1, done          # the save, with the CLI's round trip
    out = {"daemon_full_s": saved["seconds"]}
    for p, name in zip(pollers, ("metrics", "ping")):
        during = [lat for t0, lat in p.samples if t0 <= end and t0 + lat >= start]
        out[f"{name}_requests"] = len(during)
        out[f"{name}_max_ms"] = max(during) * 1000 if during else None
        out[f"{name}_errors"] = len(p.errors)
    pings = [t for t in wd.pings if start <= t <= end + 0.1]
    out["watchdog_max_gap_ms"] = max((b - a for a, b in zip(pings, pings[1:])), default=0) * 1000
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--repeats", type=int, default=5, help="plain/full pairs per size (default 5)")
    ap.add_argument("--no-daemon", action="store_true", help="skip the daemon latency runs")
    ap.add_argument("--json", default="bench/results/snapshot.json")
    args = ap.parse_args()
    exit_on_signals()
    results = []
    tmp = Path(tempfile.mkdtemp(prefix="stated-bench-"))
    try:
        for n in args.sizes:
            r = run(n, tmp, args.repeats)
            print(f"{n:>9,} records, segment {r['segment_bytes'] / 1e6:.0f} MB: plain copy+write+fsync "
                  f"{r['plain_s']:.2f}s ({r['plain_mb_s']:.0f} MB/s) | full snapshot {r['full_s']:.2f}s "
                  f"({r['full_mb_s']:.0f} MB/s of segment, file {r['full_bytes'] / 1e6:.0f} MB) | ratio "
                  f"{r['ratio']:.2f}x (pairs {', '.join(f'{x:.2f}' for x in r['ratios'])}) "
                  f"{'HOLDS' if r['ratio'] >= 0.5 else 'MISSES'} >= 0.5x", flush=True)
            print(f"{'':>9}  1% delta {r['delta_records']:,} records {r['delta_s'] * 1000:.0f} ms | restore "
                  f"{r['restore_s']:.2f}s ({r['restore_mb_s']:.0f} MB/s) | RSS during full "
                  f"{r['rss_during_full_mb']:.0f} MB, after restore {r['rss_after_restore_mb']:.0f} MB", flush=True)
            if not args.no_daemon:
                r.update(daemon_latency(n, tmp))
                worst = max(r["metrics_max_ms"] or 0, r["ping_max_ms"] or 0)
                print(f"{'':>9}  daemon full snapshot {r['daemon_full_s']:.2f}s: slowest /metrics "
                      f"{r['metrics_max_ms']:.1f} ms ({r['metrics_requests']} requests), slowest ping "
                      f"{r['ping_max_ms']:.1f} ms ({r['ping_requests']}), longest watchdog gap "
                      f"{r['watchdog_max_gap_ms']:.0f} ms {'HOLDS' if worst < 100 else 'MISSES'} < 100 ms",
                      flush=True)
            results.append(r)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
