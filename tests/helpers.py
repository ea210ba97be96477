"""Helpers shared by the test modules: one implementation of each, imported with `from helpers import ...`.

Test modules never import each other (tests/test_layers.py checks it): what two of them need lives
here. Fixtures (`new_key`, `make_segment`, `write_config`, `procs`, `notify`) and the session's leak
check live in conftest.py, which builds on the IPC-key bookkeeping below; tests/workers.py is the worker
program the tests run as real processes.

Sections: paths and commands; IPC keys and the players layout; child processes (forked, and worker
subprocesses); the daemon as a real process (launch, notify socket, control requests, metrics);
PostgreSQL clusters and the durable store's host side; deployment files; snapshot frames; fuzzing
budgets and strategies.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
import zlib
from array import array
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
import sysv_ipc
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

import stated
from stated.daemon import control
from stated.format import config as config_mod
from stated.format import layout as layout_mod
from stated.format import segment as fmt
from stated.format.schema import SCALARS, parse_fields
from stated.persist import snapshot as snap

# ---- paths and commands ----------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parent.parent          # the checkout
STATED = [sys.executable, "-m", "stated"]              # the CLI, as `stated ...` runs it
WORKERS = Path(__file__).resolve().parent / "workers.py"


def copy_checkout(dest: Path) -> Path:
    """Copy the repository's tracked and untracked-but-not-ignored files to `dest` (no .venv, no .git):
    for tests that build or install from a checkout without writing into this one."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    return dest


# ---- IPC keys (conftest's fixtures hand them out and the leak check looks for them) ----------------
# 0x5E000000 | (pid & 0xFFF) << 12 | counter, skipping any key already in use, so parallel and repeated
# runs never collide.
KEY_PREFIX = 0x5E000000
HANDED_KEYS: set[int] = set()          # every key handed out in this session
_counter = itertools.count(1)


def key_in_use(key: int) -> bool:
    """A segment or a semaphore exists on `key`."""
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
        if not key_in_use(key):
            HANDED_KEYS.add(key)
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


PLAYER_FIELDS = ["id: u64", "name: str[32]", "level: u16 = 1", "hp: i32 = 100",
                 "x: f32", "y: f32", "z: f32", "zone: u16", "gold: u64", "inventory: u32[32]"]


def player_layout(fields=None):
    return layout_mod.compute(parse_fields(fields or PLAYER_FIELDS))


def toml_str(s: str) -> str:
    """`s` as a TOML basic string (control characters escaped)."""
    out = []
    for c in s:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def toml_value(v) -> str:
    """`v` as a TOML value: what write_config writes and what the config fuzzer generates."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return toml_str(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_str(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


# ---- child processes -------------------------------------------------------------------------------
def fork_child(fn: Callable, *args, as_nobody: bool = False, groups=()) -> int:
    """fn(*args) in a forked child; returns its pid (reap it with wait_child; put it in `procs` when it
    may outlive a failing test).

    The child never returns into pytest: it exits with fn's return value (0 for None), or 70 with the
    traceback on stderr when fn raises. With as_nobody it first drops to uid/gid nobody with `groups` as
    its only supplementary groups: root bypasses the permission checks a hostile-user test wants to see."""
    nobody = pwd.getpwnam("nobody") if as_nobody else None
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            if nobody is not None:
                os.setgroups(list(groups))
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
            rc = fn(*args)
            code = 0 if rc is None else rc
        except BaseException:  # noqa: BLE001 - the child reports through its exit code only
            traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(code)
    return pid


def wait_child(pid: int, *, procs: list | None = None, timeout: float | None = None) -> int:
    """Reap a forked child; its exit code (-N when signal N killed it). With a timeout, fail instead of
    waiting longer; with procs, the pid leaves that list (the `procs` fixture need not kill it)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, 0 if deadline is None else os.WNOHANG)
        if done:
            break
        if time.monotonic() >= deadline:
            raise AssertionError(f"child {pid} still running after {timeout}s")
        time.sleep(0.05)
    if procs is not None and pid in procs:
        procs.remove(pid)
    return os.waitstatus_to_exitcode(status)


def run_child(fn: Callable, *args, as_nobody: bool = False, groups=()) -> int:
    """fork_child, then wait for it: the child's exit code."""
    return wait_child(fork_child(fn, *args, as_nobody=as_nobody, groups=groups))


def run_as_nobody(fn: Callable, groups=()) -> int:
    """fn() in a forked child running as uid/gid nobody (supplementary groups: `groups` only); its exit
    code: fn's return value, 70 when it raised."""
    return run_child(fn, as_nobody=True, groups=groups)


