"""Snapshot files: round trip, damage of every kind refused whole, fallback, failures that harm nothing."""
import os
import random
from pathlib import Path

import pytest
from helpers import edit_column, read_frames, write_frames

import stated
from stated.errors import UnsafePath
from stated.format import config as config_mod
from stated.persist import saver as persist
from stated.persist import snapshot as snap
from stated.shm import segment
from stated.shm.allocator import Allocator


@pytest.fixture
def env(write_config, tmp_path):
    """A table with a live segment, its Saver, and a writer attached as owner 'w'."""
    cfg = config_mod.load(write_config({"players": {"capacity": 300}}, daemon={"snapshots_keep": 3}))
    tc, dc = cfg.tables["players"], cfg.daemon
    seg = segment.create(tc.key, tc.capacity, tc.layout, mode=0o600)
    alloc = Allocator(seg, table="players")
    saver = persist.Saver(tc, seg, alloc, dc)
    t = stated.attach(key=tc.key, owner="w")
    yield tc, dc, saver, t
    t.close()
    saver.close()
    alloc.release_views()
    seg.detach()


def fill(t, n, start=0):
    hs = {}
    for i in range(start, start + n):
        h = t.alloc(entity=i)
        with t.write(h) as p:
            p.name = f"p{i}"
            p.hp = i
        hs[i] = h
    return hs


def table_image(t):
    return {t.entity(h): (h, bytes(t.read(h))) for h in t.handles()}


def restore_into_fresh(tc, dc, chain):
    seg, n = persist.restore(tc, dc, chain)
    seg.detach()
    return n


def test_full_and_delta_round_trip(env):
    tc, dc, saver, t = env
    hs = fill(t, 100)
    assert saver.save().kind == "full"
    for i in range(0, 100, 3):
        t.set(hs[i], "hp", 1000 + i)
    for i in range(1, 100, 7):
        t.free(hs[i])
    fill(t, 20, start=500)
    r = saver.save()
    assert r.kind == "delta" and r.records < 100       # only what changed
    expect = table_image(t)
    owners = {o.name for o in t.owners()}
    chain = snap.chain(saver.dir)
    assert len(chain.files) == 2 and not chain.warnings
    t.close()
    saver.seg.detach()
    segment.destroy(tc.key)
    assert restore_into_fresh(tc, dc, chain) == len(expect)
    with stated.attach(key=tc.key, owner="w") as t2:
        assert table_image(t2) == expect
        assert {o.name for o in t2.owners()} == owners
        assert t2.verify() == []
        assert sorted(t2.owned()) == sorted(h for h, _ in expect.values())
        for ent, (h, _) in expect.items():
            assert t2.lookup(ent) == h
        t2.alloc(entity=10**9)                         # allocation continues without collision


def test_delta_cost_follows_dirty_count(env):
    tc, dc, saver, t = env
    fill(t, 250)
    saver.save()
    r = saver.save()
    assert r.kind == "delta" and r.records == 0
    h = t.lookup(7)
    t.set(h, "hp", 1)
    assert saver.save().records == 1


def test_pinned_views_are_saved_every_time(env):
    tc, dc, saver, t = env
    hs = fill(t, 10)
    saver.save()
    p = t.record(hs[3])
    p.hp = 77                   # a write outside any write section
    assert saver.save().records == 1
    p.hp = 78
    assert saver.save().records == 1
    assert snap.read_file(snap.list_files(saver.dir)[-1][2]).chunks[0].n == 1


def _damaged_copies(path: Path, rnd: random.Random, n: int):
    data = path.read_bytes()
    for i in range(n):
        if i % 2:
            yield data[:rnd.randrange(len(data))]                       # truncation
        else:
            b = bytearray(data)
            for _ in range(rnd.randint(1, 3)):
                b[rnd.randrange(len(b))] ^= 1 << rnd.randrange(8)       # flipped bits
            yield bytes(b)


