"""Regression tests for data-plane defects found by reading the code and scribbling on live
segments (issue 8, items 1-4, 7, 13). Each failed on the code before its fix."""
import os
import time

import pytest
from helpers import index_home, lock_word, proc_start_time, run_child, u32, u64

import stated
from stated.format import segment as fmt


def _seg(t: stated.Table) -> memoryview:
    """The table's raw segment bytes, for scribbling the way another process could."""
    return t._seg.buf


def _slot_off(t: stated.Table, slot: int, field: int) -> int:
    return t._seg.header.regions.slots_offset + fmt.SLOT_SIZE * slot + field


@pytest.fixture
def table(make_segment):
    key = make_segment(capacity=20)
    t = stated.attach(key=key, owner="me", lock_timeout=0.5)
    yield t
    t.close()


# ---- item 1: free inside the slot's own write section --------------------------------------
def test_free_inside_own_write_section_leaves_slot_usable(table):
    h = table.alloc(entity=5)
    with table.write(h) as p:
        p.hp = 1
        table.free(h)              # the player died mid-update
    h2 = table.alloc(entity=6)
    assert h2.slot == h.slot
    with table.write(h2) as p:     # was: "already inside a write section"
        p.hp = 2
    assert table.read(h2).hp == 2  # was: TornRecord
    assert table.verify() == []


def test_verify_reports_free_slot_left_mid_section(table):
    h = table.alloc()
    table.free(h)
    u32(_seg(table), _slot_off(table, h.slot, fmt.S_SEQ), 7)
    assert any("odd seq" in p for p in table.verify())


# ---- item 2: wrapping counters and seqs, lock never kept -------------------------------------
def test_write_section_seq_wraps_like_c(table):
    h = table.alloc()
    u32(_seg(table), _slot_off(table, h.slot, fmt.S_SEQ), 0xFFFFFFFE)
    with table.write(h) as p:      # 0xFFFFFFFE -> 0xFFFFFFFF (odd) -> 0 (even)
        p.hp = 3
    assert u32(_seg(table), _slot_off(table, h.slot, fmt.S_SEQ)) == 0
    assert table.read(h).hp == 3


def test_owner_reattaches_after_seq_wrap(make_segment):
    key = make_segment(capacity=8)
    t = stated.attach(key=key, owner="w")
    h = t.alloc()
    u32(_seg(t), _slot_off(t, h.slot, fmt.S_SEQ), 0xFFFFFFFF)   # died inside a section at the wrap
    t.close()
    t2 = stated.attach(key=key, owner="w")                  # settles the slot: was ValueError
    assert t2.read(h).hp == 100
    t2.close()


def test_index_seq_wrap_never_keeps_the_lock(table):
    table.alloc(entity=1)
    u32(_seg(table), fmt.A_INDEX_SEQ, 0xFFFFFFFF)
    u32(_seg(table), fmt.A_INTENT_OP, fmt.INTENT_ALLOC)          # a dead process's intent: forces a repair
    u32(_seg(table), fmt.A_INTENT_PID, 0x7FFFFFF0)
    h = table.alloc(entity=2)                               # was: ValueError, semaphore kept
    assert table.lookup(2) == h
    assert lock_word(table.key) == 0
    assert table.verify() == []


def test_counters_wrap_at_2_64(table):
    u64(_seg(table), fmt.COUNTER_OFF["allocations"], 2**64 - 1)
    u64(_seg(table), fmt.COUNTER_OFF["frees"], 2**64 - 1)
    h = table.alloc()
    table.free(h)
    assert table.counters()["allocations"] == 0 and table.counters()["frees"] == 0
    assert lock_word(table.key) == 0


# ---- item 3: a full entity index never loops under the lock -----------------------------------
def _fill_index(t, entity_base: int = 10**9) -> None:
    r = t._seg.header.regions
    buf = _seg(t)
    for e in range(r.index_capacity):
        off = r.index_offset + e * fmt.INDEX_ENTRY_SIZE
        fmt.INDEX_ENTRY.pack_into(buf, off, entity_base + e, 1, 0)


def test_full_index_insert_and_delete_terminate(table):
    h = table.alloc(entity=77)
    _fill_index(table)
    t0 = time.monotonic()
    h2 = table.alloc(entity=78)         # was: endless probe while holding the lock
    table.free(h)
    assert time.monotonic() - t0 < 2
    assert table.lookup(78) == h2 and table.lookup(77) is None
    assert table.verify() == [] and table.counters()["rebuilds"] >= 1
    assert lock_word(table.key) == 0


# ---- item 4: scribbled allocator state ---------------------------------------------------------
def test_free_top_zero_on_empty_table_is_not_full(table):
    u32(_seg(table), fmt.A_FREE_TOP, 0)
    h = table.alloc()                   # was: TableFull on an empty table
    assert table.valid(h) and table.verify() == []


def test_free_top_beyond_capacity(table):
    u32(_seg(table), fmt.A_FREE_TOP, 10**6)
    h = table.alloc()                   # was: raw IndexError
    table.free(h)
    assert table.verify() == []


