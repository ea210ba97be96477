"""Allocator: crash consistency under SIGKILL at random moments, and concurrency."""
import os
import random
import select
import signal
import time

import pytest
from helpers import PLAYER_FIELDS, fill_and_drain, fork_child, fork_lock_holder, tagged_churn

import stated

KILLS = 320


def _child_churn(key: int, owner: str, seed: int, sections: bool, looping_w: int = -1) -> None:
    """Runs in a forked child until killed: alloc with entities, write, free. Writes a byte to
    `looping_w` (if given) once it is in its loop, so the parent's kill lands there."""
    rnd = random.Random(seed)
    t = stated.attach(key=key, owner=owner, lock_timeout=5)
    mine = t.owned()
    if looping_w >= 0:
        os.write(looping_w, b"x")
    while True:
        if len(mine) < 40 and rnd.random() < 0.55:
            try:
                h = t.alloc(entity=rnd.randrange(1, 500))
            except (stated.TableFull, stated.DuplicateEntity):
                if mine:
                    t.free(mine.pop(rnd.randrange(len(mine))))
                continue
            mine.append(h)
            if sections:
                with t.write(h) as p:
                    p.hp = rnd.randrange(100)
                    p.name = "x" * rnd.randrange(32)
        elif mine:
            t.free(mine.pop(rnd.randrange(len(mine))))


def _check(t: stated.Table) -> None:
    problems = t.verify()          # takes the lock within its timeout, repairing first if needed
    assert problems == [], problems


# The native core's critical section is a few microseconds, so random kills would rarely land inside it;
# a 64 KiB record (its field defaults are copied in under the lock) widens it enough that they do.
BIG_RECORD = [*PLAYER_FIELDS, "ballast: u8[65536]"]


def test_sigkill_at_random_moments_never_corrupts(make_segment, procs):
    key = make_segment(capacity=64, fields=BIG_RECORD)
    checker = stated.attach(key=key, owner="checker", lock_timeout=5)
    rnd = random.Random(1234)
    try:
        for i in range(KILLS):
            r, w = os.pipe()
            pid = fork_child(_child_churn, key, "chaos", i, i % 3 == 0, w)
            procs.append(pid)
            os.close(w)
            # most kills wait until the child is in its loop (under load, attaching alone can outlast a
            # fixed sleep); some land anywhere, attaching included
            if i % 4 and select.select([r], [], [], 5.0)[0]:
                os.read(r, 1)
            os.close(r)
            time.sleep(rnd.uniform(0.0005, 0.004) if i % 4 else rnd.uniform(0.002, 0.012))
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            procs.remove(pid)
            _check(checker)
            if i % 40 == 39:      # all remaining capacity is allocatable
                fill_and_drain(checker)
                _check(checker)
        counters = checker.counters()
        assert counters["lock_repairs"] > 0, "no kill landed inside the lock: the test lost its teeth"
        # the dead chaos worker's slots can be taken over and all freed
        with stated.attach(key=key, owner="chaos") as t:
            for h in t.owned():
                t.free(h)
        assert len(checker) == 0
        _check(checker)
    finally:
        checker.close()


def test_four_processes_never_share_a_slot(make_segment, procs):
    key = make_segment(capacity=32)      # small: 4 x 8 live slots keep the table nearly full
    pids = [fork_child(tagged_churn, key, f"w{i}", 3000, i) for i in range(4)]
    procs.extend(pids)
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        procs.remove(pid)
        assert os.waitstatus_to_exitcode(status) == 0, "a slot was handed to two processes"
    with stated.attach(key=key, owner="check") as t:
        _check(t)
        assert len(t) == 0
        c = t.counters()
        assert c["allocations"] == c["frees"] >= 4 * 1000


