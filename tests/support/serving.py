"""Helpers for the integration suites: the Cluster handle the `cluster` fixture yields, serve
configs like the repo's, request bodies, and forgetting rollout state between modules."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import httpx

from app import ray_compat
from app.constants import KV_NAMESPACE
from tests.support.tiny_models import write_model_config
from tests.support.waiting import handle_call, serve_deploy, wait_for_condition

APP = "recommender"


class Cluster:
    def __init__(self, http_port: int, dashboard_port: int) -> None:
        self.http_port = http_port
        self.dashboard_port = dashboard_port
        self.url = f"http://127.0.0.1:{http_port}"
        self.client = httpx.Client(base_url=self.url, timeout=60)
        self.admin_token: str | None = None
        self.haproxy_state: Path | None = None  # this cluster's HAProxy files, when it has HAProxy

    def router_urls(self, app: str = APP) -> list[str]:
        """The base URL of each Router replica's own HTTP server (direct ingress: what HAProxy
        forwards to) that Serve has given a port; none without direct ingress."""
        from app import ray_compat

        # On one node the replica's server listens on loopback whatever IP it advertises.
        return [f"http://127.0.0.1:{port}" for _, port in ray_compat.ingress_targets(app)]

    def router_url(self, app: str = APP, timeout_s: float = 60) -> str:
        """The base URL of one Router replica's own HTTP server, once Serve has given the
        replica its port."""
        urls = wait_for_condition(lambda: self.router_urls(app), timeout_s,
                                  message=f"a direct-ingress port for {app}")  # fmt: skip
        return urls[0]

    def serve_deploy(self, config: dict[str, Any], tmp_path: Path) -> subprocess.CompletedProcess:
        """Run the real `serve deploy` CLI on `config` (written as YAML)."""
        return serve_deploy(
            config, tmp_path, http_port=self.http_port, dashboard_port=self.dashboard_port
        )

    def app_status(self, name: str = APP):
        from ray import serve

        return serve.status().applications.get(name)

    def wait_running(self, name: str = APP, timeout_s: float = 120) -> None:
        """Until app `name` is RUNNING with every deployment's replicas all RUNNING at their
        target count, on two reads in a row (`settled`). A test that snapshots replica ids
        right after must see the replicas that will serve it: a RUNNING status alone once let
        a v2 replica that was still starting through, and the hot-patch test then counted
        its start as a restart."""
        reads: list[bool] = []

        def running() -> bool:
            app = ray_compat.serve_details()["applications"].get(name)
            if app is not None and app["status"] == "DEPLOY_FAILED":
                raise AssertionError(f"{name} failed to deploy: {app['message']}")
            reads.append(settled(app))
            return reads[-2:] == [True, True]

        wait_for_condition(running, timeout_s, message=f"app {name} RUNNING, every replica up")

    def _status_headers(self) -> dict[str, str]:
        """The admin token when a test set `admin_token` (test apps publish /status with
        `router.public_status` unless they test the default)."""
        return {"authorization": f"Bearer {self.admin_token}"} if self.admin_token else {}

    def router_status(self) -> dict[str, Any]:
        """The Router's /status, through the cluster's port (one Router replica)."""
        return self.client.get("/status", headers=self._status_headers()).json()

    def replica_info(self, deployment: str) -> dict[str, Any]:
        """`info()` of one replica of `deployment`: in its own application (one application
        per version) or in the router's app (the single-application layout)."""
        from ray import serve

        app = deployment if deployment in serve.status().applications else APP
        return handle_call(deployment, app, "info")

    def wait_all_running(self, timeout_s: float = 180) -> None:
        """Every application RUNNING (the router app and each version app)."""
        from ray import serve

        def running():
            apps = serve.status().applications
            failed = {n: a.message for n, a in apps.items() if a.status == "DEPLOY_FAILED"}
            if failed:
                raise AssertionError(f"failed to deploy: {failed}")
            return bool(apps) and all(a.status == "RUNNING" for a in apps.values())

        wait_for_condition(running, timeout_s, message="every app RUNNING")
        if APP in serve.status().applications:
            self.wait_traffic_table(timeout_s)

    def wait_traffic_table(self, timeout_s: float = 60) -> dict[str, Any]:
        """A Router's /status once every Router replica serves a traffic table and none has an
        update waiting for its versions.

        With one application per version, every application can read RUNNING while the Router
        still holds the update that waits for its versions: it retries on its next health poll
        (`health_poll_interval_s`, 1 s), and until then it has no table (503s, empty weights)."""

        def statuses() -> list[dict[str, Any]]:
            # Each Router replica's own server (HAProxy mode): with two or more, the cluster's
            # port answers from one of them only. Without direct ingress: the cluster's port.
            urls = self.router_urls()
            if not urls:
                return [self.router_status()]
            return [httpx.get(f"{url}/status", headers=self._status_headers(), timeout=10)
                    .json() for url in urls]  # fmt: skip

        def applied():
            seen = statuses()
            for status in seen:
                pending = (status.get("rejected_update") or {}).get("pending")
                if status.get("generation", 0) == 0 or pending:
                    return None
            return seen[0]

        return wait_for_condition(applied, timeout_s, message="every Router's traffic table")


