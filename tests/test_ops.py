"""Operator experience (issue 13), with real processes: the daemon's core-dump filter, exit code 78
for config errors, EXTEND_TIMEOUT_USEC, process metrics, journald priorities and JSON logs, sysv_ipc's
wheel (no semtimedop) being enough, and the unit's settings that go with them."""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, STATED, UNIT, fork_lock_holder, metrics_port, metrics_text, start, stop, unit_settings

from stated.daemon import logs, service
from stated.tools import cli

WORKER_UNIT = ROOT / "systemd" / "stated-worker@.service"


# ------------------------------------------------------------------------- unit and exit codes

def test_unit_hardening_settings():
    s = unit_settings(UNIT)
    assert s["LimitCORE"] == ["0"]
    assert s["RestartPreventExitStatus"] == [str(cli.EXIT_CONFIG)] and cli.EXIT_CONFIG == 78
    assert s["Restart"] == ["on-failure"]


def test_bad_config_exits_78_with_one_line(tmp_path):
    bad = tmp_path / "stated.toml"
    bad.write_text('[daemon]\nstate_dir = "var"\n[tables.players]\ncapacity = 10\nfields = ["hp: i33"]\n')
    res = subprocess.run([*STATED, "run", "--config", str(bad)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 78, res.stderr
    assert "Traceback" not in res.stderr
    assert "fields.hp" in res.stderr and "unknown type" in res.stderr
    missing = subprocess.run([*STATED, "run", "--config", str(tmp_path / "nope.toml")], capture_output=True,
                             text=True, timeout=30)
    assert missing.returncode == 78 and "cannot read" in missing.stderr


def test_worker_unit_orders_after_the_daemon(tmp_path):
    s = unit_settings(WORKER_UNIT)
    assert "stated.service" in s["After"], "workers start after, and stop before, the daemon"
    assert "stated.service" in " ".join(s.get("Wants", []) + s.get("Requires", []))
    assert s["RemoveIPC"] == ["no"] and "DynamicUser" not in s
    assert "stated" in s["SupplementaryGroups"][0].split()
    analyze = subprocess.run(["which", "systemd-analyze"], capture_output=True, text=True).stdout.strip()
    if not analyze:
        pytest.skip("systemd-analyze not installed (Debian package 'systemd')")
    unit = tmp_path / "game-zone@.service"
    unit.write_text(re.sub(r"^ExecStart=\S+", f"ExecStart={sys.executable}", WORKER_UNIT.read_text(), flags=re.M))
    (tmp_path / "stated.service").write_text(UNIT.read_text().replace("/usr/local/bin/stated", sys.executable))
    res = subprocess.run([analyze, "verify", "--man=no", str(tmp_path / "game-zone@1.service")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert res.returncode == 0 and not (res.stdout + res.stderr).strip(), res.stdout + res.stderr


# ------------------------------------------------------------------------------- core dumps

def test_daemon_keeps_shared_memory_out_of_core_dumps(write_config, notify, procs):
    cfg = write_config()
    p = start(procs, cfg, notify)
    filt = int(Path(f"/proc/{p.pid}/coredump_filter").read_text(), 16)
    assert filt & service.SHARED_BITS == 0, f"{filt:#x}: shared memory would be dumped"
    parent = int(Path("/proc/self/coredump_filter").read_text(), 16)
    assert filt & 1 == parent & 1, "private anonymous memory (the interpreter) is still dumped"
    assert stop(p) == 0


def test_protect_core_dumps_on_a_proc_root(tmp_path):
    (tmp_path / "self").mkdir()
    f = tmp_path / "self" / "coredump_filter"
    f.write_text("0000017f\n")                     # every bit up to shared DAX
    assert service.protect_core_dumps(tmp_path) == 0x17F & ~service.SHARED_BITS
    assert int(f.read_text(), 16) & service.SHARED_BITS == 0
    f.unlink()
    assert service.protect_core_dumps(tmp_path) is None       # logged, not fatal


# -------------------------------------------------------------------- systemd timeouts, metrics

def test_extending_timeout_sends_until_the_body_ends(notify):
    with service.extending_timeout(notify.path, every=0.05, extend=7.5):
        time.sleep(0.4)
    notify.sock.settimeout(0.3)
    try:
        while True:
            notify.got.append(notify.sock.recv(4096).decode())
    except TimeoutError:
        pass
    assert len(notify.got) >= 4, notify.got
    assert set(notify.got) == {"EXTEND_TIMEOUT_USEC=7500000"}
    time.sleep(0.2)
    notify.sock.settimeout(0.05)
    with pytest.raises(socket.timeout):
        notify.sock.recv(4096)                    # the thread stopped with the body


def test_daemon_extends_timeouts_at_start_and_stop(write_config, notify, procs):
    cfg = write_config()
    p = start(procs, cfg, notify)
    got = notify.until("READY=1")
    first_ready = next(i for i, m in enumerate(got) if "READY=1" in m.split("\n"))
    assert any(m.startswith("EXTEND_TIMEOUT_USEC=") for m in got[:first_ready]), got
    p.send_signal(signal.SIGTERM)
    notify.until("STOPPING=1")
    assert p.wait(timeout=20) == 0
    notify.sock.settimeout(0.5)
    rest = []
    try:
        while True:
            rest.append(notify.sock.recv(4096).decode())
    except (TimeoutError, BlockingIOError):
        pass
    after_stop = notify.got[next(i for i, m in enumerate(notify.got) if "STOPPING=1" in m.split("\n")):] + rest
    assert any(m.startswith("EXTEND_TIMEOUT_USEC=") for m in after_stop), after_stop


def test_process_metrics_are_exported(write_config, notify, procs):
    cfg = write_config()
    p = start(procs, cfg, notify)
    text = metrics_text(metrics_port(cfg))
    m = re.search(r"^process_start_time_seconds (\S+)$", text, re.M)
    assert m, "no process_start_time_seconds"
    assert abs(float(m.group(1)) - time.time()) < 60
    assert re.search(r"^process_resident_memory_bytes \d", text, re.M)
    assert stop(p) == 0


# ---------------------------------------------------------------------------------- logging

DATE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def test_journald_stream_gets_priorities_and_no_timestamp(write_config, notify, procs, tmp_path):
    cfg = write_config()
    log = tmp_path / "journal-stream"
    with open(log, "w") as f:
        st = os.fstat(f.fileno())
        p = start(procs, cfg, notify, stderr=f, env_extra={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert stop(p) == 0
    lines = log.read_text().splitlines()
    assert lines and all(re.match(r"<[2-7]>", ln) for ln in lines), lines
    assert not any(DATE.search(ln) for ln in lines), "journald adds its own timestamp"
    assert any(ln.startswith("<6>stated.daemon: ready") for ln in lines), lines
    if os.geteuid() == 0:   # the daemon warns when run as root: a real warning to filter on
        warnings = [ln for ln in lines if int(ln[1]) <= 4]
        assert any("running as root" in ln for ln in warnings), lines


def test_plain_format_when_stderr_is_not_the_journal_stream(write_config, notify, procs, tmp_path):
    cfg = write_config()
    log = tmp_path / "plain.log"
    with open(log, "w") as f:
        # inherited JOURNAL_STREAM, but stderr was redirected to another file
        p = start(procs, cfg, notify, stderr=f, env_extra={"JOURNAL_STREAM": "1:1"})
        assert stop(p) == 0
    lines = log.read_text().splitlines()
    assert lines and all(DATE.match(ln) for ln in lines), lines
    assert any(" INFO stated.daemon: ready" in ln for ln in lines)


def test_json_log_format(write_config, notify, procs, tmp_path):
    cfg = write_config(daemon={"log_format": "json"})
    log = tmp_path / "json.log"
    with open(log, "w") as f:
        p = start(procs, cfg, notify, stderr=f)
        assert stop(p) == 0
    recs = [json.loads(ln) for ln in log.read_text().splitlines()]
    assert recs and all({"ts", "level", "logger", "msg", "pid"} <= r.keys() for r in recs)
    assert any(r["msg"].startswith("ready") and r["level"] == "info" for r in recs)
    snaps = [r for r in recs if "snapshot" in r["msg"] and "table" in r]
    assert snaps and snaps[0]["table"] == "players", recs


def test_bad_log_format_is_a_config_error(write_config):
    cfg = write_config(daemon={"log_format": "xml"})
    res = subprocess.run([*STATED, "check-config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 1 and "log_format" in res.stdout


def test_journal_formatter_prefixes_every_line_of_a_traceback():
    fmt = logs.formatter("text", journal=True)
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.LogRecord("stated.x", logging.ERROR, __file__, 1, "table=%s failed", ("players",),
                                sys.exc_info())
    lines = fmt.format(rec).split("\n")
    assert len(lines) > 3 and all(ln.startswith("<3>") for ln in lines), lines
    assert lines[0] == "<3>stated.x: table=players failed"
    assert [logs.priority(lv) for lv in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR,
                                         logging.CRITICAL)] == [7, 6, 4, 3, 2]


def test_journal_stream_detection(tmp_path):
    with open(tmp_path / "f", "w") as f:
        st = os.fstat(f.fileno())
        assert logs.journal_stream(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not logs.journal_stream(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not logs.journal_stream(f, {"JOURNAL_STREAM": "garbage"})
        assert not logs.journal_stream(f, {})


# ------------------------------------------------------------------ sysv_ipc without semtimedop

@pytest.fixture
def no_semtimedop(tmp_path):
    """An environment whose sysv_ipc reports no semtimedop, as the PyPI wheel does. Only the
    capability flag changes (a sitecustomize sets it); the IPC calls stay real."""
    d = tmp_path / "wheel-sysv-ipc"
    d.mkdir()
    (d / "sitecustomize.py").write_text("import sysv_ipc\nsysv_ipc.SEMAPHORE_TIMEOUT_SUPPORTED = False\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(d), str(ROOT)]))
    check = subprocess.run([sys.executable, "-c", "import sysv_ipc; print(sysv_ipc.SEMAPHORE_TIMEOUT_SUPPORTED)"],
                           env=env, capture_output=True, text=True, timeout=30)
    assert check.stdout.strip() == "False"
    return env


def test_without_semtimedop_writers_wait_with_a_timeout(no_semtimedop, make_segment):
    """sysv_ipc's wheel (no semtimedop) is enough: every lock wait is the native core's own timed
    semtimedop. A writer attaches, writes, and a wait for a lock held elsewhere ends in LockTimeout after
    its lock_timeout (was: InstallError at attach, "rebuild sysv_ipc from source")."""
    key = make_segment(capacity=10)
    holder = fork_lock_holder(key, 5.0)
    code = ("import stated, time\n"
            "t0 = time.monotonic()\n"
            f"try:\n    stated.attach(key={key}, owner='w', lock_timeout=0.3)\n"     # the owner claim takes the lock
            "except stated.LockTimeout:\n    print('timeout', round(time.monotonic() - t0, 2))\n")
    try:
        res = subprocess.run([sys.executable, "-c", code], env=no_semtimedop, capture_output=True, text=True,
                             timeout=30)
    finally:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)
    assert res.returncode == 0 and res.stdout.startswith("timeout"), res.stdout + res.stderr
    assert 0.25 <= float(res.stdout.split()[1]) < 3.0, res.stdout
    res = subprocess.run([sys.executable, "-c", f"import stated\nt = stated.attach(key={key}, owner='w')\n"
                          "h = t.alloc(entity=42)\nt.set(h, 'hp', 77)\nprint(t.get(h, 'hp'))\n"],
                         env=no_semtimedop, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and res.stdout.strip() == "77", res.stdout + res.stderr


def test_without_semtimedop_the_daemon_runs(no_semtimedop, write_config, notify, procs):
    """The daemon starts, serves and stops with sysv_ipc's wheel (was: exit 78 at start-up)."""
    for args in (["--version"], ["--help"], ["run", "--help"]):
        res = subprocess.run([*STATED, *args], env=no_semtimedop, capture_output=True, text=True, timeout=30)
        assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    cfg = write_config()
    p = start(procs, cfg, notify, env_extra={"PYTHONPATH": no_semtimedop["PYTHONPATH"]})
    res = subprocess.run([*STATED, "status", "--config", str(cfg)], env=no_semtimedop, capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 0 and "players" in res.stdout, res.stderr
    assert stop(p) == 0
