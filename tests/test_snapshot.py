"""Snapshot files: round trip, damage of every kind refused whole, fallback, failures that harm nothing."""
import os
import random
from pathlib import Path

import pytest

import stated
from stated import config as config_mod
from stated import persist, segment
from stated import snapshot as snap
from stated.allocator import Allocator


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
    chain, warnings = snap.chain(saver.dir)
    assert len(chain) == 2 and not warnings
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
    header, owners, chunks = snap.read_file(snap.list_files(saver.dir)[-1][2])
    assert chunks[0]["n"] == 1


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
        chain, warnings = snap.chain(saver.dir)
        assert [p for p, *_ in chain] != [newest] and warnings, k
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
    chain, warnings = snap.chain(saver.dir)
    assert len(chain) == 1 and "stopped" in warnings[0]
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
        saver.dir = mnt / "players"
        with pytest.raises(snap.SnapshotFailed, match="No space"):
            saver.save("full")
        assert not [p for p in saver.dir.iterdir()]          # no temporary left behind
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_prune_keeps_newest_fulls_and_their_deltas(env):
    tc, dc, saver, t = env
    fill(t, 3)
    for i in range(5):
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