def fork_lock_holder(key: int, seconds: float) -> int:
    """A forked child attached to the table on `key` as owner 'holder' that holds its allocator lock for
    `seconds`, then releases it and exits 0. Returns once the lock is held; the pid."""
    r, w = os.pipe()

    def hold() -> None:
        os.close(r)
        t = stated.attach(key=key, owner="holder")
        t._alloc.acquire()
        os.write(w, b"x")
        time.sleep(seconds)
        t._alloc.release()
    pid = fork_child(hold)
    os.close(w)
    try:
        assert os.read(r, 1) == b"x", "the lock holder exited before it took the lock"
    finally:
        os.close(r)
    return pid


def tagged_churn(key: int, owner: str, ops: int, seed: int) -> None:
    """A forked child's body: `ops` random allocs and frees, each record tagged with the child's pid.
    Exits with the number of records (at most 100) found tagged by someone else: a slot handed out twice."""
    rnd = random.Random(seed)
    t = stated.attach(key=key, owner=owner, lock_timeout=10)
    me = os.getpid()
    mine = []
    bad = 0
    for _ in range(ops):
        if len(mine) < 8 and (not mine or rnd.random() < 0.5):
            try:
                h = t.alloc()
            except stated.TableFull:
                continue
            t.record(h).id = me
            mine.append(h)
        else:
            h = mine.pop(rnd.randrange(len(mine)))
            if t.get(h, "id") != me:
                bad += 1
            t.free(h)
    for h in mine:
        if t.get(h, "id") != me:
            bad += 1
        t.free(h)
    os._exit(min(bad, 100))


def lock_word(key: int) -> int:
    """The table lock word of the segment on `key` (format.A_LOCK): 0 when nobody holds the lock."""
    shm = sysv_ipc.SharedMemory(key)
    try:
        return int.from_bytes(shm.read(8, fmt.A_LOCK), "little")
    finally:
        shm.detach()


def proc_start_time(pid: int) -> int:
    """A live process's start time in clock ticks since boot (/proc/<pid>/stat field 22)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[19])


def lock_id(pid: int) -> int:
    """The lock word that names the live process `pid` as holder (docs/format.md, the lock)."""
    return pid | proc_start_time(pid) << fmt.LOCK_PID_BITS


def to_format_v1(key: int) -> None:
    """Rewrite the (idle, format-2) segment on `key` into format version 1, as a daemon of that version
    left it: the counters back at V1_OFF_COUNTERS, the holder pid word clear, the bytes format 2 uses for
    the lock and the moved counters zero, format_version 1 with its header_crc, and the semaphore as the
    free lock (value 1). For the in-place upgrade's tests (stated/shm/segment.upgrade_v1)."""
    shm = sysv_ipc.SharedMemory(key)
    buf = memoryview(shm)
    try:
        assert u32(buf, fmt.OFF_FORMAT_VERSION) == fmt.FORMAT_VERSION and u64(buf, fmt.A_LOCK) == 0
        n = 8 * len(fmt.COUNTERS)
        counters = bytes(buf[fmt.OFF_COUNTERS:fmt.OFF_COUNTERS + n])
        buf[fmt.V1_OFF_COUNTERS:fmt.SCHEMA_OFFSET] = bytes(fmt.SCHEMA_OFFSET - fmt.V1_OFF_COUNTERS)
        buf[fmt.V1_OFF_COUNTERS:fmt.V1_COUNTERS_END] = counters
        u32(buf, fmt.V1_A_HOLDER_PID, 0)
        u32(buf, fmt.OFF_FORMAT_VERSION, fmt.V1_FORMAT_VERSION)
        u32(buf, fmt.OFF_CRC, fmt.header_crc(buf))
    finally:
        buf.release()
        shm.detach()
    sysv_ipc.Semaphore(key).value = 1


def _word(buf, off: int, size: int, value: int | None) -> int:
    if value is not None:
        buf[off:off + size] = value.to_bytes(size, "little")
    return int.from_bytes(buf[off:off + size], "little")


def u32(buf, off: int, value: int | None = None) -> int:
    """The little-endian u32 at `off` of a segment's bytes, written first when `value` is given: a
    scribble the way another process could make it."""
    return _word(buf, off, 4, value)


def u64(buf, off: int, value: int | None = None) -> int:
    """As u32, 8 bytes."""
    return _word(buf, off, 8, value)


