"""A daemon of format version 2 upgrades its own format-1 segment in place, only when that is safe, and
finishes an upgrade a SIGKILL interrupted (stated/shm/segment.upgrade_v1, docs/format.md "Upgrading from
format 1").

The format-1 segments are real: a format-2 table filled through the real worker API, then rewritten to
the format-1 layout with the V1_* constants (helpers.to_format_v1). After the upgrade the whole segment
must be byte-for-byte what it was before that rewrite (the lock acquisition count aside, which format 1
did not keep): not one record, entity, owner or counter lost.
"""
from __future__ import annotations

import os
import signal
import time

import pytest
import sysv_ipc
from helpers import DaemonProc, by_table, ctl, fork_child, stated_status, to_format_v1, u32, u64, wait_child

import stated
from stated.daemon import provision
from stated.format import config as config_mod
from stated.format import segment as fmt
from stated.shm import segment

TABLES = {"players": {"capacity": 64}, "world": {"capacity": 4, "fields": ["tick: u64"]}}


def fill(key: int) -> dict:
    """Two owners' records with entities, some freed, one owner detached: what the upgrade must keep."""
    want: dict = {"owned": {}, "records": {}}
    for owner, base in (("zone-1", 100), ("zone-2", 200)):
        with stated.attach(key=key, owner=owner) as t:
            hs = [t.alloc(entity=base + i) for i in range(10)]
            for i, h in enumerate(hs):
                with t.write(h) as p:
                    p.name, p.gold, p.inventory = f"p{base + i}", 1000 * i + base, [i] * 32
            for h in hs[::3]:
                t.free(h)
            want["owned"][owner] = sorted(t.owned())
            want["records"].update({base + i: (h, f"p{base + i}", 1000 * i + base) for i, h in enumerate(hs)
                                    if i % 3})
            want["counters"] = t.counters()
    assert want["counters"]["allocations"] == 20 and want["counters"]["frees"] == 8
    return want


def segment_bytes(key: int) -> bytes:
    shm = sysv_ipc.SharedMemory(key)
    try:
        return shm.read()
    finally:
        shm.detach()


def but_lock_seq(b: bytes) -> bytes:
    """A segment's header page without the lock acquisition count (the daemon's passes may take the lock)."""
    return b[:fmt.A_LOCK_SEQ] + b[fmt.A_LOCK_SEQ + 4:fmt.SCHEMA_OFFSET]


def as_upgraded(v2: bytes) -> bytes:
    """The bytes a v2 segment has after the round trip v2 -> v1 -> upgrade: lock_seq starts again at 0."""
    b = bytearray(v2)
    b[fmt.A_LOCK_SEQ:fmt.A_LOCK_SEQ + 4] = bytes(4)
    return bytes(b)


def make_v1(cfg) -> tuple[int, dict, bytes]:
    """The players table of `cfg` as a filled format-1 segment: (key, what it holds, its bytes once upgraded)."""
    tc = config_mod.load(cfg).tables["players"]
    segment.create(tc.key, tc.capacity, tc.layout, mode=0o660).detach()
    want = fill(tc.key)
    expect = as_upgraded(segment_bytes(tc.key))
    to_format_v1(tc.key)
    return tc.key, want, expect


def check_served(key: int, want: dict) -> None:
    """Every record, entity lookup, owner and counter is there; the allocator is consistent; a worker in
    another process allocates and frees; the lock is the word (0) and the semaphore counts wake-ups (0)."""
    assert u64(segment_bytes(key), fmt.A_LOCK) == 0 and sysv_ipc.Semaphore(key).value == 0
    with stated.attach(key=key, readonly=True) as t:
        assert t.counters() == want["counters"]
        for entity, (h, name, gold) in want["records"].items():
            assert t.lookup(entity) == h and t.get(h, "name") == name and t.get(h, "gold") == gold
        assert len(t) == 12
    for owner, handles in want["owned"].items():
        with stated.attach(key=key, owner=owner) as t:
            assert sorted(t.owned()) == handles
            assert t.verify() == []

    def worker() -> None:
        with stated.attach(key=key, owner="zone-new") as t:
            h = t.alloc(entity=999)
            t.set(h, "gold", 5)
            assert t.lookup(999) == h and t.get(h, "gold") == 5
            t.free(h)
            assert t.lookup(999) is None and t.verify() == []
    assert wait_child(fork_child(worker), timeout=30) == 0


