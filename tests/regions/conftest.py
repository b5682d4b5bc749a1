"""Independent local Ray clusters on this machine, one per "region": each its own `ray start
--head` (own GCS, dashboard, Serve HTTP port, temp dir, worker ports, node label `region`),
its app deployed from its rendered region config with the real `serve deploy`.

Runs in a pytest process of its own (`make test-regions`; `make test` starts one): the test
process never joins a cluster (`ray.init`), it talks to them as an operator does, over HTTP.
Every process a cluster runs inherits a marker variable from its `ray start`, so teardown
kills exactly those processes (by pid; `ray stop` cannot pick one cluster of several).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from app.ops.declare import declare_plan
from app.ops.overlay import load_overlay, render
from tests.support.loadgen import Load
from tests.support.serving import infer_body, serve_config
from tests.support.tiny_models import build_tiny_bert, write_model_config
from tests.support.waiting import free_port, serve_deploy, throwaway_serving, wait_for_condition

BIN = Path(sys.executable).parent
MARKER = "RAY_ROLLOUT_REGION_TEST"
NODE_CPUS = 4  # logical: 3-4 small replicas per region on a 2-core machine
TOKEN = "regions-test-admin-token-0123456789"
ITEMS = ["space opera", "cooking show", "jazz music", "rock news"]


def _marked_pids(marker: str) -> list[int]:
    """Processes whose environment carries `MARKER=marker`: the cluster's, and nothing else."""
    needle = f"{MARKER}={marker}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
    return pids


class RayRegion:
    """One region's Ray cluster: started by `start()`, stopped (every process of it) by
    `stop()`."""

    def __init__(self, name: str, worker_ports: tuple[int, int]) -> None:
        self.name = name
        self.marker = uuid.uuid4().hex
        self.gcs_port, self.dashboard_port, self.http_port = free_port(), free_port(), free_port()
        self.worker_ports = worker_ports
        self.temp_dir = Path(f"/tmp/rr-{name}-{self.marker[:6]}")  # short: socket path limits
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        # Served as the project serves (app/ops/serving_mode.py): HAProxy on the region's HTTP
        # port in front of the Router's own server, with HAProxy files and ports of its own
        # (REGIONS_SERVING=proxy: behind Serve's Python proxy instead).
        self.haproxy_state, _, self.serving = throwaway_serving()
        if os.environ.get("REGIONS_SERVING", "haproxy") == "proxy":
            self.serving = {}

    def env(self) -> dict[str, str]:
        return {**os.environ, **self.serving, MARKER: self.marker, "RAY_AUTH_MODE": "disabled",
                "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}  # fmt: skip

    def start(self) -> None:
        low, high = self.worker_ports
        command = [
            str(BIN / "ray"), "start", "--head", f"--port={self.gcs_port}",
            f"--num-cpus={NODE_CPUS}", "--num-gpus=0", f"--labels=region={self.name}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}", f"--temp-dir={self.temp_dir}",
            f"--ray-client-server-port={free_port()}", f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}", f"--metrics-export-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--min-worker-port={low}", f"--max-worker-port={high}", "--disable-usage-stats",
        ]  # fmt: skip
        result = subprocess.run(command, env=self.env(), capture_output=True, text=True,
                                timeout=180)  # fmt: skip
        assert result.returncode == 0, f"ray start ({self.name}):\n{result.stdout}\n{result.stderr}"
        wait_for_condition(
            lambda: httpx.get(f"{self.dashboard_url}/api/version", timeout=5).status_code == 200,
            timeout_s=90, message=f"{self.name}: Ray dashboard",
        )  # fmt: skip

    def deploy(self, config: dict[str, Any], tmp: Path) -> None:
        serve_deploy(config, tmp, http_port=self.http_port, dashboard_port=self.dashboard_port)

    def serve_status(self) -> dict[str, Any]:
        response = httpx.get(f"{self.dashboard_url}/api/serve/applications/", timeout=10)
        response.raise_for_status()
        return response.json()

    def wait_running(self, timeout_s: float = 180) -> None:
        def running() -> bool:
            apps = self.serve_status().get("applications") or {}
            failed = {n: a.get("message") for n, a in apps.items()
                      if a.get("status") == "DEPLOY_FAILED"}  # fmt: skip
            assert not failed, f"{self.name}: failed to deploy: {failed}"
            return bool(apps) and all(a.get("status") == "RUNNING" for a in apps.values())

        wait_for_condition(running, timeout_s, interval_s=1.0, message=f"{self.name}: RUNNING")

    def admin_status(self) -> dict[str, Any]:
        headers = {"authorization": f"Bearer {TOKEN}"}
        return httpx.get(f"{self.url}/admin/rollout", headers=headers, timeout=10).json()

    def stop(self) -> None:
        """SIGTERM every process of this cluster, then SIGKILL what is left after 10 s."""
        pids = _marked_pids(self.marker)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _marked_pids(self.marker):
            time.sleep(0.2)
        for pid in _marked_pids(self.marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["rm", "-rf", str(self.temp_dir), str(self.haproxy_state)], check=False)