def test_damaged_newest_snapshot_falls_back_to_previous(env):
    tc, dc, saver, t = env
    fill(t, 50)
    saver.save("full")
    older = table_image(t)
    fill(t, 50, start=100)
    newest = saver.save("full").path
    good = newest.read_bytes()
    rnd = random.Random(7)
    t.close()
    saver.seg.detach()
    segment.destroy(tc.key)
    for k, damaged in enumerate(_damaged_copies(newest, rnd, 120)):
        if damaged == good:
            continue
        newest.write_bytes(damaged)
        with pytest.raises(snap.CorruptSnapshot):
            snap.read_file(newest)
        chain = snap.chain(saver.dir)
        assert [f.path for f in chain.files] != [newest] and chain.warnings, k
        if k % 20 == 0:     # restoring really gives the previous snapshot, never a mix
            restore_into_fresh(tc, dc, chain)
            with stated.attach(key=tc.key, readonly=True) as ro:
                assert table_image(ro) == older
            segment.destroy(tc.key)


def test_damaged_delta_ends_the_chain(env):
    tc, dc, saver, t = env
    hs = fill(t, 10)
    saver.save("full")
    t.set(hs[1], "hp", 11)
    d1 = saver.save("delta").path
    t.set(hs[2], "hp", 22)
    d2 = saver.save("delta").path
    d1.write_bytes(d1.read_bytes()[:-5])
    chain = snap.chain(saver.dir)
    assert len(chain.files) == 1 and "stopped" in chain.warnings[0]
    assert d2.exists()


def test_temporaries_are_never_snapshots(env):
    tc, dc, saver, t = env
    fill(t, 5)
    saver.save("full")
    (saver.dir / f".{snap.file_name('players', 99, 'full')}.999999999.tmp").write_bytes(b"partial")
    assert [seq for seq, *_ in snap.list_files(saver.dir)] == [1]
    snap.remove_stale_temporaries(saver.dir)
    assert not list(saver.dir.glob(".*.tmp"))


def test_unwritable_state_dir_fails_loudly_and_harms_nothing(env, tmp_path):
    tc, dc, saver, t = env
    fill(t, 5)
    first = saver.save("full").path
    before = first.read_bytes()
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory should be")
    saver.dir = blocker / "players"
    with pytest.raises(snap.SnapshotFailed, match="cannot write"):
        saver.save()
    assert saver.force_full
    assert first.read_bytes() == before


def test_disk_full(env, tmp_path):
    import subprocess
    tc, dc, saver, t = env
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and tmpfs mounts to make a full disk")
    try:
        fill(t, 280)
        saver.dir = mnt / "state" / "players"      # the mount's root is 1777: not a state_dir to trust
        with pytest.raises(snap.SnapshotFailed, match="No space"):
            saver.save("full")
        assert not [p for p in saver.dir.iterdir()]          # no temporary left behind
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_prune_keeps_newest_fulls_and_their_deltas(env):
    tc, dc, saver, t = env
    fill(t, 3)
    for _i in range(5):
        saver.save("full")
        saver.save("delta")
    kinds = [(seq, kind) for seq, kind, _ in snap.list_files(saver.dir)]
    assert [k for _, k in kinds].count("full") == 3
    assert kinds[0] == (5, "full")


def test_verify_cli(env):
    import subprocess
    import sys
    tc, dc, saver, t = env
    fill(t, 5)
    p = saver.save("full").path
    out = subprocess.run([sys.executable, "-m", "stated", "snapshot", "--verify", str(p)], capture_output=True,
                         text=True)
    assert out.returncode == 0 and "5 records" in out.stdout
    p.write_bytes(p.read_bytes()[:-1])
    out = subprocess.run([sys.executable, "-m", "stated", "snapshot", "--verify", str(p)], capture_output=True,
                         text=True)
    assert out.returncode == 1 and "INVALID" in out.stderr