def test_daemon_upgrades_a_format1_segment_in_place(write_config, procs):
    cfg = write_config(TABLES)
    key, want, expect = make_v1(cfg)
    with pytest.raises(stated.UnsupportedVersion, match=r"version 1; .*upgrades its own segment in place.*stop the "
                                                       r"workers still running the old stated.*systemctl reload"):
        stated.attach(key=key, owner="zone-1")         # was: "Upgrade stated, or migrate" (wrong for older)
    d = DaemonProc(procs, cfg)
    d.wait_for(" ready")
    line = d.wait_for("segment upgraded to format version 2")
    assert "table=players" in line and f"key={key:#010x}" in line and f"pid={d.p.pid}" in line
    rows = by_table(stated_status(cfg)[1])
    assert not rows["players"].get("error") and not rows["world"].get("error")
    assert but_lock_seq(segment_bytes(key)) == but_lock_seq(expect)     # header, allocator block, counters
    check_served(key, want)
    assert d.stop() == 0


def test_upgrade_waits_until_no_old_worker_is_attached(write_config, procs):
    """A process still attached (a format-1 worker would keep using the semaphore as the lock) or a
    semaphore taken: the table is not served, status says why and what to do, the segment is untouched
    and still a working format-1 segment; a reload after that upgrades it. The other table is served."""
    cfg = write_config(TABLES)
    key, want, expect = make_v1(cfg)
    v1 = segment_bytes(key)
    r, w = os.pipe()

    def old_worker() -> None:
        sysv_ipc.SharedMemory(key)              # attached, as a format-1 worker is, until it exits
        os.write(w, b"x")
        time.sleep(60)
    pid = fork_child(old_worker)
    procs.append(pid)
    os.close(w)
    try:
        assert os.read(r, 1) == b"x", "the attached process died"      # EOF, not a hang, if it did
    finally:
        os.close(r)
    d = DaemonProc(procs, cfg)
    d.wait_for(" ready")
    err = by_table(stated_status(cfg)[1])["players"]["error"]
    assert "not served" in err and "format version 1" in err and "1 other process(es) are still attached" in err
    assert "stop the workers still running the old stated" in err and "systemctl reload stated" in err
    assert not by_table(stated_status(cfg)[1])["world"].get("error")
    assert segment_bytes(key) == v1 and sysv_ipc.Semaphore(key).value == 1      # not a byte written

    os.kill(pid, signal.SIGTERM)                        # the old worker stops: the kernel detaches it
    assert wait_child(pid, procs=procs, timeout=10) == -signal.SIGTERM
    sysv_ipc.Semaphore(key).value = 0                   # a format-1 lock taken: not safe either
    ctl(cfg, "reload")
    err = by_table(stated_status(cfg)[1])["players"]["error"]
    assert "semaphore" in err and "is taken (value 0" in err and "ipcrm -s" in err
    assert segment_bytes(key) == v1

    sysv_ipc.Semaphore(key).value = 1
    assert ctl(cfg, "reload")["tables"] == ["world", "players"]
    assert but_lock_seq(segment_bytes(key)) == but_lock_seq(expect)
    check_served(key, want)
    assert d.stop() == 0


@pytest.mark.parametrize("stop_after", range(segment.UPGRADE_STEPS))
def test_upgrade_killed_after_any_store_is_finished_by_the_next_start(write_config, stop_after):
    """The daemon's adoption (provision.ensure, what start-up and reload run) after an upgrade stopped as a
    SIGKILL would stop it after `stop_after` stores: meanwhile no worker can attach; then the table is adopted
    with every byte as it was."""
    cfg = write_config(TABLES)
    c = config_mod.load(cfg)
    key, want, expect = make_v1(cfg)
    trust = segment.Trust.daemon(c.daemon.mode)
    assert segment.upgrade_v1(key, trust=trust, table="players", stop_after=stop_after) is False
    with pytest.raises(stated.CorruptSegment):
        stated.attach(key=key, owner="zone-1")          # half-upgraded: refused, never used
    seg, how, _ = provision.ensure(c.tables["players"], c.daemon)
    seg.detach()
    assert how == "adopted" and segment_bytes(key) == expect
    check_served(key, want)


