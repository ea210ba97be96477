"""The native core (stated/native/stated_core.h): its C build under gcc and clang, its C unit tests
(also under ASan + UBSan), the CPython extension stated.shm._native used directly next to Python's
Table (which runs the same core through it) on the same real segments, the SIGKILL tortures (native
alone, and Table + bare extension + C processes mixed in one table), and a two-process seqlock stress
in both directions."""
from __future__ import annotations

import ctypes
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import sysv_ipc
from helpers import PLAYER_FIELDS, ROOT, fill_and_drain, fork_child, index_home, lock_word, player_layout, u32

import stated
from stated.format import config as config_mod
from stated.format import segment as fmt
from stated.shm import _native, segment
from stated.shm.allocator import Handle
from stated.shm.records import default_record, record_class
from stated.tools import cheader

NATIVE = ROOT / "stated" / "native"
CSRC = Path(__file__).resolve().parent / "native"
STRICT = ["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic", "-O2"]
COMPILERS = [pytest.param(cc, marks=pytest.mark.skipif(shutil.which(cc) is None, reason=f"{cc} is not installed "
                                                         f"(.ci/system-deps installs it)")) for cc in ("gcc", "clang")]
HAVE_CC = shutil.which("gcc") or shutil.which("clang")


def cc_build(cc: str, src: Path, out: Path, *extra: str) -> Path:
    r = subprocess.run([cc, *STRICT, *extra, "-I", str(NATIVE), "-o", str(out), str(src)], capture_output=True,
                       text=True)
    assert r.returncode == 0, f"{cc} failed on {src.name}:\n{r.stderr}"
    return out


@pytest.fixture(scope="module")
def cbin(tmp_path_factory):
    """The C test programs, built once per module with the first compiler available."""
    if not HAVE_CC:
        pytest.skip("no C compiler (gcc or clang)")
    cc = shutil.which("gcc") or shutil.which("clang")
    d = tmp_path_factory.mktemp("native-bin")
    return {name: cc_build(cc, CSRC / f"{name}.c", d / name) for name in ("unit", "churn", "seqlock")}


class Attached:
    """A Core over a freshly opened segment, closed (and the segment detached) on exit."""

    def __init__(self, key: int, owner: str | None = None, readonly: bool = False, **kw):
        self.seg = segment.open(key, readonly=readonly)
        lay = self.seg.header.layout
        self.cls = record_class(lay, "players")
        kw.setdefault("init", default_record(self.cls))
        self.core = _native.Core(self.seg.buf, key, table="players", readonly=readonly, handle=Handle, **kw)
        if owner:
            self.core.claim_owner(owner)

    def view(self, slot: int):
        off = self.seg.header.regions.records_offset + slot * self.seg.header.record_size
        return self.cls.from_buffer(self.seg.buf, off)

    def close(self) -> None:
        self.core.close()
        self.seg.detach()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---- the C build ---------------------------------------------------------------------------------------
def test_format_header_is_current():
    """stated_format.h is what cheader generates from format.py (nothing restates an offset)."""
    assert (NATIVE / "stated_format.h").read_text() == cheader.format_header(), \
        "stated/native/stated_format.h is stale: regenerate it (command at its top)"


