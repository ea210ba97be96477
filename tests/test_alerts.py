"""The alert rules fire when they should and stay quiet when they should not:
`promtool test rules` cases for every alert in deploy/prometheus/stated-alerts.yml,
including the cases the first version of the rules missed (issue 13):

- a table filled up by orphaned slots raises StatedTableNearlyFull;
- StatedSnapshotStale fires while the timestamp series is absent (after a start, before
  the first snapshot);
- StatedDown fires when the target disappears (service discovery drops it), and
  StatedAbsent takes over before StatedDown's window closes;
- nothing depends on the job name: the cases use two different job names.

Annotations are stripped before the unit tests (promtool compares them verbatim); a
separate test checks every alert has a runbook_url whose anchor exists in docs/runbook.md.
"""
from __future__ import annotations

import re
import subprocess

import pytest
from helpers import ALERT_RULES, ROOT, alert_rules, free_port, require_tool

RUNBOOK = ROOT / "docs" / "runbook.md"

# Target labels as the two shipped scrape configs produce them (different job names on purpose).
STATIC = {"service": "stated", "job": "stated-static", "instance": "game1:9474"}
K8S = {"service": "stated", "job": "kubernetes-pods", "instance": "games/stated"}


def series(name: str, target: dict, values: str, **labels) -> dict:
    lbl = ", ".join(f'{k}="{v}"' for k, v in {**target, **labels}.items())
    return {"series": f"{name}{{{lbl}}}", "values": values}


def fires(name: str, at: str, *alerts: dict) -> dict:
    """`alerts`: the label sets expected (without alertname); none = must not fire."""
    return {"eval_time": at, "alertname": name, "exp_alerts": [{"exp_labels": a} for a in alerts]}


def quiet(name: str, at: str) -> dict:
    return fires(name, at)


def table_target(target: dict, table: str = "players", **extra) -> dict:
    return {**target, "table": table, **extra}


