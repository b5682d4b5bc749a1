"""A plan's load stage on a real Ray cluster: a captured sample replayed straight at the
candidate before it takes any user weight. A candidate that answers one request quickly but
cannot carry the stage's rate (one request at a time, 100 ms each) is rolled back in the load
stage with no user request ever reaching it; a healthy one passes and takes its first step."""

from __future__ import annotations

import copy
import threading
import time

import httpx
import pytest

from app.serving.capture import CaptureRecord, write_sample
from tests.support.serving import APP, forget_rollouts, infer_body, model_config, serve_config
from tests.support.waiting import wait_for_condition

pytestmark = pytest.mark.integration

TOKEN = "test-admin-token-load-stage-0123456"
GATES = {"min_requests": 10, "fail_fast_min_requests": 5, "max_p99_latency_ratio": None}
# 30 rps for 2 s of ramp and 4 s of hold: a version that serves one request at a time in
# 100 ms carries 10 rps, so its queue (and p99) grows through the hold.
LOAD = {"target_rps": 30, "ramp_s": 2, "hold_s": 4, "concurrency": 16, "max_p99_ms": 800,
        "max_error_rate": 0.01, "min_throughput_ratio": 0.9, "request_timeout_s": 5}  # fmt: skip
# One request answers in ~100 ms, but only one at a time: fine alone, not at 30 rps.
SLOW = {"max_ongoing_requests": 1, "batching": {"max_batch_size": 1, "batch_wait_timeout_s": 0.0},
        "faults": {"added_latency_ms": 100}}  # fmt: skip
BODIES = [
    infer_body(["user loves science fiction films"], ["space opera", "cooking show"]),
    infer_body(["user cooks on weekends"], ["baking contest", "war documentary"]),
    infer_body(["user watches football"], ["match highlights", "garden makeover"]),
]