# ---- helpers for hostile files: run where a hang or a runaway read cannot take the suite down ---------
def run_isolated(procs, fn, timeout: float = 10.0, extra_memory: int = 768 << 20) -> str:
    """Run fn() in a forked child whose address space may grow by at most `extra_memory` bytes;
    return repr(result), "RAISED <type>: msg", or "HANG" when it did not finish within `timeout`
    (the child is then SIGKILLed). On a broken build a FIFO hangs and /dev/zero eats memory: both
    must fail the test, not the machine."""
    import resource
    import select
    import signal
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                    # the child: never returns into pytest
        try:
            os.close(r)
            with open("/proc/self/statm") as f:
                vm = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            resource.setrlimit(resource.RLIMIT_AS, (vm + extra_memory, vm + extra_memory))
            try:
                out = repr(fn())
            except BaseException as e:          # noqa: BLE001 - reported to the parent, which asserts
                out = f"RAISED {type(e).__name__}: {e}"
            os.write(w, out.encode()[:60000])
        finally:
            os._exit(0)
    procs.append(pid)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], timeout)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            return "HANG"
        chunks = []
        while True:
            b = os.read(r, 65536)
            if not b:
                break
            chunks.append(b)
        return b"".join(chunks).decode()
    finally:
        os.close(r)


def two_fulls(env):
    """Two full snapshots (50 then 100 records); returns (older image, newest path)."""
    tc, dc, saver, t = env
    fill(t, 50)
    saver.save("full")
    older = table_image(t)
    fill(t, 50, start=100)
    return older, saver.save("full").path


def chain_summary(d) -> tuple[list[str], list[str]]:
    chain = snap.chain(d)
    return chain.names(), chain.warnings


# ---- state_dir trust -------------------------------------------------------------------------------
def test_fifo_named_like_the_newest_snapshot_is_skipped(env, procs):
    older, newest = two_fulls(env)
    newest.unlink()
    os.mkfifo(newest, 0o660)
    out = run_isolated(procs, lambda: chain_summary(env[2].dir))
    assert out != "HANG", "a FIFO named like a snapshot hangs start-up"
    names, warnings = eval(out)
    assert names == [snap.file_name("players", 1, "full")]
    assert any(newest.name in w and "not a regular file" in w for w in warnings), warnings


def test_symlink_to_dev_zero_is_skipped(env, procs):
    older, newest = two_fulls(env)
    newest.unlink()
    os.symlink("/dev/zero", newest)
    out = run_isolated(procs, lambda: chain_summary(env[2].dir))
    assert out != "HANG" and not out.startswith("RAISED"), out
    names, warnings = eval(out)
    assert names == [snap.file_name("players", 1, "full")]
    assert any(newest.name in w and "symlink" in w for w in warnings), warnings
    # the CLI too: --verify names it and never reads through it
    out = run_isolated(procs, lambda: persist.verify_file(newest))
    assert out.startswith("RAISED CorruptSnapshot") and "symlink" in out, out


def test_oversized_file_is_refused_before_it_is_read(env, procs):
    older, newest = two_fulls(env)
    with open(newest, "r+b") as f:              # a sparse 64 GiB tail: no snapshot of 300 slots is that big
        f.truncate(64 << 30)
    out = run_isolated(procs, lambda: chain_summary(env[2].dir), extra_memory=256 << 20)
    assert out != "HANG" and not out.startswith("RAISED"), out
    names, warnings = eval(out)
    assert names == [snap.file_name("players", 1, "full")]
    assert any(newest.name in w and "larger than" in w for w in warnings), warnings


def test_table_dir_replaced_by_a_symlink_is_not_followed(env, tmp_path):
    tc, dc, saver, t = env
    fill(t, 5)
    saver.save("full")
    victim = tmp_path / "victim"                # somebody else's files, named like old snapshots
    victim.mkdir()
    for seq in range(1, 6):
        (victim / snap.file_name("players", seq, "full")).write_bytes(b"precious")
    moved = tmp_path / "moved-away"
    saver.dir.rename(moved)
    os.symlink(victim, saver.dir)
    before = sorted(p.name for p in victim.iterdir())
    with pytest.raises(snap.SnapshotFailed, match="symlink"):
        for _ in range(4):                      # saving and pruning (snapshots_keep = 3)
            saver.save("full")
    assert sorted(p.name for p in victim.iterdir()) == before
    assert all(p.read_bytes() == b"precious" for p in victim.iterdir())
    with pytest.raises(UnsafePath, match="symlink"):     # nothing is read through it at start-up either
        snap.chain(saver.dir)
    saver.dir.unlink()
    moved.rename(saver.dir)                     # put back: saving works again
    assert saver.save().kind == "full"


