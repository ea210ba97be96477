"""Shared fixtures: unique IPC keys, tables on them, config files, and the leak check.

Keys: 0x5E000000 | (pid & 0xFFF) << 12 | counter, skipping any key already in
use, so parallel and repeated runs never collide. Every key handed out is
cleaned (segment and semaphore removed) when its test ends, pass or fail, and
the session fails if any of them, or any child process, is left behind.
"""
from __future__ import annotations

import itertools
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import sysv_ipc

from stated.format import layout as layout_mod
from stated.format.schema import parse_fields
from stated.shm import segment

_counter = itertools.count(1)
_handed: set[int] = set()
KEY_PREFIX = 0x5E000000

PLAYER_FIELDS = ["id: u64", "name: str[32]", "level: u16 = 1", "hp: i32 = 100",
                 "x: f32", "y: f32", "z: f32", "zone: u16", "gold: u64", "inventory: u32[32]"]


def _in_use(key: int) -> bool:
    for cls in (sysv_ipc.SharedMemory, sysv_ipc.Semaphore):
        try:
            obj = cls(key)
        except sysv_ipc.ExistentialError:
            continue
        if cls is sysv_ipc.SharedMemory:
            obj.detach()
        return True
    return False


def fresh_key() -> int:
    while True:
        n = next(_counter)
        key = KEY_PREFIX | ((os.getpid() & 0xFFF) << 12) | (n & 0xFFF)
        if n >= 0x1000:
            raise RuntimeError("test run used more than 4095 keys")
        if not _in_use(key):
            _handed.add(key)
            return key


def remove_key(key: int) -> None:
    try:
        sysv_ipc.SharedMemory(key).remove()
    except sysv_ipc.ExistentialError:
        pass
    try:
        sysv_ipc.Semaphore(key).remove()
    except sysv_ipc.ExistentialError:
        pass


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


def player_layout(fields=None):
    return layout_mod.compute(parse_fields(fields or PLAYER_FIELDS))


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
            lines.append(f"{k} = {_toml(v)}")
        for tname, t in tables.items():
            t = dict(t)
            t.setdefault("key", new_key())
            t.setdefault("fields", PLAYER_FIELDS)
            lines.append(f"[tables.{tname}]")
            lines += [f"{k} = {_toml(v)}" for k, v in t.items()]
        p = tmp_path / name
        p.write_text("\n".join(lines) + "\n")
        return p
    return write


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    raise TypeError(v)


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
    leaked = [k for k in sorted(_handed) if _in_use(k)]
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
            f"leak check: {len(_handed)} IPC keys used, none left behind; no child processes left")


# ---- helpers shared by test modules (import them from conftest, never from another test module) ----
STATED_CMD = [sys.executable, "-m", "stated"]


def run_as_nobody(fn) -> int:
    """Run fn() in a forked child as uid/gid nobody (no supplementary groups); its exit code.

    fn returns the code; an exception gives 99 (with the traceback on stderr)."""
    import pwd
    nobody = pwd.getpwnam("nobody")
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            code = fn()
        except BaseException:  # noqa: BLE001 - the child reports through its exit code only
            import traceback
            traceback.print_exc()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


