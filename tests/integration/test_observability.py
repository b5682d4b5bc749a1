"""Observability end to end: a real Prometheus scrapes the real Ray cluster running the app.

One module, one story (about 1-2 minutes):

1. Deploy v1 and v2 (v2 injects errors on 60% of its calls) at 50/50, with the cache, a shadow
   copy to v2 and JSON logs; clients send sticky, weighted, pinned, repeated (cache) and bad
   requests in the background.
2. Start Prometheus (the Debian package, on loopback) with the repo's configs/prometheus
   files, pointed at this cluster's service-discovery file; alert `for:` durations are cut to
   0s (promtool's unit tests cover the durations), scrape every 5 s, evaluation every second.
   Prometheus sends its alerts to a real Alertmanager (Debian package
   `prometheus-alertmanager`, on loopback) running configs/prometheus/alertmanager.yml rendered by
   app/ops/alertmanager.py with receiver URLs (from files) that point at a webhook receiver in
   this test (group_wait cut to 1s).
3. RolloutCanaryErrorRateAboveStable fires for v2.
4. Declare a canary plan for v2: the controller rolls it back; RolloutAutomaticRollback fires,
   and Alertmanager delivers both alerts to the receiver on the `page` route.
5. Every metric named in the rules and dashboards, and every metric in app/observability/metrics.py, exists
   in Prometheus, and every dashboard query runs and returns data.
6. The router's JSON access log has one record per request with version and decision, no
   payloads; the controller logged the rollback as a structured event.
7. `rollout report` draws the rollout's timeline from the controller's history.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from app import ray_compat
from app.observability.metrics import METRICS, exported_names, names_in_promql
from app.ops.alertmanager import markers, render
from tests.support.loadgen import Load
from tests.support.serving import APP, infer_body, model_config, serve_config
from tests.support.waiting import free_port, wait_for_condition
from tests.support.webhooks import WebhookReceiver

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "configs" / "prometheus"
DASHBOARDS = sorted((ROOT / "configs" / "grafana").glob("*.json"))
TOKEN = "observability-token-0123456789abcdef"
ITEMS = ["space opera", "cooking show", "jazz music", "history documentary", "rock news"]
LOAD_STAGE_GAUGES = {
    "ray_rollout_load_stage_running", "ray_rollout_load_stage_rps", "ray_rollout_load_stage_p99_ms",
}  # fmt: skip

PLAN = {
    "strategy": "canary", "candidate": "v2", "stable": "v1",
    "canary": {"steps": [{"set_weight": 50}, {"analysis_s": 120}]},
    "gates": {"min_requests": 10, "fail_fast_min_requests": 5, "fail_fast_error_rate": 0.3,
              "max_error_rate": 0.05, "max_p99_latency_ratio": None},
}  # fmt: skip


def _rules() -> list[dict[str, Any]]:
    return [r for name in ("recording_rules.yml", "alert_rules.yml")
            for g in yaml.safe_load((PROM / name).read_text())["groups"] for r in g["rules"]]  # fmt: skip


def _dashboard_exprs() -> list[str]:
    from tests.unit.test_observability_configs import dashboard_exprs

    return [e for path in DASHBOARDS for e in dashboard_exprs(json.loads(path.read_text()))]


def _grafana_vars(expr: str) -> str:
    return (expr.replace("$__rate_interval", "1m").replace("$model", APP)
            .replace("$application", APP))  # fmt: skip


class Prometheus:
    def __init__(self, url: str, process: subprocess.Popen, log: Path) -> None:
        self.url, self.process, self.log = url, process, log
        self.client = httpx.Client(base_url=url, timeout=10)

    def query(self, expr: str) -> list[dict[str, Any]]:
        body = self.client.get("/api/v1/query", params={"query": expr}).json()
        assert body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def names(self) -> set[str]:
        return set(self.client.get("/api/v1/label/__name__/values").json()["data"])

    def firing(self, alert: str) -> list[dict[str, Any]]:
        alerts = self.client.get("/api/v1/alerts").json()["data"]["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == alert and a["state"] == "firing"]

    def explain(self) -> str:
        """What Prometheus sees now, for a failure message: each target's health and scrape
        time, the series an alert is built from, and every rule that is not healthy."""
        lines = []
        try:
            for t in self.client.get("/api/v1/targets").json()["data"]["activeTargets"]:
                lines.append(f"target {t['scrapeUrl']}: {t['health']} in "
                             f"{t.get('lastScrapeDuration', 0):.3f}s {t.get('lastError') or ''}")  # fmt: skip
            for expr in ("scrape_samples_scraped", "ray_rollout_stable_version",
                         "rollout:is_stable", "rollout:version_requests:rate1m",
                         "rollout:version_error_ratio:rate1m", "rollout:stable_error_ratio:rate1m"):  # fmt: skip
                series = [(r["metric"], r["value"][1]) for r in self.query(expr)]
                lines.append(f"{expr}: {series}")
            for group in self.client.get("/api/v1/rules").json()["data"]["groups"]:
                for rule in group["rules"]:
                    if rule.get("health") != "ok" or rule.get("lastError"):
                        lines.append(f"rule {rule['name']}: {rule.get('health')} "
                                     f"{rule.get('lastError')}")  # fmt: skip
            lines.append("log: " + self.log.read_text()[-2000:])
        except Exception as exc:  # a diagnosis must not hide the failure it explains
            lines.append(f"(explaining failed: {exc!r})")
        return "\n".join(lines)

    def wait_firing(self, alert: str, timeout_s: float) -> list[dict[str, Any]]:
        try:
            return wait_for_condition(lambda: self.firing(alert), timeout_s, interval_s=1.0,
                                      message=alert)  # fmt: skip
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.explain()}") from None


class AlertReceiver(WebhookReceiver):
    """The webhook Alertmanager posts to: every notification, with the path (the receiver's
    name) and the time it arrived."""

    def received(self, alert: str, path: str = "/rollout-page") -> list[tuple[float, dict]]:
        """(arrival time, alert) for each firing `alert` delivered on `path`."""
        return [(r["at"], a) for r in list(self.requests) if r["path"] == path
                for a in r["body"]["alerts"]
                if a["labels"]["alertname"] == alert and a["status"] == "firing"]  # fmt: skip


def _epoch(rfc3339: str) -> float:
    """Prometheus' `activeAt` (nanosecond fractions, `Z`) as epoch seconds."""
    head, _, fraction = rfc3339.rstrip("Z").partition(".")
    return datetime.fromisoformat(head + "+00:00").timestamp() + float("0." + (fraction or "0"))


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=15)