def test_planted_temporary_name_does_not_block_saves(env):
    tc, dc, saver, t = env
    fill(t, 5)
    saver.save("full")
    target = saver.dir / "elsewhere"
    target.write_bytes(b"keep me")
    for seq in range(2, 8):                     # every name the next saves would have used, for this pid
        for kind in ("full", "delta"):
            name = f".{snap.file_name('players', seq, kind)}.{os.getpid()}.tmp"
            os.symlink(target, saver.dir / name)
    for kind in ("full", "delta", "delta", "full"):
        assert saver.save(kind).kind == kind
    assert target.read_bytes() == b"keep me"
    chain = snap.chain(saver.dir)
    assert [f.header.seq for f in chain.files] == [5] and not chain.warnings


def test_state_dir_gets_the_configured_mode_whatever_the_umask(write_config, tmp_path):
    import stat
    cfg = config_mod.load(write_config({"players": {"capacity": 10}},
                                       daemon={"state_dir": str(tmp_path / "fresh" / "state"), "mode": 0o640}))
    tc, dc = cfg.tables["players"], cfg.daemon
    seg = segment.create(tc.key, tc.capacity, tc.layout, mode=0o600)
    alloc = Allocator(seg, table="players")
    old = os.umask(0)
    try:
        saver = persist.Saver(tc, seg, alloc, dc)
        p = saver.save("full").path
    finally:
        os.umask(old)
        saver.close()
        alloc.release_views()
        seg.detach()
    assert stat.S_IMODE(os.stat(dc.state_dir).st_mode) == 0o750
    assert stat.S_IMODE(os.stat(dc.state_dir / "players").st_mode) == 0o750
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o640
    assert stat.S_IMODE(os.stat(dc.state_dir.parent).st_mode) & 0o027 == 0


def test_state_dir_of_another_user_is_not_trusted(env):
    import pwd
    tc, dc, saver, t = env
    fill(t, 5)
    saver.save("full")
    if os.geteuid() != 0:
        pytest.skip("needs root to give the directory away")
    nobody = pwd.getpwnam("nobody").pw_uid
    os.chown(saver.dir, nobody, -1)             # as if another user had replaced it
    try:
        with pytest.raises(UnsafePath, match="owned by uid"):
            snap.chain(saver.dir)
        with pytest.raises(UnsafePath, match="owned by uid"):
            snap.chain(saver.dir, euid=pwd.getpwnam("nobody").pw_uid + 1)
        with pytest.raises(snap.SnapshotFailed, match="owned by uid"):
            saver.save()
    finally:
        os.chown(saver.dir, 0, -1)
    assert saver.save().kind == "full"


def test_wider_table_dir_is_tightened_and_one_writable_by_others_refused(env):
    import stat
    tc, dc, saver, t = env
    fill(t, 5)
    saver.save("full")
    os.chmod(saver.dir, 0o775)                  # ours (stated made it): tightened
    os.chmod(dc.state_dir, 0o755)               # maybe an operator's or a volume's: reported, left alone
    assert saver.save().kind == "delta"
    assert stat.S_IMODE(os.stat(saver.dir).st_mode) == 0o770
    assert stat.S_IMODE(os.stat(dc.state_dir).st_mode) == 0o755
    for d in (saver.dir, dc.state_dir):         # writable by anyone: what is in it cannot be trusted
        os.chmod(d, 0o777)
        with pytest.raises(snap.SnapshotFailed, match="writable by others"):
            saver.save()
        with pytest.raises(UnsafePath, match="writable by others"):
            snap.chain(saver.dir)
        os.chmod(d, 0o770)
    assert saver.save().kind == "full"


