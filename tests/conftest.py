"""Fixtures every test may use: unique IPC keys, tables on them, config files, child processes, a
notify socket, PostgreSQL databases; and the session's leak check.

Keys: 0x5E000000 | (pid & 0xFFF) << 12 | counter, skipping any key already in use, so parallel and repeated
runs never collide. Every key handed out is cleaned (segment and semaphore removed) when its test ends,
pass or fail, and the session fails if any of them, or any child process, is left behind.

Plain helpers shared by test modules live in tests/helpers.py (this file imports from it too); test
modules import from there, never from conftest or from each other.
"""
from __future__ import annotations

import itertools
import os
import signal
import time
from pathlib import Path

import pytest
from helpers import (
    HANDED_KEYS,
    PLAYER_FIELDS,
    NotifySocket,
    fresh_key,
    key_in_use,
    new_pg_cluster,
    player_layout,
    remove_key,
    toml_value,
)

from stated.shm import segment


@pytest.fixture
def new_key():
    """A function returning fresh keys; every key is removed after the test."""
    mine: list[int] = []

    def make() -> int:
        k = fresh_key()
        mine.append(k)
        return k
    yield make
    for k in mine:
        remove_key(k)


@pytest.fixture
def make_segment(new_key):
    """make_segment(capacity=100, fields=None) -> key of a new table segment."""
    def make(capacity: int = 100, fields=None) -> int:
        key = new_key()
        seg = segment.create(key, capacity, player_layout(fields), mode=0o600)
        seg.detach()
        return key
    return make


@pytest.fixture
def write_config(tmp_path, new_key):
    """write_config(tables={"players": dict(capacity=..., fields=[...])}, daemon={}) -> path."""
    def write(tables=None, daemon=None, name="stated.toml") -> Path:
        tables = tables or {"players": {"capacity": 100}}
        lines = ["[daemon]", 'state_dir = "var"', 'control_socket = "var/stated.sock"',
                 'metrics_address = "127.0.0.1:0"']
        for k, v in (daemon or {}).items():
            lines = [ln for ln in lines if not ln.startswith(f"{k} =")]
            lines.append(f"{k} = {toml_value(v)}")
        for tname, t in tables.items():
            t = dict(t)
            t.setdefault("key", new_key())
            t.setdefault("fields", PLAYER_FIELDS)
            lines.append(f"[tables.{tname}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in t.items()]
        p = tmp_path / name
        p.write_text("\n".join(lines) + "\n")
        return p
    return write


@pytest.fixture
def procs():
    """Track child processes (subprocess.Popen or pids); each still running is SIGKILLed at teardown."""
    started: list = []
    yield started
    for p in started:
        pid = p if isinstance(p, int) else p.pid
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            if isinstance(p, int):
                os.waitpid(pid, 0)
            else:
                p.wait(timeout=10)
        except (ChildProcessError, OSError):
            pass


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            data = Path(f"/proc/{d}/stat").read_bytes()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2:].split()
        if int(fields[1]) == pid and fields[0] not in (b"Z", b"X"):
            out.append(int(d))
    return out


def pytest_sessionfinish(session, exitstatus):
    leaked = [k for k in sorted(HANDED_KEYS) if key_in_use(k)]
    time.sleep(0.05)
    kids = _children(os.getpid())
    if leaked or kids:
        rep = session.config.pluginmanager.get_plugin("terminalreporter")
        msg = (f"LEAK CHECK FAILED: IPC keys left behind: {[hex(k) for k in leaked]}; "
               f"child processes left running: {kids}")
        if rep:
            rep.write_line(msg, red=True)
        for k in leaked:
            remove_key(k)
        session.exitstatus = 1
    elif session.config.pluginmanager.get_plugin("terminalreporter"):
        session.config.pluginmanager.get_plugin("terminalreporter").write_line(
            f"leak check: {len(HANDED_KEYS)} IPC keys used, none left behind; no child processes left")


@pytest.fixture
def notify(tmp_path):
    """A NOTIFY_SOCKET like systemd's (helpers.NotifySocket), closed after the test."""
    n = NotifySocket(tmp_path / "notify.sock")
    yield n
    n.close()


@pytest.fixture(scope="session")
def pg_cluster():
    """One PostgreSQL server for the session (tests get their own database through `pg_dsn`)."""
    c = new_pg_cluster()
    yield c
    c.destroy()


_db_counter = itertools.count(1)


@pytest.fixture
def pg_dsn(pg_cluster):
    """DSN of a fresh, empty database on the session cluster (owned by the `stated` user)."""
    name = f"t{os.getpid()}_{next(_db_counter)}"
    dsn = pg_cluster.new_database(name)
    yield dsn
    try:
        pg_cluster.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    except Exception:  # noqa: BLE001 - the cluster is removed at session end anyway
        pass


@pytest.fixture
def pg_private():
    """A cluster of this test's own (for outages: pg_ctl stop -m immediate, restarts)."""
    c = new_pg_cluster()
    yield c
    c.destroy()