# Each case: (id, input_series, alert_rule_test). Interval 1m: "a b c" are the values at 0m, 1m, 2m.
CASES = [
    ("down-scrape-fails", [series("up", STATIC, "1 1 0x10")], [
        quiet("StatedDown", "2m"),                       # failing for less than `for: 1m`
        fires("StatedDown", "3m", {**STATIC, "severity": "critical"}),
        quiet("StatedAbsent", "10m"),                     # the target still exists
    ]),
    # The gap of the first rules: a vanished target has no `up` series at all, so
    # `up == 0` never matched. Service discovery writes a staleness marker when it drops a target.
    ("down-target-vanishes", [series("up", K8S, "1 1 1 stale")], [
        quiet("StatedDown", "3m"),
        fires("StatedDown", "4m", {**K8S, "severity": "critical"}),
        fires("StatedDown", "30m", {**K8S, "severity": "critical"}),
        quiet("StatedAbsent", "30m"),
        # StatedAbsent takes over before StatedDown's 1h window lets go: no silent gap.
        fires("StatedDown", "58m", {**K8S, "severity": "critical"}),
        fires("StatedAbsent", "58m", {"service": "stated", "severity": "critical"}),
        quiet("StatedDown", "70m"),
        fires("StatedAbsent", "70m", {"service": "stated", "severity": "critical"}),
        fires("StatedAbsent", "200m", {"service": "stated", "severity": "critical"}),
    ]),
    ("absent-never-scraped", [series("up", {**STATIC, "service": "node"}, "1x20")], [
        quiet("StatedAbsent", "4m"),
        fires("StatedAbsent", "6m", {"service": "stated", "severity": "critical"}),
        quiet("StatedDown", "6m"),
    ]),
    ("up-and-healthy", [series("up", STATIC, "1x120"), series("up", K8S, "1x120")], [
        quiet("StatedDown", "5m"), quiet("StatedAbsent", "5m"), quiet("StatedDown", "100m"),
        quiet("StatedAbsent", "100m"),
    ]),
    # Started at 0s, 60s, 120s, 180s: three changes within the hour.
    ("restarting", [series("process_start_time_seconds", STATIC, "0 0 60 60 120 120 180x10"),
                    series("process_start_time_seconds", K8S, "0x10")], [
        quiet("StatedRestarting", "5m"),
        fires("StatedRestarting", "6m", {**STATIC, "severity": "warning"}),
    ]),
    # The gap of the first rules: orphaned slots used up the free ones; "allocated" alone is 50%.
    ("nearly-full-by-orphans", [
        series("stated_slots", STATIC, "50x20", table="players", state="allocated"),
        series("stated_slots", STATIC, "0 45x20", table="players", state="orphaned"),
        series("stated_slots", STATIC, "50 5x20", table="players", state="free"),
        series("stated_capacity_slots", STATIC, "100x20", table="players"),
        series("stated_slots", STATIC, "10x20", table="world", state="allocated"),
        series("stated_slots", STATIC, "0x20", table="world", state="orphaned"),
        series("stated_slots", STATIC, "90x20", table="world", state="free"),
        series("stated_capacity_slots", STATIC, "100x20", table="world"),
    ], [
        quiet("StatedTableNearlyFull", "5m"),
        fires("StatedTableNearlyFull", "7m", {**table_target(STATIC), "severity": "warning"}),
        fires("StatedOrphanedSlots", "12m",
              {**table_target(STATIC, state="orphaned"), "severity": "warning"}),
    ]),
    ("nearly-full-by-allocations", [
        series("stated_slots", K8S, "50 95x10", table="players", state="allocated"),
        series("stated_slots", K8S, "0x10", table="players", state="orphaned"),
        series("stated_slots", K8S, "50 5x10", table="players", state="free"),
        series("stated_capacity_slots", K8S, "100x10", table="players"),
    ], [
        quiet("StatedTableNearlyFull", "3m"),
        fires("StatedTableNearlyFull", "7m", {**table_target(K8S), "severity": "warning"}),
        quiet("StatedOrphanedSlots", "10m"),
    ]),
    ("counters", [
        series("stated_alloc_failures_total", STATIC, "0 0 3x10", table="players", reason="full"),
        series("stated_alloc_failures_total", STATIC, "0 0 3x10", table="players", reason="duplicate"),
        series("stated_lock_repairs_total", STATIC, "0 0 1x10", table="players"),
        series("stated_lock_timeouts_total", STATIC, "0 2x20", table="players"),
        series("stated_settled_slots_total", STATIC, "4 4 5x10", table="players"),
        series("stated_snapshot_failures_total", STATIC, "0 1x10", table="players"),
        series("stated_torn_reads_total", STATIC, "0 0 0 7x10", table="players"),
    ], [
        quiet("StatedAllocationsFailing", "1m"),
        fires("StatedAllocationsFailing", "3m",
              {**table_target(STATIC, reason="full"), "severity": "critical"}),
        quiet("StatedAllocationsFailing", "9m"),          # no new failures in the last 5 minutes
        quiet("StatedLockRepairs", "1m"),
        fires("StatedLockRepairs", "3m", {**table_target(STATIC), "severity": "warning"}),
        fires("StatedLockTimeouts", "2m", {**table_target(STATIC), "severity": "warning"}),
        quiet("StatedLockTimeouts", "13m"),
        quiet("StatedSettledSlots", "1m"),                # 4 settled before we looked: not new
        fires("StatedSettledSlots", "3m", {**table_target(STATIC), "severity": "warning"}),
        fires("StatedSnapshotFailures", "2m", {**table_target(STATIC), "severity": "warning"}),
        fires("StatedTornReads", "4m", {**table_target(STATIC), "severity": "info"}),
    ]),
    ("table-down-and-rebuilds", [
        series("stated_table_up", STATIC, "1 1 0x10", table="guilds"),
        series("stated_table_up", STATIC, "1x12", table="players"),
        series("stated_allocator_rebuilds_total", STATIC, "0 0 2x20", table="players"),
        series("stated_table_segment_lost_total", STATIC, "0 0 1x30", table="players"),
    ], [
        quiet("StatedTableDown", "2m"),
        fires("StatedTableDown", "4m", {**table_target(STATIC, table="guilds"), "severity": "critical"}),
        quiet("StatedAllocatorRebuilds", "1m"),
        fires("StatedAllocatorRebuilds", "3m", {**table_target(STATIC), "severity": "warning"}),
        quiet("StatedAllocatorRebuilds", "20m"),
        quiet("StatedTableSegmentLost", "1m"),
        fires("StatedTableSegmentLost", "3m", {**table_target(STATIC), "severity": "warning"}),
        quiet("StatedTableSegmentLost", "25m"),
    ]),
    ("snapshot-stale-old-timestamp", [
        series("stated_snapshot_last_success_timestamp_seconds", STATIC, "0x15", table="players"),
        series("stated_capacity_slots", STATIC, "100x15", table="players"),
        series("process_start_time_seconds", STATIC, "0x15"),
    ], [
        quiet("StatedSnapshotStale", "9m"),
        fires("StatedSnapshotStale", "11m", {**table_target(STATIC), "severity": "critical"}),
    ]),
    # The gap of the first rules: no timestamp series at all since the daemon started.
    ("snapshot-stale-never-since-start", [
        series("stated_capacity_slots", K8S, "100x15", table="players"),
        series("process_start_time_seconds", K8S, "0x15"),
    ], [
        quiet("StatedSnapshotStale", "9m"),
        fires("StatedSnapshotStale", "11m", {**table_target(K8S), "severity": "critical"}),
    ]),
    # Snapshots every minute, then a restart at 5m (the series disappears: a new process has
    # no timestamp until its first snapshot) and no snapshot since.
    ("snapshot-stale-after-restart", [
        series("stated_capacity_slots", STATIC, "100x30", table="players"),
        series("process_start_time_seconds", STATIC, "0 0 0 0 0 300x25"),
        series("stated_snapshot_last_success_timestamp_seconds", STATIC, "0 60 120 180 240 stale",
               table="players"),
        series("stated_capacity_slots", STATIC, "100x30", table="world"),
        series("stated_snapshot_last_success_timestamp_seconds", STATIC, "0 60 120 180 240 300 360 420 480 "
               "540 600 660 720 780 840 900 960 1020 1080 1140 1200", table="world"),
    ], [
        quiet("StatedSnapshotStale", "10m"),              # restarted 5 minutes ago
        fires("StatedSnapshotStale", "16m", {**table_target(STATIC), "severity": "critical"}),
    ]),
    # The durable store (issue 12): database unreachable, lag, stale writes after a lost lease.
    ("store-down", [series("stated_store_up", STATIC, "1 1 0x10")], [
        quiet("StatedStoreDown", "3m"),                   # down for less than `for: 2m`
        fires("StatedStoreDown", "5m", {**STATIC, "severity": "critical"}),
    ]),
    ("store-lagging", [series("stated_store_lag_seconds", K8S, "1 2 45x10", table="players"),
                       series("stated_store_lag_seconds", K8S, "1x12", table="world")], [
        quiet("StatedStoreLagging", "4m"),
        fires("StatedStoreLagging", "8m", {**table_target(K8S), "severity": "warning"}),
    ]),
    ("store-stale-writes", [series("stated_store_stale_writes_total", STATIC, "0 0 0 3 3", table="players")], [
        quiet("StatedStoreStaleWrites", "2m"),
        fires("StatedStoreStaleWrites", "4m", {**table_target(STATIC), "severity": "warning"}),
    ]),
]


