"""Write-behind to PostgreSQL: stated's flush vs a bare asyncpg script, CPU per record, lag, claim/release.

    .venv/bin/python bench/bench_store.py            # about 2 minutes; prints a table, writes bench/results/store.json
    .venv/bin/python bench/bench_store.py --quick    # 20k records, short lag run

Starts its own throwaway PostgreSQL (tests/conftest.py's PgCluster: initdb in a temp dir, a free
loopback port, run as `postgres` when root) and its own segments; removes both on any exit.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT, exit_on_signals, pick_keys

sys.path.insert(0, str(ROOT / "tests"))

import asyncpg  # noqa: E402
from helpers import PLAYER_FIELDS, PgCluster, StoreHost, new_pg_cluster, player_layout  # noqa: E402

import stated  # noqa: E402
from stated.persist.store.schema import entity_to_sql  # noqa: E402
from stated.shm import segment  # noqa: E402

WRITER = r"""
import random, sys, time, stated
key, rate, secs, n = int(sys.argv[1], 0), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
t = stated.attach(key=key, owner="bench")
hs = t.owned()
t0 = time.monotonic(); done = 0
while True:
    now = time.monotonic() - t0
    if now >= secs: break
    due = int(now * rate)
    while done < due:
        t.set(hs[random.randrange(len(hs))], "gold", done); done += 1
    time.sleep(0.002)
print(done, flush=True)
"""


def field_values(layout, data: bytes) -> list:
    """A record's fields as the Python values asyncpg's encoders take (the bare script's input)."""
    out: list = []
    for fl in layout.fields:
        f = fl.field
        raw = data[fl.offset:fl.offset + f.size]
        if f.type == "str":
            out.append(raw.split(b"\0", 1)[0].decode("utf-8", "replace"))
        elif f.type == "bytes":
            out.append(raw)
        else:
            vals = list(struct.unpack(f"<{f.count}{f.code}", raw))
            out.append(vals if f.array else vals[0])
    return out


def fill(key: int, n: int, gold: int = 0) -> None:
    """n players (entities 1..n) with a name and gold, written as a worker does; closed afterwards: the
    worker's write sections and views (a million Python objects for 100k players) must not stay in the
    process whose CPU is measured (the collector's full passes would walk them during the flush)."""
    t = stated.attach(key=key, owner="bench")
    try:
        if not t.owned():
            for i in range(n):
                h = t.alloc(entity=i + 1)
                t.set(h, "gold", gold + i)
                t.set(h, "name", f"player-{i}")
        else:
            for h in t.owned():
                t.set(h, "gold", gold + h.slot)
    finally:
        t.close()
    gc.collect()


async def bare_asyncpg(dsn: str, rows: list[tuple], mapping, batch: int) -> tuple[float, float]:
    """What a hand-written script does: COPY into a temp table, one versioned upsert per batch."""
    c = await asyncpg.connect(dsn)
    try:
        await c.execute(mapping.temp_sql())
        fields = [f'"{x.name}"' for x in mapping.columns]
        sets = ", ".join(f"{f} = EXCLUDED.{f}" for f in ["version", "layout_hash", "updated_at", *fields])
        sql = (f"INSERT INTO bare.players AS t (entity, version, layout_hash, updated_at, {', '.join(fields)}) "
               f"SELECT s.entity, s.version, s.layout_hash, now(), {', '.join('s.' + f for f in fields)} "
               f"FROM {mapping.temp} s ON CONFLICT (entity) DO UPDATE SET {sets} WHERE t.version < EXCLUDED.version")
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(0, len(rows), batch):
            async with c.transaction():
                await c.copy_records_to_table(mapping.temp_name, records=rows[i:i + batch],
                                              columns=mapping.copy_columns)
                await c.execute(sql)
        return time.perf_counter() - t0, time.process_time() - c0
    finally:
        await c.close()


async def flush_all(host: StoreHost) -> tuple[float, float, int]:
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    while True:
        r = await host.store.tick()
        w = r["players"].written
        n += w
        if not host.ts.dirty_count():
            break
    return time.perf_counter() - t0, time.process_time() - c0, n


def p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.99 * len(xs)))]


