#!/usr/bin/env python3
"""The native core (stated.shm._native and a C worker) side by side with the raw baselines of
bench_dataplane.py, in one run: the numbers of the extension's own calls, before Table delegates to it.

    .venv/bin/python bench/bench_native.py [--quick] [--json PATH] [--no-redis]

Rows (ratios are rates, as in bench_dataplane; medians of interleaved repeats):
  - alloc+free pairs with an entity, core.free(core.alloc(e)), in 1 and 2 forked processes, against the
    naive Python free stack under the same SysV semaphore (bench_dataplane.NaiveStack), two bare
    sysv_ipc acquire/release pairs, and Redis SPOP/SADD;
  - a C worker's stated_alloc + stated_free (bench/native/bench_core.c, built here with cc) against two
    bare semop acquire/release pairs in C, 1 and 2 processes;
  - core.lookup(entity) against dict[entity]; core.read(h, Cls) / core.read_bytes(h) against a raw
    whole-record Struct.unpack_from; a 3-field write section through core.section() against three raw
    ctypes stores.
Everything it creates (segment, naive stack, semaphores, redis-server, temp dir) is removed on exit.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import sysv_ipc  # noqa: E402
from _common import ROOT, exit_on_signals, human, pick_keys, remove_raw_key
from bench_dataplane import (
    CAPACITY,
    ENTITY_BASE,
    FILL,
    LOCK_TIMEOUT,
    RECORD_STRUCT,
    SEM_NOTE,
    Harness,
    NaiveStack,
    RawPlayer,
    Variant,
    check_raw_layout,
    compare,
    start_redis,
    stop_redis,
)

from stated.format import config as config_mod  # noqa: E402
from stated.shm import _native, segment  # noqa: E402
from stated.shm.allocator import Handle  # noqa: E402
from stated.shm.records import default_record, record_class  # noqa: E402


def open_core(key: int, owner: str | None):
    seg = segment.open(key)
    cls = record_class(seg.header.layout, "players")
    core = _native.Core(seg.buf, key, table="players", init=default_record(cls), handle=Handle,
                        lock_timeout=LOCK_TIMEOUT)
    if owner:
        core.claim_owner(owner)
    return seg, cls, core


# ---- multi-process allocator rates ----------------------------------------------------------------------
def _worker(kind: str, key: int, nkey: int, owner: str, duration: float, barrier, q) -> None:
    perf = time.perf_counter
    try:
        if kind == "naive":
            st = NaiveStack(nkey)
            pop, push = st.pop, st.push
        elif kind == "sem2":
            sem = sysv_ipc.Semaphore(nkey)
            sem.undo = True
            acq, rel = sem.acquire, sem.release
        else:
            seg, _cls, core = open_core(key, owner)
            alloc, free = core.alloc, core.free
            ent = ENTITY_BASE + (os.getpid() << 24)
        barrier.wait(30)
        n = 0
        t0 = perf()
        end = t0 + duration
        if kind == "naive":
            while perf() < end:
                for _ in range(32):
                    push(pop())
                n += 32
        elif kind == "sem2":
            while perf() < end:
                for _ in range(32):
                    acq(LOCK_TIMEOUT)
                    rel()
                    acq(LOCK_TIMEOUT)
                    rel()
                n += 32
        elif kind == "native":
            while perf() < end:
                for _ in range(32):
                    free(alloc())
                n += 32
        else:   # native-entity
            while perf() < end:
                for i in range(32):
                    free(alloc(ent + n + i))
                n += 32
        el = perf() - t0
        q.put((os.getpid(), n, el, None))
        if kind.startswith("native"):
            core.close()
            seg.detach()
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        q.put((os.getpid(), 0, 0.0, f"{type(e).__name__}: {e}"))


def run_procs(kind: str, nproc: int, key: int, nkey: int, duration: float, children: list) -> float:
    ctx = mp.get_context("fork")
    barrier, q = ctx.Barrier(nproc), ctx.Queue()
    ps = [ctx.Process(target=_worker, args=(kind, key, nkey, f"bench-n{i}", duration, barrier, q), daemon=True)
          for i in range(nproc)]
    children.extend(ps)
    for p in ps:
        p.start()
    got = [q.get(timeout=60 + duration) for _ in ps]
    for p in ps:
        p.join(10)
        children.remove(p)
    errs = [g[3] for g in got if g[3]]
    if errs:
        raise RuntimeError(f"{kind} worker failed: {errs[0]}")
    return sum(n / el for _, n, el, _ in got)


def build_c_bench(tmpdir: str) -> tuple[str | None, str]:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None, "no C compiler"
    exe = os.path.join(tmpdir, "bench_core")
    r = subprocess.run([cc, "-std=c11", "-O2", "-Wall", "-Wextra", "-I", str(ROOT / "stated" / "native"), "-o", exe,
                        str(ROOT / "bench" / "native" / "bench_core.c")], capture_output=True, text=True)
    if r.returncode != 0:
        return None, f"cc failed: {r.stderr[-300:]}"
    return exe, cc


def run_c_bench(exe: str, key: int, seconds: float, nproc: int) -> dict[str, float]:
    r = subprocess.run([exe, hex(key), str(seconds), str(nproc)], capture_output=True, text=True,
                       timeout=60 + 10 * seconds)
    if r.returncode != 0:
        raise RuntimeError(f"bench_core failed: {r.stderr}")
    return {k: float(v) for k, v in (ln.split("=") for ln in r.stdout.split())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run, a smoke test")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "native.json"))
    ap.add_argument("--no-redis", action="store_true")
    args = ap.parse_args()
    exit_on_signals()
    t_start = time.monotonic()
    h = Harness(args.quick)
    layout = config_mod.load(str(ROOT / "config" / "stated.toml")).tables["players"].layout
    check_raw_layout(layout)
    key, nkey, skey = pick_keys(3)
    made, children, notes = [], [], []
    naive_made = sem_made = False
    redis_proc = None
    tmpdir = tempfile.mkdtemp(prefix="stated-bench-native-")
    res = h.results
    print(f"stated native-core benchmark ({'quick' if args.quick else 'full'}): python {platform.python_version()}, "
          f"{os.cpu_count()} cpus, loadavg {os.getloadavg()[0]:.2f}", flush=True)
    try:
        segment.create(key, CAPACITY, layout, mode=0o600).detach()
        made.append(key)
        NaiveStack(nkey, create=True).close()
        naive_made = True
        sysv_ipc.Semaphore(skey, sysv_ipc.IPC_CREX, 0o600, 1)
        sem_made = True
        seg, cls, core = open_core(key, "bench")
        ents = [ENTITY_BASE + i * 7919 for i in range(FILL)]
        handles = [core.alloc(e) for e in ents]
        hd = handles[FILL // 2]
        d = dict(zip(ents, handles))
        r = seg.header.regions
        rec = r.records_offset + hd.slot * layout.record_size
        view = cls.from_buffer(seg.buf, rec)
        c = RawPlayer.from_buffer(seg.buf, rec)
        section = core.section(hd.slot, view)
        if args.no_redis:
            redis_proc, rc = None, "--no-redis given"
        else:
            redis_proc, rc = start_redis(tmpdir)
        if redis_proc is None:
            notes.append(f"Redis rows skipped: {rc}")
            rc = None
        else:
            rc.sadd("free", *range(CAPACITY))
        ns = dict(core=core, h=hd, d=d, mv=seg.buf, o_rec=rec, urec=RECORD_STRUCT.unpack_from, Cls=cls, c=c,
                  s=section, lookup=core.lookup, read=core.read, read_bytes=core.read_bytes,
                  spop=rc.spop if rc else None, sadd=rc.sadd if rc else None)
        look = [ents[(i * 613) % FILL] for i in range(8)]
        for i, e in enumerate(look):
            ns[f"e{i}"] = e

        def V(id, label, kind, *stmts, unroll=10):
            return Variant(id, label, kind, list(stmts), unroll if kind != "redis" else 1)

        print("measuring lookup, read, write section ...", flush=True)
        compare(h, f"entity lookup ({FILL} indexed)", ns, [
            (V("n_lookup", "core.lookup(entity)", "stated", *[f"lookup(e{i})" for i in range(8)], unroll=8),
             [V("dict_lookup", "dict d[entity]", "raw", *[f"d[e{i}]" for i in range(8)], unroll=8)]),
        ])
        compare(h, "consistent read and write section", ns, [
            (V("n_read", "core.read(h, Cls) (seqlock copy, 200 B)", "stated", "read(h, Cls)"),
             [V("raw_unpack_rec", "Struct(200 B record).unpack_from", "raw", "urec(mv, o_rec)"),
              V("raw_copy_rec", "Cls.from_buffer_copy(mv, o) (no seqlock)", "raw", "Cls.from_buffer_copy(mv, o_rec)")]),
            (V("n_read_bytes", "core.read_bytes(h)", "stated", "read_bytes(h)"),
             [V("raw_unpack_rec_b", "Struct(200 B record).unpack_from", "raw", "urec(mv, o_rec)")]),
            (V("n_write3", "with section as p: hp, x, gold", "stated",
               "with s as q:\n    q.hp = 5\n    q.x = 1.5\n    q.gold = 7"),
             [V("ctypes_set3", "ctypes c.hp, c.x, c.gold = ...", "raw", "c.hp = 5\nc.x = 1.5\nc.gold = 7")]),
        ])
        if rc is not None:
            red = V("redis_spop_sadd", "redis SPOP+SADD allocator pair", "redis", "sadd('free', spop('free'))")
            h.measure(ns, [red])
            h.record(red, "redis", {"unit": "pairs"})
        del view, c, section, ns
        for hh in handles:
            core.free(hh)
        core.close()
        seg.detach()

        duration = 0.25 if args.quick else 1.0
        repeats = 3 if args.quick else 7
        print("measuring alloc+free in forked processes ...", flush=True)
        configs = [(k, n) for k in ("native-entity", "native", "naive", "sem2") for n in (1, 2)]
        samples = {cfg: [] for cfg in configs}
        for _ in range(repeats):
            for kind, n in configs:
                sem = nkey if kind == "naive" else skey
                samples[(kind, n)].append(run_procs(kind, n, key, sem, duration, children))
        labels = {"native-entity": "core.free(core.alloc(entity))", "native": "core.free(core.alloc())",
                  "naive": "naive stack pop+push (sysv_ipc, SEM_UNDO)",
                  "sem2": f"2x sysv_ipc acquire(2.0)+release (SEM_UNDO){SEM_NOTE}"}
        for (kind, n), s in samples.items():
            rate = statistics.median(s)
            vid = f"alloc_{kind}_{n}p".replace("-", "_")
            res[vid] = dict(id=vid, group="allocator", label=f"{labels[kind]}, {n} proc",
                            kind="stated" if kind.startswith("native") else "raw", ns_per_op=1e9 / rate,
                            ops_per_s=rate, samples_ops=[round(x) for x in s], spread=(max(s) - min(s)) / rate,
                            processes=n, unit="pairs",
                            paired=[a for a in s])
        exe, cc = build_c_bench(tmpdir)
        if exe is None:
            notes.append(f"C worker rows skipped: {cc}")
        else:
            print("measuring the C worker ...", flush=True)
            for n in (1, 2):
                cs = [run_c_bench(exe, key, duration, n) for _ in range(repeats)]
                for name, label in (("pair_entity", "C stated_alloc(entity) + stated_free"),
                                    ("pair_anon", "C stated_alloc_anon + stated_free"),
                                    ("sem2", "C 2x semop acquire/release (SEM_UNDO)")):
                    s = [x[name] for x in cs]
                    rate = statistics.median(s)
                    vid = f"c_{name}_{n}p"
                    res[vid] = dict(id=vid, group="C worker", label=f"{label}, {n} proc",
                                    kind="raw" if name == "sem2" else "stated", ns_per_op=1e9 / rate, ops_per_s=rate,
                                    samples_ops=[round(x) for x in s], spread=(max(s) - min(s)) / rate, processes=n,
                                    unit="pairs", per_repeat_ratio=[x["pair_entity"] / x["sem2"] for x in cs])
    finally:
        for p in children:
            if p.is_alive():
                p.kill()
                p.join(5)
        stop_redis(redis_proc)
        shutil.rmtree(tmpdir, ignore_errors=True)
        for k in made:
            segment.destroy(k)
        if naive_made:
            remove_raw_key(nkey)
        if sem_made:
            remove_raw_key(skey)
    report(h, notes, args, time.monotonic() - t_start)
    return 0


def _ratio(res: dict, a: str, b: str) -> float | None:
    ra, rb = res.get(a), res.get(b)
    if not ra or not rb:
        return None
    if "vs" in ra and b in ra["vs"]:
        return ra["vs"][b]
    if "paired" in ra and "paired" in rb:          # forked runs were interleaved repeat by repeat
        return statistics.median(x / y for x, y in zip(ra["paired"], rb["paired"]))
    return ra["ops_per_s"] / rb["ops_per_s"]


def targets(res: dict) -> list[dict]:
    out = []

    def target(name, a, b, want, text):
        r = _ratio(res, a, b)
        if r is None:
            out.append(dict(target=name, holds=None, detail="n/a (rows skipped)"))
        else:
            out.append(dict(target=name, holds=r >= want, ratio=r, want=want, detail=text(r)))

    target("ext alloc+free (entity) >= 2x naive stack, 1 proc", "alloc_native_entity_1p", "alloc_naive_1p", 2.0,
           lambda r: f"{r:.2f}x of naive rate")
    target("ext alloc+free (entity) >= 1x naive stack, 2 procs", "alloc_native_entity_2p", "alloc_naive_2p", 1.0,
           lambda r: f"{r:.2f}x of naive rate")
    target("ext alloc+free (entity) >= 100x Redis SPOP/SADD", "alloc_native_entity_1p", "redis_spop_sadd", 100.0,
           lambda r: f"{r:.0f}x Redis' rate")
    target("C alloc+free within 1.5x of two bare semop pairs, 1 proc", "c_pair_entity_1p", "c_sem2_1p", 1 / 1.5,
           lambda r: f"{1 / r:.2f}x the time (limit 1.5x)")
    target("C alloc+free within 1.5x of two bare semop pairs, 2 procs", "c_pair_entity_2p", "c_sem2_2p", 1 / 1.5,
           lambda r: f"{1 / r:.2f}x the time (limit 1.5x)")
    target("ext lookup <= 10x a dict lookup", "n_lookup", "dict_lookup", 0.1,
           lambda r: f"{1 / r:.1f}x the time (limit 10x)")
    target("ext read(h, Cls) no slower than raw whole-record unpack", "n_read", "raw_unpack_rec", 1.0,
           lambda r: f"{r:.2f}x of raw rate")
    target("3-field section <= 4x three raw ctypes stores", "n_write3", "ctypes_set3", 0.25,
           lambda r: f"{1 / r:.2f}x the time (limit 4x)")
    return out


def report(h: Harness, notes: list[str], args, elapsed: float) -> None:
    res = h.results
    lines = [f"{'operation':<62} {'time':>12}        {'rate':>9}", "-" * 100]
    for row in res.values():
        unit = "/pair" if row.get("unit") == "pairs" else "/op"
        noisy = "~" if row["spread"] > 0.25 else " "
        lines.append(f"{row['label']:<62} {row['ns_per_op']:>10,.1f} ns{unit:<5}{noisy}{human(row['ops_per_s']):>9}/s")
    tg = targets(res)
    lines += ["", "targets (reported, not asserted):"]
    for x in tg:
        mark = {True: "HOLDS ", False: "MISSES", None: "n/a   "}[x["holds"]]
        lines.append(f"  {mark} {x['target']:<62} {x['detail']}")
    lines += [f"NOTE: {n}" for n in notes]
    lines.append(f"(run took {elapsed:.1f} s)")
    print("\n".join(lines))
    out = dict(meta=dict(quick=args.quick, python=platform.python_version(), platform=platform.platform(),
                         cpus=os.cpu_count(), elapsed_s=elapsed, loadavg_end=os.getloadavg(),
                         time=time.strftime("%Y-%m-%dT%H:%M:%S%z")),
               results=list(res.values()), targets=tg, notes=notes)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
