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
import tempfile
from pathlib import Path

import httpx
import pytest

from app import ray_compat
from app.ops.serving_mode import HaproxyPorts, serving_env
from tests.support.serving import Cluster
from tests.support.tiny_models import build_tiny_bert
from tests.support.waiting import free_port, wait_for_condition

# A throwaway cluster of the test's own: token auth off (real clusters keep it on).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray's metrics agents export every second instead of every 10 s, so the observability test's
# Prometheus sees new series sooner (read by the raylet and workers that ray.init starts).
os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
# A stopping Router replica keeps serving this long so HAProxy takes it out first (Serve's
# default is 30 s, which every Router redeploy and the final shutdown would wait for; one HAProxy
# health-check round here is 0.25 s).
DRAIN_S = 2.0


def _serving_env(state_dir: Path) -> dict[str, str]:
    """HAProxy mode with this cluster's own HAProxy files and ports (another cluster on the
    machine, such as `make demo`, keeps its own); nothing under the Python proxy."""
    if os.environ.get("ROLLOUT_TEST_SERVING", "haproxy") == "proxy":
        return {}
    ports = HaproxyPorts(free_port(), free_port(), free_port(), free_port())
    return serving_env(state_dir, ports, haproxy_threads=1, haproxy_metrics=False, drain_s=DRAIN_S)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory) -> Cluster:
    import ray
    from ray import serve

    dashboard_port = free_port()
    http_port = free_port()
    metrics_port = free_port()
    # Read by Serve's controller and HAProxy manager, which this ray.init's raylet starts.
    # HAProxy's socket paths must stay short (app/ops/serving_mode.py): not under pytest's tmp.
    haproxy_state = Path(tempfile.mkdtemp(prefix="rh-", dir="/tmp"))
    serving = _serving_env(haproxy_state)
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