@pytest.fixture(scope="module")
def alertmanager(tmp_path_factory):
    """A real Alertmanager with the shipped template rendered as an operator renders it
    (app/ops/alertmanager.py, a URL file per receiver): receivers pointed at an AlertReceiver,
    group_wait 1s (the shipped routes and inhibit rules as they are)."""
    binary = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if binary is None:
        pytest.fail("alertmanager not found: install the Debian package `prometheus-alertmanager`"
                    " (.ci/run does)")  # fmt: skip
    tmp = tmp_path_factory.mktemp("alertmanager")
    receiver = AlertReceiver()
    template = PROM / "alertmanager.yml"
    url_files = {}
    for key, name in markers(template).items():
        url_files[key] = tmp / f"{key}-url"
        url_files[key].write_text(f"{receiver.url}/{name}\n")
    config = yaml.safe_load(render(template, url_files))
    for route in [config["route"], *config["route"].get("routes", [])]:
        route.update(group_wait="1s", group_interval="1s", repeat_interval="1m")
    (tmp / "alertmanager.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    log = tmp / "alertmanager.log"
    log_file = log.open("w")
    process = subprocess.Popen(
        [binary, f"--config.file={tmp / 'alertmanager.yml'}", f"--storage.path={tmp / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=",
         "--log.level=warn"],
        stdout=log_file, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"127.0.0.1:{port}"
    try:
        wait_for_condition(lambda: httpx.get(f"http://{url}/-/ready").status_code == 200, 60,
                           message="Alertmanager ready")  # fmt: skip
        yield url, receiver
    finally:
        _stop(process)
        log_file.close()
        receiver.close()


@pytest.fixture(scope="module")
def prometheus(cluster, alertmanager, tmp_path_factory):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus not found: install the Debian package `prometheus` (.ci/run does)")
    tmp = tmp_path_factory.mktemp("prometheus")
    discovery = cluster.session_dir / "prom_metrics_service_discovery.json"
    wait_for_condition(discovery.exists, 60, message=f"Ray's service-discovery file {discovery}")
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    # Ray's metrics agent keeps the counters and histograms of every worker that ever ran on
    # its node until the node stops: late in the suite's shared cluster one scrape carries
    # ~20,000 samples and takes about a second on two loaded cores. At a 1 s interval the
    # scrape timeout is 1 s too, and CI's run of af05638 timed out every scrape of the agent
    # (up 0 for the whole test, no ray_rollout_ series, no alert). 5 s gives it room.
    config["global"] = {
        "scrape_interval": "5s",
        "scrape_timeout": "5s",
        "evaluation_interval": "1s",
    }
    for job in config["scrape_configs"]:
        job["file_sd_configs"] = [{"files": [str(discovery)], "refresh_interval": "2s"}]
    config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager[0]]}]}]}
    shutil.copy(PROM / "recording_rules.yml", tmp / "recording_rules.yml")
    alerts = yaml.safe_load((PROM / "alert_rules.yml").read_text())
    for group in alerts["groups"]:
        for rule in group["rules"]:
            rule["for"] = "0s"  # promtool's tests cover the durations; here: fire on the fault
    (tmp / "alert_rules.yml").write_text(yaml.safe_dump(alerts, sort_keys=False))
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    log = tmp / "prometheus.log"
    log_file = log.open("w")
    process = subprocess.Popen(
        [binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log_file, stderr=subprocess.STDOUT,
    )  # fmt: skip
    server = Prometheus(f"http://127.0.0.1:{port}", process, log)
    try:
        wait_for_condition(lambda: server.client.get("/-/ready").status_code == 200, 60,
                           message="Prometheus ready")  # fmt: skip
        yield server
    finally:
        server.client.close()
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
        log_file.close()


class Traffic(Load):
    """Background clients (tests/support/loadgen.py): sticky users, keyless (weighted),
    pinned, repeated bodies for cache hits, and an occasional bad request (a 400 before any
    model runs). Every status is kept in `statuses`; none counts as a load error."""

    def __init__(self, url: str, clients: int = 3) -> None:
        self.statuses: list[int] = []
        self.calls = [0] * clients  # per client, to pick each call's kind
        super().__init__(url, self._call, clients)

    def _call(self, c: httpx.Client, rng: random.Random, i: int) -> None:
        path = f"/v2/models/{APP}/infer"
        self.calls[i] += 1
        n = self.calls[i]
        users = [f"user {rng.choice(ITEMS)} {rng.randrange(1000)}"]
        body = infer_body(users, rng.sample(ITEMS, 3))
        headers = {}
        if n % 4 == 0:
            headers["x-user-id"] = f"u{rng.randrange(50)}"
        if n % 9 == 0:
            headers["x-model-version"] = "v1"
        if n % 5 == 0:  # the same body again: a cache hit once the first answer is stored
            body = infer_body(["user likes jazz"], ["jazz music", "rock news"])
        if n % 23 == 0:  # fails validation against the chosen version's inputs
            body = {"inputs": [{"name": "user", "datatype": "FP32", "shape": [1], "data": [1.0]}]}
        if n % 29 == 0:  # not JSON: refused before a version is chosen
            r = c.post(path, content=b"not json", headers={"content-type": "application/json"})
        else:
            r = c.post(path, json=body, headers=headers)
        self.statuses.append(r.status_code)


@pytest.fixture(scope="module")
def observed_app(cluster, tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("observability")
    token_file = tmp / "admin_token"
    token_file.write_text(TOKEN + "\n")
    versions = [
        model_config(tmp, tmp, "v1", tiny_models["a"]),
        model_config(tmp, tmp, "v2", tiny_models["b"], faults={"error_rate": 0.6}),
    ]
    config = serve_config(versions, {"v1": 50, "v2": 50},
                          drift={"min_samples": 20, "slot_s": 5.0})  # fmt: skip
    app = config["applications"][0]
    app["runtime_env"] = {"env_vars": {"ROLLOUT_ADMIN_TOKEN_FILE": str(token_file)}}
    app["logging_config"] = {"encoding": "JSON"}
    router = app["deployments"][0]["user_config"]
    router["cache"] = {"enabled": True}
    router["shadow"] = {"version": "v2", "percent": 50, "max_in_flight": 4}
    # Keep v2 failing (not shut out by its breaker) so its error rate stays visible.
    router["breaker"] = {"enabled": False}
    cluster.serve_deploy(config, tmp)
    cluster.wait_running()
    return cluster, config, tmp


def test_prometheus_sees_the_app_and_alerts_fire(observed_app, prometheus, alertmanager, tmp_path):
    cluster, config, tmp = observed_app
    _, receiver = alertmanager
    with Traffic(cluster.url) as traffic:
        # 3. The injected fault (v2 fails 60% of its calls; the fallback hides it from clients).
        # `for:` is cut to 0 s here: it fires once the 1 m rate windows hold both versions' calls.
        firing = prometheus.wait_firing("RolloutCanaryErrorRateAboveStable", 180)
        assert {a["labels"]["version"] for a in firing} == {"v2"}
        ratio = prometheus.query('rollout:version_error_ratio:rate1m{version="v2"}')
        assert ratio and float(ratio[0]["value"][1]) > 0.2
        assert not prometheus.firing("RolloutAutomaticRollback")  # no rollout yet
        # Quality drift: both versions answer, so the router compares their score distributions.
        wait_for_condition(lambda: prometheus.query('rollout:score_psi{version="v2"} >= 0'), 60,
                           interval_s=1.0, message="a PSI reading for v2")  # fmt: skip
        assert prometheus.query('rollout:score_psi{version="v1"} == 0')  # stable against itself

        # 4. A rollout of the faulty v2: the controller rolls it back by itself.
        declared = copy.deepcopy(config)
        declared["applications"][0]["deployments"].append(
            {"name": "RolloutController", "user_config": {"plan": PLAN, "tick_interval_s": 0.25}}
        )
        cluster.serve_deploy(declared, tmp)
        headers = {"authorization": f"Bearer {TOKEN}"}

        def rolled_back():
            return (
                cluster.client.get("/admin/rollout", headers=headers).json()["phase"]
                == "rolled_back"
            )

        wait_for_condition(rolled_back, 90, message="the controller's rollback")
        # Which error gate fails first is a race at ~10 samples (fail-fast above 0.3, or
        # max_error_rate above 0.05 once min_requests is in): the metric must name the gates
        # the controller's own rollback event names.
        events = cluster.client.get("/admin/rollout/history", headers=headers).json()["events"]
        rollback = next(e for e in events if e["to_phase"] == "rolled_back")
        failed_gates = {g for g, r in rollback["gates"].items() if r.get("status") == "failed"}
        assert failed_gates & {"fail_fast_error_rate", "max_error_rate", "max_error_rate_increase"}
        rollback = prometheus.wait_firing("RolloutAutomaticRollback", 60)
        # Alertmanager routed both `page` alerts to the receiver (the shipped routes, a test URL).
        delivered = wait_for_condition(lambda: receiver.received("RolloutAutomaticRollback"), 30,
                                       interval_s=0.5, message="Alertmanager's RolloutAutomaticRollback")  # fmt: skip
        assert {a["labels"]["model"] for _, a in delivered} == {APP}
        canary = wait_for_condition(lambda: receiver.received("RolloutCanaryErrorRateAboveStable"), 30,
                                    interval_s=0.5, message="Alertmanager's RolloutCanaryErrorRateAboveStable")  # fmt: skip
        assert {a["labels"]["version"] for _, a in canary} == {"v2"}
        assert not receiver.received("RolloutAutomaticRollback", path="/rollout-warn")
        active = _epoch(rollback[0]["activeAt"])
        print(f"alert round trip: RolloutAutomaticRollback active in Prometheus -> delivered by "
              f"Alertmanager in {delivered[0][0] - active:.2f}s")  # fmt: skip

        # 5. Every metric the rules and dashboards name, and every metric we define, exists.
        wanted = set().union(*(names_in_promql(r["expr"]) for r in _rules()))
        wanted |= set().union(*(names_in_promql(e) for e in _dashboard_exprs()))
        wanted |= exported_names()
        wanted |= {r["record"] for r in _rules() if "record" in r}
        # Sent only while a rollout has a load stage, which this story's plan has not:
        # test_load_stage.py reads them from Ray's metrics endpoints after a stage passes.
        wanted -= LOAD_STAGE_GAUGES

        last: set[str] = set()

        def all_present():
            nonlocal last
            last = wanted - prometheus.names()
            return not last

        try:
            wait_for_condition(
                all_present, 90, interval_s=1.0, message="every metric in Prometheus"
            )
        except AssertionError:
            raise AssertionError(f"metrics missing from Prometheus: {sorted(last)}") from None

        # Every dashboard query runs and returns data (under traffic: gauges are live).
        for expr in _dashboard_exprs():
            if expr.startswith("label_values("):
                continue  # a Grafana template function, not PromQL; its metric is checked above
            if names_in_promql(expr) & LOAD_STAGE_GAUGES:
                continue  # the load stage's panels: no load stage here (see above)
            wait_for_condition(lambda expr=expr: prometheus.query(_grafana_vars(expr)), 30, interval_s=1.0,
                               message=f"data for the dashboard query {expr}")  # fmt: skip
        # Still firing after all that: the controller keeps re-sending its phase gauge. (Within
        # 30 s: a gauge a loaded host did not re-send within two 1 s exports is gone from a
        # scrape or two.)
        prometheus.wait_firing("RolloutAutomaticRollback", 30)
    assert traffic.errors == []  # no transport error (every HTTP status is in `statuses`)
    assert traffic.statuses.count(200) > 100
    assert (
        500 not in traffic.statuses and 503 not in traffic.statuses
    )  # the fallback hid v2's faults

    # Counters carry the fixed tags we defined, and Serve's own tags beside them.
    series = prometheus.query("ray_rollout_requests_total")
    decisions = {s["metric"]["decision"] for s in series}
    assert {"weighted", "sticky", "pinned", "cache", "unrouted"} <= decisions, decisions
    assert all({"model", "version", "decision", "outcome", "deployment", "application"} <= set(s["metric"])
               for s in series)  # fmt: skip
    errors = {
        s["metric"]["error_type"] for s in prometheus.query("ray_rollout_request_errors_total")
    }
    assert "invalid_input" in errors
    assert prometheus.query('ray_rollout_fallbacks_total{version="v2",reason="error"}')
    assert prometheus.query('ray_rollout_rollbacks_total{version="v2"} >= 1')
    # This module's controller replica only: the session cluster's earlier modules (the load
    # stage's, for one) counted gate failures of their own under the same model and app names.
    deployments = ray_compat.serve_details()["applications"][APP]["deployments"]
    ids = {r["replica_id"] for r in deployments["RolloutController"]["replicas"]}
    series = prometheus.query("ray_rollout_gate_failures_total")
    counted = {s["metric"]["gate"] for s in series
               if any(i in s["metric"].get("replica", "") for i in ids)}  # fmt: skip
    assert counted == failed_gates, (counted, failed_gates, ids, [s["metric"] for s in series])
    for spec in METRICS.values():  # every series of ours is tagged with exactly its tag keys
        for s in prometheus.query(spec.series_names()[0])[:3]:
            assert set(spec.tag_keys) <= set(s["metric"]), (spec.name, s["metric"])

    # 6. Logs: Serve's JSON logs, with the router's access records and the controller's events.
    logs = cluster.session_dir / "logs" / "serve"
    records = []
    for path in logs.glob(f"replica_{APP}_Router_*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"rollout access' in line:
                records.append(json.loads(line))
    assert len(records) > 100
    for r in records[-200:]:
        assert {
            "request_id",
            "model",
            "model_version",
            "routing_decision",
            "status",
            "latency_ms",
        } <= set(r), r
        assert "payload" not in r  # payloads are opt-in
    assert {"weighted", "sticky", "pinned", "cache"} <= {r["routing_decision"] for r in records}
    assert any(r.get("fallback_from") == "v2" for r in records)
    events = []
    for path in logs.glob(f"replica_{APP}_RolloutController_*.log"):
        events += [json.loads(line) for line in path.read_text(errors="replace").splitlines()
                   if line.startswith("{") and "rollout_event" in line]  # fmt: skip
    assert any("rolled_back" in json.dumps(e) for e in events), "no structured rollback event"

    # 7. The report.
    out = tmp_path / "rollout-report.png"
    result = subprocess.run(
        [sys.executable, "-m", "app.ops.cli", "report", "--url", cluster.url, "-o", str(out)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, "ROLLOUT_ADMIN_TOKEN": TOKEN, "ROLLOUT_ADMIN_TOKEN_FILE": ""},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = cluster.client.get("/admin/rollout/history", headers=headers).json()
    assert history["timeline"], "the controller kept no timeline"
    assert any(s["versions"].get("v2", {}).get("errors") for s in history["timeline"])
