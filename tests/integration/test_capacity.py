"""Capacity-aware steps on a real cluster (docs/capacity-aware-steps.md): a candidate that
opts in has the replicas its next share needs RUNNING before its weight rises, under steady
load, with no failed request.

The candidate declares a small per-replica capacity, so the steady load's share needs more
replicas than its `min_replicas` (1): the controller publishes a floor, the version's
`CapacityFloorPolicy` in Serve's controller raises its target at once (no upscale delay, no
load building up first), and the step waits until they run. The times are printed, never
asserted.
"""

from __future__ import annotations

import copy
import random
import threading
import time

import httpx
import pytest

from tests.support import loadgen
from tests.support.serving import APP, forget_rollouts, infer_body, model_config, serve_config
from tests.support.waiting import wait_for_condition

pytestmark = pytest.mark.integration

TOKEN = "test-admin-token-capacity-0123456789"

CANDIDATE = "v2"
DEPLOYMENT = f"{APP}-{CANDIDATE}"
MAX_REPLICAS = 3
BODY = infer_body(["user loves science fiction films"], ["space opera", "cooking show"])
GATES = {"min_requests": 5, "fail_fast_min_requests": 5, "max_p99_latency_ratio": None}
CAPACITY = {
    "min_replicas": 1,
    "max_replicas": MAX_REPLICAS,
    # A long declared delay: only the floor, never the load, can add replicas in this test.
    "upscale_delay_s": 600,
    "capacity_aware": True,
    # One request per second per replica: any steady load's 30% needs every replica.
    "replica_capacity_rps": 1,
}


def running_replicas(version: str = CANDIDATE) -> int:
    from app import ray_compat

    deployments = ray_compat.serve_details()["applications"][APP]["deployments"]
    return sum(r["state"] == "RUNNING" for r in deployments[f"{APP}-{version}"]["replicas"])


@pytest.fixture(scope="module")
def capacity_app(cluster, tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("capacity")
    versions = [
        model_config(tmp, tmp, "v1", tiny_models["a"], resources={"num_cpus": 0.5}),
        model_config(
            tmp, tmp, CANDIDATE, tiny_models["b"], resources={"num_cpus": 0.5}, autoscaling=CAPACITY
        ),  # fmt: skip
    ]
    config = serve_config(versions, {"v1": 100})
    token_file = tmp / "admin_token"
    token_file.write_text(TOKEN + "\n")
    config["applications"][0]["runtime_env"] = {
        "env_vars": {"ROLLOUT_ADMIN_TOKEN_FILE": str(token_file)}
    }
    forget_rollouts()
    cluster.serve_deploy(config, tmp)
    cluster.wait_running()
    wait_for_condition(lambda: running_replicas() == 1, 60, message=f"{DEPLOYMENT}: 1 replica")
    yield cluster, config, tmp
    from ray import serve

    serve.delete(APP)


def rollout_status(cluster) -> dict:
    headers = {"authorization": f"Bearer {TOKEN}"}
    return cluster.client.get("/admin/rollout", headers=headers).json()


def _infer(client: httpx.Client, rng: random.Random, index: int) -> str | None:
    r = client.post(f"/v2/models/{APP}/infer", json=BODY,
                    headers={"x-user-id": f"user-{rng.randrange(100_000)}"})  # fmt: skip
    return None if r.status_code == 200 else f"{r.status_code} {r.text[:200]}"


def test_the_candidate_runs_its_floor_before_its_weight_rises(capacity_app):
    cluster, config, tmp = capacity_app
    plan = {"strategy": "canary", "candidate": CANDIDATE, "stable": "v1",
            "canary": {"steps": [{"set_weight": 30}, {"pause_s": 2}]},
            "gates": GATES, "progress_deadline_s": 240}  # fmt: skip
    declared = copy.deepcopy(config)
    declared["applications"][0]["deployments"].append(
        {"name": "RolloutController", "user_config": {"plan": plan, "tick_interval_s": 0.25}}
    )
    # What the operator sees, with what Serve ran at that moment (read after the status, so a
    # weight above 0 in the status was published before the replica count was read).
    samples: list[tuple[float, float, int, dict | None]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                status = rollout_status(cluster)
                weight = float((status.get("weights") or {}).get(CANDIDATE, 0.0))
                samples.append((time.monotonic(), weight, running_replicas(),
                                status.get("capacity")))  # fmt: skip
            except Exception:  # a poll that failed is no sample
                pass
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    with loadgen.Load(cluster.url, _infer, clients=4) as load:
        time.sleep(3)  # steady load before the rollout: the controller sees the traffic
        watcher.start()
        started = time.monotonic()
        cluster.serve_deploy(declared, tmp)

        def done():
            status = rollout_status(cluster)
            phase = status.get("phase")
            assert phase not in ("paused", "rolled_back", "aborted"), status
            return phase == "succeeded" and status

        wait_for_condition(done, timeout_s=240, interval_s=0.5, message="rollout to succeed")
        stop.set()
        watcher.join(5)
    raised = [s for s in samples if s[1] > 0]
    assert raised, samples[-5:]
    first = raised[0]
    print(f"\ncapacity: {DEPLOYMENT} at {first[1]:g}% {first[0] - started:.1f}s after the "
          f"declaration with {first[2]} RUNNING replicas; {load.sent} requests; "
          f"samples (t, weight, running): {[(round(t - started, 1), w, n) for t, w, n, _ in samples[::5]]}")  # fmt: skip
    assert first[2] >= MAX_REPLICAS, first
    assert all(n >= MAX_REPLICAS for _, w, n, _ in raised if w > 0), raised[:5]
    assert load.errors == [], load.errors[:5]
    waits = [c["waiting"] for _, _, _, c in samples if c and c.get("waiting")]
    print(f"capacity status while the step waited: {waits[:1]}")
