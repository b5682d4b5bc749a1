"""Hot patches under steady load (8 clients), each through the real `serve deploy`: new
hyperparameters, new weights (loaded beside the old, swapped atomically), a refused bad
artifact, router and controller knobs. Every patch must fail no request and restart no
replica; the patched behaviour must show within a bounded time."""

from __future__ import annotations

import copy
import hashlib
import random
import shutil
from typing import Any

import httpx
import pytest

from tests.support.loadgen import Load
from tests.support.serving import APP, infer_body, model_config, serve_config
from tests.support.waiting import wait_for_condition

pytestmark = pytest.mark.integration

PROBE = infer_body(
    ["likes space opera films"], ["a space opera", "a cooking show", "a jazz record"]
)


def _digest(directory) -> str:
    return hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()


def _probe(client: httpx.Client, rng: random.Random, index: int) -> str | None:
    """Half the clients pinned to v2 (the version patched), half routed."""
    path = f"/v2/models/{APP}/versions/v2/infer" if index % 2 else f"/v2/models/{APP}/infer"
    r = client.post(path, json=PROBE, headers={"x-user-id": f"u{rng.randrange(10**6)}"})
    return None if r.status_code == 200 else f"{r.status_code} {r.text[:200]}"


@pytest.fixture(scope="module")
def patch_app(cluster, tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hotpatch")
    # v2 starts on a copy of v1's weights; "b" (other random weights) is what the swap loads.
    shutil.copytree(tiny_models["a"], tmp / "weights-a")
    shutil.copytree(tiny_models["b"], tmp / "weights-b")
    versions = [
        model_config(tmp, tmp, "v1", tiny_models["a"]),
        model_config(tmp, tmp, "v2", tmp / "weights-a"),
    ]
    config = serve_config(versions, {"v1": 50, "v2": 50})
    config["applications"][0]["deployments"].append(
        {"name": "RolloutController", "user_config": {"plan": None, "tick_interval_s": 0.25}}
    )
    cluster.serve_deploy(config, tmp)
    cluster.wait_running()
    return cluster, config, tmp


def replicas() -> dict[str, list[str]]:
    from app import ray_compat

    details = ray_compat.serve_details()
    deployments = details["applications"][APP]["deployments"]
    return {
        name: sorted(r["replica_id"] for r in d["replicas"] if r["state"] == "RUNNING")
        for name, d in deployments.items()
    }


def deploy(patch_app, **user_configs: Any) -> None:
    """Redeploy the app with these deployments' user_configs replaced."""
    cluster, config, tmp = patch_app
    updated = copy.deepcopy(config)
    deployments = updated["applications"][0]["deployments"]
    for name, user_config in user_configs.items():
        deployments[:] = [d for d in deployments if d["name"] != name]
        deployments.append({"name": name, "user_config": user_config})
    cluster.serve_deploy(updated, tmp)


def v2_scores(cluster) -> list[float]:
    r = cluster.client.post(f"/v2/models/{APP}/versions/v2/infer", json=PROBE)
    assert r.status_code == 200, r.text
    return r.json()["outputs"][0]["data"]


def v2_user_config(tmp, **changes: Any) -> dict[str, Any]:
    base = {"hyperparameters": {"pooling": "mean", "normalize": True, "temperature": 1.0},
            "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.005}}  # fmt: skip
    return {**base, **changes}


def test_patches_under_load_fail_nothing_and_restart_nothing(patch_app):
    cluster, config, tmp = patch_app
    before = replicas()
    original = v2_scores(cluster)
    with Load(cluster.url, _probe, clients=8) as load:
        # 1. Hyperparameters: a query prefix changes v2's scores in place.
        deploy(patch_app, **{"recommender-v2": v2_user_config(tmp, hyperparameters={
            "pooling": "mean", "normalize": True, "temperature": 1.0, "query_prefix": "a fan of "})})  # fmt: skip
        prefixed = wait_for_condition(lambda: (s := v2_scores(cluster)) != original and s,
                                      timeout_s=60, message="v2 answers with the new hyperparameters")  # fmt: skip

        # 2. Weights: v2 loads "b" beside "a" and swaps; its answers change again.
        swap = {"artifact": str(tmp / "weights-b"), "sha256": _digest(tmp / "weights-b")}
        deploy(patch_app, **{"recommender-v2": v2_user_config(tmp, weights=swap)})
        swapped = wait_for_condition(
            lambda: (s := v2_scores(cluster)) not in (original, prefixed) and s,
            timeout_s=90, message="v2 answers with the swapped weights",
        )  # fmt: skip
        info = cluster.replica_info("recommender-v2")
        assert info["weights"] == str(tmp / "weights-b") and info["weights_swaps"] >= 1
        assert info["refused_patch"] is None

        # 3. A bad artifact (wrong checksum) with other changes: the whole patch is refused;
        # the swapped weights and their settings keep answering.
        digest_before = cluster.replica_info("recommender-v2")["config"]
        bad = {"artifact": str(tmp / "weights-a"), "sha256": "0" * 64}
        deploy(patch_app, **{"recommender-v2": v2_user_config(
            tmp, weights=bad, hyperparameters={"temperature": 0.25},
            faults={"added_latency_ms": 50, "latency_rate": 1.0})})  # fmt: skip
        refused = wait_for_condition(
            lambda: (i := cluster.replica_info("recommender-v2"))["refused_patch"] and i,
            timeout_s=60, message="the bad weights refused",
        )  # fmt: skip
        assert "sha256 mismatch" in refused["refused_patch"]["error"]
        assert refused["weights"] == str(tmp / "weights-b")
        assert refused["config"] == digest_before  # nothing of the patch applied
        assert refused["faults"]["added_latency_ms"] == 0
        assert v2_scores(cluster) == swapped

        # 4. Router and controller knobs: weights, breaker, tick.
        deploy(patch_app, Router={"stable": "v1", "weights": {"v1": 20, "v2": 80},
                                  "breaker": {"consecutive_failures": 7}},
               RolloutController={"plan": None, "tick_interval_s": 0.5})  # fmt: skip
        wait_for_condition(lambda: cluster.router_status()["weights"] == {"v1": 20, "v2": 80},
                           timeout_s=60, message="the router's new weights")  # fmt: skip
    assert load.errors == [], load.errors[:5]
    assert load.sent > 100
    # A replica applying a user_config shows UPDATING, not RUNNING, for a moment after its new
    # behaviour answers: compare once every replica is RUNNING again. A restart would show as
    # a new replica id.
    cluster.wait_running()
    assert replicas() == before  # no replica of any deployment restarted
