"""An adversarial look at the table lock of format version 2 (docs/format.md "Taking and releasing the
lock"): a word in the segment taken by CAS, the semaphore only to sleep and wake waiters, a dead
holder's word taken over only with proof of its death. Real processes, real SIGKILL/SIGSTOP, real
semaphore removal; each test is cheap (well under 2 s).

What broke (each test failed before its fix in stated_core.h):
- a fork()ed child using its parent's table took the lock under the *parent's* id: killed inside, it
  left a word naming a live process (every acquire timed out until the daemon's 30 s watch); its
  release of a lock its parent held at fork time let a third process in beside the parent;
- a second Core of the same process (another thread) could release the first one's lock and pass the
  repair_locked() guard: the word names the process, not the table that took it;
- after the semaphore was removed and recreated, a process that never waited kept posting its
  wake-ups to the removed one: every wake-up it owed a sleeper on the new semaphore was lost;
- a process whose main thread exited (pthread_exit) shows 'Z' in /proc/<pid>/stat while its other
  threads run: a holder thread inside the lock was "proven dead" and taken over."""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import sysv_ipc
from helpers import (
    ROOT,
    fork_child,
    fork_lock_holder,
    lock_id,
    lock_word,
    proc_start_time,
    tagged_churn,
    u64,
    wait_child,
)

import stated
from stated.format import segment as fmt
from stated.shm import segment
from stated.shm.owners import ALIVE, Liveness

CSRC = Path(__file__).resolve().parent / "native"
PID_MASK = (1 << fmt.LOCK_PID_BITS) - 1
WAITERS = 1 << 63


def _alloc_and_exit(key: int, owner: str, lock_timeout: float) -> int:
    """Forked child: attach (the owner claim takes the lock) and one alloc, then exit 0; 5 on LockTimeout."""
    try:
        stated.attach(key=key, owner=owner, lock_timeout=lock_timeout).alloc()
    except stated.LockTimeout:
        return 5
    return 0