def _alerts_under_test() -> set[str]:
    return {t["alertname"] for _, _, tests in CASES for t in tests if t["exp_alerts"]}


def test_every_alert_has_a_firing_case():
    names = {r["alert"] for r in alert_rules()}
    assert names == _alerts_under_test(), (names ^ _alerts_under_test())


def test_rules_name_no_job():
    for r in alert_rules():
        assert "job=" not in r["expr"].replace(" ", ""), f"{r['alert']} hard-codes a job label"


def test_every_alert_has_a_runbook_section():
    anchors = {re.sub(r"[^a-z0-9 -]", "", m.group(1).strip().lower()).replace(" ", "-")
               for m in re.finditer(r"^#+\s+(.*)$", RUNBOOK.read_text(), re.M)}
    for r in alert_rules():
        url = r["annotations"]["runbook_url"]
        base, _, anchor = url.partition("#")
        assert base.endswith("/docs/runbook.md"), url
        assert anchor == r["alert"].lower() and anchor in anchors, f"{r['alert']}: no section #{anchor}"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_promtool_alert_cases(case, tmp_path):
    promtool = require_tool("promtool", "prometheus")
    yaml = pytest.importorskip("yaml")
    rules = yaml.safe_load(ALERT_RULES.read_text())
    for g in rules["groups"]:
        for r in g["rules"]:
            r.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    _, inputs, tests = case
    spec = {"rule_files": ["rules.yml"], "evaluation_interval": "1m",
            "tests": [{"interval": "1m", "input_series": inputs, "alert_rule_test": tests}]}
    (tmp_path / "test.yml").write_text(yaml.safe_dump(spec, sort_keys=False))
    res = subprocess.run([promtool, "test", "rules", "test.yml"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


# --------------------------------------------------- the Kubernetes relabel rules, in a real Prometheus

def test_kubernetes_relabeling_sets_service_and_a_stable_instance(tmp_path, procs):
    """deploy/prometheus/prometheus-kubernetes.yml's relabel rules, run by Prometheus itself: the pod's
    discovery labels come from a file_sd file instead of the Kubernetes API (Debian's Prometheus has
    no Kubernetes SD). Targets are loopback addresses where nothing listens."""
    import json
    import time
    import urllib.request
    prometheus = require_tool("prometheus", "prometheus")
    yaml = pytest.importorskip("yaml")
    cfg = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus-kubernetes.yml").read_text())
    job = cfg["scrape_configs"][0]
    assert "kubernetes_sd_configs" in job
    del job["kubernetes_sd_configs"]
    job["file_sd_configs"] = [{"files": [str(tmp_path / "pods.json")], "refresh_interval": "1s"}]
    job["scrape_interval"] = "1h"
    cfg["rule_files"] = []
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))

    def pod(addr, name, **labels):
        meta = {"__meta_kubernetes_namespace": "games", "__meta_kubernetes_pod_name": name}
        meta.update({f"__meta_kubernetes_pod_{k}": v for k, v in labels.items()})
        return {"targets": [addr], "labels": meta}

    scrape = {"annotation_prometheus_io_scrape": "true", "annotation_prometheus_io_port": "9474"}
    (tmp_path / "pods.json").write_text(json.dumps([
        pod("127.0.0.2:8080", "stated-7d9f-abcde", label_app_kubernetes_io_name="stated", **scrape),
        pod("127.0.0.3:8080", "stated-eu-1-x", label_app_kubernetes_io_name="stated",
            label_app_kubernetes_io_instance="eu-1", **scrape),
        pod("127.0.0.4:8080", "redis-0", label_app_kubernetes_io_name="redis", **scrape),
        pod("127.0.0.5:8080", "unscraped", label_app_kubernetes_io_name="stated"),
    ]))
    port = free_port()
    p = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                          f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                         stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))
    procs.append(p)
    deadline = time.monotonic() + 30
    targets: list = []
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/targets", timeout=2) as r:
                targets = json.load(r)["data"]["activeTargets"]
        except OSError:
            targets = []
        if len(targets) == 3:
            break
        time.sleep(0.3)
    p.terminate()
    p.wait(timeout=20)
    got = {t["labels"]["pod"]: (t["labels"].get("service"), t["labels"]["instance"], t["scrapeUrl"])
           for t in targets}
    assert got == {
        "stated-7d9f-abcde": ("stated", "games/stated", "http://127.0.0.2:9474/metrics"),
        "stated-eu-1-x": ("stated", "games/eu-1", "http://127.0.0.3:9474/metrics"),
        "redis-0": (None, "127.0.0.4:9474", "http://127.0.0.4:9474/metrics"),
    }, (tmp_path / "prometheus.log").read_text()[-2000:]
