"""A throwaway Ray + Serve running the recommender app, for benchmarks that need the real thing.

`LocalApp.start(tmp, versions, router=...)` starts a Ray of its own (`address="local"`, 4
logical CPUs unless told otherwise, the dashboard on a free loopback port because the
declarative Serve API lives there) and Serve on a free loopback port, then deploys the app the
way operators do: a serve config PUT to the dashboard's REST API
(`ServeSubmissionClient.deploy_applications`, what `serve deploy` calls). The app's
runtime_env names an admin token file and a feedback token file (random 32 characters each), so
the router's admin API and its feedback endpoint are on (`feedback_token` for the latter).
`close()` stops only what it started.

Served as the project serves (app/ops/serving_mode.py, docs/serving.md): HAProxy on the HTTP
port in front of the Router's own server (direct ingress), with this cluster's own HAProxy
files and ports, unless `BENCH_SERVING=proxy` (Serve's Python proxy, as before issue 19) or the
caller set HAProxy mode itself before `start` (throughput and wrkload do: they also call the
Python fallback proxy). `serving` says which.
"""

from __future__ import annotations

import contextlib
import copy
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

# A throwaway cluster of our own: token auth off (real clusters keep it on). Before `import ray`.
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402

from app.ops.serving_mode import HAPROXY_FLAG  # noqa: E402
from bench.common import log, shutdown  # noqa: E402
from tests.support.waiting import free_port, serving_environ, wait_for_condition  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
APP = "recommender"
TICK_S = 0.25

__all__ = ["APP", "LocalApp", "wait_for"]


def wait_for(predicate: Callable[[], Any], timeout_s: float, interval_s: float, what: str) -> Any:
    return wait_for_condition(predicate, timeout_s, interval_s, what)


def serve_config(versions: list[Path], http_port: int, env_vars: dict[str, str],
                 router: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Like the repo's serve_config.yaml (and tests/integration/conftest.py's serve_config)."""
    return {
        "http_options": {"host": "127.0.0.1", "port": http_port},
        "applications": [
            {
                "name": APP,
                "route_prefix": "/",
                "import_path": "app.builder:build_app",
                "args": {"model": APP, "versions": [str(p) for p in versions], "router": {}},
                "runtime_env": {"env_vars": env_vars},
                "deployments": [
                    {"name": "Router", "user_config": router},
                    {
                        "name": "RolloutController",
                        "user_config": {"plan": None, "tick_interval_s": TICK_S},
                    },
                ],
            }
        ],
    }


def with_user_configs(config: dict[str, Any], **user_configs: Any) -> dict[str, Any]:
    """`config` with these deployments' user_configs (keyed by deployment name) replaced."""
    updated = copy.deepcopy(config)
    deployments = updated["applications"][0]["deployments"]
    for name, user_config in user_configs.items():
        deployments[:] = [d for d in deployments if d["name"] != name]
        deployments.append({"name": name, "user_config": user_config})
    return updated


def replica_ids(details: dict[str, Any]) -> dict[str, list[str]]:
    """app/deployment -> replica ids (RUNNING or not), for every application."""
    return {
        f"{app}/{name}": sorted(r["replica_id"] for r in d.get("replicas", []))
        for app, app_details in details.get("applications", {}).items()
        for name, d in (app_details.get("deployments") or {}).items()
    }