def test_lookup_owned_and_index_under_churn(make_segment):
    key = make_segment(capacity=500)
    with stated.attach(key=key, owner="a") as t:
        live = {}
        rnd = random.Random(5)
        for _ in range(5000):
            if live and rnd.random() < 0.45:
                e = rnd.choice(list(live))
                t.free(live.pop(e))
            elif len(live) < 500:
                e = rnd.randrange(10**12)
                if e not in live:
                    live[e] = t.alloc(entity=e)
        for e, h in live.items():
            assert t.lookup(e) == h
        assert t.lookup(10**13) is None
        assert sorted(t.owned()) == sorted(live.values())
        _check(t)


def test_repair_rebuilds_from_slot_states(make_segment):
    """Simulate a holder that died mid-alloc: intent set, free stack not yet popped."""
    from stated.format import segment as fmt
    key = make_segment(capacity=16)
    with stated.attach(key=key, owner="a") as t:
        hs = [t.alloc(entity=i) for i in range(5)]
        h32 = t.views.h32
        h32[fmt.W_INTENT_OP] = fmt.INTENT_ALLOC
        h32[fmt.W_INTENT_PID] = 999_999_999              # no such process
        h32[fmt.W_FREE_TOP] += 1                         # as if the pop had not happened
        t.free(hs[0])                                    # acquiring repairs first
        assert t.counters()["lock_repairs"] == 1
        _check(t)
        assert [t.lookup(i) for i in range(1, 5)] == hs[1:]


def test_lock_timeout_is_bounded_and_counted(make_segment, procs):
    key = make_segment(capacity=4)
    with stated.attach(key=key, owner="a", lock_timeout=0.2) as t:
        pid = fork_lock_holder(key, 60)
        procs.append(pid)
        t0 = time.monotonic()
        with pytest.raises(stated.LockTimeout, match="0.2s"):
            t.alloc()
        assert time.monotonic() - t0 < 1.0
        assert t.counters()["lock_timeouts"] == 1
        os.kill(pid, signal.SIGKILL)     # its word stays in the lock: the next waiter takes it over
        os.waitpid(pid, 0)
        procs.remove(pid)
        t0 = time.monotonic()
        t.alloc()
        assert time.monotonic() - t0 < 0.5


@pytest.mark.parametrize("scribble, problem", [
    ("owner_count", "owner #1 slot count 0 != 20"),
    ("foreign_owner", "owner #7 slot count 0 != 1"),
    ("owner_beyond", "owner #1 slot count 20 != 19"),
    ("odd_free", "a free slot is left inside a write section"),
    ("lost_entity", "entity index holds 10 entries (count word 10) for 9 entities"),
    ("invalid_state", "1 slots with an invalid state"),
])
def test_audit_names_each_disagreement_and_rebuilds(make_segment, scribble, problem):
    """The daemon's audit finds each kind of disagreement between the slot table and what is derived
    from it (owner counts, owners beyond the table, odd seqs of free slots, the entity index, slot
    states), naming it, with 20 allocated slots among 100; the rebuild ends it."""
    from stated.format import segment as fmt
    key = make_segment(capacity=100)
    with stated.attach(key=key, owner="w") as t:
        hs = [t.alloc(entity=i + 1 if i < 10 else None) for i in range(20)]
        t.free(t.alloc())
        a = t._alloc
        v = a.views
        assert a.audit() == []
        free_slot = next(s for s in range(100) if v.state[s] == fmt.SLOT_FREE)
        if scribble == "owner_count":
            v.owner_slots[0] = 0
        elif scribble == "foreign_owner":
            v.owner[hs[3].slot] = 7
            v.owner_slots[0] = 19
        elif scribble == "owner_beyond":
            v.owner[hs[3].slot] = 256 + 1      # low byte 1, but no owner index
        elif scribble == "odd_free":
            v.seq[free_slot] = 3
        elif scribble == "lost_entity":
            v.flags[hs[2].slot] = 0
        elif scribble == "invalid_state":
            v.state[free_slot] = 9
        problems = a.audit()
        assert any(problem in p for p in problems), problems
        assert a.audit() == [] and t.verify() == []