class DaemonProc:
    """`stated run` as a real subprocess whose log (stderr) is collected by a reader thread."""

    def __init__(self, procs: list, cfg: Path, *extra: str):
        import subprocess
        import threading
        self.p = subprocess.Popen([*STATED_CMD, "run", "--config", str(cfg), *extra], stderr=subprocess.PIPE,
                                  text=True)
        procs.append(self.p)
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.p.stderr:
            self.log.append(line)

    def wait_for(self, text: str, timeout: float = 15.0, start: int = 0) -> str:
        """Wait until a log line (from index `start` on) contains `text`; return it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log[start:]:
                if text in line:
                    return line
            if self.p.poll() is not None and not any(text in ln for ln in self.log[start:]):
                time.sleep(0.1)
                if not any(text in ln for ln in self.log[start:]):
                    break
            time.sleep(0.02)
        raise AssertionError(f"daemon never logged {text!r}:\n" + "".join(self.log))

    def stop(self) -> int:
        self.p.terminate()
        return self.p.wait(timeout=15)


def copy_checkout(dest: Path) -> Path:
    """Copy the repository's tracked and untracked-but-not-ignored files to `dest` (no .venv, no .git):
    for tests that build or install from a checkout without writing into this one."""
    import shutil
    import subprocess
    root = Path(__file__).resolve().parent.parent
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=root, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    for f in filter(None, files):
        if (root / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / f, dest / f)
    return dest


# ---- PostgreSQL: a throwaway cluster per session (and private ones for outage tests) ----------------
class PgCluster:
    """A real PostgreSQL server in a temp dir on a free loopback port, run as the `postgres` user when
    we are root (initdb and pg_ctl refuse root). Stopped by pid and removed by `destroy`, even after a
    failure. Users: `postgres` (superuser, password 'postgres'), `stated` (password 'stated-pw')."""

    SUPERUSER_PW = "postgres"
    USER, USER_PW = "stated", "stated-pw"

    def __init__(self, bindir: Path):
        import pwd
        import tempfile
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="stated-pg-"))
        self.data = self.dir / "data"
        self.port = _free_port()
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        os.chmod(self.dir, 0o700)

    def _run(self, *args: str, timeout: float = 60) -> str:
        import subprocess
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.dir)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stdout}{r.stderr}")
        return r.stdout

    def init(self) -> PgCluster:
        pwfile = self.dir / "pw"
        pwfile.write_text(self.SUPERUSER_PW + "\n")
        if self.as_postgres:
            import pwd
            pw = pwd.getpwnam("postgres")
            os.chown(pwfile, pw.pw_uid, pw.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--pwfile", str(pwfile),
                  "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8")
        pwfile.unlink()
        return self

    def start(self) -> PgCluster:
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                f"-c full_page_writes=off -c shared_buffers=64MB -c max_connections=60")
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.dir / "log"), "-w", "-t", "30", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")

    def pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def psql(self, sql: str, db: str = "postgres") -> str:
        return self._run("psql", "-h", str(self.dir), "-p", str(self.port), "-U", "postgres", "-d", db,
                         "-v", "ON_ERROR_STOP=1", "-qAt", "-c", sql)

    def dsn(self, db: str, user: str | None = None, password: str | None = None) -> str:
        user = user or self.USER
        password = self.USER_PW if password is None else password
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{db}"

    def new_database(self, name: str) -> str:
        self.psql(f"CREATE DATABASE {name} OWNER {self.USER}")
        return self.dsn(name)

    def setup_users(self) -> None:
        self.psql(f"CREATE ROLE {self.USER} LOGIN PASSWORD '{self.USER_PW}'")

    def destroy(self) -> None:
        import shutil
        pid = self.pid()
        if pid:
            try:
                self.stop("immediate")
            except Exception:  # noqa: BLE001 - fall back to the pid
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        while pid and time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        shutil.rmtree(self.dir, ignore_errors=True)


def _free_port() -> int:
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bindir() -> Path | None:
    """Where initdb/pg_ctl live: PATH, else the newest Debian /usr/lib/postgresql/N/bin."""
    import shutil
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(os.path.realpath(found)).parent
    cands = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name)
                   if p.parent.parent.name.isdigit() else 0)
    return cands[-1].parent if cands else None


def new_pg_cluster() -> PgCluster:
    bindir = pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed: apt-get install postgresql "
                    "(.ci/system-deps does it as root)")
    if os.geteuid() == 0:
        import pwd
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run initdb/pg_ctl as (Debian's "
                        "postgresql package creates it)")
    c = PgCluster(bindir)
    try:
        c.init().start()
        c.setup_users()
    except BaseException:
        c.destroy()
        raise
    return c


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


class StoreHost:
    """The daemon side of one host for store tests, without a daemon: the table's segment, an
    allocator, and a Store on it (stated/persist/store/flush.py). Workers attach in-process as usual."""

    def __init__(self, key: int, dsn: str, host_id: str, table: str = "players", **cfg):
        from stated.format.store_config import StoreConfig
        from stated.persist.store.flush import Store
        from stated.shm import segment as seg_mod
        from stated.shm.allocator import Allocator
        self.seg = seg_mod.open(key, table=table)
        self.alloc = Allocator(self.seg, table=table)
        cfg.setdefault("lease_ttl", 30.0)
        cfg.setdefault("timeout", 3.0)
        migrate = cfg.pop("migrate", False)
        allow_lossy = cfg.pop("allow_lossy", False)
        self.store = Store(StoreConfig(dsn=dsn, host_id=host_id, **cfg), migrate=migrate, allow_lossy=allow_lossy)
        self.ts = self.store.add_table(table, self.seg.header.layout, self.alloc, self.seg)
        self.table = table

    def close(self) -> None:
        self.store.close_tables()
        self.alloc.release_views()
        self.seg.detach()


async def pg_rows(dsn: str, table: str = "players", schema: str = "stated") -> dict:
    """{entity: row dict} of a stored table, read with a plain connection (what an operator sees)."""
    import asyncpg
    c = await asyncpg.connect(dsn.replace(PgCluster.USER_PW, PgCluster.USER_PW))
    try:
        return {r["entity"]: dict(r) for r in await c.fetch(f'SELECT * FROM "{schema}"."{table}"')}
    finally:
        await c.close()


async def pg_exec(dsn: str, sql: str, *args):
    import asyncpg
    c = await asyncpg.connect(dsn)
    try:
        return await c.fetch(sql, *args)
    finally:
        await c.close()


async def pg_expire(dsn: str, host_id: str | None = None) -> None:
    """Make leases (of `host_id`, or all) expire now: their own deadline and their host's heartbeat."""
    await pg_exec(dsn, "UPDATE stated.leases SET lease_until = now() - interval '1 second' "
                       "WHERE $1::text IS NULL OR host_id = $1", host_id)
    await pg_exec(dsn, "UPDATE stated.hosts SET alive_until = now() - interval '1 second' "
                       "WHERE $1::text IS NULL OR host_id = $1", host_id)