def test_upgrade_killed_twice_at_any_two_points(write_config):
    """Killed after any number of stores, then the resumed upgrade killed again after any number of its own:
    the next start still finishes it with every byte in place."""
    cfg = write_config(TABLES)
    c = config_mod.load(cfg)
    trust = segment.Trust.daemon(c.daemon.mode)
    for first in range(1, segment.UPGRADE_STEPS):
        for second in range(segment.UPGRADE_STEPS):
            key, _, expect = make_v1(cfg)
            segment.upgrade_v1(key, trust=trust, stop_after=first)
            segment.upgrade_v1(key, trust=trust, stop_after=second)
            seg, how, _ = provision.ensure(c.tables["players"], c.daemon)
            seg.detach()
            assert (how, segment_bytes(key)) == ("adopted", expect), (first, second)
            segment.destroy(key)


def test_daemon_started_after_a_kill_mid_move_finishes_the_upgrade(write_config, procs):
    """The worst moment: the old counters' place already zeroed, the new one not written yet."""
    cfg = write_config(TABLES)
    key, want, expect = make_v1(cfg)
    trust = segment.Trust.daemon(config_mod.load(cfg).daemon.mode)

    def killed_daemon() -> None:              # a real process, SIGKILLed where the hook stops it
        segment.upgrade_v1(key, trust=trust, table="players", stop_after=5)
        os.kill(os.getpid(), signal.SIGKILL)
    assert wait_child(fork_child(killed_daemon), timeout=30) == -signal.SIGKILL
    raw = segment_bytes(key)
    assert u32(raw, fmt.A_UPGRADE_STEP) == fmt.UPGRADE_SAVED and u64(raw, fmt.V1_OFF_COUNTERS) == 0
    d = DaemonProc(procs, cfg)
    d.wait_for(" ready")
    assert "resuming an interrupted upgrade" in d.wait_for("upgrading the segment")
    assert not by_table(stated_status(cfg)[1])["players"].get("error")
    assert but_lock_seq(segment_bytes(key)) == but_lock_seq(expect)
    check_served(key, want)
    assert d.stop() == 0


@pytest.mark.parametrize("version", [0, 3])
def test_other_format_versions_are_refused_untouched(write_config, version):
    cfg = write_config(TABLES)
    c = config_mod.load(cfg)
    key, _, _ = make_v1(cfg)
    shm = sysv_ipc.SharedMemory(key)
    buf = memoryview(shm)
    u32(buf, fmt.OFF_FORMAT_VERSION, version)
    u32(buf, fmt.OFF_CRC, fmt.header_crc(buf))
    buf.release()
    shm.detach()
    before = segment_bytes(key)
    with pytest.raises(stated.UnsupportedVersion, match="newer stated" if version > 2 else "No stated ever wrote"):
        provision.ensure(c.tables["players"], c.daemon)
    assert segment_bytes(key) == before


def test_a_scribbled_format1_header_is_not_upgraded(write_config):
    cfg = write_config(TABLES)
    c = config_mod.load(cfg)
    key, _, _ = make_v1(cfg)
    shm = sysv_ipc.SharedMemory(key)
    shm.write(b"\xff", 40)                               # inside the crc-covered header
    shm.detach()
    before = segment_bytes(key)
    with pytest.raises(stated.CorruptSegment, match="checksum"):
        provision.ensure(c.tables["players"], c.daemon)
    assert segment_bytes(key) == before


def test_interrupted_upgrade_with_a_process_attached_waits_for_it(write_config):
    """Past the point of no return (the counters half moved) an attached process is refused as at the
    start, but the segment stays `migrating` (no version can use it) until a start can finish it."""
    cfg = write_config(TABLES)
    c = config_mod.load(cfg)
    key, want, expect = make_v1(cfg)
    segment.upgrade_v1(key, trust=segment.Trust.daemon(c.daemon.mode), stop_after=5)
    half = segment_bytes(key)
    other = sysv_ipc.SharedMemory(key)
    try:
        with pytest.raises(stated.UnsupportedVersion, match=r"interrupted upgrade .* cannot be finished now: 1 other "
                                                           r"process\(es\) are still attached"):
            provision.ensure(c.tables["players"], c.daemon)
        assert segment_bytes(key) == half and u32(half, fmt.OFF_STATE) == fmt.STATE_MIGRATING
    finally:
        other.detach()
    seg, how, _ = provision.ensure(c.tables["players"], c.daemon)
    seg.detach()
    assert how == "adopted" and segment_bytes(key) == expect
    check_served(key, want)
