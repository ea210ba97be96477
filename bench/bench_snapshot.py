"""Snapshot benchmark: full save and restore of N records of the default players layout, and a 1% delta.

    .venv/bin/python bench/bench_snapshot.py [--sizes 100000 1000000] [--json PATH]

Creates its own table on a free key in a temp state_dir, removes both at the end. Prints seconds,
MB/s and the process RSS (the daemon's snapshot code runs in this process, as in the daemon).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sysv_ipc  # noqa: E402

from stated.format import config as config_mod  # noqa: E402
from stated.persist import saver as persist
from stated.persist import snapshot as snap  # noqa: E402
from stated.shm import segment  # noqa: E402
from stated.shm.allocator import Allocator  # noqa: E402
from stated.shm.table import Table  # noqa: E402


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


def run(n: int, tmp: Path) -> dict:
    base = config_mod.load("config/stated.toml")
    players = base.tables["players"]
    key = free_key()
    tc = config_mod.TableConfig("players", key, n, players.layout)
    dc = config_mod.DaemonConfig(state_dir=tmp / f"s{n}", snapshots_keep=2, full_every=100)
    out: dict = {"records": n}
    seg = segment.create(key, n, tc.layout, mode=0o600)
    try:
        t = Table(segment.open(key), name="players", owner="bench")
        t0 = time.perf_counter()
        hs = [t.alloc(entity=i) for i in range(n)]
        out["fill_s"] = time.perf_counter() - t0
        alloc = Allocator(seg, table="players")
        saver = persist.Saver(tc, seg, alloc, dc)
        rss0 = rss_mb()
        r = saver.save("full")
        out.update(full_s=r.seconds, full_bytes=r.bytes, full_mb_s=r.bytes / r.seconds / 1e6,
                   rss_during_full_mb=max(rss_mb(), rss0))
        rnd = random.Random(1)
        for h in rnd.sample(hs, n // 100):
            t.set(h, "hp", 7)
        d = saver.save("delta")
        out.update(delta_records=d.records, delta_s=d.seconds, delta_bytes=d.bytes,
                   delta_vs_full=d.seconds / r.seconds)
        chain, _ = snap.chain(saver.dir)
        saver.close()
        alloc.release_views()
        t.close()
        seg.detach()
        segment.destroy(key)
        t0 = time.perf_counter()
        seg2, restored = persist.restore(tc, dc, chain)
        out.update(restore_s=time.perf_counter() - t0, restored=restored, rss_after_restore_mb=rss_mb(),
                   restore_mb_s=(r.bytes + d.bytes) / (time.perf_counter() - t0) / 1e6)
        seg2.detach()
    finally:
        segment.destroy(key)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--json", default="bench/results/snapshot.json")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            r = run(n, Path(tmp))
            results.append(r)
            print(f"{n:>9,} records: full {r['full_s']:.2f}s ({r['full_bytes'] / 1e6:.0f} MB, "
                  f"{r['full_mb_s']:.0f} MB/s, RSS {r['rss_during_full_mb']:.0f} MB) | "
                  f"1% delta {r['delta_records']:,} records {r['delta_s'] * 1000:.0f} ms "
                  f"({r['delta_vs_full'] * 100:.1f}% of full) | restore {r['restore_s']:.2f}s "
                  f"({r['restore_mb_s']:.0f} MB/s, RSS {r['rss_after_restore_mb']:.0f} MB)", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
