#!/usr/bin/env python3
"""Candidate hot-path changes for stated/, measured against the current code on a real segment.

    .venv/bin/python bench/hotpath_experiments.py [--quick]

Nothing in stated/ is modified: each candidate is written here as a function taking the
Table (or Allocator) as `self`, doing the same checks and the same shared-memory stores as
the method it would replace, and is timed interleaved with the current method. The numbers
back the suggestions in bench/README.md. Candidates that are correct here are not
necessarily drop-in: read the notes printed next to each.
"""
from __future__ import annotations

import argparse
import struct
import sys

from _common import ROOT, exit_on_signals, pick_keys
from bench_dataplane import CAPACITY, Harness, Variant, paired_ratio

import stated  # noqa: E402
from stated.format import config as config_mod  # noqa: E402
from stated.format import segment as fmt  # noqa: E402
from stated import segment  # noqa: E402
from stated.shm.allocator import Handle  # noqa: E402
from stated.errors import DuplicateEntity, TableFull  # noqa: E402
from stated.format.schema import check_value  # noqa: E402

M64 = (1 << 64) - 1
F32_MAX = 3.4028234663852886e38
_tnew = tuple.__new__
_TOP, _USED, _OP, _ISLOT = fmt.A_FREE_TOP // 4, fmt.A_USED // 4, fmt.A_INTENT_OP // 4, fmt.A_INTENT_SLOT // 4
_IENT, _IOWN, _IPID = fmt.A_INTENT_ENTITY // 8, fmt.A_INTENT_OWNER // 4, fmt.A_INTENT_PID // 4
_ISEQ, _HOLDER, _ICOUNT = fmt.A_INDEX_SEQ // 4, fmt.A_HOLDER_PID // 4, fmt.A_INDEX_COUNT // 4
_C_ALLOC, _C_FREES = fmt.COUNTER_OFF["allocations"] // 8, fmt.COUNTER_OFF["frees"] // 8


def add_strided_views(t: stated.Table) -> None:
    """What Table/Allocator.__init__ would precompute: one strided memoryview per slot word / field.

    `t._gen[slot]` instead of `t._s32[8 * slot + 1]`, `t._fv["hp"][slot]` instead of
    `view[slot * stride + k]`: the index arithmetic moves into C.
    """
    a = t._alloc
    t._seqv, t._gen = t._s32[0::8], t._s32[1::8]
    t._ownv = t._s16[8::16]
    t._dirtyv = t._s8[20::32]
    t._fv = {}
    for name, (view, stride, k, check) in t._acc.items():
        t._fv[name] = (view[k::stride], check) if view is not None else (None, check)
    a._islot, a._ient = a._i32[2::4], a._i64[0::2]
    a._state, a._ent = a._s8[18::32], a._s64[1::4]
    t._sections = {}


def make_getter(t, name):
    """A per-field accessor closure (a possible `t.getter("hp")` API): the floor for a checked get."""
    gens = t._gen
    view, _ = t._fv[name]

    def get(h):
        slot, gen = h
        if gens[slot] == gen and slot >= 0 and view is not None:
            return view[slot]
        return t.get(h, name)       # stale / out of range / string field: the checked path raises
    return get


# ---- Table.get / set ----------------------------------------------------------------------------
def get_strided(self, h, name):
    slot, gen = h
    try:
        ok = self._gen[slot] == gen and slot >= 0
        view, _ = self._fv[name]
    except (IndexError, KeyError):
        return self.get(h, name)            # the current method raises the right error
    if ok and view is not None:
        return view[slot]
    return self.get(h, name)


def set_f32_fastcheck(self, h, name, value):
    """Current set() with check_value() only when the value is outside the f32 range (or not a number)."""
    slot, gen = h
    try:
        ok = self._s32[8 * slot + 1] == gen and slot >= 0 and self._s16[16 * slot + 8] == self._owner
        view, stride, k, check = self._acc[name]
    except (IndexError, KeyError):
        return self.set(h, name, value)
    if not ok or not self._owner or view is None:
        return self.set(h, name, value)
    try:
        if check is not None and not -F32_MAX <= value <= F32_MAX:
            check_value(check, value)       # inf/nan/too large/non-number: the slow, exact path
        view[slot * stride + k] = value
    except (ValueError, TypeError) as e:
        if isinstance(e, ValueError) and str(e).startswith("field"):
            raise
        raise ValueError(f"table {self.name!r} field {name!r}: {value!r} does not fit ({e})") from None
    self._s8[32 * slot + 20] = 1