def index_home(entity: int, index_capacity: int) -> int:
    """The entity index entry where probing for `entity` starts (docs/format.md "Entity index":
    Fibonacci hashing), computed from the format's constant as a C worker would: for tests that
    plant index entries or need an entity whose entry lies on a given page."""
    from stated.format.segment import HASH_MUL, U64
    return ((entity * HASH_MUL) & U64) >> (64 - (index_capacity.bit_length() - 1))


def spawn(procs: list, *args) -> subprocess.Popen:
    """tests/workers.py MODE KEY OWNER [N [ARGS]] as a real process; returns once it printed "ready"."""
    p = subprocess.Popen([sys.executable, str(WORKERS), *map(str, args)], stdout=subprocess.PIPE, text=True)
    procs.append(p)
    line = p.stdout.readline()
    assert line.strip() == "ready", line
    return p


def kill9(p: subprocess.Popen) -> None:
    p.kill()
    p.wait(timeout=10)


# ---- the daemon as a real process -------------------------------------------------------------------
def popen_daemon(procs: list, cfg: Path, *extra: str, **popen_kw) -> subprocess.Popen:
    """`stated run --config cfg [extra]`, registered in `procs` (SIGKILLed at teardown if still running).
    popen_kw go to subprocess.Popen (stderr=, env=, preexec_fn=, ...)."""
    p = subprocess.Popen([*STATED, "run", "--config", str(cfg), *extra], **popen_kw)
    procs.append(p)
    return p


