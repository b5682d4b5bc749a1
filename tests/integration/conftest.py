"""One real Ray cluster (with its dashboard, so `serve deploy` works) for the whole session.

Apps are deployed the way users deploy them: a serve config YAML handed to `serve deploy`.
The cluster is served the way the project serves in production (app/ops/serving_mode.py):
Serve's direct ingress with HAProxy in front, HAProxy on the cluster's HTTP port, each Router
replica on its own port (`cluster.router_url()`). `ROLLOUT_TEST_SERVING=proxy` runs the suite
behind Serve's Python proxy instead.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from app import ray_compat
from tests.support.serving import Cluster
from tests.support.tiny_models import build_tiny_bert
from tests.support.waiting import free_port, throwaway_serving, wait_for_condition

# A throwaway cluster of the test's own: token auth off (real clusters keep it on).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray's metrics agents export every second instead of every 10 s, so the observability test's
# Prometheus sees new series sooner (read by the raylet and workers that ray.init starts).
os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
# With an export every second Ray drops a gauge not re-sent within 2 s, and the Router's and the
# controller's gauges come every second plus the time to send them: on a loaded 2-core host a
# scrape can miss one, its series goes stale and an alert built on it resolves for a moment.
# Re-sent every 0.25 s they have 1.75 s of slack.
os.environ.setdefault("RAY_ROLLOUT_GAUGE_INTERVAL_S", "0.25")
# Serve's controller re-sets an unchanged per-replica health gauge
# (ray_serve_deployment_replica_healthy) only every 10 s: with 1 s exports it would be visible
# 2 s in 10, and a Prometheus scraping every 5 s (test_observability) can miss it for minutes.
os.environ.setdefault("RAY_SERVE_STATUS_GAUGE_REPORT_INTERVAL_S", "0.5")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory) -> Cluster:
    import ray
    from ray import serve

    dashboard_port = free_port()
    http_port = free_port()
    metrics_port = free_port()
    # Read by Serve's controller and HAProxy manager, which this ray.init's raylet starts;
    # nothing under the Python proxy (ROLLOUT_TEST_SERVING=proxy).
    haproxy_state, _, serving = throwaway_serving()
    if os.environ.get("ROLLOUT_TEST_SERVING", "haproxy") == "proxy":
        serving = {}
    os.environ.update(serving)
    ray.init(
        num_cpus=8,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        log_to_driver=False,
        _metrics_export_port=metrics_port,  # each node's metrics agent; Prometheus scrapes it
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}},
    )
    # The raylet has them now (every worker it starts inherits them); the clusters that tests
    # start in subprocesses (the benches) must not inherit this cluster's HAProxy files and ports.
    for key in serving:
        del os.environ[key]
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    cluster = Cluster(http_port, dashboard_port)
    cluster.haproxy_state = haproxy_state if serving else None
    cluster.metrics_port = metrics_port
    cluster.session_dir = Path(ray_compat.session_dir())
    # The dashboard's REST API (used by `serve deploy`) comes up a little after ray.init.
    wait_for_condition(
        lambda: httpx.get(f"http://127.0.0.1:{dashboard_port}/api/version", timeout=5).status_code == 200,
        timeout_s=60, message="Ray dashboard",
    )  # fmt: skip
    yield cluster
    cluster.client.close()
    serve.shutdown()
    ray.shutdown()
    shutil.rmtree(haproxy_state, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Two tiny BERTs with different random weights, and model configs that point at them."""
    root = tmp_path_factory.mktemp("models")
    artifacts = {name: build_tiny_bert(root / name, seed) for name, seed in (("a", 0), ("b", 1))}
    return artifacts
