"""configs/prometheus and configs/grafana: valid, tested, and naming only metrics we export.

`promtool` comes with the Debian package `prometheus` (.ci/run installs it). These tests fail,
not skip, without it: the alert rules are untested otherwise."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from app.observability.metrics import exported_names, names_in_promql
from app.ops.alertmanager import markers, render

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "configs" / "prometheus"
DASHBOARDS = sorted((ROOT / "configs" / "grafana").glob("*.json"))
RULE_FILES = [PROM / "recording_rules.yml", PROM / "alert_rules.yml"]
# Serve's own metrics the rules and dashboards use (exported by Ray Serve itself).
SERVE_METRICS = {"ray_serve_deployment_replica_healthy"}
PROMETHEUS_METRICS = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}  # per target


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool not found: install the Debian package `prometheus` (.ci/run does)")
    return found


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_promtool(), *args], capture_output=True, text=True, timeout=60, cwd=PROM
    )


def _rules() -> list[dict]:
    return [rule for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"]]  # fmt: skip


def _recorded() -> set[str]:
    return {rule["record"] for rule in _rules() if "record" in rule}


def dashboard_exprs(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dashboard.get("annotations", {}).get("list", []) if "expr" in a]
    exprs += [
        v["definition"]
        for v in dashboard.get("templating", {}).get("list", [])
        if "definition" in v
    ]
    return exprs


def test_promtool_check_rules():
    result = _run("check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_config():
    result = _run("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules():
    result = _run("test", "rules", "tests/alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_unit_test():
    alerts = {rule["alert"] for rule in _rules() if "alert" in rule}
    assert len(alerts) >= 6
    tests = yaml.safe_load((PROM / "tests" / "alerts_test.yml").read_text())["tests"]
    fired = {
        case["alertname"]
        for t in tests
        for case in t.get("alert_rule_test", [])
        if case["exp_alerts"]
    }
    quiet = {
        case["alertname"]
        for t in tests
        for case in t.get("alert_rule_test", [])
        if not case["exp_alerts"]
    }
    assert alerts - fired == set(), "alerts with no test that makes them fire"
    assert alerts - quiet == set(), "alerts with no test that they stay quiet"


def test_rules_name_only_metrics_we_export_or_record():
    known = exported_names() | SERVE_METRICS | PROMETHEUS_METRICS | _recorded()
    for rule in _rules():
        unknown = names_in_promql(rule["expr"]) - known
        assert not unknown, f"{rule.get('alert') or rule.get('record')}: unknown metrics {unknown}"


def test_scrape_config_uses_rays_service_discovery_file():
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    files = [
        f
        for job in config["scrape_configs"]
        for sd in job.get("file_sd_configs", [])
        for f in sd["files"]
    ]
    assert files and all(f.endswith("prom_metrics_service_discovery.json") for f in files)
    assert sorted(config["rule_files"]) == sorted(p.name for p in RULE_FILES)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_panels_query_known_metrics(path):
    dashboard = json.loads(path.read_text())
    known = exported_names() | SERVE_METRICS | PROMETHEUS_METRICS | _recorded() | {"ALERTS"}
    assert dashboard["panels"], "no panels"
    for panel in dashboard["panels"]:
        targets = panel.get("targets", [])
        assert targets and all(t.get("expr", "").strip() for t in targets), panel["title"]
        for target in targets:
            names = names_in_promql(target["expr"])
            assert names, f"{panel['title']}: query names no metric: {target['expr']}"
            assert not names - known, f"{panel['title']}: unknown metrics {names - known}"
    for expr in dashboard_exprs(dashboard):
        assert not names_in_promql(expr) - known, expr
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_overview_dashboard_covers_the_rollout_signals():
    dashboard = json.loads((ROOT / "configs" / "grafana" / "rollout-overview.json").read_text())
    used = set().union(*(names_in_promql(e) for e in dashboard_exprs(dashboard)))
    for name in ("ray_rollout_traffic_weight_percent", "ray_rollout_version_requests_total",
                 "ray_rollout_version_latency_ms_bucket", "ray_rollout_cache_lookups_total",
                 "ray_rollout_fallbacks_total", "ray_rollout_score_psi",
                 "ray_rollout_phase"):  # fmt: skip
        assert name in used, name


# -- Alertmanager (configs/prometheus/alertmanager.yml) -------------------------------------------

# A template: its webhook URLs are markers that app/ops/alertmanager.py fills from files.
ALERTMANAGER_TEMPLATE = PROM / "alertmanager.yml"


@pytest.fixture(scope="module")
def alertmanager_config(tmp_path_factory) -> Path:
    """The template rendered as an operator renders it, with a URL file per receiver."""
    tmp = tmp_path_factory.mktemp("alertmanager")
    url_files = {}
    for key in markers(ALERTMANAGER_TEMPLATE):
        url_files[key] = tmp / f"{key}-url"
        url_files[key].write_text(f"https://{key}.test/alertmanager\n")
    path = tmp / "alertmanager.yml"
    path.write_text(render(ALERTMANAGER_TEMPLATE, url_files))
    return path


def _amtool(*args: str) -> subprocess.CompletedProcess:
    found = shutil.which("amtool")
    if found is None:
        pytest.fail(
            "amtool not found: install the Debian package `prometheus-alertmanager` (.ci/run does)"
        )
    return subprocess.run([found, *args], capture_output=True, text=True, timeout=60, cwd=PROM)


def test_amtool_check_config(alertmanager_config):
    result = _amtool("check-config", str(alertmanager_config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_routes_by_its_severity(alertmanager_config):
    """Each alert rule's severity reaches its receiver: page -> rollout-page, warn ->
    rollout-warn (amtool resolves the route tree offline)."""
    receivers = {"page": "rollout-page", "warn": "rollout-warn"}
    for rule in (r for r in _rules() if "alert" in r):
        severity = rule["labels"]["severity"]
        result = _amtool("config", "routes", "test", f"--config.file={alertmanager_config}",
                         f"--verify.receivers={receivers[severity]}",
                         f"alertname={rule['alert']}", f"severity={severity}", "model=m")  # fmt: skip
        assert result.returncode == 0, (rule["alert"], result.stdout + result.stderr)


def test_alertmanager_ships_url_markers_and_prometheus_points_at_it():
    """No URL in the repository (a receiver URL is a credential): a marker per receiver."""
    assert markers(ALERTMANAGER_TEMPLATE) == {"page": "rollout-page", "warn": "rollout-warn"}
    assert "://" not in "".join(
        line.partition("#")[0] for line in ALERTMANAGER_TEMPLATE.read_text().splitlines()
    )
    prometheus = yaml.safe_load((PROM / "prometheus.yml").read_text())
    targets = prometheus["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert targets == ["127.0.0.1:9093"]
