"""Modes and groups on every object, checked with a real unprivileged process (uid nobody).

Root bypasses SysV permission checks, so each check runs in a forked child that drops to
nobody, with or without the table's group among its supplementary groups.
"""
import grp
import os
import pwd
import socket
import stat

import pytest
from helpers import NotifySocket, ctl, player_layout, run_as_nobody, start

import stated
from stated.shm import segment

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create an unprivileged child")

GROUP = "users"


def _ids():
    try:
        return pwd.getpwnam("nobody").pw_uid, grp.getgrnam(GROUP).gr_gid
    except KeyError:
        pytest.skip("needs user 'nobody' and group 'users'")


def as_nobody(fn, *, in_group: bool) -> int:
    """run_as_nobody, with or without the table's group among the child's supplementary groups."""
    _, gid = _ids()
    return run_as_nobody(fn, groups=[gid] if in_group else [])


def _attach(key, **kw) -> int:
    try:
        t = stated.attach(key=key, **kw)
    except stated.PermissionDenied:
        return 1
    try:
        h = t.handles()[0]
        t.get(h, "hp")
        try:
            t.set(h, "hp", 1)
            return 0                                   # could write
        except (stated.ReadOnlyTable, stated.NotOwner):
            return 2                                   # could read, not write
    finally:
        t.close()


@pytest.fixture
def table(new_key):
    def make(mode):
        key = new_key()
        segment.create(key, 10, player_layout(), mode=mode, group=GROUP).detach()
        with stated.attach(key=key, owner="root-worker") as t:
            t.alloc()
        return key
    return make


def test_objects_get_mode_and_group(table):
    _, gid = _ids()
    key = table(0o660)
    import sysv_ipc
    shm, sem = sysv_ipc.SharedMemory(key), sysv_ipc.Semaphore(key)
    assert (shm.mode & 0o777, shm.gid) == (0o660, gid)
    assert (sem.mode & 0o777, sem.gid) == (0o660, gid)
    shm.detach()


def test_outside_the_group_cannot_attach(table):
    key = table(0o660)
    assert as_nobody(lambda: _attach(key, readonly=True), in_group=False) == 1
    assert as_nobody(lambda: _attach(key, owner="zone-1"), in_group=False) == 1


def test_group_member_with_read_only_mode(table):
    key = table(0o640)
    assert as_nobody(lambda: _attach(key, readonly=True), in_group=True) == 2     # reads, cannot write
    assert as_nobody(lambda: _attach(key, owner="zone-1"), in_group=True) == 1    # no writable attach


def test_group_member_with_read_write_mode(table):
    key = table(0o660)
    assert as_nobody(lambda: _attach(key, owner="zone-1"), in_group=True) == 2    # writes only its own slots


def test_daemon_files_and_socket_refuse_outsiders(write_config, procs, tmp_path, request):
    import shutil
    import tempfile

    from stated.format import config as config_mod
    sockdir = tempfile.mkdtemp(prefix="stated-perm-", dir="/tmp")    # reachable by nobody: the socket decides
    os.chmod(sockdir, 0o755)
    request.addfinalizer(lambda: shutil.rmtree(sockdir, ignore_errors=True))
    cfg = write_config({"players": {"capacity": 10}},
                       daemon={"group": GROUP, "mode": 0o660, "control_socket": f"{sockdir}/run/stated.sock"})
    old = os.umask(0)                # the daemon must not depend on a sane umask
    try:
        n = NotifySocket(tmp_path / "n.sock")
        start(procs, cfg, n)
    finally:
        os.umask(old)
    try:
        c = config_mod.load(cfg)
        path = str(c.daemon.control_socket)
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == grp.getgrnam(GROUP).gr_gid
        snap = ctl(cfg, "snapshot")["tables"]["players"]["path"]
        sst = os.stat(snap)
        assert stat.S_IMODE(sst.st_mode) & 0o007 == 0 and sst.st_gid == grp.getgrnam(GROUP).gr_gid

        def connect() -> int:
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(path)
                return 0
            except PermissionError:
                return 1
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o750   # umask 0 did not leak in
        assert as_nobody(connect, in_group=False) == 1
        assert as_nobody(connect, in_group=True) == 0
    finally:
        n.close()


def test_root_warning_names_the_unit(write_config, procs, tmp_path):
    cfg = write_config({"players": {"capacity": 5}})
    n = NotifySocket(tmp_path / "n.sock")
    try:
        d = start(procs, cfg, n)
        d.terminate()
        d.wait(timeout=10)
    finally:
        n.close()
    log = open(str(cfg) + ".log").read()
    assert "running as root" in log and "stated.service" in log
