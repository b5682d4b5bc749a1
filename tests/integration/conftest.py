"""One real Ray cluster (with its dashboard, so `serve deploy` works) for the whole session.

Apps are deployed the way users deploy them: a serve config YAML handed to `serve deploy`.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.tiny_models import build_tiny_bert, write_model_config
from tests.waiting import free_port, handle_call, serve_deploy, wait_for_condition  # noqa: F401 - re-exported

# A throwaway cluster of the test's own: token auth off (real clusters keep it on).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray's metrics agents export every second instead of every 10 s, so the observability test's
# Prometheus sees new series sooner (read by the raylet and workers that ray.init starts).
os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")

APP = "recommender"


class Cluster:
    def __init__(self, http_port: int, dashboard_port: int) -> None:
        self.http_port = http_port
        self.dashboard_port = dashboard_port
        self.url = f"http://127.0.0.1:{http_port}"
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def serve_deploy(self, config: dict[str, Any], tmp_path: Path) -> subprocess.CompletedProcess:
        """Run the real `serve deploy` CLI on `config` (written as YAML)."""
        return serve_deploy(config, tmp_path, http_port=self.http_port, dashboard_port=self.dashboard_port)

    def app_status(self, name: str = APP):
        from ray import serve

        return serve.status().applications.get(name)

    def wait_running(self, name: str = APP, timeout_s: float = 120) -> None:
        def running():
            status = self.app_status(name)
            if status is not None and status.status == "DEPLOY_FAILED":
                raise AssertionError(f"{name} failed to deploy: {status.message}")
            return status is not None and status.status == "RUNNING"

        wait_for_condition(running, timeout_s, message=f"app {name} RUNNING")

    def router_status(self) -> dict[str, Any]:
        return self.client.get("/status").json()

    def replica_info(self, deployment: str) -> dict[str, Any]:
        return handle_call(deployment, APP, "info")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory) -> Cluster:
    import ray
    from ray import serve

    dashboard_port = free_port()
    http_port = free_port()
    metrics_port = free_port()
    ray.init(
        num_cpus=8,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        log_to_driver=False,
        _metrics_export_port=metrics_port,  # each node's metrics agent; Prometheus scrapes it
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}},
    )
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    cluster = Cluster(http_port, dashboard_port)
    cluster.metrics_port = metrics_port
    cluster.session_dir = Path(ray._private.worker._global_node.get_session_dir_path())
    # The dashboard's REST API (used by `serve deploy`) comes up a little after ray.init.
    wait_for_condition(
        lambda: httpx.get(f"http://127.0.0.1:{dashboard_port}/api/version", timeout=5).status_code == 200,
        timeout_s=60, message="Ray dashboard",
    )  # fmt: skip
    yield cluster
    cluster.client.close()
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Two tiny BERTs with different random weights, and model configs that point at them."""
    root = tmp_path_factory.mktemp("models")
    artifacts = {name: build_tiny_bert(root / name, seed) for name, seed in (("a", 0), ("b", 1))}
    return artifacts


def forget_rollouts(app: str = APP, model: str = APP) -> None:
    """Delete the rollout state an earlier test module left in GCS for this app: a controller
    deployed again resumes it (by design), and a module that starts from idle must not."""
    from ray.experimental.internal_kv import _internal_kv_del

    from deployments.controller import KV_NAMESPACE

    for suffix in ("rollout-state", "rollout-state/outcomes"):
        _internal_kv_del(f"{app}/{model}/{suffix}", namespace=KV_NAMESPACE)


def model_config(
    directory: Path, tmp: Path, version: str, artifact: Path, **overrides: Any
) -> Path:
    """Write `<directory>/<version>.yaml` for a tiny artifact; return its path."""
    return write_model_config(directory, version, artifact, **overrides)


def serve_config(versions: list[Path], weights: dict[str, float], stable: str = "v1",
                 deployments: list[dict[str, Any]] | None = None, **router: Any) -> dict[str, Any]:  # fmt: skip
    """A serve config like the repo's serve_config.yaml, for the given model config files."""
    return {
        "applications": [
            {
                "name": APP,
                "route_prefix": "/",
                "import_path": "app.builder:build_app",
                "args": {"model": APP, "versions": [str(p) for p in versions], "router": router},
                "deployments": [
                    {"name": "Router", "user_config": {"stable": stable, "weights": weights}},
                    *(deployments or []),
                ],
            }
        ]
    }


def infer_body(users: list[str], items: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "user", "datatype": "BYTES", "shape": [len(users)], "data": users},
            {"name": "items", "datatype": "BYTES", "shape": [len(items)], "data": items},
        ],
        **extra,
    }