async def flush_bench(key: int, dsn: str, n: int, batch: int, out: dict) -> None:
    fill(key, n)
    host = StoreHost(key, dsn, "bench-host", batch=batch)
    try:
        assert await host.store.ensure_connected(), host.store.status()
        await host.store.renew()         # periodic (every lease_ttl/3): not part of a flush's cost
        m = host.ts.mapping
        c = await asyncpg.connect(dsn)
        await c.execute("CREATE SCHEMA bare")
        await c.execute(m.create_sql()[0].replace('"stated"."players"', "bare.players"))
        await c.close()
        res = {}
        for rnd, label in ((0, "insert"), (1, "update")):
            if rnd:
                fill(key, n, gold=1000)
            rows = None                     # the previous round's rows: garbage before stated's run
            gc.collect()
            wall, cpu, written = await flush_all(host)
            # the same rows for the bare script: decoded from the same records (flushing did not change
            # them), one version above. Built after stated's run: a million live Python objects would
            # make the collector's full passes during stated's flush part of its CPU per record.
            rec, rs = host.ts.rec, host.ts.rs
            rows = [(entity_to_sql(e), ((2 + rnd) << 32) | 1, m.layout_hex,
                     *field_values(m.layout, bytes(rec[s * rs:(s + 1) * rs])))
                    for e, s in host.ts.allocated_entities().items()]
            bare, bare_cpu = await bare_asyncpg(dsn, rows, m, batch)
            res[label] = {"stated_rows_per_s": written / wall, "bare_rows_per_s": len(rows) / bare,
                          "ratio": (written / wall) / (len(rows) / bare),
                          "stated_cpu_us_per_record": cpu / written * 1e6,
                          "bare_cpu_us_per_record": bare_cpu / len(rows) * 1e6, "records": written}
            print(f"  flush {label:6s}: stated {written / wall:8.0f} rows/s  "
                  f"bare asyncpg {len(rows) / bare:8.0f} rows/s"
                  f"  ratio {res[label]['ratio']:.2f}x  client CPU: stated {cpu / written * 1e6:5.2f} us/record, "
                  f"bare script {bare_cpu / len(rows) * 1e6:5.2f}", flush=True)
        out["flush"] = res
    finally:
        await host.store.close()
        host.close()


async def lag_bench(key: int, dsn: str, n: int, rate: int, secs: float, out: dict) -> None:
    fill(key, n)
    host = StoreHost(key, dsn, "bench-host", flush_interval=1.0)
    samples: list[float] = []
    try:
        await host.store.ensure_connected()
        while host.ts.dirty_count():
            await host.store.tick()
        w = subprocess.Popen([sys.executable, "-c", WRITER, hex(key), str(rate), str(secs), str(n)],
                             stdout=subprocess.PIPE, text=True)
        try:
            stop = False

            async def sampler():
                while not stop:
                    samples.append(host.ts.lag(time.monotonic()))
                    await asyncio.sleep(0.05)
            st = asyncio.create_task(sampler())
            c0 = time.process_time()
            flushed0 = host.ts.flushed
            t_end = time.monotonic() + secs
            while time.monotonic() < t_end:
                t0 = time.monotonic()
                await host.store.tick()
                await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))
            stop = True
            await st
            cpu = time.process_time() - c0
            writes = int(w.communicate(timeout=30)[0].strip() or 0)
        finally:
            if w.poll() is None:
                w.kill()
                w.wait()
        flushed = host.ts.flushed - flushed0
        out["lag"] = {"writes_per_s": writes / secs, "flush_interval": 1.0, "lag_p50": statistics.median(samples),
                      "lag_p99": p99(samples), "lag_max": max(samples), "flushed_per_s": flushed / secs,
                      "cpu_us_per_record": cpu / max(1, flushed) * 1e6}
        print(f"  lag at {writes / secs:.0f} writes/s ({flushed / secs:.0f} rows/s flushed): p50 "
              f"{out['lag']['lag_p50']:.2f}s p99 {out['lag']['lag_p99']:.2f}s max {out['lag']['lag_max']:.2f}s "
              f"(flush_interval 1 s); daemon CPU {out['lag']['cpu_us_per_record']:.2f} us/record", flush=True)
    finally:
        await host.store.close()
        host.close()