@pytest.mark.parametrize("cc", COMPILERS)
def test_core_compiles_strict(cc, tmp_path):
    """The core alone and inside a generated header, -Wall -Wextra -Werror -std=c11 -pedantic."""
    (tmp_path / "alone.c").write_text('#define _GNU_SOURCE\n#define STATED_IMPLEMENTATION\n#include "stated_core.h"\n'
                                      "int main(void) { stated_table t; return stated_open(1, NULL, &t) == 0; }\n")
    cc_build(cc, tmp_path / "alone.c", tmp_path / "alone", "-Wshadow")
    cfg = config_mod.load(ROOT / "config" / "stated.toml")
    (tmp_path / "stated_tables.h").write_text(cheader.generate([(n, t.key, t.layout) for n, t in cfg.tables.items()]))
    (tmp_path / "gen.c").write_text(
        '#define _XOPEN_SOURCE 700\n#define STATED_IMPLEMENTATION\n#include "stated_tables.h"\n'
        "int main(void) { stated_table t; stated_handle h;\n"
        "  if (stated_open_players(\"w\", &t) != 0) return 1;\n"
        "  return stated_alloc(&t, 1, &h) == 0 && stated_free(&t, h) == 0; }\n")
    r = subprocess.run([cc, *STRICT, "-Wshadow", "-I", str(tmp_path), "-o", str(tmp_path / "gen"),
                        str(tmp_path / "gen.c")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr



@pytest.mark.parametrize("cc", COMPILERS)
def test_extension_compiles_without_warnings(cc, tmp_path):
    """The CPython extension (_native.c: the core plus its Python adapter and record-view descriptors)
    under -Wall -Wextra -Werror (not -pedantic: its module docstring is longer than ISO C's 4095)."""
    r = subprocess.run([cc, "-std=c11", "-Wall", "-Wextra", "-Werror", "-O2", "-fno-strict-aliasing", "-fPIC",
                        "-I", sysconfig.get_paths()["include"], "-I", str(NATIVE), "-c", "-o", str(tmp_path / "n.o"),
                        str(NATIVE / "_native.c")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

def test_generated_header_refuses_table_names_clashing_with_the_core():
    lay = player_layout()
    for bad in ("handle", "table", "options", "hooks", "table_info", "slot_copy", "ex"):
        with pytest.raises(ValueError, match="rename the table"):
            cheader.generate([(bad, 1, lay)])


@pytest.mark.parametrize("cc", COMPILERS)
def test_c_unit_tests(cc, tmp_path, make_segment):
    exe = cc_build(cc, CSRC / "unit.c", tmp_path / "unit")
    key = make_segment(capacity=16)
    r = subprocess.run([str(exe), hex(key)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "all ok" in r.stdout, r.stdout + r.stderr
    with stated.attach(key=key, owner="py") as t:      # and the Python side agrees
        assert t.verify() == []


def _sanitizer_flags(cc: str, tmp_path: Path) -> list[str] | None:
    flags = ["-g", "-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
    (tmp_path / "probe.c").write_text("int main(void) { return 0; }\n")
    r = subprocess.run([cc, *flags, "-o", str(tmp_path / "probe"), str(tmp_path / "probe.c")], capture_output=True)
    if r.returncode != 0 or subprocess.run([str(tmp_path / "probe")]).returncode != 0:
        return None
    return flags


@pytest.mark.parametrize("cc", COMPILERS)
def test_c_unit_tests_under_asan_ubsan(cc, tmp_path, make_segment):
    flags = _sanitizer_flags(cc, tmp_path)
    if flags is None:
        pytest.skip(f"{cc} cannot link ASan+UBSan here (clang needs libclang-rt-dev: .ci/system-deps)")
    exe = tmp_path / "unit-san"
    r = subprocess.run([cc, "-std=c11", "-Wall", "-Wextra", "-Werror", *flags, "-I", str(NATIVE), "-o", str(exe),
                        str(CSRC / "unit.c")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    key = make_segment(capacity=16)
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1")
    r = subprocess.run([str(exe), hex(key)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and "all ok" in r.stdout, r.stdout + r.stderr
    assert "runtime error" not in r.stderr and "AddressSanitizer" not in r.stderr, r.stderr


# ---- the bare extension next to Python's Table ---------------------------------------------------------------
def test_extension_and_python_share_one_table(make_segment):
    key = make_segment(capacity=32)
    with Attached(key, "ext") as a, stated.attach(key=key, owner="py") as t:
        c = a.core
        he = c.alloc(10)
        hp = t.alloc(entity=20)
        assert isinstance(he, Handle) and he == (0, 1) and hp == (1, 1)
        assert t.lookup(10) == he and c.lookup(20) == hp and c.lookup(30) is None
        assert c.lookup(-1) is None and c.lookup(2**64) is None
        with pytest.raises(stated.DuplicateEntity):
            c.alloc(20)                                   # Python's entity, seen by the C index code
        with pytest.raises(stated.DuplicateEntity):
            t.alloc(entity=10)
        assert t.read(he).hp == 100 and t.read(he).level == 1     # the record initialiser
        with c.section(he.slot, a.view(he.slot)) as p:
            p.hp = 7
            p.name = "from-c"
        assert t.read(he).hp == 7 and t.read(he).name == "from-c"
        with t.write(hp) as p:
            p.gold = 99
        assert c.read(hp, a.cls).gold == 99
        assert bytes(c.read(hp, bytearray(200))) == c.read_bytes(hp)
        with pytest.raises(stated.NotOwner):
            c.free(hp)                                    # Python's slot
        c.free(hp, True)                                  # forced, as the daemon may
        with pytest.raises(stated.StaleHandle):
            t.free(hp)
        t.free(t.alloc(entity=21))
        c.free(he)
        assert c.lookup(10) is None and t.lookup(10) is None and len(t) == 0 == c.used()
        assert t.verify() == [] and c.verify() == [] and c.audit() == []
        counters = dict(zip(fmt.COUNTERS, c.counters()))
        assert counters == t.counters()
        assert counters["allocations"] == counters["frees"] == 3
        assert counters["alloc_failures_duplicate"] == 2


def test_extension_errors_are_stated_exceptions(make_segment, new_key):
    key = make_segment(capacity=2)
    with Attached(key, "e") as a:
        c = a.core
        h1, h2 = c.alloc(), c.alloc()
        with pytest.raises(stated.TableFull, match="full"):
            c.alloc()
        with pytest.raises(stated.SlotOutOfRange):
            c.free((5, 1))
        with pytest.raises(stated.SlotOutOfRange):
            c.read((-1, 1), bytearray(200))
        with pytest.raises(stated.StaleHandle):
            c.free((h1.slot, 2**40))
        with pytest.raises(ValueError, match="u64"):
            c.alloc(-5)
        with pytest.raises(TypeError):
            c.free(5)
        c.free(h1)
        with pytest.raises(stated.StaleHandle, match="already freed"):
            c.free(h1)
        with pytest.raises(stated.StaleHandle):
            c.read(h1, bytearray(200))
        with pytest.raises(ValueError, match="200 bytes"):
            c.read(h2, bytearray(8))                      # smaller than a record
        a.core.owner = 0
        with pytest.raises(stated.NotOwner, match="owner name"):
            c.alloc()
    with Attached(key, readonly=True) as ro:
        with pytest.raises(stated.ReadOnlyTable):
            ro.core.alloc()
        with pytest.raises(stated.ReadOnlyTable):
            ro.core.claim_owner("x")
    seg = segment.open(key)
    try:
        bad = bytearray(seg.buf)
        bad[0] = ord("X")
        with pytest.raises(stated.CorruptSegment, match="magic"):
            _native.Core(bad, key)
        with pytest.raises(stated.LayoutMismatch):
            _native.Core(seg.buf, key, layout_hash=seg.header.layout_hash ^ 1)
        with pytest.raises(stated.SegmentNotFound):
            _native.Core(seg.buf, new_key())               # no semaphore on that key
        with pytest.raises(ValueError, match="record size"):
            _native.Core(seg.buf, key, init=b"x")
    finally:
        seg.detach()


def test_owner_claims_between_extension_and_python(make_segment, procs):
    key = make_segment(capacity=8)
    with Attached(key, "zone") as a:
        h = a.core.alloc(1)
        a.core.write_begin(h)                             # dies inside a section, as it were
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:                                      # another live process may not take the name
            code = 9
            try:
                stated.attach(key=key, owner="zone")
            except stated.OwnerBusy:
                code = 0
            except BaseException:  # noqa: BLE001 - the child reports through its exit code
                code = 8
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        idx = a.core.owner
    # the extension's process "restarts": Python re-attaches under the same name, settles the odd seq
    seg_seq = None
    with stated.attach(key=key, owner="zone") as t:
        assert t._owner == idx and t.owned() == [h]
        assert t.read(h).hp == 100 and t.counters()["settled_slots"] == 1
        seg_seq = u32(t._seg.buf, t._seg.header.regions.slots_offset + 32 * h.slot)
        assert seg_seq % 2 == 0
    with Attached(key, "zone") as a2:                     # and the extension takes it back from Python
        assert a2.core.owner == idx and a2.core.handles(idx) == [h] and a2.core.owned_slots(idx) == [h.slot]
        assert a2.core.set_owner_state(idx, fmt.OWNER_DEAD, 1) is False        # not that pid
        assert a2.core.set_owner_state(idx, fmt.OWNER_DEAD, os.getpid()) is True
        assert a2.core.reap_owner(idx) == 1
        assert a2.core.verify() == [] and dict(zip(fmt.COUNTERS, a2.core.counters()))["reaped_slots"] == 1


@pytest.mark.parametrize("scribble", ["free_top_zero", "free_top_huge", "used_zero", "full_index", "phantom",
                                      "index_seq_wrap", "counters_wrap", "owner_out_of_range"])
def test_extension_rebuilds_scribbled_state(make_segment, scribble):
    """The scribbles of test_dataplane_defects, through the extension: never stuck, never a lock kept."""
    key = make_segment(capacity=20)
    with Attached(key, "me") as a, stated.attach(key=key, owner="py") as t:
        c, buf, r = a.core, a.seg.buf, a.seg.header.regions
        if scribble == "free_top_zero":
            u32(buf, fmt.A_FREE_TOP, 0)
            assert c.valid(c.alloc())
        elif scribble == "free_top_huge":
            u32(buf, fmt.A_FREE_TOP, 10**6)
            c.free(c.alloc())
        elif scribble == "used_zero":
            h = c.alloc()
            u32(buf, fmt.A_USED, 0)
            c.free(h)
            assert c.audit() != [] and c.audit() == []
        elif scribble == "full_index":
            h = c.alloc(77)
            for e in range(r.index_capacity):
                fmt.INDEX_ENTRY.pack_into(buf, r.index_offset + e * fmt.INDEX_ENTRY_SIZE, 10**9 + e, 1, 0)
            t0 = time.monotonic()
            h2 = c.alloc(78)
            c.free(h)
            assert time.monotonic() - t0 < 2 and c.lookup(78) == h2 and c.lookup(77) is None
        elif scribble == "phantom":
            h = c.alloc(1)
            c.free(h)
            home = index_home(999, r.index_capacity)
            fmt.INDEX_ENTRY.pack_into(buf, r.index_offset + home * fmt.INDEX_ENTRY_SIZE, 999, h.slot + 1, 0)
            assert c.lookup(999) is None
            assert c.lookup(999) is None and c.alloc(999) == c.lookup(999)
        elif scribble == "index_seq_wrap":
            c.alloc(1)
            u32(buf, fmt.A_INDEX_SEQ, 0xFFFFFFFF)
            u32(buf, fmt.A_INTENT_OP, fmt.INTENT_ALLOC)
            u32(buf, fmt.A_INTENT_PID, 0x7FFFFFF0)
            h = c.alloc(2)
            assert t.lookup(2) == h and u32(buf, fmt.A_INDEX_SEQ) % 2 == 0
        elif scribble == "counters_wrap":
            for n in ("allocations", "frees"):
                buf[fmt.COUNTER_OFF[n]:fmt.COUNTER_OFF[n] + 8] = (2**64 - 1).to_bytes(8, "little")
            c.free(c.alloc())
            assert t.counters()["allocations"] == 0 == t.counters()["frees"]
        elif scribble == "owner_out_of_range":
            h = c.alloc()
            off = r.slots_offset + 32 * h.slot + fmt.S_OWNER
            buf[off:off + 2] = (1000).to_bytes(2, "little")
            with pytest.raises(stated.NotOwner):
                c.free(h)
            assert c.audit() != []
        assert lock_word(key) == 0
        assert c.verify() == [] and t.verify() == []


def test_sections_reads_and_dirty_scans(make_segment):
    key = make_segment(capacity=8)
    with Attached(key, "w") as a, stated.attach(key=key, readonly=True) as obs:
        c = a.core
        h = c.alloc(5)
        assert c.changed_slots() == [h.slot] and c.changed_slots() == []       # cleared before listing
        view = a.view(h.slot)
        s = c.section(h.slot, view)
        for i in range(3):                                 # reusable
            with s as p:
                assert p is view
                p.hp = i
        assert obs.read(h).hp == 2 and c.changed_slots(clear=False) == [h.slot]
        c.write_begin(h)
        with pytest.raises(stated.StatedError, match="nest"):
            c.write_begin(h)
        with stated.attach(key=key, readonly=True, read_timeout=0.05) as obs2, pytest.raises(stated.TornRecord):
            obs2.read(h)
        c.free(h)                                          # freed inside its own section: seq settled
        c.write_end(h)                                     # a no-op now
        s.disarm()
        with pytest.raises(stated.StaleHandle):
            with s:
                pass
        h2 = c.alloc(6)
        assert h2.slot == h.slot
        with c.section(h2.slot, a.view(h2.slot)) as p:
            p.hp = 11
        assert c.read(h2, a.cls).hp == 11 and obs.read(h2).hp == 11
        t2 = c.alloc()
        buf = a.seg.buf
        buf[a.seg.header.regions.slots_offset + 32 * t2.slot + fmt.S_PINNED] = 1
        assert c.changed_slots() == sorted({h2.slot, t2.slot})
        assert c.changed_slots() == [t2.slot]              # pinned: on every snapshot
        assert c.allocated_slots(clear_dirty=True) == sorted([h2.slot, t2.slot])
        gen, state, flags, owner, entity, data, torn = c.copy_slot(h2.slot)
        assert (gen, state, flags, owner, entity, torn) == (h2.generation, 1, 1, c.owner, 6, False)
        assert data == c.read_bytes(h2)
        assert c.entity(h2) == 6 and c.entity(t2) is None
        assert c.verify() == []
        closed, live = a.core, c.section(h2.slot, a.view(h2.slot))
    with pytest.raises(stated.StatedError, match="closed"):
        closed.alloc()
    with pytest.raises(stated.StatedError, match="closed"):
        with live:
            pass


def test_write_checks_and_caches_the_slot_section(make_segment):
    """Core.write(h), Table.write's C path: the checks of a write section, one section per slot made
    over view_factory(slot) and reused, disarmed by free and by close."""
    key = make_segment(capacity=8)
    made = []
    with Attached(key, "w") as a, Attached(key, "other") as b:
        c = a.core
        h = c.alloc(1)
        with pytest.raises(TypeError, match="view_factory"):
            c.write(h)
        c.view_factory = lambda slot: made.append(slot) or a.view(slot)
        s = c.write(h)
        assert c.write(h) is s and made == [h.slot]      # made once, then cached
        with s as p:
            p.hp = 5
            with pytest.raises(stated.StatedError, match="do not nest"):
                c.write(h)
        assert c.read(h, a.cls).hp == 5 and c.changed_slots() == [h.slot]
        with pytest.raises(stated.NotOwner):
            b.core.write(h)
        with pytest.raises(stated.SlotOutOfRange):
            c.write((8, 1))
        with pytest.raises(TypeError):
            c.view_factory = 5
        c.free(h)
        with pytest.raises(stated.StaleHandle):
            c.write(h)
        with pytest.raises(stated.StaleHandle, match="freed"):
            with s:                                     # disarmed by free: never touches the slot again
                pass
        h2 = c.alloc(2)
        assert h2.slot == h.slot and c.write(h2) is not s and made == [h.slot, h.slot]
        s2 = c.write(h2)
    with pytest.raises(stated.StatedError):
        with s2:                                        # disarmed by close
            pass
    with Attached(key, readonly=True) as ro, pytest.raises(stated.ReadOnlyTable):
        ro.core.write(h2)


def test_allocator_allocates_and_frees_for_an_owner_with_its_record(make_segment):
    """What the daemon's store does for claim/release: allocate for a worker's owner index with a record
    loaded from the database (Core.alloc(entity, init)), free it for that owner; the worker's Table
    forgets the slot (its cached write section is disarmed)."""
    from stated.shm.allocator import Allocator
    key = make_segment(capacity=4)
    with stated.attach(key=key, owner="zone") as t:
        seg = segment.open(key)
        a = Allocator(seg, table="players")
        try:
            row = bytearray(default_record(t._cls))
            t._cls.from_buffer(row).hp = 42
            h = a.alloc(77, t._owner, bytes(row))
            assert a.core.owner == 0                                  # the daemon's own stays unset
            assert t.lookup(77) == h == a.lookup(77) and t.read(h).hp == 42 and t.entity(h) == 77
            assert t.owned() == [h]
            with pytest.raises(ValueError, match="records are"):
                a.alloc(78, t._owner, b"short")
            s = t.write(h)
            with pytest.raises(stated.NotOwner):
                a.free(h, t._owner + 1)
            a.free(h, t._owner)
            t._forget(h.slot)                                         # as Table.release() does
            with pytest.raises(stated.StaleHandle):
                with s:
                    pass
            assert t.lookup(77) is None and a.verify() == [] and a.core.owner == 0
        finally:
            a.release_views()
            seg.detach()


def test_core_in_a_reference_cycle_is_collected(make_segment):
    """A Core is garbage-collected: a Table dropped without close() (its bound view factory refers to
    the Table, which refers to the Core) does not keep the segment's buffer exported for good."""
    import gc
    import weakref

    class Factory:
        def __call__(self, slot):
            return None
    key = make_segment(capacity=4)
    seg = segment.open(key)
    try:
        f = Factory()
        f.core = _native.Core(seg.buf, key)                 # Factory -> Core -> Factory
        f.core.view_factory = f
        gone = weakref.ref(f)
        del f
        gc.collect()
        assert gone() is None
    finally:
        assert seg.detach()                                  # no export left: the Core released the buffer


def test_timeouts_repair_locked_and_conditional_owner_state(make_segment):
    key = make_segment(capacity=4)
    with Attached(key, "w", lock_timeout=0.5, read_timeout=0.2) as a:
        c = a.core
        assert (c.lock_timeout, c.read_timeout) == (0.5, 0.2)
        c.lock_timeout, c.read_timeout = 0.25, 0.05          # a reload changes them
        assert (c.lock_timeout, c.read_timeout) == (0.25, 0.05)
        for bad in (0, -1.0, float("nan"), "x"):
            with pytest.raises((ValueError, TypeError)):
                c.lock_timeout = bad
        with pytest.raises(stated.StatedError, match="outside acquire"):
            c.repair_locked()                               # never without the lock
        before = dict(zip(fmt.COUNTERS, c.counters()))["lock_repairs"]
        c.acquire()
        try:
            c.repair_locked()
        finally:
            c.release()
        assert dict(zip(fmt.COUNTERS, c.counters()))["lock_repairs"] == before + 1 and lock_word(key) == 0
        r, w = os.pipe()
        pid = fork_child(_hold_lock, key, w, 5)
        os.read(r, 1)
        try:
            t0 = time.monotonic()
            with pytest.raises(stated.LockTimeout, match="0.25s"):
                c.alloc()
            assert time.monotonic() - t0 < 0.6              # the new lock timeout
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        idx = c.owner
        assert c.set_owner_state(idx, fmt.OWNER_DEAD, 0) is False     # 0 is a pid like any other here
        assert c.set_owner_state(idx, fmt.OWNER_DETACHED, None) is True   # None: unconditionally


def test_readonly_core_reads_and_looks_up(make_segment):
    key = make_segment(capacity=8)
    with Attached(key, "w") as a, Attached(key, readonly=True) as ro:
        h = a.core.alloc(42)
        assert ro.core.lookup(42) == h and ro.core.read(h, ro.cls).hp == 100
        assert ro.core.verify() == [] and ro.core.readonly and ro.core.semid == -1


# ---- the lock: timeouts, signals, a swapped semaphore -----------------------------------------------------
def _hold_lock(key: int, ready_w: int, hold: float) -> None:
    """Forked child: take the table lock through the native core, then hold it."""
    a = Attached(key)
    a.core.acquire()
    os.write(ready_w, b"x")
    time.sleep(hold)
    a.core.release()
    os._exit(0)


def test_lock_wait_is_one_deadline_across_signals(make_segment, procs):
    key = make_segment(capacity=4)
    r, w = os.pipe()
    pid = fork_child(_hold_lock, key, w, 60)
    procs.append(pid)
    os.read(r, 1)
    calls = []
    old = signal.signal(signal.SIGALRM, lambda *_: calls.append(1))
    try:
        with Attached(key, None, lock_timeout=0.3) as a:
            a.core.owner = 1
            signal.setitimer(signal.ITIMER_REAL, 0.02, 0.02)
            t0 = time.monotonic()
            with pytest.raises(stated.LockTimeout, match="0.3s"):
                a.core.alloc()
            took = time.monotonic() - t0
            signal.setitimer(signal.ITIMER_REAL, 0)
            assert 0.28 < took < 0.8 and len(calls) >= 5, (took, len(calls))
            assert dict(zip(fmt.COUNTERS, a.core.counters()))["lock_timeouts"] == 1

            def boom(*_):
                raise KeyboardInterrupt
            signal.signal(signal.SIGALRM, boom)
            signal.setitimer(signal.ITIMER_REAL, 0.05)
            t0 = time.monotonic()
            with pytest.raises(KeyboardInterrupt):          # a handler's exception ends the wait at once
                a.core.alloc()
            assert time.monotonic() - t0 < 0.25
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        procs.remove(pid)
    assert lock_word(key) & ((1 << fmt.LOCK_PID_BITS) - 1) == pid    # the waiters gave up, never took it
    with stated.attach(key=key, owner="after") as t:
        t0 = time.monotonic()
        t.free(t.alloc())                                  # the killed holder's word is taken over
        assert time.monotonic() - t0 < 0.5
    assert lock_word(key) == 0


def test_swapped_semaphore_waits_for_the_live_holder(make_segment, procs):
    """A native holder inside the lock; the semaphore is removed and recreated (ipcrm, RemoveIPC) with
    a spare wake-up on it: a second process still waits for the holder (the lock is the word in the
    segment; the semaphore only wakes waiters) instead of entering the critical section with it."""
    key = make_segment(capacity=4)
    r, w = os.pipe()
    pid = fork_child(_hold_lock, key, w, 0.4)
    procs.append(pid)
    os.read(r, 1)
    sysv_ipc.Semaphore(key).remove()
    sysv_ipc.Semaphore(key, sysv_ipc.IPC_CREX, 0o600, 1)     # the daemon recreates it
    with Attached(key, lock_timeout=3.0, semid=-1) as a:
        t0 = time.monotonic()
        a.core.owner = 1
        h = a.core.alloc()
        waited = time.monotonic() - t0
        assert waited > 0.2, "entered while the holder was still inside"
        a.core.free(h)
        assert a.core.verify() == []
    _, status = os.waitpid(pid, 0)
    procs.remove(pid)
    assert os.waitstatus_to_exitcode(status) == 0


# ---- SIGKILL tortures ------------------------------------------------------------------------------------
def _ext_churn(key: int, owner: str, seed: int, ready_w: int = -1, tight: bool = False) -> None:
    """Forked child, until killed: the extension allocates (entities), tags records in sections, frees.

    `tight`: only alloc and free, with precomputed choices, so that most of the time goes to the
    allocator itself (a kill then lands inside its lock far more often)."""
    rnd = random.Random(seed)
    a = Attached(key, owner, lock_timeout=10)
    c = a.core
    me = os.getpid()
    mine = [(h, False) for h in c.handles(c.owner)]
    if ready_w >= 0:
        os.write(ready_w, b"e")
    if tight:
        alloc, free = c.alloc, c.free
        ents = [rnd.randrange(1, 500) for _ in range(4096)]
        live = [h for h, _ in mine]
        i = 0
        while True:
            i = (i + 1) & 4095
            if len(live) < 40 and ents[i] & 1:
                try:
                    live.append(alloc(ents[i]))
                except (stated.TableFull, stated.DuplicateEntity):
                    if live:
                        free(live.pop())
            elif live:
                free(live.pop(ents[i] % len(live)))
    while True:
        if len(mine) < 40 and rnd.random() < 0.55:
            try:
                h = c.alloc(rnd.randrange(1, 500))
            except (stated.TableFull, stated.DuplicateEntity):
                if mine:
                    c.free(mine.pop(rnd.randrange(len(mine)))[0])
                continue
            with c.section(h.slot, a.view(h.slot)) as p:
                p.id = me
                p.hp = rnd.randrange(100)
            mine.append((h, True))
        elif mine:
            h, tagged = mine.pop(rnd.randrange(len(mine)))
            if tagged and c.read(h, a.cls).id != me:
                sys.stderr.write(f"VIOLATION slot {h.slot}\n")
                os._exit(3)
            c.free(h)


def _py_churn(key: int, owner: str, seed: int, ready_w: int = -1) -> None:
    """Forked child, until killed: the same through Python's Table (its write sections, reads, owned())."""
    rnd = random.Random(seed)
    t = stated.attach(key=key, owner=owner, lock_timeout=10)
    me = os.getpid()
    mine = [(h, False) for h in t.owned()]
    if ready_w >= 0:
        os.write(ready_w, b"p")
    while True:
        if len(mine) < 40 and rnd.random() < 0.55:
            try:
                h = t.alloc(entity=rnd.randrange(1, 500))
            except (stated.TableFull, stated.DuplicateEntity):
                if mine:
                    t.free(mine.pop(rnd.randrange(len(mine)))[0])
                continue
            with t.write(h) as p:
                p.id = me
                p.name = "py"
            mine.append((h, True))
        elif mine:
            h, tagged = mine.pop(rnd.randrange(len(mine)))
            if tagged and t.read(h).id != me:
                sys.stderr.write(f"VIOLATION slot {h.slot}\n")
                os._exit(3)
            t.free(h)


def _check_table(key: int, checker: stated.Table, core) -> None:
    assert checker.verify() == []
    assert core.verify() == []


def test_native_sigkill_torture(make_segment, procs):
    """The allocator torture of test_allocator.py on the native path: 200 kills at random moments.

    The native critical section is so short that random kills seldom land inside it; records of
    128 KiB (their initialiser is copied under the lock) make it long enough to be hit, and two in
    three kills wait until the worker is in its loop."""
    key = make_segment(capacity=64, fields=[*PLAYER_FIELDS, "blob: bytes[131072]"])
    rnd = random.Random(99)
    with stated.attach(key=key, owner="checker", lock_timeout=5) as checker, Attached(key) as ac:
        for i in range(200):
            r, w = os.pipe()
            pid = fork_child(_ext_churn, key, "chaos", i, w, i % 2 == 1)
            procs.append(pid)
            os.close(w)
            if i % 3:                                      # most kills inside the loop, some anywhere
                assert select.select([r], [], [], 20)[0] and os.read(r, 1), "the worker died before its loop"
                time.sleep(rnd.uniform(0, 0.004))
            else:
                time.sleep(rnd.uniform(0.003, 0.015))
            os.close(r)
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            procs.remove(pid)
            assert os.WIFSIGNALED(status), f"the worker exited by itself ({status}): see its stderr"
            _check_table(key, checker, ac.core)
            if i % 30 == 29:
                fill_and_drain(checker)
        counters = checker.counters()
        print(counters)
        assert counters["lock_repairs"] > 10, "kills seldom landed inside the lock: the test lost its teeth"
        with Attached(key, "chaos") as a:
            for h in a.core.handles(a.core.owner):
                a.core.free(h)
        assert len(checker) == 0
        _check_table(key, checker, ac.core)


def _mixed_rounds(key: int, rounds: int, churn_exe: Path, procs, seed: int) -> dict:
    rnd = random.Random(seed)
    killed = {"py": 0, "ext": 0, "c": 0}
    in_mutation = {"py": 0, "ext": 0, "c": 0}       # killed with its intent mark set: repaired by another
    with stated.attach(key=key, owner="checker", lock_timeout=5) as checker, Attached(key) as ac:
        for i in range(rounds):
            # every other round the kills wait until all three are inside their loops (most kills of a
            # free-running round land in start-up: fork, attach, exec)
            in_loop = i % 2 == 0
            r, w = os.pipe()
            kids = {"py": fork_child(_py_churn, key, "py", rnd.randrange(1 << 30), w),
                    "ext": fork_child(_ext_churn, key, "ext", rnd.randrange(1 << 30), w)}
            cproc = subprocess.Popen([str(churn_exe), hex(key), "c", str(rnd.randrange(1 << 30))],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            procs.extend([*kids.values(), cproc])
            os.close(w)
            if in_loop:
                got = b""
                while len(got) < 2:                       # bounded: a worker may die before its loop
                    assert select.select([r], [], [], 20)[0], f"workers not in their loops after 20 s ({got})"
                    got += os.read(r, 2)
                assert cproc.stdout.readline() == b"ready\n"
                time.sleep(rnd.uniform(0, 0.006))
            else:
                time.sleep(rnd.uniform(0.005, 0.03))
            os.close(r)
            order = list(kids.items()) + [("c", cproc)]
            pids = {(p if isinstance(p, int) else p.pid): kind for kind, p in order}
            rnd.shuffle(order)
            for kind, p in order:
                pid = p if isinstance(p, int) else p.pid
                os.kill(pid, signal.SIGKILL)
                if isinstance(p, int):
                    _, status = os.waitpid(pid, 0)
                    signalled = os.WIFSIGNALED(status)
                else:
                    err = p.communicate(timeout=30)[1]
                    signalled = p.returncode == -signal.SIGKILL
                    assert signalled, f"the C worker exited {p.returncode}: {err.decode(errors='replace')}"
                assert signalled, f"the {kind} worker exited by itself ({status}): see its stderr"
                procs.remove(p)
                killed[kind] += 1
                time.sleep(rnd.uniform(0, 0.004))
            buf = checker._seg.buf
            op, ipid = u32(buf, fmt.A_INTENT_OP), u32(buf, fmt.A_INTENT_PID)
            if op and ipid in pids:
                in_mutation[pids[ipid]] += 1
            _check_table(key, checker, ac.core)            # takes the lock: repairs what the kill left
            if i % 10 == 9:
                fill_and_drain(checker)
                _check_table(key, checker, ac.core)
        counters = checker.counters()
        for name in ("py", "ext", "c"):                   # every dead worker's slots can be taken back and freed
            with stated.attach(key=key, owner=name) as t:
                for h in t.owned():
                    t.free(h)
        assert len(checker) == 0
        _check_table(key, checker, ac.core)
    return dict(counters=counters, killed=killed, in_mutation=in_mutation)


def test_mixed_sigkill_torture(make_segment, procs, cbin):
    """Table, bare-extension and C processes allocate, write and free in one table while being
    SIGKILLed: 0 violations (verify() == [] after every round, no slot ever held twice, every free
    slot allocatable), repairs counted."""
    key = make_segment(capacity=64, fields=[*PLAYER_FIELDS, "blob: bytes[32768]"])   # see the native torture
    got = _mixed_rounds(key, 60, cbin["churn"], procs, seed=7)
    print(got)
    assert got["counters"]["lock_repairs"] > 0, got


@pytest.mark.slow
def test_mixed_sigkill_torture_long(make_segment, procs, cbin):
    key = make_segment(capacity=64, fields=[*PLAYER_FIELDS, "blob: bytes[32768]"])
    got = _mixed_rounds(key, 600, cbin["churn"], procs, seed=20261202)
    print(got)
    assert got["counters"]["lock_repairs"] > 10, got
    assert all(n > 0 for n in got["in_mutation"].values()), got     # each kind was killed mid-mutation


# ---- two-process seqlock stress --------------------------------------------------------------------------
def _all_equal_words(data: bytes) -> bool:
    return data == data[:4] * (len(data) // 4)


def test_seqlock_c_writer_python_reader_never_torn(make_segment, procs, cbin):
    key = make_segment(capacity=4)
    p = subprocess.Popen([str(cbin["seqlock"]), "writer", hex(key), "cw", "77"], stdout=subprocess.PIPE, text=True)
    procs.append(p)
    assert p.stdout.readline().startswith("ready")
    try:
        with Attached(key, readonly=True, read_timeout=1.0) as a:
            h = a.core.lookup(77)
            reads = torn = 0
            seen = set()
            end = time.monotonic() + 1.5
            read_bytes = a.core.read_bytes
            while time.monotonic() < end:
                for _ in range(200):
                    d = read_bytes(h)
                    reads += 1
                    if not _all_equal_words(d):
                        torn += 1
                    seen.add(d[:4])
    finally:
        p.kill()
        p.wait()
        procs.remove(p)
    assert torn == 0 and reads > 1000 and len(seen) > 10, (reads, torn, len(seen))


def _py_writer(key: int, ready_w: int) -> None:
    a = Attached(key, "pw")
    h = a.core.alloc(88)
    words = a.core.record_size // 4
    arr = (ctypes.c_uint32 * words).from_buffer(a.seg.buf, a.seg.header.regions.records_offset
                                                  + h.slot * a.core.record_size)
    s = a.core.section(h.slot, arr)
    v = 0
    while True:
        v = (v + 1) & 0xFFFFFFFF
        with s as p:
            for i in range(words):                        # word by word, interpreted: a wide window
                p[i] = v
        if v == 1:
            # ready only now: before the first section ends the record holds the field defaults (words
            # not all equal), which a reader would count as torn although the seqlock is doing its job
            os.write(ready_w, b"x")


def test_seqlock_python_writer_c_reader_never_torn(make_segment, procs, cbin):
    key = make_segment(capacity=4)
    r, w = os.pipe()
    pid = fork_child(_py_writer, key, w)
    procs.append(pid)
    os.read(r, 1)
    try:
        out = subprocess.run([str(cbin["seqlock"]), "reader", hex(key), "88", "1.5"], capture_output=True,
                             text=True, timeout=60)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        procs.remove(pid)
    assert out.returncode == 0, out.stderr
    got = dict(kv.split("=") for kv in out.stdout.split())
    assert int(got["torn"]) == 0 and int(got["reads"]) > 100 and int(got["distinct"]) > 10, got


# ---- examples/c_worker.c: a C worker allocates, writes and frees ----------------------------------------
@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
def test_example_c_worker_plays_with_python(tmp_path, write_config, procs):
    cc = shutil.which("gcc") or shutil.which("clang")
    cfg = config_mod.load(write_config(tables={"players": {"capacity": 50}}))
    tc = cfg.table("players")
    segment.create(tc.key, tc.capacity, tc.layout, mode=0o600).detach()
    (tmp_path / "stated_tables.h").write_text(cheader.generate([(n, t.key, t.layout) for n, t in cfg.tables.items()]))
    exe = tmp_path / "c_worker"
    r = subprocess.run([cc, *STRICT, "-I", str(tmp_path), "-o", str(exe), str(ROOT / "examples" / "c_worker.c")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with stated.attach(key=tc.key, owner="py") as t:
        t.alloc(entity=5)
        out = subprocess.run([str(exe), "--play", "c-zone", "6"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0].endswith("entity=1000000 name=c-player-0 level=10 hp=100")
        assert lines[5].endswith("entity=1000005 name=c-player-5 level=15 hp=95") and lines[6] == "used=4"
        for i in range(6):
            h = t.lookup(1_000_000 + i)
            if i % 2:
                assert h is None
                continue
            p = t.read(h)
            assert (p.name, p.level, p.hp, p.gold) == (f"c-player-{i}", 10 + i, 100 - i, 1000 * i)
        owner = next(o for o in t.owners() if o.name == "c-zone")
        assert owner.state == fmt.OWNER_DETACHED and owner.slots == 3
        assert t.verify() == [] and t.counters()["allocations"] == 7
        again = subprocess.run([str(exe), "--play", "c-zone", "2"], capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and again.stdout.splitlines()[-1] == "used=4", again.stdout + again.stderr
        assert t.read(t.lookup(1_000_000)).hp == 100 - 0 and t.verify() == []


def test_foreign_semaphore_is_refused_never_waited_on(make_segment, procs):
    """Provenance: a semaphore planted on the table's key (here: world-writable) is refused, both at
    attach and when a removed semaphore is looked up again during a lock wait."""
    key = make_segment(capacity=4)
    with Attached(key, "w") as a:
        r, w = os.pipe()
        pid = fork_child(_hold_lock, key, w, 0.5)
        procs.append(pid)
        os.close(w)
        assert os.read(r, 1) == b"x"
        os.close(r)
        sysv_ipc.Semaphore(key).remove()
        sysv_ipc.Semaphore(key, sysv_ipc.IPC_CREX, 0o666, 1)
        with pytest.raises(stated.ForeignSegment, match="ipcrm -s"):
            a.core.alloc()                                # waits: EIDRM -> semget again -> provenance
        os.waitpid(pid, 0)
        procs.remove(pid)
        a.core.free(a.core.alloc())                       # uncontended: the semaphore is not needed
        assert a.core.verify(lock=False) == []
        seg = segment.open(key)
        try:
            with pytest.raises(stated.ForeignSegment):
                _native.Core(seg.buf, key)
        finally:
            seg.detach()
