import time

import pytest
from helpers import kill9, spawn

import stated
from stated.errors import NotOwner, OwnerBusy, ReadOnlyTable, SlotOutOfRange, StaleHandle, TableFull, TornRecord


@pytest.fixture
def table(make_segment):
    key = make_segment(capacity=20)
    t = stated.attach(key=key, owner="me")
    yield t
    t.close()


def test_defaults_on_alloc(table):
    h = table.alloc(entity=7)
    r = table.read(h)
    assert (r.level, r.hp, r.name, list(r.inventory[:2])) == (1, 100, "", [0, 0])
    assert table.entity(h) == 7 and table.lookup(7) == h


def test_view_get_set_write_read(table):
    h = table.alloc()
    p = table.record(h)
    p.x = 1.5
    p.x += 2.0 * 0.25
    p.hp -= 10
    p.inventory[3] = 9
    assert table.get(h, "x") == 2.0 and table.get(h, "hp") == 90
    table.set(h, "gold", 2**63)
    with table.write(h) as w:
        w.name = "alice"
        w.level = 20
        w.inventory = [1, 2]
    r = table.read(h)
    assert r.to_dict()["inventory"][:4] == [1, 2, 0, 0]
    assert (r.name, r.level, r.gold) == ("alice", 20, 2**63)
    assert table.get(h, "name") == "alice"
    table.set(h, "name", "bob")
    assert table.read(h).name == "bob"
    r.hp = 1                      # a read() copy is detached from shared memory
    assert table.get(h, "hp") == 90


def test_unicode_strings_and_bytes(make_segment):
    key = make_segment(fields=["name: str[8]", "tag: bytes[4]"])
    with stated.attach(key=key, owner="me") as t:
        h = t.alloc()
        t.set(h, "name", "héllo")
        t.set(h, "tag", b"\x00\x01")
        assert t.get(h, "name") == "héllo" and t.get(h, "tag") == b"\x00\x01\x00\x00"
        with pytest.raises(ValueError, match="at most 8"):
            t.set(h, "name", "ééééé")     # 10 bytes in UTF-8
        assert t.get(h, "name") == "héllo"


@pytest.mark.parametrize("field, value", [("level", 70000), ("level", -1), ("hp", 2**31), ("gold", -1),
                                          ("name", "x" * 33), ("x", 1e39), ("inventory", list(range(33))),
                                          ("inventory", [-1])])
def test_out_of_range_raises_and_writes_nothing(table, field, value):
    h = table.alloc()
    before = bytes(table.read(h))
    with pytest.raises(ValueError):
        table.set(h, field, value)
    if field != "x":    # views keep C float semantics for f32 (overflow is inf); set() checks
        with pytest.raises(ValueError):
            setattr(table.record(h), field, value)
        with pytest.raises(ValueError):
            with table.write(h) as p:
                setattr(p, field, value)
    assert bytes(table.read(h)) == before


def test_stale_handle_after_free_and_reuse(table):
    h = table.alloc(entity=1)
    table.free(h)
    h2 = table.alloc(entity=2)
    assert h2.slot == h.slot and h2.generation != h.generation
    for op in (lambda: table.get(h, "hp"), lambda: table.set(h, "hp", 1), lambda: table.read(h),
               lambda: table.write(h), lambda: table.free(h), lambda: table.record(h)):
        with pytest.raises(StaleHandle):
            op()
    assert not table.valid(h) and table.valid(h2)


def test_out_of_range_slot(table):
    bad = stated.Handle(10_000, 1)
    for op in (lambda: table.get(bad, "hp"), lambda: table.read(bad), lambda: table.set(bad, "hp", 1),
               lambda: table.free(bad)):
        with pytest.raises(SlotOutOfRange):
            op()


def test_full_table(table):
    hs = [table.alloc() for _ in range(20)]
    with pytest.raises(TableFull, match="20 slots"):
        table.alloc()
    assert table.counters()["alloc_failures_full"] == 1
    table.free(hs[5])
    assert table.alloc().slot == hs[5].slot


def test_duplicate_entity(table):
    table.alloc(entity=5)
    with pytest.raises(stated.DuplicateEntity):
        table.alloc(entity=5)


def test_readonly_cannot_write(table):
    h = table.alloc()
    table.set(h, "hp", 55)
    ro = stated.attach(key=table.key, readonly=True)
    try:
        assert ro.get(h, "hp") == 55 and ro.read(h).hp == 55 and ro.record(h).hp == 55
        with pytest.raises(ReadOnlyTable):
            ro.set(h, "hp", 1)
        with pytest.raises(ReadOnlyTable):
            ro.record(h).hp = 1
        with pytest.raises(ReadOnlyTable):
            ro.alloc()
        with pytest.raises(ReadOnlyTable):
            ro.write(h)
        assert table.get(h, "hp") == 55
    finally:
        ro.close()


def test_only_the_owner_writes(table):
    h = table.alloc()
    other = stated.attach(key=table.key, owner="other")
    try:
        with pytest.raises(NotOwner):
            other.set(h, "hp", 1)
        with pytest.raises(NotOwner):
            other.free(h)
        assert other.get(h, "hp") == 100
    finally:
        other.close()


def test_live_owner_name_is_busy(table, procs):
    spawn(procs, "write_players", table.key, "zone-1", 1)
    with pytest.raises(OwnerBusy, match="zone-1"):
        stated.attach(key=table.key, owner="zone-1")


def test_worker_killed_then_restarted_gets_everything_back(make_segment, procs):
    key = make_segment(capacity=200)
    p = spawn(procs, "write_players", key, "zone-3", 150)
    kill9(p)
    with stated.attach(key=key, owner="zone-3") as t:
        hs = t.owned()
        assert len(hs) == 150
        by_entity = {t.entity(h): t.read(h) for h in hs}
        for i in range(150):
            r = by_entity[1000 + i]
            assert (r.name, r.hp, r.gold, r.level) == (f"player-{i}", 100 - i, i * 1000, i % 60 + 1)
            assert list(r.inventory[:3]) == [i, i + 1, i + 2]
        assert t.counters()["owner_takeovers"] == 1
        assert t.verify() == []


def test_reader_gives_up_on_dead_writer_and_owner_settles(make_segment, procs):
    key = make_segment()
    p = spawn(procs, "hold_write_section", key, "zone-9")
    ro = stated.attach(key=key, readonly=True)
    h = ro.handles()[0]
    ro.read_timeout = 0.05
    assert ro.get(h, "hp") == 1           # a single aligned field needs no seqlock
    t0 = time.monotonic()
    with pytest.raises(TornRecord, match="mid-write"):
        ro.read(h)
    assert time.monotonic() - t0 < 1.0
    kill9(p)
    with stated.attach(key=key, owner="zone-9") as t:     # the owner's next attach settles it
        assert t.read(h).hp == 1
        assert t.counters()["settled_slots"] == 1
    ro.close()