def set_strided(self, h, name, value):
    slot, gen = h
    try:
        ok = self._gen[slot] == gen and slot >= 0 and self._ownv[slot] == self._owner
        view, check = self._fv[name]
    except (IndexError, KeyError):
        return self.set(h, name, value)
    if not ok or not self._owner or view is None:
        return self.set(h, name, value)
    try:
        if check is not None and not -F32_MAX <= value <= F32_MAX:
            check_value(check, value)
        view[slot] = value
    except (ValueError, TypeError) as e:
        if isinstance(e, ValueError) and str(e).startswith("field"):
            raise
        raise ValueError(f"table {self.name!r} field {name!r}: {value!r} does not fit ({e})") from None
    self._dirtyv[slot] = 1


# ---- write sections ------------------------------------------------------------------------------
class Section:
    """_WriteSection with strided views: no index arithmetic in __enter__/__exit__."""

    __slots__ = ("_seq", "_dirty", "_slot", "_view")

    def __init__(self, seq, dirty, slot, view):
        self._seq, self._dirty, self._slot, self._view = seq, dirty, slot, view

    def __enter__(self):
        self._seq[self._slot] += 1
        return self._view

    def __exit__(self, *exc):
        s = self._slot
        self._seq[s] += 1
        self._dirty[s] = 1
        return False


def write_cached(self, h):
    """Table.write returning a per-slot Section built once (Table.free would drop it, like _views)."""
    slot, gen = h
    try:
        ok = self._gen[slot] == gen and slot >= 0 and self._ownv[slot] == self._owner
    except IndexError:
        return self.write(h)
    if not ok or not self._owner:
        return self.write(h)
    if self._seqv[slot] & 1:
        return self.write(h)                # raises "already inside a write section"
    sec = self._sections.get(slot)
    if sec is None:
        sec = self._sections[slot] = Section(self._seqv, self._dirtyv, slot, self._view(slot))
    return sec


# ---- lookup ---------------------------------------------------------------------------------------
def lookup_inline(a, entity):
    """Allocator.lookup with the hash and the probe inlined, strided index views, tuple.__new__ Handle."""
    if not 0 <= entity <= M64:
        return None
    h32 = a._h32
    seq = h32[_ISEQ]
    if not seq & 1:
        islot, ient, mask = a._islot, a._ient, a._imask
        e = ((entity * 0x9E3779B97F4A7C15) & M64) >> a._ishift
        slot = -1
        for _ in range(mask + 1):
            s = islot[e]
            if s == 0:
                break
            if ient[e] == entity:
                slot = s - 1
                break
            e = (e + 1) & mask
        if slot < 0:
            if h32[_ISEQ] == seq:
                return None
        else:
            gen = a._s32[8 * slot + 1]
            if h32[_ISEQ] == seq and a._state[slot] == fmt.SLOT_ALLOCATED and a._ent[slot] == entity:
                return _tnew(Handle, (slot, gen))
    return a.lookup(entity)                 # index changing: the current retry/lock path


# ---- alloc / free ---------------------------------------------------------------------------------
def acquire_nowait_first(a):
    """Allocator.acquire trying IPC_NOWAIT first: the timed semtimedop only when the lock is busy."""
    try:
        a._sem.acquire(0)
    except Exception:   # BusyError (or removed): the current bounded wait, with its messages
        return a.acquire()
    a._h32[_HOLDER] = a.pid
    if a._h32[_OP]:
        a._settle_intent()


def alloc_lean(self, entity=None):
    """Table.alloc + Allocator.alloc as one function: same stores in the same order, lookups hoisted,
    counters by precomputed index, Handle via tuple.__new__, IPC_NOWAIT-first lock."""
    a = self._alloc
    owner = self._owner
    h32, s32, s8 = a._h32, a._s32, a._s8
    acquire_nowait_first(a)
    try:
        if entity is not None:
            if a._find(entity) >= 0:
                raise DuplicateEntity(f"entity {entity} already has a slot")
        top = h32[_TOP]
        if top == 0:
            raise TableFull("full")
        slot = a._free[top - 1]
        if slot >= a.capacity or a._state[slot] != fmt.SLOT_FREE:
            raise RuntimeError("free stack inconsistent: the real alloc() repairs here")
        h32[_ISLOT] = slot
        a._h64[_IENT] = entity or 0
        h32[_IOWN] = owner
        h32[_IPID] = a.pid
        h32[_OP] = fmt.INTENT_ALLOC
        h32[_TOP] = top - 1
        gen = (s32[8 * slot + 1] + 1) & 0xFFFFFFFF
        s32[8 * slot + 1] = gen
        rs = self.record_size
        base = slot * rs
        self._rec[base:base + rs] = self._init
        b = 32 * slot
        if entity is not None:
            a._s64[4 * slot + 1] = entity
            s8[b + 19] = fmt.FLAG_HAS_ENTITY
        else:
            a._s64[4 * slot + 1] = 0
            s8[b + 19] = 0
        a._s16[16 * slot + 8] = owner
        s8[b + 20] = 1
        s8[b + 21] = 0
        s8[b + 18] = fmt.SLOT_ALLOCATED
        if entity is not None:
            a._index_insert(entity, slot)
        h32[_USED] += 1
        a._o32[(owner - 1) * 16 + 12] += 1
        a._h64[_C_ALLOC] += 1
        h32[_OP] = 0
        return _tnew(Handle, (slot, gen))
    finally:
        h32[_HOLDER] = 0
        a._sem.release()


