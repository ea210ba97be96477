#!/usr/bin/env python3
"""stated data-plane benchmark: stated's record and allocator paths side by side with their raw
counterparts on the same SysV segment, and with Redis.

    .venv/bin/python bench/bench_dataplane.py [--quick] [--json PATH] [--no-redis]

Everything is measured in one run, interleaved (each repeat runs every variant of a group in
turn, so drift on a noisy machine hits all of them alike), and reported as the median of the
repeats. Ratios are rates: "0.80x of raw" means stated does 80% of the raw variant's ops/s;
"500x faster than Redis" means 500 times Redis' ops/s. Targets are reported, never asserted:
the exit code is 0 whenever the benchmark itself ran.

The script creates its own table segment, naive free stack and semaphore on unused keys
0x5F<pid><n>, and its own redis-server on a free 127.0.0.1 port; all of them are removed /
killed on every exit path (return, exception, Ctrl-C, SIGTERM).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing as mp
import os
import platform
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import timeit
from dataclasses import dataclass, field

import sysv_ipc  # noqa: E402
from _common import ROOT, exit_on_signals, human, pick_keys, remove_raw_key

import stated  # noqa: E402
from stated.errors import TableFull  # noqa: E402
from stated.format import config as config_mod  # noqa: E402
from stated.format import segment as fmt  # noqa: E402
from stated.shm import segment  # noqa: E402

try:
    import redis as redis_mod
except ImportError:            # reported as skipped rows
    redis_mod = None

CAPACITY = 10000               # the players table's configured capacity
LOCK_TIMEOUT = 2.0             # stated's default lock_timeout; the naive stack uses the same
# sysv_ipc's PyPI wheel is built without semtimedop: its acquire(timeout) then waits without one (the
# same semop otherwise). stated does not care (the native core makes its own timed waits); the rows say it.
SEM_TIMED = bool(getattr(sysv_ipc, "SEMAPHORE_TIMEOUT_SUPPORTED", False))
SEM_NOTE = "" if SEM_TIMED else " (timeout ignored: sysv_ipc without semtimedop)"
FILL = 5000                    # players allocated (with entity ids) before measuring lookups
ENTITY_BASE = 0x1234_0000_0000


# ---------------------------------------------------------------------------------------------
# measurement harness
# ---------------------------------------------------------------------------------------------
@dataclass
class Variant:
    id: str
    label: str
    kind: str                      # "stated" | "raw" | "redis"
    stmts: list[str]               # one op each; cycled to `unroll` ops per timed iteration
    unroll: int = 10
    samples: list[float] = field(default_factory=list)   # ns/op per repeat
    timer: timeit.Timer | None = None
    number: int = 0

    @property
    def ns(self) -> float:
        return statistics.median(self.samples)

    @property
    def rate(self) -> float:
        return 1e9 / self.ns


class Harness:
    def __init__(self, quick: bool):
        self.quick = quick
        self.target = 0.02 if quick else 0.12     # seconds per timed repeat of one variant
        self.repeats = 3 if quick else 9
        self.results: dict[str, dict] = {}
        self.groups: list[tuple[str, list[tuple[Variant, list[Variant]]]]] = []

    def measure(self, ns: dict, variants: list[Variant]) -> None:
        """Calibrate every variant, then run the repeats interleaved across variants."""
        setup = "\n".join(f"{k} = _G[{k!r}]" for k in ns)     # names become fast locals
        for v in variants:
            v.samples = []
            body = [v.stmts[i % len(v.stmts)] for i in range(max(v.unroll, len(v.stmts)))]
            v.unroll = len(body)
            v.timer = timeit.Timer("\n".join(body), setup, globals={"_G": ns})
            n = 1
            while True:                            # also the warm-up
                dt = v.timer.timeit(n)
                if dt >= self.target / 5 or n >= 1 << 24:
                    break
                n *= 4
            v.number = max(1, int(n * self.target / max(dt, 1e-9)))
        for _ in range(self.repeats):
            for v in variants:
                dt = v.timer.timeit(v.number)
                v.samples.append(dt / (v.number * v.unroll) * 1e9)

    def record(self, v: Variant, group: str, extra: dict | None = None) -> None:
        self.results[v.id] = dict(id=v.id, group=group, label=v.label, kind=v.kind, ns_per_op=v.ns,
                                  ops_per_s=v.rate, samples_ns=[round(s, 2) for s in v.samples],
                                  spread=(max(v.samples) - min(v.samples)) / v.ns, **(extra or {}))


def compare(h: Harness, title: str, ns: dict, pairs: list[tuple[Variant, list[Variant]]]) -> None:
    """Measure each stated variant with its baselines in one interleaved run."""
    allv: list[Variant] = []
    for s, bases in pairs:
        for v in [s, *bases]:
            if v.id not in {x.id for x in allv}:
                allv.append(v)
    h.measure(ns, allv)
    for v in allv:
        h.record(v, title)
    for s, bases in pairs:
        h.results[s.id]["vs"] = {b.id: paired_ratio(s.samples, b.samples) for b in bases}
    h.groups.append((title, pairs))


def paired_ratio(stated_ns: list[float], base_ns: list[float]) -> float:
    """stated rate / baseline rate, the median over repeats of the per-repeat ratio.

    Each repeat ran both variants back to back, so the per-repeat ratio cancels the slow drift
    of a noisy machine that medians taken separately would not.
    """
    return statistics.median(b / s for s, b in zip(stated_ns, base_ns))


# ---------------------------------------------------------------------------------------------
# raw counterparts
# ---------------------------------------------------------------------------------------------
class RawPlayer(ctypes.Structure):
    """The players record as a plain ctypes structure (what a C programmer would map)."""
    _fields_ = [("id", ctypes.c_uint64), ("name", ctypes.c_char * 32), ("level", ctypes.c_uint16),
                ("hp", ctypes.c_int32), ("x", ctypes.c_float), ("y", ctypes.c_float),
                ("z", ctypes.c_float), ("zone", ctypes.c_uint16), ("gold", ctypes.c_uint64),
                ("inventory", ctypes.c_uint32 * 32)]


RECORD_STRUCT = struct.Struct("<Q32sH2xi3fH2xQ32I")   # the whole 200-byte record


def check_raw_layout(layout) -> None:
    assert ctypes.sizeof(RawPlayer) == layout.record_size == RECORD_STRUCT.size, "players layout changed"
    for fl in layout.fields:
        assert getattr(RawPlayer, fl.name).offset == fl.offset, (fl.name, fl.offset)


class NaiveStack:
    """The simplest crash-unsafe allocator: a u32 free stack in shm under one SEM_UNDO semaphore.

    [0] = number of free slots, [1..cap] = the stack. No intent marks, no generations, no index.
    """

    def __init__(self, key: int, capacity: int = CAPACITY, create: bool = False):
        if create:
            self.shm = sysv_ipc.SharedMemory(key, sysv_ipc.IPC_CREX, 0o600, 4 * (capacity + 1),
                                             init_character=b"\0")
            self.sem = sysv_ipc.Semaphore(key, sysv_ipc.IPC_CREX, 0o600, 1)
        else:
            self.shm = sysv_ipc.SharedMemory(key)
            self.sem = sysv_ipc.Semaphore(key)
        self.sem.undo = True
        self.mv = memoryview(self.shm)
        self.a = self.mv.cast("I")
        if create:
            self.a[1:capacity + 1] = memoryview(struct.pack(f"<{capacity}I", *range(capacity - 1, -1, -1))).cast("I")
            self.a[0] = capacity

    def pop(self) -> int:
        self.sem.acquire(LOCK_TIMEOUT)
        try:
            a = self.a
            top = a[0]
            if top == 0:
                raise TableFull("naive stack empty")
            s = a[top]
            a[0] = top - 1
            return s
        finally:
            self.sem.release()

    def push(self, s: int) -> None:
        self.sem.acquire(LOCK_TIMEOUT)
        try:
            a = self.a
            top = a[0] + 1
            a[top] = s
            a[0] = top
        finally:
            self.sem.release()

    def close(self) -> None:
        self.a.release()
        self.mv.release()
        self.shm.detach()


# ---------------------------------------------------------------------------------------------
# multi-process allocator throughput
# ---------------------------------------------------------------------------------------------
def _alloc_worker(kind: str, key: int, nkey: int, owner: str, duration: float, barrier, q) -> None:
    """Runs in a forked child: attach, wait for the others, do alloc+free pairs for `duration`."""
    perf = time.perf_counter
    try:
        if kind == "naive":
            st = NaiveStack(nkey)
            pop, push = st.pop, st.push
        else:
            t = stated.Table(segment.open(key), name="players", owner=owner, lock_timeout=LOCK_TIMEOUT)
            alloc, free = t.alloc, t.free
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
        elif kind == "stated":
            while perf() < end:
                for _ in range(32):
                    free(alloc())
                n += 32
        else:   # stated-entity
            while perf() < end:
                for i in range(32):
                    free(alloc(ent + n + i))
                n += 32
        el = perf() - t0
        q.put((os.getpid(), n, el, None))
        if kind != "naive":
            t.close()
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        q.put((os.getpid(), 0, 0.0, f"{type(e).__name__}: {e}"))


def run_alloc_procs(kind: str, nproc: int, key: int, nkey: int, duration: float, children: list) -> float:
    """Aggregate alloc+free pairs/s of `nproc` forked processes running at once."""
    ctx = mp.get_context("fork")
    barrier, q = ctx.Barrier(nproc), ctx.Queue()
    ps = [ctx.Process(target=_alloc_worker, args=(kind, key, nkey, f"bench-w{i}", duration, barrier, q),
                      daemon=True) for i in range(nproc)]
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


def alloc_section(h: Harness, key: int, nkey: int, children: list) -> None:
    duration = 0.25 if h.quick else 1.0
    repeats = 3 if h.quick else 7
    configs = [(k, n) for k in ("stated", "stated-entity", "naive") for n in (1, 2)]
    samples = {c: [] for c in configs}
    for _ in range(repeats):                   # interleaved, like the micro benchmarks
        for c in configs:
            samples[c].append(run_alloc_procs(c[0], c[1], key, nkey, duration, children))
    labels = {"stated": "t.free(t.alloc())", "stated-entity": "t.free(t.alloc(entity))",
              "naive": f"naive stack pop+push (sem, SEM_UNDO){SEM_NOTE}"}
    for (kind, n), s in samples.items():
        rate = statistics.median(s)
        vid = f"alloc_{kind}_{n}p".replace("-", "_")
        h.results[vid] = dict(id=vid, group="allocator", label=f"{labels[kind]}, {n} proc",
                              kind="raw" if kind == "naive" else "stated", ns_per_op=1e9 / rate,
                              ops_per_s=rate, samples_ops=[round(x) for x in s],
                              spread=(max(s) - min(s)) / rate, processes=n, unit="pairs")


# ---------------------------------------------------------------------------------------------
# redis
# ---------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(tmpdir: str):
    """(Popen, client) or (None, reason)."""
    if redis_mod is None:
        return None, "the redis Python package is not installed (.venv/bin/pip install redis)"
    exe = shutil.which("redis-server")
    if exe is None:
        return None, "redis-server is not on PATH (apt-get install -y redis-server)"
    for _ in range(3):
        port = free_port()
        proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--daemonize", "no", "--dir", tmpdir],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis_mod.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                client.ping()
                return proc, client
            except redis_mod.ConnectionError:
                time.sleep(0.02)
        proc.kill()
        proc.wait()
    return None, "redis-server did not come up (3 attempts)"


def stop_redis(proc) -> None:
    if proc is not None and proc.poll() is None:
        os.kill(proc.pid, 9)
        proc.wait()


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run (~15 s), a smoke test")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "dataplane.json"),
                    help="where to write results (default bench/results/dataplane.json)")
    ap.add_argument("--no-redis", action="store_true", help="skip the Redis rows")
    args = ap.parse_args()
    exit_on_signals()

    t_start = time.monotonic()
    h = Harness(args.quick)
    layout = config_mod.load(str(ROOT / "config" / "stated.toml")).tables["players"].layout
    check_raw_layout(layout)
    key, nkey = pick_keys(2)
    made: list[int] = []
    naive_made = False
    children: list = []
    redis_proc = None
    skipped: list[str] = []
    tmpdir = tempfile.mkdtemp(prefix="stated-bench-")
    print(f"stated data-plane benchmark ({'quick' if args.quick else 'full'}): python {platform.python_version()}, "
          f"{os.cpu_count()} cpus, loadavg {os.getloadavg()[0]:.2f}; table key {key:#010x}, naive stack "
          f"key {nkey:#010x}; median of {h.repeats} interleaved repeats", flush=True)
    try:
        # ---- segments ------------------------------------------------------------------------
        segment.create(key, CAPACITY, layout, mode=0o600).detach()
        made.append(key)
        naive = NaiveStack(nkey, create=True)
        naive_made = True
        t = stated.Table(segment.open(key), name="players", owner="bench", lock_timeout=LOCK_TIMEOUT)
        ents = [ENTITY_BASE + i * 7919 for i in range(FILL)]
        handles = [t.alloc(e) for e in ents]
        hd = handles[FILL // 2]
        p = t.record(hd)
        p.y = 0.001
        d = {e: hh for e, hh in zip(ents, handles)}

        raw_shm = sysv_ipc.SharedMemory(key)       # an independent attach of the same segment
        mv = memoryview(raw_shm)
        r = segment.open(key).header.regions
        rec = r.records_offset + hd.slot * layout.record_size
        c = RawPlayer.from_buffer(mv, rec)
        offs = {fl.name: rec + fl.offset for fl in layout.fields}
        sem = naive.sem

        if args.no_redis:
            redis_proc, reason = None, "--no-redis given"
        else:
            redis_proc, reason = start_redis(tmpdir)
        rc = None
        if redis_proc is None:
            skipped.append(f"Redis rows skipped: {reason}")
            print(f"NOTE: Redis rows skipped: {reason}", flush=True)
        else:
            rc = reason
            rc.hset("player:1", mapping=dict(id=1, name="alice", level=1, hp=100, x=0.0, y=0.001, z=0.0, zone=3,
                                             gold=0, inventory=",".join(["0"] * 32)))
            rc.set("player:1:hp", 100)
            rc.sadd("free", *range(CAPACITY))

        ns = dict(t=t, h=hd, p=p, c=c, mv=mv, o_hp=offs["hp"], o_x=offs["x"], o_y=offs["y"], o_gold=offs["gold"],
                  o_rec=rec, ui=struct.Struct("<i").unpack_from, uf=struct.Struct("<f").unpack_from,
                  pi=struct.Struct("<i").pack_into, pf=struct.Struct("<f").pack_into,
                  pq=struct.Struct("<Q").pack_into, unpack_from=struct.unpack_from, pack_into=struct.pack_into,
                  urec=RECORD_STRUCT.unpack_from, Cls=t._cls, RawPlayer=RawPlayer, sem=sem, d=d, rc=rc,
                  io=r.index_offset, ie=fmt.INDEX_ENTRY.unpack_from, MUL=fmt.HASH_MUL, M64=(1 << 64) - 1,
                  SH=64 - (r.index_capacity.bit_length() - 1), spop=rc.spop if rc else None,
                  sadd=rc.sadd if rc else None)
        look = [ents[(i * 613) % FILL] for i in range(8)]
        for i, e in enumerate(look):
            ns[f"e{i}"] = e

        def V(id, label, kind, *stmts, unroll=10):
            return Variant(id, label, kind, list(stmts), unroll if kind != "redis" else 1)

        def clone(v, suffix):
            return Variant(f"{v.id}_{suffix}", v.label, v.kind, list(v.stmts), v.unroll)

        def R(id, label, *stmts):
            return [V(id, label, "redis", *stmts)] if rc else []

        raw_i = V("raw_unpack_i32", "Struct('<i').unpack_from(mv, o)[0]", "raw", "ui(mv, o_hp)[0]")
        raw_i_mod = V("raw_unpack_mod_i32", "struct.unpack_from('<i', mv, o)[0]", "raw",
                      "unpack_from('<i', mv, o_hp)[0]")
        raw_f = V("raw_unpack_f32", "Struct('<f').unpack_from(mv, o)[0]", "raw", "uf(mv, o_x)[0]")
        ct_i = V("ctypes_get_i32", "ctypes c.hp (from_buffer)", "raw", "c.hp")
        ct_f = V("ctypes_get_f32", "ctypes c.x (from_buffer)", "raw", "c.x")
        raw_si = V("raw_pack_i32", "Struct('<i').pack_into(mv, o, 5)", "raw", "pi(mv, o_hp, 5)")
        raw_sf = V("raw_pack_f32", "Struct('<f').pack_into(mv, o, 1.5)", "raw", "pf(mv, o_x, 1.5)")
        ct_si = V("ctypes_set_i32", "ctypes c.hp = 5", "raw", "c.hp = 5")
        ct_sf = V("ctypes_set_f32", "ctypes c.x = 1.5", "raw", "c.x = 1.5")
        redis_get = R("redis_get", "redis GET player:1:hp", "rc.get('player:1:hp')")
        redis_hget = R("redis_hget", "redis HGET player:1 hp", "rc.hget('player:1', 'hp')")
        redis_hset = R("redis_hset", "redis HSET player:1 hp 5", "rc.hset('player:1', 'hp', 5)")
        redis_hgetall = R("redis_hgetall", "redis HGETALL player:1 (10 fields)", "rc.hgetall('player:1')")

        print("measuring view attributes ...", flush=True)
        compare(h, "view attributes: p = t.record(h)", ns, [
            (V("view_get_i32", "view get p.hp (i32)", "stated", "p.hp"), [raw_i, raw_i_mod, ct_i, *redis_get]),
            (V("view_get_f32", "view get p.x (f32)", "stated", "p.x"), [raw_f, ct_f]),
            (V("view_set_i32", "view set p.hp = 5", "stated", "p.hp = 5"), [raw_si, ct_si]),
            (V("view_set_f32", "view set p.x = 1.5", "stated", "p.x = 1.5"), [raw_sf, ct_sf]),
            (V("view_update", "view p.x += p.y * 0.05", "stated", "p.x += p.y * 0.05"),
             [V("raw_update", "pack_into(x, unpack(x) + unpack(y) * 0.05)", "raw",
                "pf(mv, o_x, uf(mv, o_x)[0] + uf(mv, o_y)[0] * 0.05)"),
              V("ctypes_update", "ctypes c.x += c.y * 0.05", "raw", "c.x += c.y * 0.05")]),
        ])
        print("measuring get/set ...", flush=True)
        compare(h, "checked one-field API", ns, [
            (V("get_i32", 't.get(h, "hp")', "stated", "t.get(h, 'hp')"), [clone(raw_i, "get"), *redis_hget]),
            (V("get_f32", 't.get(h, "x")', "stated", "t.get(h, 'x')"), [clone(raw_f, "get")]),
            (V("set_i32", 't.set(h, "hp", 5)', "stated", "t.set(h, 'hp', 5)"), [clone(raw_si, "set"), *redis_hset]),
            (V("set_f32", 't.set(h, "x", 1.5)', "stated", "t.set(h, 'x', 1.5)"), [clone(raw_sf, "set")]),
        ])
        print("measuring write sections / consistent reads ...", flush=True)
        compare(h, "write section and consistent read", ns, [
            (V("write3", "with t.write(h) as p: hp, x, gold", "stated",
               "with t.write(h) as q:\n    q.hp = 5\n    q.x = 1.5\n    q.gold = 7"),
             [V("raw_pack3", "3x pack_into (hp, x, gold)", "raw",
                "pi(mv, o_hp, 5)\npf(mv, o_x, 1.5)\npq(mv, o_gold, 7)"),
              V("ctypes_set3", "ctypes c.hp, c.x, c.gold = ...", "raw", "c.hp = 5\nc.x = 1.5\nc.gold = 7")]),
            (V("read", "t.read(h) (seqlock copy, 200 B)", "stated", "t.read(h)"),
             [V("raw_unpack_rec", "Struct(200 B record).unpack_from", "raw", "urec(mv, o_rec)"),
              V("raw_copy_rec", "Cls.from_buffer_copy(mv, o) (no seqlock)", "raw", "Cls.from_buffer_copy(mv, o_rec)"),
              *redis_hgetall]),
        ])
        print("measuring lookup ...", flush=True)
        compare(h, f"entity lookup ({FILL} entities indexed)", ns, [
            (V("lookup", "t.lookup(entity)", "stated", *[f"t.lookup(e{i})" for i in range(8)], unroll=8),
             [V("dict_lookup", "dict d[entity]", "raw", *[f"d[e{i}]" for i in range(8)], unroll=8),
              V("raw_probe", "hash + index entry unpack_from", "raw",
                *[f"ie(mv, io + ((((e{i} * MUL) & M64) >> SH) << 4))" for i in range(8)], unroll=8)]),
        ])
        print("measuring semaphore / Redis allocator ...", flush=True)
        semv = V("sem_pair", f"sysv_ipc acquire(2.0)+release, SEM_UNDO{SEM_NOTE}", "raw",
                 "sem.acquire(2.0)\nsem.release()")
        semv2 = V("sem_pair_notimeout", "sysv_ipc acquire()+release, SEM_UNDO (no timeout)", "raw",
                  "sem.acquire()\nsem.release()")
        misc = [semv, semv2, *R("redis_spop_sadd", "redis SPOP+SADD allocator pair", "sadd('free', spop('free'))")]
        h.measure(ns, misc)
        for v in misc:
            h.record(v, "semaphore and Redis allocator", {"unit": "pairs"} if v.kind == "redis" else None)

        t.close()
        print("measuring alloc+free (1 and 2 processes) ...", flush=True)
        alloc_section(h, key, nkey, children)
        # ratios for the allocator rows
        res = h.results
        for k in ("stated", "stated_entity"):
            for n in (1, 2):
                row, naive_row = res[f"alloc_{k}_{n}p"], res[f"alloc_naive_{n}p"]
                row["vs"] = {f"alloc_naive_{n}p": statistics.median(
                    a / b for a, b in zip(row["samples_ops"], naive_row["samples_ops"]))}
                if rc:
                    row["vs"]["redis_spop_sadd"] = row["ops_per_s"] / res["redis_spop_sadd"]["ops_per_s"]
    finally:
        for pch in children:
            if pch.is_alive():
                pch.kill()
                pch.join(5)
        stop_redis(redis_proc)
        shutil.rmtree(tmpdir, ignore_errors=True)
        for k in made:
            segment.destroy(k)
        if naive_made:
            remove_raw_key(nkey)
    elapsed = time.monotonic() - t_start
    report(h, skipped, args, elapsed)
    return 0


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def ratio(stated_row: dict, base: dict) -> float:
    r = stated_row.get("vs", {}).get(base["id"])
    return r if r is not None else stated_row["ops_per_s"] / base["ops_per_s"]


def ratio_text(stated_row: dict, base: dict) -> str:
    r = ratio(stated_row, base)
    if base["kind"] == "redis":
        return f"stated {r:,.0f}x faster than Redis" if r >= 10 else f"stated {r:.2f}x faster than Redis"
    return f"stated = {r:.2f}x of raw"


def fmt_row(row: dict, indent: str, note: str = "") -> str:
    noisy = "~" if row["spread"] > 0.25 else " "
    unit = "/pair" if row.get("unit") == "pairs" else "/op"
    ns = row["ns_per_op"]
    ns_s = f"{ns:,.1f}" if ns < 1e5 else f"{ns:,.0f}"
    return (f"{indent}{row['label']:<{58 - len(indent)}} {ns_s:>10} ns{unit:<5}{noisy}"
            f"{human(row['ops_per_s']):>9}/s  {note}")


def targets(res: dict) -> list[dict]:
    def get(k):
        return res.get(k)

    out = []

    def target(name, a, b, want, text):
        ra, rb = get(a), get(b)
        if not ra or not rb:
            out.append(dict(target=name, holds=None, detail="n/a (rows skipped)"))
            return
        r = ratio(ra, rb)
        out.append(dict(target=name, holds=r >= want, ratio=r, want=want, detail=text(r)))

    # issue 11 (the Python API on the native core)
    target("alloc+free (entity) >= 2x naive stack, 1 proc", "alloc_stated_entity_1p", "alloc_naive_1p", 2.0,
           lambda r: f"{r:.2f}x of naive rate")
    target("alloc+free (entity) >= 1x naive stack, 2 procs", "alloc_stated_entity_2p", "alloc_naive_2p", 1.0,
           lambda r: f"{r:.2f}x of naive rate")
    target("alloc+free (entity) >= 100x Redis SPOP/SADD", "alloc_stated_entity_1p", "redis_spop_sadd", 100.0,
           lambda r: f"{r:.0f}x Redis' rate")
    target("t.lookup(entity) <= 10x a dict lookup", "lookup", "dict_lookup", 0.1,
           lambda r: f"{1 / r:.1f}x the time (limit 10x)")
    target("t.read(h) no slower than raw whole-record unpack", "read", "raw_unpack_rec", 1.0,
           lambda r: f"{r:.2f}x of raw rate")
    target("3-field t.write(h) section <= 4x three raw ctypes stores", "write3", "ctypes_set3", 0.25,
           lambda r: f"{1 / r:.2f}x the time (limit 4x)")
    target("view get p.x (f32) within 1.1x of raw ctypes", "view_get_f32", "ctypes_get_f32", 1 / 1.1,
           lambda r: f"{1 / r:.2f}x the time (limit 1.1x)")
    target("view get p.hp (int, range-checked setter) within 1.1x of raw ctypes", "view_get_i32", "ctypes_get_i32",
           1 / 1.1, lambda r: f"{1 / r:.2f}x the time (limit 1.1x)")
    # earlier ones
    target("view get p.hp no slower than raw struct.unpack_from", "view_get_i32", "raw_unpack_i32", 1.0,
           lambda r: f"{r:.2f}x of raw rate")
    target("view get p.x no slower than raw struct.unpack_from", "view_get_f32", "raw_unpack_f32", 1.0,
           lambda r: f"{r:.2f}x of raw rate")
    target('t.get(h, "hp") within 3x of raw unpack_from', "get_i32", "raw_unpack_i32_get", 1 / 3,
           lambda r: f"{1 / r:.2f}x the raw time (limit 3x)")
    return out


def report(h: Harness, skipped: list[str], args, elapsed: float) -> None:
    res = h.results
    lines = [f"{'operation':<58} {'time':>13}{'':<6}{'rate':>9}    ratio (rates)", "-" * 120]
    for title, pairs in h.groups:
        lines.append(f"[{title}]")
        for s, bases in pairs:
            lines.append(fmt_row(res[s.id], ""))
            for b in bases:
                lines.append(fmt_row(res[b.id], "    ", ratio_text(res[s.id], res[b.id])))
    lines.append("[allocator: alloc+free pairs, forked processes contending on one table]")
    for n in (1, 2):
        for k in ("stated", "stated_entity"):
            row = res[f"alloc_{k}_{n}p"]
            lines.append(fmt_row(row, ""))
        naive = res[f"alloc_naive_{n}p"]
        lines.append(fmt_row(naive, "    ", ratio_text(res[f"alloc_stated_{n}p"], naive) + " (alloc()), "
                             + ratio_text(res[f"alloc_stated_entity_{n}p"], naive) + " (alloc(entity))"))
        if "redis_spop_sadd" in res and n == 1:
            red = res["redis_spop_sadd"]
            lines.append(fmt_row(red, "    ", ratio_text(res[f"alloc_stated_{n}p"], red) + " (alloc()), "
                                 + ratio_text(res[f"alloc_stated_entity_{n}p"], red) + " (alloc(entity))"))
    lines.append("[semaphore]")
    for k in ("sem_pair", "sem_pair_notimeout"):
        lines.append(fmt_row(res[k], ""))
    tg = targets(res)
    lines.append("")
    lines.append("targets (reported, not asserted):")
    for x in tg:
        mark = {True: "HOLDS ", False: "MISSES", None: "n/a   "}[x["holds"]]
        lines.append(f"  {mark} {x['target']:<58} {x['detail']}")
    for s in skipped:
        lines.append(f"NOTE: {s}")
    lines.append(f"('~' marks rows whose repeats spread over more than 25% of the median; run took {elapsed:.1f} s)")
    print("\n".join(lines))
    out = dict(meta=dict(quick=args.quick, python=platform.python_version(), platform=platform.platform(),
                         cpus=os.cpu_count(), repeats=h.repeats, target_s=h.target, elapsed_s=elapsed,
                         loadavg_end=os.getloadavg(), time=time.strftime("%Y-%m-%dT%H:%M:%S%z")),
               results=[r for r in res.values()], targets=tg, skipped=skipped)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