@pytest.fixture(scope="module")
def load_app(cluster, tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("load-stage")
    (tmp / "admin_token").write_text(TOKEN + "\n")
    sample = tmp / "sample"
    records = [CaptureRecord(APP, "v1", time.time(), body) for body in BODIES * 4]
    write_sample(sample, APP, records)
    versions = [
        model_config(tmp, tmp, "v1", tiny_models["a"]),
        model_config(tmp, tmp, "v2", tiny_models["b"]),
        model_config(tmp, tmp, "v3", tiny_models["b"], **SLOW),
    ]
    config = serve_config(versions, {"v1": 100})
    config["applications"][0]["runtime_env"] = {
        "env_vars": {"ROLLOUT_ADMIN_TOKEN_FILE": str(tmp / "admin_token")}
    }
    cluster.admin_token = TOKEN
    forget_rollouts()
    cluster.serve_deploy(config, tmp)
    cluster.wait_running()
    return cluster, config, tmp, str(sample)


def declare(load_app, candidate: str) -> None:
    cluster, config, tmp, sample = load_app
    plan = {"strategy": "canary", "candidate": candidate, "stable": "v1",
            "canary": {"steps": [{"set_weight": 10}, {"pause_s": None}]}, "gates": GATES,
            "load_stage": {"sample": sample, **LOAD}}  # fmt: skip
    updated = copy.deepcopy(config)
    updated["applications"][0]["deployments"].append(
        {"name": "RolloutController", "user_config": {"plan": plan, "tick_interval_s": 0.25}}
    )
    cluster.serve_deploy(updated, tmp)


def rollout(cluster, method: str = "GET", path: str = "") -> dict:
    r = cluster.client.request(method, f"/admin/rollout{path}",
                               headers={"authorization": f"Bearer {TOKEN}"})  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()


class UserTraffic:
    """A client sending user requests through the router, noting which version answered."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.versions: dict[str, int] = {}
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            i = 0
            while not self.stop.is_set():
                i += 1
                r = client.post(f"/v2/models/{APP}/infer", json=BODIES[i % len(BODIES)],
                                headers={"x-user-id": f"user-{i}"})  # fmt: skip
                if r.status_code != 200:
                    self.failures.append(f"{r.status_code} {r.text[:200]}")
                    continue
                version = r.headers["x-model-version"]
                self.versions[version] = self.versions.get(version, 0) + 1
                time.sleep(0.05)

    def __enter__(self) -> UserTraffic:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


def test_a_candidate_that_cannot_carry_the_rate_is_rolled_back_in_the_load_stage(load_app):
    cluster = load_app[0]
    alone = cluster.client.post(f"/v2/models/{APP}/versions/v3/infer", json=BODIES[0])
    assert alone.status_code == 200  # one request alone is served, and quickly
    with UserTraffic(cluster.url) as users:
        declare(load_app, "v3")
        wait_for_condition(
            lambda: rollout(cluster)["candidate"] == "v3"
            and rollout(cluster)["phase"] == "rolled_back",
            timeout_s=60, message="v3 rolled back in the load stage",
        )  # fmt: skip
    status = rollout(cluster)
    load = status["load_stage"]
    assert load["phase"] == "failed" and load["sent"] > 30, load
    failed = [g for g, r in load["gates"].items() if r["status"] == "failed"]
    assert "load_stage.max_p99_ms" in failed or "load_stage.min_throughput_ratio" in failed
    # No user request reached v3: the routers never chose it, their stats never counted it.
    assert status["weights"]["v3"] == 0.0
    assert status["versions"]["v3"]["requests"] == 0, status["versions"]
    assert users.failures == [] and set(users.versions) == {"v1"}, users.versions
    events = rollout(cluster, path="/history")["events"]
    assert all(e["weight"] == 0.0 for e in events)
    back = events[-1]
    assert back["to_phase"] == "rolled_back" and "load stage" in back["reason"]
    assert any(r["status"] == "failed" for r in back["gates"].values())


def test_a_healthy_candidate_passes_the_load_stage_and_takes_its_first_step(load_app):
    cluster = load_app[0]
    declare(load_app, "v2")
    wait_for_condition(
        lambda: rollout(cluster)["candidate"] == "v2" and rollout(cluster)["phase"] == "paused",
        timeout_s=60, message="v2 past the load stage, waiting for promote at 10%",
    )  # fmt: skip
    status = rollout(cluster)
    assert status["weights"]["v2"] == 10.0
    assert status["load_stage"]["phase"] == "passed", status["load_stage"]
    events = rollout(cluster, path="/history")["events"]
    passed = next(e for e in events if "load stage passed" in e["reason"])
    assert passed["weight"] == 0.0
    assert passed["gates"]["load_stage.max_p99_ms"]["status"] == "passed"
    # The load stage's gauges reach Ray's metrics endpoints (what Prometheus scrapes; the
    # observability test's story has no load stage): its rates and p99, and, once the export
    # has caught up with the stage's end, running 0.
    gauges = wait_for_condition(
        lambda: (g := _load_stage_gauges(cluster, "v2")).get("running") == 0.0 and g,
        timeout_s=30, message="the load stage's gauges on Ray's metrics endpoints, running 0",
    )  # fmt: skip
    assert gauges["target"] == 30.0 and gauges["p99_ms"] > 0, gauges
    rollout(cluster, "POST", "/abort")


def _load_stage_gauges(cluster, version: str) -> dict[str, float]:
    """The load stage gauges for `version` on every node's metrics endpoint (Ray's service
    discovery file lists them): running, p99_ms and each rate tag (target, scheduled, ...)."""
    import json
    import re

    targets = json.loads((cluster.session_dir / "prom_metrics_service_discovery.json").read_text())
    found: dict[str, float] = {}
    line = re.compile(r"^ray_rollout_load_stage_(running|p99_ms|rps)\{([^}]*)\} (\S+)$", re.M)
    for group in targets:
        for target in group["targets"]:
            text = httpx.get(f"http://{target}/metrics", timeout=10).text
            for name, labels, value in line.findall(text):
                if f'version="{version}"' not in labels or f'model="{APP}"' not in labels:
                    continue
                rate = re.search(r'rate="([^"]+)"', labels)
                found[rate.group(1) if name == "rps" and rate else name] = float(value)
    return found