class LocalApp:
    def __init__(self) -> None:
        self.ray_started = self.serve_started = False
        self.tmp: Path | None = None
        self.client: httpx.Client | None = None
        self._serving = contextlib.ExitStack()  # HAProxy mode's environment and folder
        self.serving = "proxy"

    def start(self, tmp: Path, versions: list[Path], router: dict[str, Any],
              build: Callable[[int, dict[str, str]], dict[str, Any]] | None = None,
              ready_paths: tuple[str, ...] = ("/v2/health/ready",), num_cpus: int = 4) -> LocalApp:  # fmt: skip
        """Start Ray and Serve and deploy the app: the one-application config for `versions`
        and `router`, or what `build(http_port, env_vars)` returns; wait until every app is
        RUNNING and every one of `ready_paths` answers 200."""
        import ray
        from ray import serve
        from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

        self.tmp = tmp
        self.token = secrets.token_hex(16)  # 32 characters
        token_file = tmp / "admin_token"
        token_file.write_text(self.token + "\n")
        token_file.chmod(0o600)
        # The feedback endpoint's own credential (the outcome pipeline's, not the admin token).
        self.feedback_token = secrets.token_hex(16)
        feedback_token_file = tmp / "feedback_token"
        feedback_token_file.write_text(self.feedback_token + "\n")
        feedback_token_file.chmod(0o600)
        http_port, dashboard_port = free_port(), free_port()
        if os.environ.get(HAPROXY_FLAG) != "1":  # before ray.init: every Ray process reads it
            self._serving.enter_context(serving_environ("BENCH_SERVING"))
        self.serving = "haproxy" if os.environ.get(HAPROXY_FLAG) == "1" else "proxy"
        pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        base_env = {"PYTHONPATH": pythonpath, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
        log(
            f"starting a throwaway Ray (address=local, num_cpus={num_cpus}, dashboard on 127.0.0.1:{dashboard_port})"
        )
        ray.init(
            address="local",  # always a new cluster of our own, never one that is already running
            num_cpus=num_cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=dashboard_port,
            log_to_driver=False,
            runtime_env={"env_vars": base_env},
        )
        self.ray_started = True
        log(f"starting Serve on http://127.0.0.1:{http_port} (served by {self.serving})")
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        self.serve_started = True
        dashboard_url = f"http://127.0.0.1:{dashboard_port}"
        wait_for(lambda: httpx.get(f"{dashboard_url}/api/version", timeout=5).status_code == 200,
                 timeout_s=60, interval_s=0.5, what="the Ray dashboard")  # fmt: skip
        self.submission = ServeSubmissionClient(dashboard_url)
        env = {**base_env, "ROLLOUT_ADMIN_TOKEN_FILE": str(token_file),
               "ROLLOUT_FEEDBACK_TOKEN_FILE": str(feedback_token_file)}  # fmt: skip
        self.env = env
        self.config = (
            build(http_port, env) if build else serve_config(versions, http_port, env, router)
        )
        log("deploying the recommender app through the REST API")
        self.deploy(self.config)
        wait_for(self._running, timeout_s=180, interval_s=0.5, what="the app to be RUNNING")
        self.url = f"http://127.0.0.1:{http_port}"
        # The admin token on every call: /status needs it (router.public_status is off).
        self.client = httpx.Client(base_url=self.url, timeout=30,
                                   headers={"authorization": f"Bearer {self.token}"})  # fmt: skip
        for path in ready_paths:
            wait_for(
                lambda path=path: self.client.get(path).status_code == 200,
                60,
                0.2,
                f"{path} to answer 200",
            )
        return self

    def wait_for_status(self, predicate: Callable[[dict[str, Any]], bool], what: str,
                        timeout_s: float = 30) -> dict[str, Any]:  # fmt: skip
        """Until the Router's /status satisfies `predicate` (e.g. an in-place change landed)."""
        return wait_for(lambda: (lambda s: s if predicate(s) else None)(self.client.get("/status").json()),
                        timeout_s, 0.2, what)  # fmt: skip

    def _running(self) -> bool:
        apps = self.details().get("applications", {})
        names = [a["name"] for a in self.config["applications"]]
        for name in names:
            app = apps.get(name)
            if app and app.get("status") == "DEPLOY_FAILED":
                raise SystemExit(f"the app {name} failed to deploy: {app.get('message')}")
        return all((apps.get(name) or {}).get("status") == "RUNNING" for name in names)

    def deploy(self, config: dict[str, Any]) -> None:
        """What `serve deploy` does: PUT the whole config; Serve applies the difference."""
        self.submission.deploy_applications(config)

    def details(self) -> dict[str, Any]:
        return self.submission.get_serve_details()

    def replica_ids(self) -> dict[str, list[str]]:
        return replica_ids(self.details())

    def admin(self) -> dict[str, Any]:
        r = self.client.get("/admin/rollout", headers={"authorization": f"Bearer {self.token}"})
        r.raise_for_status()
        return r.json()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        try:
            shutdown(serve_started=self.serve_started, ray_started=self.ray_started, tmp=self.tmp)
        finally:
            self._serving.close()  # os.environ as it was; this cluster's HAProxy folder removed