def test_root_owned_dirs_are_trusted_by_other_users(env):
    """A volume's mount root (Kubernetes PVC with fsGroup: root-owned, 02775) is root's, who is trusted."""
    tc, dc, saver, t = env
    fill(t, 5)
    saver.save("full")
    if os.geteuid() != 0:
        pytest.skip("needs root-owned directories")
    chain = snap.chain(saver.dir, euid=12345)     # as seen by a daemon running as uid 12345
    assert len(chain.files) == 1 and not chain.warnings


# ---- semantic validation after the checksums -------------------------------------------------------------
def _set(i, v):
    def f(a):
        a[i] = v
    return f


def _all(v):
    def f(a):
        for i in range(len(a)):
            a[i] = v
    return f


SEMANTIC = {
    "counter 2^64-1": lambda fr: fr[0]["counters"].update(allocations=2**64 - 1),
    "negative counter": lambda fr: fr[0]["counters"].update(frees=-1),
    "duplicate slots": lambda fr: edit_column(fr[2], "slots", "I", _all(7)),
    "duplicate entities": lambda fr: edit_column(fr[2], "entities", "Q", lambda a: a.__setitem__(1, a[0])),
    "state not free or allocated": lambda fr: fr[2].update(states=bytes([1, 1, 9]) + fr[2]["states"][3:]),
    "unknown flag bits": lambda fr: fr[2].update(flags=bytes([0x41]) + fr[2]["flags"][1:]),
    "owner index beyond the owner table": lambda fr: edit_column(fr[2], "owners", "H", _set(0, 300)),
    "seq differs from its file name": lambda fr: fr[0].update(seq=77, base=77),
    "full whose base is not itself": lambda fr: fr[0].update(base=1),
    "owners frame with a duplicate index": lambda fr: fr[1].extend([list(fr[1][0])]),
    "owner index 0": lambda fr: fr[1][0].__setitem__(0, 0),
    "time is not finite": lambda fr: fr[0].update(time=float("nan")),
}


@pytest.mark.parametrize("what", sorted(SEMANTIC))
def test_semantically_wrong_newest_full_is_skipped_like_a_bad_checksum(env, what):
    """Checksums pass, contents cannot be true: the file is refused whole and the previous full used."""
    tc, dc, saver, t = env
    older, newest = two_fulls(env)
    frames = read_frames(newest)
    SEMANTIC[what](frames)
    write_frames(newest, frames)
    with pytest.raises(snap.CorruptSnapshot) as ei:
        snap.read_file(newest)
    assert newest.name in str(ei.value)
    chain = snap.chain(saver.dir)
    assert chain.names() == [snap.file_name("players", 1, "full")], what
    assert any(newest.name in w for w in chain.warnings), chain.warnings
    t.close()
    saver.seg.detach()
    segment.destroy(tc.key)
    restore_into_fresh(tc, dc, chain)                 # start-up's path: no traceback, the older state
    with stated.attach(key=tc.key, readonly=True) as ro:
        assert table_image(ro) == older
        assert ro.verify() == []


def test_delta_whose_layout_differs_from_its_full_ends_the_chain(env):
    from stated.format import layout as layout_mod
    from stated.format.schema import parse_fields, to_wire
    tc, dc, saver, t = env
    hs = fill(t, 10)
    saver.save("full")
    expect = table_image(t)
    t.set(hs[1], "hp", 11)
    d1 = saver.save("delta").path
    frames = read_frames(d1)
    other = layout_mod.compute(parse_fields(["id: u64", "name: str[32]", "hp: i32"]))
    frames[0].update(schema=to_wire(other.schema), layout_hash=other.hash, record_size=other.record_size)
    for c in frames[2:-1]:
        c["records"] = bytes(c["n"] * other.record_size)
    write_frames(d1, frames)
    snap.read_file(d1)                                # valid on its own
    chain = snap.chain(saver.dir)
    assert len(chain.files) == 1 and any(d1.name in w and "layout" in w for w in chain.warnings), chain.warnings
    t.close()
    saver.seg.detach()
    segment.destroy(tc.key)
    restore_into_fresh(tc, dc, chain)
    with stated.attach(key=tc.key, readonly=True) as ro:
        assert table_image(ro) == expect