def _waiting(pid: int) -> bool:
    """The process sleeps in the kernel (a semtimedop or a poll sleep of the lock wait)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] == "S"


# ---- fork() after attach -----------------------------------------------------------------------------
def test_forked_child_may_not_take_the_lock_under_its_parents_id(make_segment, procs):
    key = make_segment(capacity=8)
    with stated.attach(key=key, owner="parent", lock_timeout=0.3) as t:
        t.alloc()

        def child_acquires() -> int:
            try:
                t._alloc.acquire()
            except stated.StatedError as e:
                return 0 if "fork" in str(e) else 6
            time.sleep(60)                    # inside the lock under the parent's id, until killed
            return 7
        pid = fork_child(child_acquires)
        procs.append(pid)
        deadline = time.monotonic() + 5
        while lock_word(key) == 0 and Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        if lock_word(key) != 0:               # it took the lock: kill it inside, as a crash would
            os.kill(pid, signal.SIGKILL)
        code = wait_child(pid, procs=procs, timeout=10)
        # was: the child held the lock as "pid <parent>"; killed, its word named the live parent, and
        # every acquire (the parent's own too) timed out for as long as the parent lived
        assert lock_word(key) == 0, "a forked child left a word naming its live parent"
        assert code == 0, f"the child's acquire did not refuse clearly (exit {code})"
        t.free(t.alloc())                     # the parent is unaffected
        assert t.verify() == []


def test_forked_child_release_leaves_the_parents_hold(make_segment, procs):
    key = make_segment(capacity=8)
    with stated.attach(key=key, owner="parent") as t:
        t._alloc.acquire()                    # forking inside a locked section
        try:
            pid = fork_child(lambda: t._alloc.core.release())
            assert wait_child(pid, timeout=10) == 0
            # was: the child's release cleared the parent's word: a third process could enter beside it
            assert lock_word(key) & ~WAITERS == lock_id(os.getpid())
            assert _third_process_times_out(key, procs)
        finally:
            t._alloc.release()
        assert lock_word(key) == 0 and t.verify() == []


def _third_process_times_out(key: int, procs) -> bool:
    pid = fork_child(_alloc_and_exit, key, "third", 0.3)
    procs.append(pid)
    return wait_child(pid, procs=procs, timeout=10) == 5


# ---- two Cores of one process (threads) -------------------------------------------------------------
def test_a_second_core_of_the_process_cannot_release_or_repair_under_the_first(make_segment, procs):
    """Both Cores' lock ids are the process's (pid | start time): the word cannot tell which of them
    took it. Only the one that did may give it back or repair under it."""
    key = make_segment(capacity=8)
    with stated.attach(key=key, owner="a") as a, stated.attach(key=key, owner="b", lock_timeout=0.2) as b:
        a._alloc.acquire()
        try:
            b._alloc.core.release()           # was: released a's lock
            assert lock_word(key) != 0
            with pytest.raises(stated.StatedError, match="outside acquire"):
                b._alloc.core.repair_locked()  # was: ran a repair beside a's mutation
            assert _third_process_times_out(key, procs)
            t0 = time.monotonic()
            with pytest.raises(stated.LockTimeout):
                b.alloc()                     # the same process waits like anyone else, never enters
            assert time.monotonic() - t0 < 1.0
            with pytest.raises(stated.StatedError, match="already holds"):
                a._alloc.core.acquire()       # nested: refused at once (was: a timeout naming ourselves)
        finally:
            a._alloc.release()
        assert lock_word(key) == 0 and a.verify() == [] and b.verify() == []


def test_two_threads_each_with_a_core_never_share_a_slot(make_segment):
    key = make_segment(capacity=16)
    errors: list[str] = []

    def churn(owner: str, seed: int) -> None:
        rnd = random.Random(seed)
        with stated.attach(key=key, owner=owner, lock_timeout=5) as t:
            tag = seed + 1
            mine = []
            for _ in range(1500):
                if len(mine) < 6 and (not mine or rnd.random() < 0.5):
                    try:
                        h = t.alloc()
                    except stated.TableFull:
                        continue
                    t.set(h, "id", tag)
                    mine.append(h)
                else:
                    h = mine.pop(rnd.randrange(len(mine)))
                    if t.get(h, "id") != tag:
                        errors.append(f"slot {h} tagged {t.get(h, 'id')}, not {tag}")
                    t.free(h)
            for h in mine:
                t.free(h)
    threads = [threading.Thread(target=churn, args=(f"t{i}", i)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert not errors, errors[:5]
    with stated.attach(key=key, owner="check") as t:
        assert t.verify() == [] and len(t) == 0


# ---- a stopped holder ---------------------------------------------------------------------------------
def test_stopped_holder_keeps_the_lock_and_nobody_enters(make_segment, procs):
    key = make_segment(capacity=8)
    with stated.attach(key=key, owner="w", lock_timeout=0.25) as t:
        holder = fork_lock_holder(key, 0.8)
        procs.append(holder)
        os.kill(holder, signal.SIGSTOP)
        try:
            for _ in range(2):
                with pytest.raises(stated.LockTimeout, match=f"held by pid {holder}, which is stopped"):
                    t.alloc()
            word = lock_word(key)
            assert word & PID_MASK == holder
            assert t._alloc.clear_lock(word) is False      # the daemon's watch: a stopped holder keeps it
            assert lock_word(key) == word
        finally:
            os.kill(holder, signal.SIGCONT)
        t._alloc.core.lock_timeout = 5.0
        t.free(t.alloc())                                   # after its release
        assert wait_child(holder, procs=procs, timeout=10) == 0
        assert t.verify() == [] and lock_word(key) == 0


# ---- many waiters, holder or waiters killed ------------------------------------------------------------
def test_holder_killed_with_four_waiters_asleep(make_segment, procs):
    """Exactly one waiter takes the dead holder's word over (CAS from exactly that value); the others
    queue behind it; no slot is handed out twice; the whole crowd is through quickly."""
    key = make_segment(capacity=32)
    holder = fork_lock_holder(key, 60)
    procs.append(holder)
    kids = [fork_child(tagged_churn, key, f"w{i}", 200, i) for i in range(4)]
    procs.extend(kids)
    deadline = time.monotonic() + 5
    while not all(_waiting(k) for k in kids) or not lock_word(key) & WAITERS:
        assert time.monotonic() < deadline, "the waiters never went to sleep"
        time.sleep(0.02)
    time.sleep(0.1)
    t0 = time.monotonic()
    os.kill(holder, signal.SIGKILL)
    wait_child(holder, procs=procs)
    for k in kids:
        assert wait_child(k, procs=procs, timeout=20) == 0, "a slot was handed to two processes"
    took = time.monotonic() - t0
    with stated.attach(key=key, owner="check") as t:
        assert t.verify() == [] and len(t) == 0
    assert took < 10, took


def test_waiters_killed_asleep_do_not_strand_the_last_one(make_segment, procs):
    """Two of three sleeping waiters are SIGKILLed (each had set WAITERS): the holder's one wake-up
    stays counted in the semaphore, and the survivor gets the lock right after the release."""
    key = make_segment(capacity=8)
    holder = fork_lock_holder(key, 0.6)
    procs.append(holder)
    t_start = time.monotonic()
    kids = [fork_child(_alloc_and_exit, key, f"w{i}", 5.0) for i in range(3)]
    procs.extend(kids)
    deadline = time.monotonic() + 5
    while not all(_waiting(k) for k in kids):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    for k in kids[:2]:
        os.kill(k, signal.SIGKILL)
        wait_child(k, procs=procs)
    assert wait_child(kids[2], procs=procs, timeout=10) == 0
    assert time.monotonic() - t_start < 0.6 + 0.5
    assert wait_child(holder, procs=procs, timeout=10) == 0


# ---- the semaphore removed, recreated, planted -----------------------------------------------------------
def test_release_after_the_semaphore_was_recreated_wakes_on_the_new_one(make_segment):
    """A process that attached before `ipcrm -s` and never waited since still has the removed
    semaphore's id: its release must post the wake-up a sleeper is owed to the daemon's new one."""
    key = make_segment(capacity=8)
    with stated.attach(key=key, owner="w") as t:
        sysv_ipc.Semaphore(key).remove()
        new = segment.open_semaphore(key, create_mode=0o600)       # the daemon's repair pass
        assert new.value == 0
        t._alloc.acquire()
        buf = t._seg.buf
        u64(buf, fmt.A_LOCK, u64(buf, fmt.A_LOCK) | WAITERS)       # a waiter went to sleep on `new`
        t._alloc.release()
        assert lock_word(key) == 0
        assert new.value == 1, "the wake-up went to the removed semaphore: the sleeper was never woken"
        t.free(t.alloc())
        assert t.verify() == []


def test_semaphore_removed_under_sleeping_waiters_then_recreated(make_segment, procs):
    key = make_segment(capacity=8)
    holder = fork_lock_holder(key, 1.0)
    procs.append(holder)
    t0 = time.monotonic()
    kids = [fork_child(_alloc_and_exit, key, f"w{i}", 5.0) for i in range(2)]
    procs.extend(kids)
    deadline = time.monotonic() + 5
    while not all(_waiting(k) for k in kids):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    sysv_ipc.Semaphore(key).remove()              # ipcrm -s while they sleep on it
    time.sleep(0.2)                               # they poll meanwhile: no semaphore at all
    segment.open_semaphore(key, create_mode=0o600)
    for k in kids:
        assert wait_child(k, procs=procs, timeout=10) == 0
    assert wait_child(holder, procs=procs, timeout=10) == 0
    assert 0.9 < time.monotonic() - t0 < 1.0 + 0.6
    with stated.attach(key=key, owner="check") as t:
        assert t.verify() == [] and len(t) == 2


def test_planted_semaphore_under_a_sleeping_waiter_is_refused(make_segment, procs):
    key = make_segment(capacity=8)
    with stated.attach(key=key, owner="w", lock_timeout=5) as t:
        holder = fork_lock_holder(key, 1.0)
        procs.append(holder)
        done: list = []

        def wait() -> None:
            try:
                t.alloc()
                done.append("entered")
            except stated.StatedError as e:
                done.append(e)
        th = threading.Thread(target=wait)
        th.start()
        time.sleep(0.2)
        sysv_ipc.Semaphore(key).remove()
        sysv_ipc.Semaphore(key, sysv_ipc.IPC_CREX, 0o666, 5)     # world-writable: not the daemon's
        th.join(3)
        assert isinstance(done[0], stated.ForeignSegment), done
        assert lock_word(key) & PID_MASK == holder                # never entered beside the holder
        wait_child(holder, procs=procs, timeout=10)


# ---- scribbled lock words ----------------------------------------------------------------------------------
def test_scribbled_lock_words_cost_a_bounded_wait(make_segment, procs):
    key = make_segment(capacity=8)
    rnd = random.Random(42)
    me = os.getpid()
    with stated.attach(key=key, owner="w", lock_timeout=0.3) as t:
        buf = t._seg.buf
        words = [rnd.getrandbits(64) for _ in range(20)] + [WAITERS, me | (proc_start_time(me) + 7) << 22,
                                                             1 | WAITERS, PID_MASK]
        for w in words:
            u64(buf, fmt.A_LOCK, w)
            t0 = time.monotonic()
            t.free(t.alloc())                # a dead (or no) holder's word: taken over
            assert time.monotonic() - t0 < 0.25, hex(w)
            assert lock_word(key) == 0
        for w in (lock_id(1), lock_id(me), lock_id(1) | WAITERS):   # live holders that are not inside
            u64(buf, fmt.A_LOCK, w)
            t0 = time.monotonic()
            with pytest.raises(stated.LockTimeout, match=f"held by pid {w & PID_MASK}"):
                t.alloc()
            assert time.monotonic() - t0 < 0.6
            assert lock_word(key) == w | WAITERS     # flagged by our wait, never cleared
            assert t._alloc.clear_lock(w | WAITERS)    # the daemon's watch, after STUCK_LOCK_AFTER
            t.free(t.alloc())
        assert t.verify() == []


# ---- /proc unreadable -----------------------------------------------------------------------------------------
def test_unreadable_own_start_time_refuses_the_lock_clearly(make_segment, tmp_path):
    from stated.shm import _native
    key = make_segment(capacity=8)
    seg = segment.open(key)
    try:
        core = _native.Core(seg.buf, key, proc_root=str(tmp_path))
        t0 = time.monotonic()
        with pytest.raises(stated.StatedError, match="start time"):
            core.acquire()
        with pytest.raises(stated.StatedError, match="start time"):
            core.claim_owner("w")
        assert time.monotonic() - t0 < 0.1 and lock_word(key) == 0
        core.close()
    finally:
        seg.detach()


# ---- a live process whose main thread exited ----------------------------------------------------------------
@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("clang") is None, reason="no C compiler")
def test_holder_thread_of_a_process_whose_main_thread_exited_is_alive(make_segment, procs, tmp_path):
    """/proc/<pid>/stat shows 'Z' for a thread-group leader that called pthread_exit while other threads
    run: no proof of death. The waiter must wait for the holder thread, not take its word over."""
    cc = shutil.which("gcc") or shutil.which("clang")
    exe = tmp_path / "leader_exit"
    r = subprocess.run([cc, "-std=c11", "-Wall", "-Wextra", "-Werror", "-O2", "-pthread", "-I",
                        str(ROOT / "stated" / "native"), "-o", str(exe), str(CSRC / "leader_exit.c")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    key = make_segment(capacity=8)
    p = subprocess.Popen([str(exe), hex(key), "0.6"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.append(p)
    assert p.stdout.readline() == "held\n", p.stderr.read()
    deadline = time.monotonic() + 5
    while Path(f"/proc/{p.pid}/stat").read_text().split(") ")[1][0] != "Z":
        assert time.monotonic() < deadline, "the main thread did not exit"
        time.sleep(0.005)
    t0 = time.monotonic()
    assert Liveness().state(p.pid, proc_start_time(p.pid)) == ALIVE       # the daemon's view: no reaping
    with stated.attach(key=key, owner="w", lock_timeout=5) as t:    # the owner claim takes the lock
        waited = time.monotonic() - t0
        t.alloc()
    out = p.stdout.read()
    p.wait(10)
    procs.remove(p)
    assert out == "released\n", f"the holder thread lost the lock while inside ({out!r}, waited {waited:.3f}s)"
    assert waited > 0.3
    with stated.attach(key=key, owner="check") as t:
        assert t.verify() == []