def settled(app: dict[str, Any] | None) -> bool:
    """Whether one application of `serve_details()` is RUNNING and each of its deployments
    HEALTHY with exactly its target number of replicas, every one RUNNING (none starting,
    updating or stopping)."""
    if app is None or app["status"] != "RUNNING" or not app["deployments"]:
        return False
    for deployment in app["deployments"].values():
        states = [r["state"] for r in deployment["replicas"]]
        if deployment["status"] != "HEALTHY" or any(s != "RUNNING" for s in states):
            return False
        if len(states) != deployment["target_num_replicas"]:
            return False
    return True


def forget_rollouts(app: str = APP, model: str = APP) -> None:
    """Delete the rollout state an earlier test module left in GCS for this app: a controller
    deployed again resumes it (by design), and a module that starts from idle must not."""
    # Deleting the epoch key also fences a controller still running from that module: it
    # finds its claim gone and stops writing (deployments/store.py, Fence).
    for suffix in (
        "rollout-state",
        "rollout-state/outcomes",
        "rollout-state/epoch",
        "rollout-state/waves",
    ):
        ray_compat.kv_delete(f"{app}/{model}/{suffix}", KV_NAMESPACE)


def model_config(
    directory: Path, tmp: Path, version: str, artifact: Path, **overrides: Any
) -> Path:
    """Write `<directory>/<version>.yaml` for a tiny artifact; return its path."""
    return write_model_config(directory, version, artifact, **overrides)


def version_apps_config(
    versions: dict[str, Path], weights: dict[str, float], stable: str = "v1", **router: Any
) -> dict[str, Any]:
    """The repo's layout (serve_config.yaml): each version an application of its own, and the
    router app in version_apps mode."""
    return {
        "applications": [
            *(
                {"name": f"{APP}-{version}", "route_prefix": None,
                 "import_path": "app.builder:build_version", "args": {"config": str(path)}}
                for version, path in versions.items()
            ),
            {
                "name": APP,
                "route_prefix": "/",
                "import_path": "app.builder:build_app",
                "args": {"model": APP, "version_apps": True,
                         "router": {"public_status": True, "open_feedback": True, **router}},
                "deployments": [
                    {"name": "Router", "user_config": {"stable": stable, "weights": weights,
                                                       "pinnable": list(versions)}},
                ],
            },
        ]
    }  # fmt: skip


def serve_config(versions: list[Path], weights: dict[str, float], stable: str = "v1",
                 deployments: list[dict[str, Any]] | None = None,
                 pinnable: list[str] | None = None, **router: Any) -> dict[str, Any]:  # fmt: skip
    """A serve config like the single-application layout (serve_config.single-app.yaml), for
    the given model config files (`<version>.yaml`). Test apps publish /status and let any
    client pin any version (`pinnable`: all) unless a test asks for the defaults."""
    if pinnable is None:
        pinnable = [Path(p).stem for p in versions]
    return {
        "applications": [
            {
                "name": APP,
                "route_prefix": "/",
                "import_path": "app.builder:build_app",
                # Test apps publish /status (the harness reads it) unless a test says otherwise.
                "args": {
                    "model": APP,
                    "versions": [str(p) for p in versions],
                    "router": {"public_status": True, "open_feedback": True, **router},
                },
                "deployments": [
                    {
                        "name": "Router",
                        "user_config": {"stable": stable, "weights": weights, "pinnable": pinnable},
                    },
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