def test_delta_whose_capacity_differs_from_its_full_ends_the_chain(env):
    tc, dc, saver, t = env
    hs = fill(t, 10)
    saver.save("full")
    t.set(hs[1], "hp", 11)
    d1 = saver.save("delta").path
    frames = read_frames(d1)
    frames[0]["capacity"] = 5000
    write_frames(d1, frames)
    chain = snap.chain(saver.dir)
    assert len(chain.files) == 1 and any(d1.name in w and "capacity" in w for w in chain.warnings), \
        chain.warnings


def test_verify_cli_reports_semantic_problems(env):
    import subprocess
    import sys
    older, newest = two_fulls(env)
    frames = read_frames(newest)
    frames[0]["counters"]["allocations"] = 2**64 - 1
    write_frames(newest, frames)
    out = subprocess.run([sys.executable, "-m", "stated", "snapshot", "--verify", str(newest)],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "INVALID" in out.stderr and "counter" in out.stderr, out.stderr


# ---- writers that died mid-section: one bounded wait per save, not per slot -------------------------------
def test_dead_writers_cost_one_bounded_wait_per_save(env):
    import time
    tc, dc, saver, t = env
    hs = fill(t, 200)
    saver.save("full")
    seq = saver.alloc.views.seq
    for h in hs.values():                           # 200 writers died inside their write sections
        seq[h.slot] |= 1
    try:
        t0 = time.perf_counter()
        r = saver.save("full")
        took = time.perf_counter() - t0
        assert r.records == 200
        assert took < 0.5, f"a save with 200 stuck slots took {took:.2f}s"
        assert persist.verify_file(r.path)["torn_flagged"] == 200
    finally:
        for h in hs.values():
            seq[h.slot] += 1


def test_a_live_writer_mid_section_is_waited_for_not_flagged(env):
    """After the pass's wait is spent on a dead writer, a slot whose writer is alive and only
    briefly mid-section is still copied consistently (its retry comes after the rest of its chunk)."""
    import threading
    import time
    tc, dc, saver, t = env
    hs = fill(t, 20)
    seq = saver.alloc.views.seq
    seq[hs[0].slot] |= 1                          # dead: costs the pass its one wait
    live = hs[19].slot
    seq[live] += 1                                    # a live writer enters...
    threading.Timer(0.01, lambda: seq.__setitem__(live, seq[live] + 1)).start()   # ...and leaves
    try:
        r = saver.save("full")
        c = snap.read_file(r.path).chunks[0]
        flags = dict(zip(c.slots, c.flags))
        assert flags[hs[0].slot] & snap.FLAG_TORN and not flags[live] & snap.FLAG_TORN
    finally:
        time.sleep(0.05)
        seq[hs[0].slot] += 1


# ---- one entity, one slot: in every file, and across a chain -------------------------------------------
def test_an_entity_moving_during_a_save_is_written_once(write_config):
    """Entity E is copied at slot A, then (mid-pass) freed there and allocated at slot B, which is
    copied later: the file would name E twice. The writer copies A again after the pass instead."""
    import time

    from stated.format.schema import to_wire
    cfg = config_mod.load(write_config({"players": {"capacity": 5000}}))
    tc, dc = cfg.tables["players"], cfg.daemon
    seg = segment.create(tc.key, tc.capacity, tc.layout, mode=0o600)
    alloc = Allocator(seg, table="players")
    saver = persist.Saver(tc, seg, alloc, dc)
    try:
        with stated.attach(key=tc.key, owner="w") as t:
            hs = {i: t.alloc(entity=i) for i in range(4200)}
            a, b = hs[10], hs[4150]                 # chunk 0 and chunk 1 of the file
            slots = sorted(h.slot for h in hs.values())
            cap = snap.Capture(alloc, saver.records, tc.layout.record_size, slots)

            def chunks():
                it = iter(cap)
                yield next(it)                      # A copied, holding entity 10
                t.free(a)
                t.free(b)
                moved = t.alloc(entity=10)          # the last freed slot: B
                assert moved.slot == b.slot
                assert t.alloc(entity=99_999).slot == a.slot
                yield from it

            header = snap.SnapshotHeader(kind="full", table="players", key=tc.key, schema=to_wire(tc.layout.schema),
                                         layout_hash=tc.layout.hash, record_size=tc.layout.record_size,
                                         capacity=tc.capacity, seq=1, base=1, prev=0, time=time.time(), counters={})
            with snap.SnapshotDir.open(saver.dir, create=True) as sd:
                assert sd.write(snap.file_name("players", 1, "full"), header, [], chunks(), fixups=cap.fixups) == 4200
        assert cap.recopied == 1 and not cap.dropped_entities
        f = snap.read_file(saver.dir / snap.file_name("players", 1, "full"))   # accepted
        ent = {}
        for c in f.chunks:
            ent.update(zip(c.slots, c.entities))
        assert ent[a.slot] == 99_999 and ent[b.slot] == 10
    finally:
        saver.close()
        alloc.release_views()
        seg.detach()


def test_a_later_file_of_the_chain_wins_an_entity(env):
    """The full has entity 15 at slot 15; a delta has it at slot 2 and does not mention slot 15 (freed
    after the delta chose its slots). Restore gives 15 to slot 2, as the newer copy says."""
    tc, dc, saver, t = env
    hs = fill(t, 20)
    saver.save("full")
    t.free(hs[15])
    t.free(hs[2])
    moved = t.alloc(entity=15)
    assert moved.slot == hs[2].slot
    saver.alloc.views.dirty[hs[15].slot] = 0     # slot 15's free happened after the delta's selection
    assert saver.save("delta").records == 1
    chain = snap.chain(saver.dir)
    assert len(chain.files) == 2 and not chain.warnings
    t.close()
    saver.seg.detach()
    segment.destroy(tc.key)
    restore_into_fresh(tc, dc, chain)
    with stated.attach(key=tc.key, readonly=True) as ro:
        assert ro.lookup(15) == moved
        assert ro.entity(hs[15]) is None            # kept its record, without the entity
        assert ro.verify() == []


def test_a_delta_with_no_full_to_follow_is_written_as_a_full(env, tmp_path):
    tc, dc, saver, t = env
    fill(t, 5)
    assert saver.save("delta").kind == "full"           # the first save of a Saver's life
    assert saver.save("delta").kind == "delta"
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    good, saver.dir = saver.dir, blocker / "players"
    with pytest.raises(snap.SnapshotFailed):
        saver.save("delta")
    saver.dir = good
    assert saver.save("delta").kind == "full"           # the failed save cleared dirty marks
    chain = snap.chain(saver.dir)
    assert [f.header.kind for f in chain.files] == ["full"] and not chain.warnings


# ---- how a chunk is copied: by column (dense or gathered) or slot by slot ---------------------------------
def test_every_way_a_chunk_is_copied_saves_the_same_table(write_config):
    """Chunk 0 is every slot of its range (copied by column), chunk 1 every other slot (copied by column,
    then gathered), the rest one slot in 20 (slot by slot); fulls and deltas of each restore exactly."""
    cfg = config_mod.load(write_config({"players": {"capacity": 3 * snap.CHUNK + 20 * snap.CHUNK}}))
    tc, dc = cfg.tables["players"], cfg.daemon
    seg = segment.create(tc.key, tc.capacity, tc.layout, mode=0o600)
    alloc = Allocator(seg, table="players")
    saver = persist.Saver(tc, seg, alloc, dc)
    try:
        with stated.attach(key=tc.key, owner="w") as t:
            def kept(slot):
                return slot < snap.CHUNK or (slot < 3 * snap.CHUNK and slot % 2 == 0) or slot % 20 == 0
            hs = [t.alloc(entity=10 * i + 1) for i in range(tc.capacity)]
            for h in hs:
                if not kept(h.slot):
                    t.free(h)
                else:
                    with t.write(h) as p:
                        p.hp, p.gold, p.name = h.slot, 3 * h.slot, f"s{h.slot}"
            full = saver.save("full")
            assert full.records == sum(1 for h in hs if kept(h.slot))
            assert [c.n for c in snap.read_file(full.path).chunks][:3] == [snap.CHUNK] * 3
            for h in hs:
                if kept(h.slot) and h.slot % 3 == 0:
                    t.set(h, "hp", -h.slot)
            delta = saver.save("delta")
            assert delta.kind == "delta" and delta.records == sum(1 for h in hs if kept(h.slot) and h.slot % 3 == 0)
            expect = table_image(t)
        seg.detach()
        segment.destroy(tc.key)
        chain = snap.chain(saver.dir)
        assert chain.names() == [full.path.name, delta.path.name] and not chain.warnings
        restore_into_fresh(tc, dc, chain)
        with stated.attach(key=tc.key, readonly=True) as ro:
            assert table_image(ro) == expect
            assert ro.verify() == []
    finally:
        saver.close()
        alloc.release_views()
        seg.detach()


def test_saves_under_a_busy_writer_copy_whole_writes_only(env, procs):
    """A worker rewrites its records nonstop (hp, gold and the inventory set to one value per write):
    every record in every file is one write, never a mix; nothing is flagged torn (the writer is alive)."""
    from helpers import spawn
    tc, dc, saver, t = env
    spawn(procs, "rewrite", tc.key, "busy", 250)
    lay = tc.layout
    hp, gold, inv = lay["hp"].offset, lay["gold"].offset, lay["inventory"].offset
    seen = set()
    for kind in ["full", "delta", "full", "delta", "delta", "full"]:
        r = saver.save(kind)
        f = snap.read_file(r.path)
        for c in f.chunks:
            assert not c.torn()
            for i in range(c.n):
                rec = c.record(i)
                k = int.from_bytes(rec[hp:hp + 4], "little", signed=True)
                assert int.from_bytes(rec[gold:gold + 8], "little") == k, (c.slots[i], rec)
                assert memoryview(rec[inv:inv + 128]).cast("I").tolist() == [k] * 32, (c.slots[i], rec)
                seen.add(k)
    assert len(seen) > 2, seen          # the writer wrote while the saves ran


def test_an_entity_held_twice_by_a_damaged_table_is_saved_once(env, caplog):
    """A scribbled slot table where two allocated slots claim one entity: the file is still one that
    read_file accepts, with the entity on the later slot only (as repair resolves it), and the log says so."""
    tc, dc, saver, t = env
    hs = fill(t, 300)
    v = saver.alloc.views
    a, b = hs[10].slot, hs[250].slot
    v.entity[b] = v.entity[a]                    # both claim entity 10 now
    r = saver.save("full")
    f = snap.read_file(r.path)                   # accepted: one holder per entity
    claims = dict((s, e) for c in f.chunks for s, e in c.claims())
    assert claims[b] == 10 and a not in claims and f.records == 300
    assert any(f"slot={a}: entity 10 is claimed by two slots" in m for m in caplog.messages), caplog.messages
    v.entity[b] = 250


@pytest.mark.parametrize("n", [0, 1, 127, 128, 255, 256, 4096])
@pytest.mark.parametrize("record_size", [8, 200, 2000])
def test_chunk_frames_are_written_as_msgpack_packs_them(n, record_size):
    """The writer builds chunk frames in pieces (no copy of the records into one body); the bytes are
    exactly msgpack's, so format 1 readers, fixups (which re-pack a frame in place) and the file size
    bound all still hold."""
    import zlib
    from array import array

    import msgpack
    rnd = random.Random(n * 7 + record_size)
    c = {"n": n, "slots": array("I", range(n)).tobytes(), "gens": rnd.randbytes(4 * n), "owners": rnd.randbytes(2 * n),
         "entities": rnd.randbytes(8 * n), "states": rnd.randbytes(n), "flags": rnd.randbytes(n),
         "records": rnd.randbytes(record_size * n)}
    body = msgpack.packb(c, use_bin_type=True)
    assert b"".join(snap._chunk_frame(c)) == snap.FRAME.pack(len(body), zlib.crc32(body)) + body
