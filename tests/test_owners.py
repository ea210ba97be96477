"""Liveness: a process is called dead only with proof (pid gone, zombie, or start time changed).

Everything here uses real processes, a real descriptor limit and a real hidepid=2 procfs mount:
a /proc that cannot be read (EMFILE, EACCES, hidepid) must never make a live worker look dead.
"""
import errno
import os
import resource
import subprocess
import sys
import tempfile
import time

import pytest
from helpers import run_as_nobody, run_child

from stated.shm.owners import ALIVE, DEAD, UNKNOWN, Liveness


@pytest.fixture
def sleeper(procs):
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    procs.append(p)
    return p


def test_live_dead_and_recycled(sleeper):
    lv = Liveness()
    st = lv.start_time(sleeper.pid)
    assert isinstance(st, int) and st > 0
    assert lv.state(sleeper.pid, st) == ALIVE and lv.alive(sleeper.pid, st)
    assert lv.state(sleeper.pid, st + 1) == DEAD          # same pid, other process: recycled
    assert not lv.alive(sleeper.pid, st + 1)
    assert lv.state(0, st) == DEAD and lv.state(-5, st) == DEAD
    for impossible in (1 << 22, 2**31 + 5, 2**32 - 1):       # scribbled pids: no process can have them
        assert lv.state(impossible, st) == DEAD and lv.start_time(impossible) is None
    sleeper.kill()
    time.sleep(0.2)
    assert lv.state(sleeper.pid, st) == DEAD               # a zombie (not yet reaped) is dead
    sleeper.wait()
    assert lv.state(sleeper.pid, st) == DEAD               # gone: kill(pid, 0) says ESRCH
    assert lv.start_time(sleeper.pid) is None
    assert lv.me()[0] == os.getpid()


def test_descriptor_exhaustion_is_unknown_not_dead(sleeper):
    """EMFILE on /proc/<pid>/stat is not proof of death: the live worker stays alive."""
    st = Liveness().start_time(sleeper.pid)

    def child() -> int:
        resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))
        fds = []
        try:
            while True:
                fds.append(os.open("/dev/null", os.O_RDONLY))
        except OSError as e:
            if e.errno != errno.EMFILE:
                return 3
        lv = Liveness()
        if lv.state(sleeper.pid, st) != UNKNOWN:
            return 4
        if not lv.alive(sleeper.pid, st):
            return 5
        if lv.start_time(sleeper.pid) is None:      # "exists", even though its start time is unreadable
            return 6
        return 0
    assert run_child(child) == 0


def test_unreadable_proc_root_keeps_live_and_proves_dead(tmp_path, sleeper, procs):
    """A /proc that hides everything (what hidepid=2 shows another user): kill(pid, 0) decides."""
    st = Liveness().start_time(sleeper.pid)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lv = Liveness(str(tmp_path))          # empty: ENOENT for every pid
    assert lv.state(sleeper.pid, st) == UNKNOWN and lv.alive(sleeper.pid, st)
    assert lv.state(gone.pid, st) == DEAD and not lv.alive(gone.pid, st)


@pytest.fixture
def hidepid_proc():
    mnt = tempfile.mkdtemp(prefix="stated-hidepid-")      # /tmp: traversable by nobody, unlike tmp_path
    os.chmod(mnt, 0o755)
    r = subprocess.run(["mount", "-t", "proc", "-o", "hidepid=2", "proc", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        os.rmdir(mnt)
        pytest.skip(f"cannot mount procfs with hidepid=2 here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", mnt], check=True)
        os.rmdir(mnt)


def test_hidepid_other_users_worker_is_not_dead(hidepid_proc, sleeper):
    """The daemon as an unprivileged user, /proc mounted hidepid=2: root's live worker is invisible in /proc
    (ENOENT) and kill(pid, 0) says EPERM: it exists, so it is kept. A pid that is really gone is still dead."""
    st = Liveness().start_time(sleeper.pid)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()

    def child() -> int:
        if os.path.exists(f"{hidepid_proc}/{sleeper.pid}/stat"):
            return 2                      # hidepid did not hide it: the test proves nothing
        lv = Liveness(hidepid_proc)
        if lv.state(sleeper.pid, st) != UNKNOWN or not lv.alive(sleeper.pid, st):
            return 3
        if lv.state(gone.pid, st) != DEAD or lv.alive(gone.pid, st):
            return 4
        if lv.state(os.getpid(), lv.me()[1]) != ALIVE:     # its own processes stay readable
            return 5
        return 0
    assert run_as_nobody(child) == 0
