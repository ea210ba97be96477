"""Checks of the deployment files: systemd unit, sysusers/tmpfiles, sysctl,
Prometheus config and alerts, Grafana dashboard, Kubernetes manifest and
Dockerfile.

External tools: systemd-analyze, systemd-sysusers, systemd-tmpfiles (systemd)
and promtool (Debian package "prometheus"). Tests that need a missing tool
skip and say which. Everything they write goes to pytest's tmp_path.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from helpers import ALERT_RULES, ROOT, UNIT, alert_rules, require_tool, unit_settings

from stated.format import config as config_mod
from stated.format import segment as fmt

SYSUSERS = ROOT / "systemd" / "stated.sysusers.conf"
TMPFILES = ROOT / "systemd" / "stated.tmpfiles.conf"
SYSCTL = ROOT / "deploy" / "sysctl.d" / "60-stated.conf"
PROM_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "stated-dashboard.json"
K8S = ROOT / "deploy" / "k8s" / "stated-pod.yaml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"

# Every metric the daemon exports (plus Prometheus' own `up`).
METRICS = {
    "stated_slots", "stated_capacity_slots", "stated_allocations_total", "stated_frees_total",
    "stated_alloc_failures_total", "stated_lock_repairs_total", "stated_lock_timeouts_total",
    "stated_reaped_slots_total", "stated_owners", "stated_attached_processes",
    "stated_segment_size_bytes", "stated_dirty_slots", "stated_build_info",
    "stated_snapshot_last_success_timestamp_seconds", "stated_snapshot_size_bytes",
    "stated_snapshot_failures_total", "stated_torn_reads_total", "stated_settled_slots_total", "up",
    "stated_table_up", "stated_allocator_rebuilds_total", "stated_table_segment_lost_total",
    # prometheus_client's ProcessCollector (stated/service.py)
    "process_start_time_seconds", "process_resident_memory_bytes", "process_virtual_memory_bytes",
    "process_cpu_seconds_total", "process_open_fds", "process_max_fds",
    # the durable store (stated/daemon/store_metrics.py; exported when [store] is configured)
    "stated_store_up", "stated_store_flushed_records_total", "stated_store_stale_writes_total",
    "stated_store_lag_seconds", "stated_store_dirty_records", "stated_store_errors_total", "stated_leases",
}
HISTOGRAMS = {"stated_housekeeping_duration_seconds", "stated_snapshot_duration_seconds",
              "stated_store_flush_duration_seconds"}
KNOWN_SERIES = METRICS | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}

# The syscalls stated cannot live without: SysV shared memory and semaphores.
IPC_SYSCALLS = {"shmget", "shmat", "shmdt", "shmctl", "semget", "semop", "semtimedop", "semctl"}

TIMEOUT = 60


def _run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=TIMEOUT, check=False)


# ---------------------------------------------------------------- systemd unit

def _testable_unit(tmp_path: Path) -> Path:
    """Copy of the unit whose ExecStart=/ExecReload= binary exists on this machine
    (verify checks that), in a tmp dir; the sysusers user is irrelevant to verify."""
    exe = shutil.which("stated") or shutil.which("true") or "/bin/true"
    lines = []
    for line in UNIT.read_text().splitlines():
        m = re.match(r"^(Exec(?:Start|Reload)=)([-@:+!]*)(\S+)(.*)$", line)
        if m:
            line = f"{m.group(1)}{m.group(2)}{exe}{m.group(4)}"
        lines.append(line)
    unit = tmp_path / "stated.service"
    unit.write_text("\n".join(lines) + "\n")
    return unit


def test_unit_functional_settings():
    s = unit_settings(UNIT)

    def one(key):
        assert key in s, f"{key}= missing"
        return s[key][-1]

    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert one("ExecStart") == "/usr/local/bin/stated run --config /etc/stated/stated.toml"
    assert one("ExecReload") == "/usr/local/bin/stated reload --config /etc/stated/stated.toml"
    assert one("WatchdogSec") == "30s"
    assert one("Restart") == "on-failure"
    assert one("TimeoutStopSec") == "30s"
    assert one("User") == "stated" and one("Group") == "stated"
    assert one("StateDirectory") == "stated"
    assert one("RuntimeDirectory") == "stated"
    assert one("RuntimeDirectoryPreserve") == "yes"
    assert one("ConfigurationDirectory") == "stated"
    assert one("UMask") == "0007"
    # SysV IPC objects must outlive the service and be shared with workers.
    assert one("RemoveIPC") == "no"
    assert "DynamicUser" not in s, "DynamicUser= implies RemoveIPC=yes"
    assert "PrivateIPC" not in s, "workers must share the IPC namespace"
    # Liveness checks read /proc/<pid>/stat of workers running as other users.
    assert s.get("ProtectProc", ["default"])[-1] == "default"
    assert set(" ".join(s["RestrictAddressFamilies"]).split()) >= {"AF_UNIX", "AF_INET", "AF_INET6"}


def _expand_syscall_group(analyze: str, group: str, cache: dict) -> set[str]:
    if group in cache:
        return cache[group]
    res = _run(analyze, "syscall-filter", "--no-pager", group)
    assert res.returncode == 0, res.stderr
    calls: set[str] = set()
    for line in res.stdout.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        calls |= _expand_syscall_group(analyze, item, cache) if item.startswith("@") else {item}
    cache[group] = calls
    return calls


def test_unit_syscall_filter_allows_sysv_ipc():
    """Replays the SystemCallFilter= assignments the way systemd does (the first
    non-inverted one starts an allow list, later ones add, `~` ones remove)."""
    analyze = require_tool("systemd-analyze", "systemd")
    cache: dict[str, set[str]] = {}
    allowed: set[str] | None = None
    for value in unit_settings(UNIT).get("SystemCallFilter", []):
        invert = value.startswith("~")
        names: set[str] = set()
        for item in value.lstrip("~").split():
            names |= _expand_syscall_group(analyze, item, cache) if item.startswith("@") else {item}
        assert allowed is not None or not invert, "expected an allow list first"
        allowed = (allowed - names) if invert else (allowed or set()) | names
    if allowed is None:
        return  # no filter at all
    assert IPC_SYSCALLS <= allowed, f"filtered out: {sorted(IPC_SYSCALLS - allowed)}"
    # Group ownership of the socket/snapshots (daemon.group) needs chown(2).
    assert {"fchown", "chown", "fchownat"} <= allowed


def test_unit_verify_is_silent(tmp_path):
    analyze = require_tool("systemd-analyze", "systemd")
    unit = _testable_unit(tmp_path)
    res = _run(analyze, "verify", "--man=no", unit, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout == "" and res.stderr == "", f"verify printed:\n{res.stdout}{res.stderr}"


def test_unit_security_exposure_ok(tmp_path):
    analyze = require_tool("systemd-analyze", "systemd")
    unit = _testable_unit(tmp_path)
    res = _run(analyze, "security", "--offline=yes", "--no-pager", unit, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", res.stdout)
    assert m, f"no overall exposure line in:\n{res.stdout}{res.stderr}"
    exposure, rating = float(m.group(1)), m.group(2)
    assert exposure <= 4.9 or rating in {"SAFE", "OK"}, f"exposure {exposure} {rating}:\n{res.stdout}"


# ---------------------------------------------------------- sysusers, tmpfiles

def test_sysusers_and_tmpfiles(tmp_path):
    sysusers = require_tool("systemd-sysusers", "systemd")
    tmpfiles = require_tool("systemd-tmpfiles", "systemd")
    (tmp_path / "etc").mkdir()
    res = _run(sysusers, f"--root={tmp_path}", SYSUSERS)
    assert res.returncode == 0 and "Failed" not in res.stderr, res.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text().splitlines()
    group = (tmp_path / "etc" / "group").read_text().splitlines()
    user = next(line.split(":") for line in passwd if line.startswith("stated:"))
    grp = next(line.split(":") for line in group if line.startswith("stated:"))
    assert int(user[2]) < 1000, "must be a system user (logind's RemoveIPC= spares those)"
    assert user[3] == grp[2], "primary group must be 'stated'"

    if os.geteuid() != 0:
        pytest.skip("systemd-tmpfiles --create chowns to 'stated': needs root")
    res = _run(tmpfiles, f"--root={tmp_path}", "--create", TMPFILES)
    assert res.returncode == 0, res.stderr
    for d in ("var/lib/stated", "run/stated"):
        st = (tmp_path / d).stat()
        assert oct(st.st_mode & 0o7777) == "0o750", d


# ---------------------------------------------------------------------- sysctl

def test_sysctl_file():
    settings: dict[str, str] = {}
    comment_before = False
    for raw in SYSCTL.read_text().splitlines():
        line = raw.strip()
        if not line:
            continue
        if line[0] in "#;":
            comment_before = True
            continue
        m = re.fullmatch(r"([a-z0-9_.]+)\s*=\s*(\S+)", line)
        assert m, f"not a 'key = value' line: {raw!r}"
        assert m.group(1) not in settings, f"duplicate {m.group(1)}"
        assert comment_before, f"{m.group(1)} has no comment saying what it is for"
        settings[m.group(1)] = m.group(2)
        comment_before = False
    assert set(settings) == {"kernel.shmmax", "kernel.shmall", "kernel.shmmni", "kernel.shm_rmid_forced"}
    values = {k: int(v) for k, v in settings.items()}
    assert values["kernel.shm_rmid_forced"] == 0, "1 destroys segments when the last process detaches"
    assert values["kernel.shmall"] * 4096 >= values["kernel.shmmax"], "shmall is in pages"
    assert values["kernel.shmmni"] >= 64


# ------------------------------------------------------------------ Prometheus

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
             "unless", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names used in a PromQL expression (Grafana variables allowed)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # string literals
    e = re.sub(r"\$\{[^}]*\}|\$\w+", "", e)                          # Grafana variables
    e = re.sub(r"\{[^}]*\}", "", e)                                    # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                                   # range selectors
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    e = re.sub(r"\b\d+(?:\.\d+)?(?:[eE][+-]?\d+|ms|s|m|h|d|w|y)?\b", "", e)  # numbers, durations
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        if e[m.end():].lstrip().startswith("(") or m.group(0).lower() in _KEYWORDS:
            continue  # function call or keyword
        names.add(m.group(0))
    return names


def test_metric_name_extraction():
    assert metric_names('sum by (table) (rate(stated_frees_total{table=~"$table"}[$__rate_interval]))') \
        == {"stated_frees_total"}
    assert metric_names("time() - foo_bar{a=\"b\"} > 600 and on(x) up == 0") == {"foo_bar", "up"}
    assert metric_names('histogram_quantile(0.99, sum by (le) (rate(x_bucket[5m])))') == {"x_bucket"}


def test_alert_rules_use_known_metrics_and_cover_the_basics():
    rules = alert_rules()
    for r in rules:
        unknown = metric_names(r["expr"]) - KNOWN_SERIES
        assert not unknown, f"{r.get('alert')}: unknown metrics {unknown}"
    used = {n for r in rules for n in metric_names(r["expr"])}
    for must in ("up", "stated_slots", "stated_capacity_slots", "stated_lock_repairs_total",
                 "stated_lock_timeouts_total", "stated_snapshot_last_success_timestamp_seconds",
                 "stated_snapshot_failures_total", "stated_table_up"):
        assert must in used, f"no alert on {must}"


def test_promtool_check_config():
    promtool = require_tool("promtool", "prometheus")
    res = _run(promtool, "check", "config", PROM_CONFIG)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 rule files found" in res.stdout, res.stdout


def test_promtool_check_rules():
    promtool = require_tool("promtool", "prometheus")
    res = _run(promtool, "check", "rules", ALERT_RULES)
    assert res.returncode == 0, res.stdout + res.stderr


# --------------------------------------------------------------------- Grafana

def _panels(panels):
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))


def _dashboard_exprs(dash) -> list[str]:
    exprs = [t["expr"] for p in _panels(dash["panels"]) for t in p.get("targets", []) if "expr" in t]
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]
            q = q["query"] if isinstance(q, dict) else q
            # label_values(SERIES, LABEL): only SERIES is PromQL.
            m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", q)
            exprs.append(m.group(1) if m else q)
    return exprs


def test_dashboard_metrics_and_datasource():
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    exprs = _dashboard_exprs(dash)
    assert len(exprs) >= 10
    for e in exprs:
        unknown = metric_names(e) - KNOWN_SERIES
        assert not unknown, f"unknown metrics {unknown} in {e!r}"
    ids = [p["id"] for p in _panels(dash["panels"])]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for p in _panels(dash["panels"]):
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            for t in p["targets"]:
                assert t["datasource"]["uid"] == "${datasource}", p["title"]


def test_dashboard_exprs_are_valid_promql(tmp_path):
    """promtool parses each panel expression (Grafana variables substituted) as
    a recording rule."""
    promtool = require_tool("promtool", "prometheus")
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in _panels(dash["panels"]) for t in p.get("targets", []) if "expr" in t]
    subst = {"$__rate_interval": "5m", "$__interval": "1m", "$instance": ".*", "$table": ".*"}
    rules = []
    for i, e in enumerate(exprs):
        for k, v in subst.items():
            e = e.replace(k, v)
        assert "$" not in e, f"unsubstituted variable in {e!r}"
        rules.append({"record": f"dashboard:expr_{i}", "expr": e})
    path = tmp_path / "dashboard-rules.json"  # JSON is YAML
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = _run(promtool, "check", "rules", path)
    assert res.returncode == 0, res.stdout + res.stderr


# ------------------------------------------------------------------ Kubernetes

def _mib(q: str) -> float:
    m = re.fullmatch(r"(\d+)(Mi|Gi)", q)
    assert m, q
    return int(m.group(1)) * (1024 if m.group(2) == "Gi" else 1)


def test_k8s_manifest():
    yaml = pytest.importorskip("yaml")
    docs = {d["kind"]: d for d in yaml.safe_load_all(K8S.read_text()) if d}
    cm, pvc, dep = docs["ConfigMap"], docs["PersistentVolumeClaim"], docs["Deployment"]
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    pod = dep["spec"]["template"]["spec"]
    assert pod["shareProcessNamespace"] is True
    assert not pod.get("hostIPC"), "the pod's own IPC namespace is shared by its containers"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert {s["name"]: s["value"] for s in pod["securityContext"]["sysctls"]} \
        .get("kernel.shm_rmid_forced") == "0"
    # stated is a native sidecar: an init container with restartPolicy Always and a startup
    # probe, so it starts before the worker and stops after it.
    inits = {c["name"]: c for c in pod["initContainers"]}
    containers = {c["name"]: c for c in pod["containers"]}
    assert list(inits) == ["stated"] and list(containers) == ["game-worker"]
    stated = inits["stated"]
    assert stated["restartPolicy"] == "Always" and "startupProbe" in stated
    for c in [*inits.values(), *containers.values()]:
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c.get("securityContext", {}).get("runAsUser", pod["securityContext"]["runAsUser"]) != 0
    assert stated["args"] == ["stated", "run", "--config", "/etc/stated/stated.toml"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in stated["volumeMounts"]}
    assert volumes[mounts["/var/lib/stated"]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert volumes[mounts["/etc/stated"]]["configMap"]["name"] == cm["metadata"]["name"]
    assert pod["terminationGracePeriodSeconds"] >= 40, "the worker's stop, then the final snapshot"

    conf = tomllib.loads(cm["data"]["stated.toml"])["daemon"]
    assert conf["state_dir"] == "/var/lib/stated"
    assert Path(conf["control_socket"]).parent == Path("/run/stated")
    port = int(conf["metrics_address"].rpartition(":")[2])
    assert port == stated["ports"][0]["containerPort"]


# Peak RSS of `stated run` with the manifest's tables (players 10,000, world 16), filled, during
# `stated snapshot`: 40 MiB measured (VmHWM), of which ~34.5 MiB before any table was written.
MEASURED_SNAPSHOT_RSS_MIB = 40


def test_k8s_memory_matches_the_tables():
    """Requests and limits follow the rule written next to them: request >= measured RSS + the
    segments (shared memory may be charged to this container), limit >= measured + 3 x segments,
    and neither absurdly larger (a 1 GiB limit for 3 MiB of state hides leaks)."""
    yaml = pytest.importorskip("yaml")
    docs = {d["kind"]: d for d in yaml.safe_load_all(K8S.read_text()) if d}
    cfg = config_mod.loads(docs["ConfigMap"]["data"]["stated.toml"], "stated-pod.yaml", Path("/etc/stated"))
    seg_mib = sum(fmt.regions(t.capacity, t.layout.record_size, 4096).total_size     # schema blob < 4 KiB
                  for t in cfg.tables.values()) / 2**20
    res = next(c for c in docs["Deployment"]["spec"]["template"]["spec"]["initContainers"]
               if c["name"] == "stated")["resources"]
    request, limit = _mib(res["requests"]["memory"]), _mib(res["limits"]["memory"])
    assert request >= MEASURED_SNAPSHOT_RSS_MIB + seg_mib, (request, seg_mib)
    assert limit >= MEASURED_SNAPSHOT_RSS_MIB + 3 * seg_mib, (limit, seg_mib)
    assert limit <= 4 * (MEASURED_SNAPSHOT_RSS_MIB + 3 * seg_mib), f"limit {limit} MiB for {seg_mib:.1f} MiB"


def test_k8s_config_loads_with_stated():
    yaml = pytest.importorskip("yaml")
    cm = next(d for d in yaml.safe_load_all(K8S.read_text()) if d and d["kind"] == "ConfigMap")
    cfg = config_mod.loads(cm["data"]["stated.toml"], "stated-pod.yaml", Path("/etc/stated"))
    assert cfg.tables


# ------------------------------------------------------------------ Dockerfile

def test_dockerfile():
    text = DOCKERFILE.read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms and all(f == "python:3.11-slim" for f in froms), froms
    assert "--no-binary" not in text            # sysv_ipc's wheel is enough: lock waits are the native core's
    # everything the build reads: pyproject's readme and license-files, setup.py (the native core's extension)
    copied = " ".join(re.findall(r"^COPY (?!--from)(.*) \S+$", text, re.M))
    for f in ("pyproject.toml", "setup.py", "README.md", "LICENSE", "stated/"):
        assert f in copied.split(), f"the build stage does not COPY {f}"
    assert re.search(r"^ && /opt/stated/bin/python -c \"import stated\.shm\._native\"$", text, re.M), \
        "the build must fail when the native core did not build"
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert re.search(r'^CMD \["stated", "run", "--config", "/etc/stated/stated.toml"\]$', text, re.M)