async def claim_bench(key: int, dsn: str, k: int, out: dict) -> None:
    t = stated.attach(key=key, owner="claimer")
    host = StoreHost(key, dsn, "bench-host")
    claims, releases = [], []
    try:
        await host.store.ensure_connected()
        for i in range(k):
            e = 10_000_000 + random.randrange(50_000)
            t0 = time.perf_counter()
            h = await host.store.claim("players", e, t._owner)
            t1 = time.perf_counter()
            t.set(h, "gold", i)
            t2 = time.perf_counter()
            await host.store.release("players", h[0], h[1], t._owner)
            t3 = time.perf_counter()
            claims.append(t1 - t0)
            releases.append(t3 - t2)
        out["claim_release"] = {"claim_p50_ms": statistics.median(claims) * 1e3, "claim_p99_ms": p99(claims) * 1e3,
                                "release_p50_ms": statistics.median(releases) * 1e3,
                                "release_p99_ms": p99(releases) * 1e3, "n": k}
        c = out["claim_release"]
        print(f"  claim p50 {c['claim_p50_ms']:.2f} ms p99 {c['claim_p99_ms']:.2f} ms; release (flush + free + lease) "
              f"p50 {c['release_p50_ms']:.2f} ms p99 {c['release_p99_ms']:.2f} ms  (store API, no control socket)",
              flush=True)
    finally:
        await host.store.close()
        host.close()
        t.close()


def daemon_claim_bench(key: int, cluster: PgCluster, dsn: str, k: int, out: dict) -> None:
    """claim/release as a worker does them: through a real `stated run` and its control socket."""
    import tempfile
    with tempfile.TemporaryDirectory(prefix="stated-bench-") as tmp:
        cfg = Path(tmp) / "stated.toml"
        fields = ", ".join(json.dumps(f) for f in PLAYER_FIELDS)
        cfg.write_text(f'[store]\ndsn = "{dsn}"\nhost_id = "bench"\n[daemon]\nstate_dir = "var"\n'
                       f'control_socket = "var/stated.sock"\nmetrics_address = "127.0.0.1:0"\n'
                       f'[tables.players]\nkey = {key}\ncapacity = 1000\nfields = [{fields}]\n')
        d = subprocess.Popen([sys.executable, "-m", "stated", "run", "--config", str(cfg)],
                             stderr=subprocess.PIPE, text=True)
        try:
            for line in d.stderr:
                if "store: connected" in line:
                    break
            t = stated.attach("players", owner="bench-worker", config=str(cfg))
            claims, releases = [], []
            for i in range(k):
                e = 20_000_000 + random.randrange(50_000)
                t0 = time.perf_counter()
                h = t.claim(e)
                t1 = time.perf_counter()
                t.set(h, "gold", i)
                t2 = time.perf_counter()
                t.release(h)
                t3 = time.perf_counter()
                claims.append(t1 - t0)
                releases.append(t3 - t2)
            t.close()
        finally:
            d.terminate()
            d.wait(30)
    out["claim_release_daemon"] = {"claim_p50_ms": statistics.median(claims) * 1e3, "claim_p99_ms": p99(claims) * 1e3,
                                   "release_p50_ms": statistics.median(releases) * 1e3,
                                   "release_p99_ms": p99(releases) * 1e3, "n": k}
    c = out["claim_release_daemon"]
    print(f"  through the daemon: claim p50 {c['claim_p50_ms']:.2f} ms p99 {c['claim_p99_ms']:.2f} ms; release p50 "
          f"{c['release_p50_ms']:.2f} ms p99 {c['release_p99_ms']:.2f} ms (worker -> control socket -> daemon -> "
          f"PostgreSQL)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "store.json"))
    a = ap.parse_args()
    exit_on_signals()
    n = 20_000 if a.quick else 100_000
    out: dict = {"records": n}
    keys = pick_keys(3)
    import pytest
    try:
        cluster = new_pg_cluster(fsync=True)       # durable like production: commits wait for the disk
    except pytest.skip.Exception as e:
        print(f"skipped: {e}")
        return 0
    try:
        assert cluster.psql("SHOW fsync").strip() == "on"
        layout = player_layout(PLAYER_FIELDS)
        for k, cap in zip(keys, (n, 100_000, 1000)):
            segment.create(k, cap, layout, mode=0o600).detach()
        print(f"bench_store: PostgreSQL {cluster.psql('SHOW server_version').strip()} on 127.0.0.1:{cluster.port} "
              f"(fsync on), players layout ({layout.record_size} B), batch 5000", flush=True)
        asyncio.run(flush_bench(keys[0], cluster.new_database("flush"), n, 5000, out))
        asyncio.run(lag_bench(keys[1], cluster.new_database("lag"), 100_000, 20_000, 6 if a.quick else 20, out))
        asyncio.run(claim_bench(keys[2], cluster.new_database("claim"), 200 if a.quick else 1000, out))
        segment.destroy(keys[2])
        daemon_claim_bench(keys[2], cluster, cluster.new_database("claimd"), 200 if a.quick else 1000, out)
    finally:
        for k in keys:
            segment.destroy(k)
        cluster.destroy()
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
