"""Autoscaling proven (issue 20 item 4): steady load drives a version from one replica to
several and, once the load stops, back to one, with no failed request on the way.

The version is slowed on purpose (`faults.added_latency_ms`), so that a handful of clients keeps
more requests in flight than `target_ongoing_requests` allows one replica, and its autoscaling
timing is shortened (`upscale_delay_s`, `downscale_delay_s`, `look_back_period_s`,
`metrics_interval_s`) so that Serve acts in seconds. The times are printed, never asserted.
"""

from __future__ import annotations

import copy
import threading
import time

import httpx
import numpy as np
import pytest

from tests.support.loadgen import Load
from tests.support.serving import APP, forget_rollouts, infer_body, model_config, serve_config
from tests.support.waiting import wait_for_condition

pytestmark = [
    pytest.mark.integration,
    # Ray 2.60 deprecates `metrics_interval_s` (for environment variables it does not read yet)
    # and warns wherever it rebuilds this version's AutoscalingConfig, serve.status() included.
    pytest.mark.filterwarnings("ignore:The `metrics_interval_s` field:DeprecationWarning"),
]

VERSION = "v1"
DEPLOYMENT = f"{APP}-{VERSION}"
MAX_REPLICAS = 3
CLIENTS = 8  # 8 in flight at 300 ms each: 4 replicas' worth at target 2, capped at 3
BODY = infer_body(["user loves science fiction films"], ["space opera", "jazz music"])
FAST = {
    "min_replicas": 1,
    "max_replicas": MAX_REPLICAS,
    "target_ongoing_requests": 2,
    "upscale_delay_s": 1,
    "downscale_delay_s": 3,
    "look_back_period_s": 2,
    "metrics_interval_s": 0.5,
}


def running_replicas() -> int:
    from app import ray_compat

    deployments = ray_compat.serve_details()["applications"][APP]["deployments"]
    return sum(r["state"] == "RUNNING" for r in deployments[DEPLOYMENT]["replicas"])