@pytest.fixture(scope="session")
def ray_regions() -> Iterator[dict[str, RayRegion]]:
    """Two regions, r1 and r2, each its own Ray cluster (no app yet)."""
    regions = {
        "r1": RayRegion("r1", (10_002, 14_999)),
        "r2": RayRegion("r2", (15_000, 19_999)),
    }
    try:
        for region in regions.values():
            region.start()
        yield regions
    finally:
        for region in regions.values():
            region.stop()


def write_yaml(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _plan(candidate: str, stable: str) -> dict[str, Any]:
    return {
        "strategy": "canary", "candidate": candidate, "stable": stable,
        "canary": {"steps": [{"set_weight": 50}, {"analysis_s": 5}]},
        "gates": {"min_requests": 10, "fail_fast_min_requests": 5, "fail_fast_error_rate": 0.3,
                  "max_error_rate": 0.05, "max_p99_latency_ratio": None},
        "progress_deadline_s": 120,
    }  # fmt: skip


def _call(client: httpx.Client, rng: random.Random, index: int) -> str | None:
    body = infer_body(["loves science fiction"], rng.sample(ITEMS, 2))
    r = client.post("/v2/models/recommender/infer", json=body,
                    headers={"x-user-id": f"user-{rng.randrange(1000)}"})  # fmt: skip
    return None if r.status_code == 200 else f"{r.status_code} {r.text[:100]}"


def build_project(regions: dict[str, RayRegion], root: Path,
                  faulty: dict[str, str]) -> Path:  # fmt: skip
    """A project root (serve config, region overlays with `admin:`, plans to-v2 and to-v3) with
    every region deployed from its rendered config, v1 serving. `faulty`: region -> version
    whose every call fails (fault injection)."""
    token_file = root / "admin_token"
    token_file.write_text(TOKEN + "\n")
    artifacts = {v: build_tiny_bert(root / f"artifacts/{v}", seed) for seed, v in
                 enumerate(("v1", "v2", "v3"))}  # fmt: skip
    versions: dict[str, list[str]] = {}
    for name in regions:
        directory = root / "models" / name
        directory.mkdir(parents=True)
        versions[name] = [
            str(write_model_config(directory, v, artifacts[v],
                                   **({"faults": {"error_rate": 1.0}} if faulty.get(name) == v else {})))
            for v in ("v1", "v2", "v3")
        ]  # fmt: skip
    base = serve_config([Path(p) for p in versions["r1"]], {"v1": 100, "v2": 0, "v3": 0})
    base["applications"][0]["runtime_env"] = {
        "env_vars": {"ROLLOUT_ADMIN_TOKEN_FILE": str(token_file), "HF_HUB_OFFLINE": "1"}
    }
    write_yaml(root / "serve_config.yaml", base)
    write_yaml(root / "configs/rollouts/to-v2.yaml", _plan("v2", "v1"))
    write_yaml(root / "configs/rollouts/to-v3.yaml", _plan("v3", "v2"))
    for name, region in regions.items():
        overlay = {
            "region": name,
            "admin": {"url": region.url, "token_file": str(token_file),
                      "dashboard_url": region.dashboard_url},
            "serve": {
                "http_options": {"host": "127.0.0.1", "port": region.http_port},
                "applications": [{"name": "recommender",
                                  "args": {"region": name, "versions": versions[name]}}],
            },
        }  # fmt: skip
        path = write_yaml(root / f"configs/regions/{name}.yaml", overlay)
        region.deploy(declare_plan(render(base, load_overlay(path)), None), root)
    for region in regions.values():
        region.wait_running()
    return root


def start_loads(regions: dict[str, RayRegion], clients: int = 2) -> dict[str, Load]:
    """Client traffic in every region (stop each with `__exit__`)."""
    loads = {name: Load(region.url, _call, clients=clients, seed=i)
             for i, (name, region) in enumerate(regions.items())}  # fmt: skip
    for load in loads.values():
        load.__enter__()
    return loads