def free_lean(self, h):
    a = self._alloc
    slot, gen = h
    self._views.pop(slot, None)
    s8, s32, h32 = a._s8, a._s32, a._h32
    acquire_nowait_first(a)
    try:
        b = 32 * slot
        if s32[8 * slot + 1] != gen or s8[b + 18] != fmt.SLOT_ALLOCATED or a._s16[16 * slot + 8] != self._owner:
            raise RuntimeError("stale/not owner: the real free() raises here")
        a._free_locked(slot, fmt.INTENT_FREE)
        a._h64[_C_FREES] += 1
    finally:
        h32[_HOLDER] = 0
        a._sem.release()


# ---- run ------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    exit_on_signals()
    h = Harness(args.quick)
    layout = config_mod.load(str(ROOT / "config" / "stated.toml")).tables["players"].layout
    (key,) = pick_keys(1, salt=0x400)
    created = False
    rows = []
    try:
        segment.create(key, CAPACITY, layout, mode=0o600).detach()
        created = True
        t = stated.Table(segment.open(key), name="players", owner="bench")
        ents = [0x1234_0000_0000 + i * 7919 for i in range(5000)]
        hs = [t.alloc(e) for e in ents]
        hd = hs[2500]
        add_strided_views(t)
        a = t._alloc
        ns = dict(t=t, a=a, h=hd, get_strided=get_strided, set_f32_fastcheck=set_f32_fastcheck,
                  set_strided=set_strided, write_cached=write_cached, lookup_inline=lookup_inline,
                  alloc_lean=alloc_lean, free_lean=free_lean, Handle=Handle, _tnew=_tnew, sem=a._sem,
                  acquire_nowait_first=acquire_nowait_first, init=t._init, rec=t._rec, C=fmt.COUNTER_OFF,
                  hp_get=make_getter(t, "hp"), ui=struct.Struct("<i").unpack_from, mv=t._rec,
                  o_hp=hd.slot * t.record_size + layout["hp"].offset)
        for i in range(8):
            ns[f"e{i}"] = ents[(i * 613) % 5000]
        # sanity: candidates return what the current code returns
        assert ns["hp_get"](hd) == t.get(hd, "hp") == ns["ui"](t._rec, ns["o_hp"])[0]
        assert get_strided(t, hd, "hp") == t.get(hd, "hp") and get_strided(t, hd, "x") == t.get(hd, "x")
        assert all(lookup_inline(a, ns[f"e{i}"]) == t.lookup(ns[f"e{i}"]) for i in range(8))
        assert lookup_inline(a, 12345) is None
        set_strided(t, hd, "hp", 77)
        assert t.get(hd, "hp") == 77
        for bad in (1e39, -1e39, "x", float("nan"), float("inf"), 2**40):
            res = []
            for fn in (lambda v: t.set(hd, "x", v), lambda v: set_f32_fastcheck(t, hd, "x", v),
                       lambda v: set_strided(t, hd, "x", v)):
                try:
                    fn(bad)
                    res.append("ok")
                except ValueError:
                    res.append("ValueError")
            rows.append(("semantics", f"set x={bad!r}: now/fastcheck/strided", " / ".join(res)))
            assert len(set(res)) == 1, (bad, res)
        with write_cached(t, hd) as p:
            p.hp = 5
        assert t.get(hd, "hp") == 5 and t._s32[8 * hd.slot] % 2 == 0
        h2 = alloc_lean(t, 999)
        assert t.lookup(999) == h2 and t.verify() == []
        free_lean(t, h2)
        assert t.lookup(999) is None and t.verify() == []

        def V(id, label, *stmts, unroll=10):
            return Variant(id, label, "stated", list(stmts), unroll)

        experiments = [
            ("Table.get: strided per-field/generation views",
             V("get_now", 't.get(h, "hp") now', "t.get(h, 'hp')"),
             V("get_new", "get_strided(t, h, 'hp')", "get_strided(t, h, 'hp')")),
            ("per-field getter closure hp_get(h) (new API) vs t.get",
             V("get_now2", 't.get(h, "hp") now', "t.get(h, 'hp')"),
             V("get_closure", "hp_get(h)", "hp_get(h)")),
            ("raw unpack_from (reference) vs per-field getter closure",
             V("raw_ref", "Struct('<i').unpack_from(mv, o)[0]", "ui(mv, o_hp)[0]"),
             V("get_closure2", "hp_get(h)", "hp_get(h)")),
            ("Table.set f32: check_value only outside +-F32_MAX",
             V("setf_now", 't.set(h, "x", 1.5) now', "t.set(h, 'x', 1.5)"),
             V("setf_new", "set_f32_fastcheck(t, h, 'x', 1.5)", "set_f32_fastcheck(t, h, 'x', 1.5)")),
            ("Table.set f32: fast check + strided views",
             V("setf_now2", 't.set(h, "x", 1.5) now', "t.set(h, 'x', 1.5)"),
             V("setf_new2", "set_strided(t, h, 'x', 1.5)", "set_strided(t, h, 'x', 1.5)")),
            ("Table.set i32: strided views",
             V("seti_now", 't.set(h, "hp", 5) now', "t.set(h, 'hp', 5)"),
             V("seti_new", "set_strided(t, h, 'hp', 5)", "set_strided(t, h, 'hp', 5)")),
            ("write section (3 fields): per-slot cached section, strided seq/dirty",
             V("w_now", "with t.write(h) as p: 3 fields, now",
               "with t.write(h) as q:\n    q.hp = 5\n    q.x = 1.5\n    q.gold = 7"),
             V("w_new", "with write_cached(t, h) as p: same",
               "with write_cached(t, h) as q:\n    q.hp = 5\n    q.x = 1.5\n    q.gold = 7")),
            ("write section machinery only (empty body)",
             V("w0_now", "with t.write(h): pass, now", "with t.write(h) as q:\n    pass"),
             V("w0_new", "with write_cached(t, h): pass", "with write_cached(t, h) as q:\n    pass")),
            ("lookup: inlined hash+probe, strided views, tuple.__new__",
             V("lk_now", "t.lookup(e) now", *[f"t.lookup(e{i})" for i in range(8)], unroll=8),
             V("lk_new", "lookup_inline(a, e)", *[f"lookup_inline(a, e{i})" for i in range(8)], unroll=8)),
            ("Handle construction",
             V("hd_now", "Handle(slot, gen)", "Handle(3, 4)"),
             V("hd_new", "tuple.__new__(Handle, (slot, gen))", "_tnew(Handle, (3, 4))")),
            ("semaphore: acquire(timeout) vs IPC_NOWAIT first",
             V("sem_now", "sem.acquire(2.0); sem.release()", "sem.acquire(2.0)\nsem.release()"),
             V("sem_new", "sem.acquire(0); sem.release()", "sem.acquire(0)\nsem.release()")),
            ("alloc+free pair, 1 process",
             V("af_now", "t.free(t.alloc()) now", "t.free(t.alloc())", unroll=4),
             V("af_new", "free_lean(t, alloc_lean(t))", "free_lean(t, alloc_lean(t))", unroll=4)),
            ("alloc+free pair without the semaphore (Python cost only; lock calls stubbed)",
             V("afp_now", "t.free(t.alloc()), acquire/release stubbed", "t.free(t.alloc())", unroll=4),
             V("afp_new", "free_lean/alloc_lean, sem stubbed", "free_lean(t, alloc_lean(t))", unroll=4)),
            ("cost of the 200 B record init copy in alloc (vs a no-op)",
             V("init_now", "rec[0:200] = init", "rec[0:200] = init"),
             V("init_alt", "no-op (shows the copy is not where alloc time goes)", "pass")),
        ]
        print(f"hot-path experiments ({'quick' if args.quick else 'full'}), median of {h.repeats} interleaved "
              f"repeats; ratio = candidate speed / current speed", flush=True)
        print(f"{'experiment':<76} {'now ns':>9} {'cand. ns':>9} {'speedup':>8}")
        for title, now, new in experiments:
            stub = "stubbed" in title
            if stub:
                class _NoSem:
                    def acquire(self, *a):
                        pass

                    def release(self):
                        pass
                real_sem, a._sem = a._sem, _NoSem()
            try:
                h.measure(ns, [now, new])
            finally:
                if stub:
                    a._sem = real_sem
            r = paired_ratio(new.samples, now.samples)
            rows.append((title, now.ns, new.ns, r))
            print(f"{title:<76} {now.ns:>9.1f} {new.ns:>9.1f} {r:>7.2f}x", flush=True)
        for row in rows:
            if row[0] == "semantics":
                print(f"  semantics check: {row[1]} -> {row[2]}")
        assert t.verify() == []
        t.close()
    finally:
        if created:
            segment.destroy(key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