@pytest.fixture(scope="module")
def slow_app(cluster, tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("autoscaling")
    version = model_config(
        tmp, tmp, VERSION, tiny_models["a"],
        autoscaling=FAST,
        faults={"added_latency_ms": 300},
        batching={"max_batch_size": 8, "batch_wait_timeout_s": 0.005},
    )  # fmt: skip
    forget_rollouts()
    config = serve_config([version], {VERSION: 100})
    cluster.serve_deploy(config, tmp)
    cluster.wait_running()
    wait_for_condition(lambda: running_replicas() == 1, 60, message=f"{DEPLOYMENT}: 1 replica")
    yield cluster, config, tmp
    # The next module deploys its own app; it must not find this one's deprecated field.
    from ray import serve

    serve.delete(APP)


class Recorder:
    """The load's call: one inference, its latency kept with the phase it was sent in."""

    def __init__(self) -> None:
        self.phase = "before"
        self.lock = threading.Lock()
        self.latencies: dict[str, list[float]] = {}

    def __call__(self, client: httpx.Client, rng, index: int) -> str | None:
        phase, started = self.phase, time.perf_counter()
        r = client.post(f"/v2/models/{APP}/infer", json=BODY, headers={"x-user-id": f"u{index}"})
        with self.lock:
            self.latencies.setdefault(phase, []).append(time.perf_counter() - started)
        if r.status_code != 200:
            return f"{r.status_code} {r.text[:200]}"
        if r.headers.get("x-model-version") != VERSION:
            return f"served by {r.headers.get('x-model-version')!r}"
        return None

    def p99_ms(self) -> dict[str, float]:
        with self.lock:
            return {p: round(float(np.percentile(v, 99)) * 1000, 1)
                    for p, v in self.latencies.items() if v}  # fmt: skip


def test_load_scales_a_version_up_and_back_down_without_a_failed_request(slow_app):
    cluster = slow_app[0]
    assert running_replicas() == 1
    recorder = Recorder()
    seen: list[tuple[float, int]] = []

    def replicas_at_least(n: int) -> int | None:
        count = running_replicas()
        if not seen or seen[-1][1] != count:
            seen.append((round(time.monotonic() - onset, 1), count))
        return count if count >= n else None

    onset = time.monotonic()
    with Load(cluster.url, recorder, clients=CLIENTS) as load:
        recorder.phase = "scaling up"
        peak = wait_for_condition(lambda: replicas_at_least(2), 60, interval_s=0.25,
                                  message=f"{DEPLOYMENT} to scale past 1 replica under load")  # fmt: skip
        scale_up_s = time.monotonic() - onset
        recorder.phase = "scaled up"
        time.sleep(2)  # the new replicas take a share of the load before it stops
        peak = max(peak, running_replicas())
        sent_under_load = load.sent
    stopped = time.monotonic()
    wait_for_condition(lambda: running_replicas() == 1, 60, interval_s=0.25,
                       message=f"{DEPLOYMENT} to scale back to 1 replica")  # fmt: skip
    scale_down_s = time.monotonic() - stopped

    print(f"\nautoscaling: 1 -> {peak} replicas {scale_up_s:.1f}s after load onset, back to 1 "
          f"{scale_down_s:.1f}s after it stopped; {sent_under_load} requests, p99 ms by phase "
          f"{recorder.p99_ms()}; replicas over time {seen}")  # fmt: skip
    assert load.errors == [], load.errors[:5]
    assert sent_under_load > 0
    assert 2 <= peak <= MAX_REPLICAS
    # Serving still works on the one replica left.
    r = cluster.client.post(f"/v2/models/{APP}/infer", json=BODY)
    assert r.status_code == 200 and r.headers["x-model-version"] == VERSION


def test_with_micro_batching_the_requests_a_call_carries_still_scale_the_version_out(slow_app):
    """Router -> model micro-batching on, one call out per version: the 8 clients' requests
    leave the Router as one call at a time carrying the rest. Serve counts calls (1 in flight:
    half of one replica's target, no scale-out; before, the version stayed at 1 replica); the
    replicas report the requests they hold (`record_autoscaling_stats`) and the version's
    policy scales on those (deployments/capacity_policy.py). Scaled out, the version takes one
    call per running replica at once from the Router (before, still one in all: the new
    replica idled while requests waited in the Router)."""
    cluster, config, tmp = slow_app
    wait_for_condition(lambda: running_replicas() == 1, 60, message=f"{DEPLOYMENT}: 1 replica")
    batched = copy.deepcopy(config)
    router = next(d for d in batched["applications"][0]["deployments"] if d["name"] == "Router")
    router["user_config"]["microbatch"] = {"enabled": True, "max_batch_size": 32,
                                           "max_calls_in_flight": 1}  # fmt: skip
    cluster.serve_deploy(batched, tmp)
    wait_for_condition(lambda: cluster.router_status()["microbatch"]["enabled"], 60,
                       message="micro-batching on in the Router")  # fmt: skip
    onset = time.monotonic()
    try:
        with Load(cluster.url, Recorder(), clients=CLIENTS) as load:
            peak = wait_for_condition(
                lambda: (n := running_replicas()) >= 2 and n, 60, interval_s=0.25,
                message=f"{DEPLOYMENT} to scale past 1 replica while its calls are coalesced",
            )  # fmt: skip
            scale_up_s = time.monotonic() - onset

            def lane() -> dict:
                return cluster.router_status()["microbatch"]["versions"][VERSION]

            # The Router's health poll (1 s) sees the second replica: two calls out at once.
            wait_for_condition(lambda: lane()["peak_in_flight"] >= 2, 15, interval_s=0.25,
                               message="two calls out at once to the scaled-out version")  # fmt: skip
            lanes = lane()
        print(f"\nmicro-batching: 1 -> {peak} replicas {scale_up_s:.1f}s after load onset; "
              f"{load.sent} requests; Router -> {VERSION} {lanes}")  # fmt: skip
        assert load.errors == [], load.errors[:5]
        assert lanes["items"] > lanes["calls"]  # calls carried several requests
        wait_for_condition(lambda: running_replicas() == 1, 60, interval_s=0.25,
                           message=f"{DEPLOYMENT} to scale back to 1 replica")  # fmt: skip
    finally:
        cluster.serve_deploy(config, tmp)  # micro-batching off again