def test_used_scribbled_to_zero_then_free(table):
    h = table.alloc()
    u32(_seg(table), fmt.A_USED, 0)
    table.free(h)                       # was: raw ValueError (negative into u32), lock kept
    assert lock_word(table.key) == 0
    assert table._alloc.audit() != []        # the daemon's repair pass finds it and rebuilds
    assert table.verify() == [] and len(table) == 0


def test_phantom_index_entry_never_yields_a_free_slot(table):
    h = table.alloc(entity=1)
    r = table._seg.header.regions
    assert table.views.index_slot1[index_home(1, r.index_capacity)] == h.slot + 1   # where the core put it
    table.free(h)
    home = index_home(999, r.index_capacity)
    fmt.INDEX_ENTRY.pack_into(_seg(table), r.index_offset + home * fmt.INDEX_ENTRY_SIZE, 999, h.slot + 1, 0)
    assert table.lookup(999) is None    # was: a handle to a free slot
    h2 = table.alloc(entity=999)        # was: DuplicateEntity
    assert table.lookup(999) == h2 and table.verify() == []


def test_slot_owner_out_of_range_then_free(table):
    h = table.alloc()
    buf = _seg(table)
    off = _slot_off(table, h.slot, fmt.S_OWNER)
    buf[off:off + 2] = (1000).to_bytes(2, "little")
    with pytest.raises(stated.NotOwner):
        table.free(h)
    assert lock_word(table.key) == 0
    assert table._alloc.audit() != []
    assert table.verify() == []


@pytest.mark.parametrize("start", ["zero", "wrong"])
def test_lock_word_scribbled_to_a_live_pid_with_another_start_time_is_taken_over(table, start):
    """The lock word naming a live process (pid 1, which never exits) with a start time that is not
    its own (0: no holder writes that; or another one: a recycled pid) is no holder: the first waiter
    takes it over within a sleep slice, instead of timing out (found by the scribble test under a
    daemon, when the word was a bare pid)."""
    table.alloc(entity=1)
    real = proc_start_time(1)
    bad = 0 if start == "zero" else real + 12345
    u64(_seg(table), fmt.A_LOCK, 1 | bad << fmt.LOCK_PID_BITS)
    t0 = time.monotonic()
    h = table.alloc(entity=2)
    assert time.monotonic() - t0 < 0.3
    assert table.lookup(2) == h and table.verify() == [] and lock_word(table.key) == 0


# ---- item 7: views after close, arrays through read-only views --------------------------------
@pytest.mark.parametrize("readonly", [False, True])
def test_view_after_close_raises(make_segment, readonly):
    key = make_segment(capacity=4)
    w = stated.attach(key=key, owner="w")
    h = w.alloc()

    def use_after_close():
        t = stated.attach(key=key, readonly=True) if readonly else stated.attach(key=key, owner="w2")
        p = t.record(h if readonly else t.alloc())
        arr = p.inventory
        t.close()
        arr[0]                   # an array taken earlier: no crash (the mapping stays while it lives)
        for action in (lambda: p.hp, lambda: setattr(p, "x", 1.0), lambda: p.inventory, lambda: t.read(h),
                       lambda: bytes(p)):
            try:
                action()
            except stated.StatedError:
                continue
            os._exit(3)          # no error: silently used a closed table
        os._exit(0)
    try:
        assert run_child(use_after_close) == 0      # was: -11 (SIGSEGV)
    finally:
        w.close()


def test_readonly_view_array_write_raises(make_segment):
    key = make_segment(capacity=4)
    w = stated.attach(key=key, owner="w")
    h = w.alloc()

    def write_array():
        t = stated.attach(key=key, readonly=True)
        p = t.record(h)
        try:
            p.inventory[0] = 5
        except stated.ReadOnlyTable:
            os._exit(0)
        os._exit(3)
    try:
        assert run_child(write_array) == 0          # was: -11 (SIGSEGV)
        assert w.read(h).inventory[0] == 0
    finally:
        w.close()


def test_view_of_freed_slot_raises_stale(table):
    h = table.alloc()
    p = table.record(h)
    table.free(h)
    table.alloc()                       # the slot is someone's record again
    with pytest.raises(stated.StaleHandle):
        p.hp = 5


# ---- item 13: owner names run out --------------------------------------------------------------
def test_owner_entries_exhausted_says_what_to_do(make_segment):
    key = make_segment(capacity=300)
    t = stated.attach(key=key, owner="w0")
    buf = t._seg.buf
    off = t._seg.header.regions.owners_offset
    # 255 owners that died holding a slot each
    for i in range(fmt.OWNERS_CAPACITY):
        fmt.OWNER.pack_into(buf, off + i * fmt.OWNER_SIZE, f"dead-{i}".encode(), 0x7FFFFFF0, fmt.OWNER_DEAD,
                            1, 1, 0, 0)
    with pytest.raises(stated.OwnersExhausted, match="stated reap --owner"):
        stated.attach(key=key, owner="newcomer")
    t.close()