class DaemonProc:
    """`stated run` as a real subprocess whose log (stderr) is collected by a reader thread."""

    def __init__(self, procs: list, cfg: Path, *extra: str, env: dict[str, str] | None = None):
        self.p = popen_daemon(procs, cfg, *extra, stderr=subprocess.PIPE, text=True, env=env)
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

    def metrics_port(self) -> int:
        """The /metrics port, from the daemon's log line announcing it."""
        line = self.wait_for("metrics on http://")
        return int(line.rsplit(":", 1)[1].split("/")[0])

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM; the exit code."""
        return stop(self.p, timeout)


class NotifySocket:
    """What systemd does: an AF_UNIX datagram socket whose path goes in NOTIFY_SOCKET.

    `got` keeps every datagram received, in order. until(line) waits until any of them has the line;
    wait_for(line) waits for one that no earlier wait_for took (and that came after the last forget()),
    and takes it: a second READY=1 is a new one."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.got: list[str] = []
        self._taken: set[int] = set()
        self._from = 0

    def _receive(self, deadline: float) -> bool:
        if time.monotonic() >= deadline:
            return False
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            self.got.append(self.sock.recv(4096).decode())
        except TimeoutError:
            return False
        return True

    def wait_for(self, line: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        i = self._from
        while True:
            for j in range(i, len(self.got)):
                if j not in self._taken and line in self.got[j].split("\n"):
                    self._taken.add(j)
                    return self.got[j]
            i = len(self.got)
            if not self._receive(deadline):
                break
        raise AssertionError(f"no {line!r} from the daemon; got {self.got[self._from:]}")

    def until(self, line: str, timeout: float = 15.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while not any(line in m.split("\n") for m in self.got):
            if not self._receive(deadline):
                raise AssertionError(f"no {line!r}; got {self.got}")
        return self.got

    def forget(self) -> None:
        """wait_for considers only datagrams received from now on."""
        self._from = len(self.got)

    def close(self) -> None:
        self.sock.close()


def start(procs: list, cfg: Path, notify: NotifySocket, *, watchdog_usec: int | None = None, stderr=None,
          env_extra: dict | None = None) -> subprocess.Popen:
    """`stated run` the way systemd runs it (NOTIFY_SOCKET, optionally WATCHDOG_USEC); returns once this
    process sent READY=1. Its log (stderr) is appended to `<cfg>.log` unless `stderr` is given. The test
    runner's own JOURNAL_STREAM is dropped (it must not count) unless env_extra sets one."""
    env = dict(os.environ, NOTIFY_SOCKET=notify.path, **(env_extra or {}))
    if watchdog_usec:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    if "JOURNAL_STREAM" not in (env_extra or {}):
        env.pop("JOURNAL_STREAM", None)
    notify.forget()                  # only this process's READY counts
    if stderr is None:
        with open(str(cfg) + ".log", "a") as log:
            p = popen_daemon(procs, cfg, stderr=log, env=env)
    else:
        p = popen_daemon(procs, cfg, stderr=stderr, env=env)
    notify.wait_for("READY=1")
    return p


def stop(p: subprocess.Popen, timeout: float = 20.0) -> int:
    """SIGTERM; the exit code."""
    p.send_signal(signal.SIGTERM)
    return p.wait(timeout=timeout)


_sockets: dict[str, Path] = {}


def ctl(cfg: Path, op: str, timeout: float = 10.0, **kw) -> dict:
    """A control request to the daemon running `cfg`. The socket path is read from the file once and
    remembered: tests break their config files while the daemon runs."""
    if str(cfg) not in _sockets:
        _sockets[str(cfg)] = config_mod.load(cfg).daemon.control_socket
    return control.request(_sockets[str(cfg)], op, timeout=timeout, **kw)


def stated_status(cfg: Path) -> tuple[int, dict | None]:
    """`stated status --json`: its exit code and its document (None when it printed nothing)."""
    out = subprocess.run([*STATED, "status", "--config", str(cfg), "--json"], capture_output=True, text=True)
    return out.returncode, json.loads(out.stdout) if out.stdout else None


def by_table(status: dict) -> dict[str, dict]:
    """The rows of a status document by table name."""
    return {r["table"]: r for r in status["tables"]}


def metrics_port(cfg: Path) -> int:
    return ctl(cfg, "status")["daemon"]["metrics_port"]


def metrics_text(port: int, timeout: float = 5.0) -> str:
    """GET /metrics on 127.0.0.1:port: the exposition text."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
        return r.read().decode()


def scrape_port(port: int, timeout: float = 5.0) -> dict:
    """/metrics as {(sample name, sorted label items): value}, and the text under "_text"."""
    text = metrics_text(port, timeout)
    out: dict = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    out["_text"] = text
    return out


def scrape(cfg: Path) -> dict:
    """scrape_port on the metrics port of the daemon running `cfg`."""
    return scrape_port(metrics_port(cfg))


def metric(ms: dict, name: str, **labels) -> float:
    """One sample of a scrape: metric(ms, "stated_slots", table="players", state="free")."""
    return ms[(name, tuple(sorted(labels.items())))]


# ---- PostgreSQL (conftest's pg_cluster, pg_dsn, pg_private fixtures) and the durable store's host side ----
class PgCluster:
    """A real PostgreSQL server in a temp dir on a free loopback port, run as the `postgres` user when
    we are root (initdb and pg_ctl refuse root). Stopped by pid and removed by `destroy`, even after a
    failure. Users: `postgres` (superuser, password 'postgres'), `stated` (password 'stated-pw')."""

    SUPERUSER_PW = "postgres"
    USER, USER_PW = "stated", "stated-pw"

    def __init__(self, bindir: Path, *, fsync: bool = False):
        import pwd
        import tempfile
        self.bindir = bindir
        self.fsync = fsync          # tests: off (speed); bench_store: on, durable like production
        self.dir = Path(tempfile.mkdtemp(prefix="stated-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
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
        durable = "on" if self.fsync else "off"
        # command-line settings win over ALTER SYSTEM: fsync is chosen here, not later
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync={durable} "
                f"-c full_page_writes={durable} -c shared_buffers=64MB -c max_connections=60")
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


def free_port() -> int:
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


def new_pg_cluster(*, fsync: bool = False) -> PgCluster:
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
    c = PgCluster(bindir, fsync=fsync)
    try:
        c.init().start()
        c.setup_users()
    except BaseException:
        c.destroy()
        raise
    return c


@contextlib.contextmanager
def two_hosts(make_segment: Callable, dsn: str, capacity: int = 10, **cfg):
    """Hosts A and B of one fleet for lease tests: each its own table of `capacity` slots with a worker
    attached in-process (owners "wa", "wb") and a StoreHost ("host-a", "host-b", store settings `cfg`).
    Yields (a, b, ta, tb); closes both stores, hosts and workers on exit, even on failure."""
    ka, kb = make_segment(capacity), make_segment(capacity)
    ta, tb = stated.attach(key=ka, owner="wa"), stated.attach(key=kb, owner="wb")
    a, b = StoreHost(ka, dsn, "host-a", **cfg), StoreHost(kb, dsn, "host-b", **cfg)
    try:
        yield a, b, ta, tb
    finally:
        for h in (a, b):
            asyncio.run(h.store.close())
            h.close()
        ta.close(), tb.close()


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


# ---- deployment files ---------------------------------------------------------------------------------
UNIT = ROOT / "systemd" / "stated.service"
ALERT_RULES = ROOT / "deploy" / "prometheus" / "stated-alerts.yml"


def unit_settings(path: Path) -> dict[str, list[str]]:
    """A systemd unit's settings as key -> list of values (in order), sections merged."""
    out: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;" or line.startswith("["):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line in {path.name}: {raw!r}"
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def require_tool(name: str, package: str) -> str:
    """The path of an external tool; skips the test (naming the Debian package) when it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (install the Debian package {package!r})")
    return path


def alert_rules() -> list[dict]:
    """Every rule of deploy/prometheus/stated-alerts.yml, all groups in order."""
    return [r for g in pytest.importorskip("yaml").safe_load(ALERT_RULES.read_text())["groups"] for r in g["rules"]]


# ---- snapshot files, frame by frame ----------------------------------------------------------------------
class Raw(bytes):
    """A frame body given as raw bytes (any other object is msgpack-packed)."""


def encode_frames(frames) -> bytes:
    """A snapshot file of `frames`, every frame with a valid checksum: only the contents may lie."""
    out = [snap.PREAMBLE.pack(snap.MAGIC, snap.VERSION, 0)]
    for f in frames:
        body = bytes(f) if isinstance(f, Raw) else msgpack.packb(f, use_bin_type=True)
        out.append(snap.FRAME.pack(len(body), zlib.crc32(body)) + body)
    return b"".join(out)


def write_frames(path: Path, frames: list) -> None:
    path.write_bytes(encode_frames(frames))


def read_frames(path: Path) -> list:
    """The frames of a snapshot file, unpacked, checksums not checked."""
    data = path.read_bytes()
    pos, frames = snap.PREAMBLE.size, []
    while pos < len(data):
        n, _crc = snap.FRAME.unpack_from(data, pos)
        frames.append(msgpack.unpackb(data[pos + 8:pos + 8 + n], raw=False, strict_map_key=False))
        pos += 8 + n
    return frames


def edit_column(chunk: dict, name: str, code: str, fn: Callable[[array], None]) -> None:
    """fn edits column `name` of a snapshot chunk as an array of typecode `code`."""
    a = array(code, chunk[name])
    fn(a)
    chunk[name] = a.tobytes()


# ---- fuzzing: budgets, time bounds, strategies shared by the schema, segment and snapshot fuzzers --------
def FUZZ(n: int) -> settings:
    """Fixed budget, reproducible: the same examples on every run, no example database."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])


class Hang(Exception):
    """A call under test did not return within its bound."""


@contextlib.contextmanager
def bounded(seconds: float = 5.0, what: str = "call"):
    """Fail (instead of hanging the suite) when the body runs longer than `seconds`."""
    def on_alarm(signum, frame):
        raise Hang(f"{what} did not return within {seconds}s")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


TYPE_NAMES = [*SCALARS, "str", "bytes"]
HOSTILE_NAMES = ["hp", "x", "name", "inventory", "a\u00b2", "\ufb01eld", "\u00e9t\u00e9", "table", "slot", "_x",
                 "class", "x1", "a b", "a:b", "hp: u8 = 1 #", "", "x\n", "to_dict", "\u0661", "A" * 300]
names = st.one_of(st.sampled_from(HOSTILE_NAMES), st.text(max_size=6),
                  st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True))
types = st.one_of(st.sampled_from(TYPE_NAMES), st.sampled_from(["u128", "int", "", "STR", "u8[2]", "u8 = 1", "f16"]),
                  st.text(max_size=4))
counts = st.one_of(st.integers(-2, 70), st.sampled_from([0, 1 << 20, (1 << 20) + 1, 2**63 - 1]), st.booleans())
msgpack_ints = st.integers(-(2**63), 2**64 - 1)
defaults = st.one_of(st.none(), st.booleans(), msgpack_ints, st.floats(), st.text(max_size=40),
                     st.binary(max_size=40), st.lists(st.integers(-3, 3), max_size=3))
wire_entry = st.tuples(names, types, counts, st.one_of(st.booleans(), st.none(), st.integers(0, 1)), defaults).map(list)
wire_schema = st.one_of(
    st.lists(wire_entry, min_size=1, max_size=6),
    st.lists(st.one_of(wire_entry, st.lists(defaults, max_size=7), defaults), max_size=6),
    defaults,
)
scalars = st.one_of(st.none(), st.booleans(), msgpack_ints, st.floats(), st.text(max_size=20), st.binary(max_size=20))
nested = st.recursive(scalars, lambda c: st.lists(c, max_size=6) | st.dictionaries(st.text(max_size=4), c, max_size=4),
                      max_leaves=20)


def fill_and_drain(t: stated.Table) -> None:
    """Every slot the table says is free can be allocated (then all are freed again): after crashes and
    repairs, capacity is neither lost nor handed out twice."""
    free_before = t.capacity - len(t)
    got = []
    while True:
        try:
            got.append(t.alloc())
        except stated.TableFull:
            break
    assert len(got) == free_before
    for h in got:
        t.free(h)
