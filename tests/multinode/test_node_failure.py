"""Placement and node failure on a real multi-node Ray cluster (see conftest.py).

The app is deployed the way a region is: a base serve config plus a region overlay
(`args.region`, `version_resources` with `num_gpus`), rendered by app/ops/overlay.py and handed to
the real `serve deploy`. Then, under steady client load and in the middle of a canary rollout,
a GPU worker node is killed outright; a replacement joins (what the autoscaler does).
"""

from __future__ import annotations

import collections
import json
import os
import time
from pathlib import Path

import httpx
import pytest
import yaml

from app.ops.overlay import load_overlay, render
from tests.multinode.conftest import REGION
from tests.support import loadgen
from tests.support.tiny_models import build_tiny_bert, write_model_config
from tests.support.waiting import wait_for_condition

APP = "recommender"
TOKEN = "multinode-admin-token-0123456789"
BODY = {
    "inputs": [
        {"name": "user", "datatype": "BYTES", "shape": [1], "data": ["user loves science fiction"]},
        {
            "name": "items",
            "datatype": "BYTES",
            "shape": [2],
            "data": ["space opera", "cooking show"],
        },
    ]
}
# Each version: two replicas, at most one per node, half a GPU each, so either GPU worker can
# die and every version still has a live replica on the other.
GPU_VERSION = {"num_cpus": 0.5, "num_gpus": 0.5, "torch_threads": 1}
REPLICAS = {
    "autoscaling_config": {"min_replicas": 2, "max_replicas": 2},
    "max_replicas_per_node": 1,
}
# Lenient gates: this test is about the platform surviving a node, not about judging v2.
GATES = {"min_requests": 10, "fail_fast_min_requests": 10, "max_error_rate": 0.25,
         "max_error_rate_increase": 0.25, "max_p99_latency_ratio": None, "fail_fast_error_rate": 0.5}  # fmt: skip
STEPS = [{"set_weight": 30}, {"pause_s": 12}, {"set_weight": 60}, {"pause_s": 4}]
SLOW_MS = 250
CLIENTS = 6


@pytest.fixture(scope="module")
def app(multinode, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multinode")
    (tmp / "admin_token").write_text(TOKEN)
    # Every request spends SLOW_MS inside its replica, so a killed node always takes requests
    # in flight with it (tiny models alone answer in a few ms and would rarely be caught).
    slow = {"faults": {"added_latency_ms": SLOW_MS, "latency_rate": 1.0}}
    v1 = write_model_config(tmp, "v1", build_tiny_bert(tmp / "a", 0), **slow)
    v2 = write_model_config(tmp, "v2", build_tiny_bert(tmp / "b", 1), **slow)
    base = {
        "proxy_location": "HeadOnly",
        "applications": [{
            "name": APP, "route_prefix": "/", "import_path": "app.builder:build_app",
            "runtime_env": {"env_vars": {"ROLLOUT_ADMIN_TOKEN_FILE": str(tmp / "admin_token")}},
            "args": {"model": APP, "versions": [str(v1), str(v2)]},
            # v2 (weight 0 until the rollout) is pinned below: any client may, as listed.
            "deployments": [{"name": "Router", "user_config": {"stable": "v1", "weights": {"v1": 100},
                                                               "pinnable": ["v2"]}}],
        }],
    }  # fmt: skip
    overlay_file = tmp / f"{REGION}.yaml"
    overlay_file.write_text(yaml.safe_dump({
        "region": REGION,
        "serve": {"applications": [{
            "name": APP,
            "args": {"region": REGION, "version_resources": {"v1": GPU_VERSION, "v2": GPU_VERSION}},
            "deployments": [{"name": "recommender-v1", **REPLICAS}, {"name": "recommender-v2", **REPLICAS}],
        }]},
    }))  # fmt: skip
    config = render(base, load_overlay(overlay_file))
    multinode.serve_deploy(config, tmp)
    wait_running(timeout_s=180)
    return multinode, config, tmp


def wait_running(timeout_s: float = 120) -> None:
    from ray import serve

    def running():
        status = serve.status().applications.get(APP)
        if status is not None and status.status == "DEPLOY_FAILED":
            raise AssertionError(f"{APP} failed to deploy: {status.message}")
        return status is not None and status.status == "RUNNING"

    wait_for_condition(running, timeout_s, message=f"app {APP} RUNNING")


def replicas() -> dict[str, list[dict]]:
    """Live Serve replica actors of the app, by deployment: node id and what they reserved."""
    import ray
    from ray.util.state import list_actors

    gpus = {n["NodeID"]: n["Resources"].get("GPU", 0) for n in ray.nodes() if n["Alive"]}
    found: dict[str, list[dict]] = collections.defaultdict(list)
    for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=1000, detail=True):
        name = actor.name or ""
        if not name.startswith(f"SERVE_REPLICA::{APP}#"):
            continue
        deployment = name.split("#")[1]
        found[deployment].append({"node": actor.node_id, "node_gpus": gpus.get(actor.node_id),
                                  "required": actor.required_resources})  # fmt: skip
    return found


def admin(url: str, path: str = "", method: str = "GET") -> httpx.Response:
    return httpx.request(method, f"{url}/admin/rollout{path}", timeout=10,
                         headers={"authorization": f"Bearer {TOKEN}"})  # fmt: skip


def summary(load: loadgen.InferLoad) -> dict:
    """The load so far: sent, failed, fallbacks, and each answer's routing decision, serving
    version and fallback reason."""
    decisions = load.count("x-routing-decision")
    reasons = load.count("x-fallback-reason")
    reasons.pop("?", None)
    return {"sent": load.sent, "failed": len(load.errors), "fell_back": decisions["fallback"],
            "decisions": dict(decisions), "served_by": dict(load.count("x-model-version")),
            "fallback_reasons": dict(reasons), "failures": load.errors[:10]}  # fmt: skip


def test_gpu_versions_land_only_on_gpu_workers(app):
    import ray

    multinode = app[0]
    head = multinode.cluster.head_node.node_id
    placed = replicas()
    for version in ("v1", "v2"):
        found = placed[f"{APP}-{version}"]
        assert len(found) == 2, placed
        for replica in found:
            assert replica["node_gpus"] and replica["node_gpus"] >= 1, replica  # a GPU worker
            assert replica["node"] != head
            assert replica["required"].get("GPU") == 0.5, replica
        assert len({r["node"] for r in found}) == 2, found  # one per GPU worker
    # The router (no GPU) may run anywhere; every replica honoured the region label selector.
    assert placed["Router"]
    labelled = {
        n["NodeID"]
        for n in ray.nodes()
        if n["Alive"] and n.get("Labels", {}).get("region") == REGION
    }
    assert all(r["node"] in labelled for rs in placed.values() for r in rs), placed
    # Fake GPUs: replicas hold a GPU but torch sees no CUDA, so they serve on the CPU.
    r = httpx.post(f"{multinode.url}/v2/models/{APP}/versions/v2/infer", json=BODY, timeout=30)
    assert r.status_code == 200 and r.headers["x-model-version"] == "v2", r.text


def test_worker_node_killed_under_load_mid_rollout(app):
    multinode, config, tmp = app
    import copy

    declared = copy.deepcopy(config)
    declared["applications"][0]["deployments"].append({
        "name": "RolloutController",
        "user_config": {"tick_interval_s": 0.25, "plan": {
            "strategy": "canary", "candidate": "v2", "stable": "v1",
            "canary": {"steps": STEPS}, "gates": GATES}},
    })  # fmt: skip
    with loadgen.InferLoad(multinode.url, f"/v2/models/{APP}/infer", BODY, CLIENTS) as load:
        time.sleep(2)
        multinode.serve_deploy(declared, tmp)
        # In the 12 s pause at 30%: kill the GPU worker that hosts replicas (both do).
        status = wait_for_condition(
            lambda: (s := admin(multinode.url).json())["weights"].get("v2") == 30 and s["step_index"] == 1 and s,
            timeout_s=60, message="rollout at 30%, pausing",
        )  # fmt: skip
        # A GPU worker with a replica of each version; not the router's node (losing the one
        # router replica is another failure: it fails the requests it holds; run several).
        router_nodes = {r["node"] for r in replicas()["Router"]}
        victim = next(n for n in multinode.gpu_nodes if n.node_id not in router_nodes)
        victim_id = victim.node_id
        assert {r["node"] for v in ("v1", "v2") for r in replicas()[f"{APP}-{v}"]} >= {victim_id}
        before = summary(load)
        multinode.kill_node(victim)
        killed_at = time.time()
        time.sleep(3)  # the cluster runs one GPU worker short, as while a cloud VM is replaced
        multinode.add_gpu_worker()  # the autoscaler's replacement

        def succeeded():
            s = admin(multinode.url).json()
            assert s["phase"] not in ("rolled_back", "aborted"), s  # fail with the reason
            return s["phase"] == "succeeded" and s

        final = wait_for_condition(succeeded, timeout_s=120, message="rollout to succeed")

        def restored():
            placed = replicas()
            versions = [placed.get(f"{APP}-{v}", []) for v in ("v1", "v2")]
            return all(len(found) == 2 for found in versions) and placed

        placed = wait_for_condition(restored, timeout_s=120, message="replicas rescheduled")
        time.sleep(2)  # a little steady traffic on the restored cluster
    after = summary(load)
    router = httpx.get(f"{multinode.url}/status", timeout=10,
                       headers={"authorization": f"Bearer {TOKEN}"}).json()  # fmt: skip
    after["router_replica_retries"] = router.get("replica_retries")
    after["router_fallbacks"] = router.get("fallbacks")
    history = admin(multinode.url, "/history").json()["events"]
    report = {"before_kill": {k: before[k] for k in ("sent", "failed", "fell_back")}, **after,
              "rollout_events_after_kill": [(e["to_phase"], e.get("weight")) for e in history
                                            if e["time_s"] >= killed_at]}  # fmt: skip
    print("node-kill report:", json.dumps(report, indent=1))
    if os.environ.get("NODE_KILL_REPORT"):
        Path(os.environ["NODE_KILL_REPORT"]).write_text(json.dumps(report, indent=1))

    # The rollout went on after the kill: it stepped to 60% and then to 100% afterwards.
    assert status["step_index"] == 1 and final["weights"]["v2"] == 100
    weights_after = [w for _, w in report["rollout_events_after_kill"]]
    assert 60 in weights_after and 100 in weights_after, history
    # Replicas came back: two per version, none on the dead node, all on GPU workers.
    for version in ("v1", "v2"):
        for replica in placed[f"{APP}-{version}"]:
            assert replica["node"] != victim_id and replica["node_gpus"] >= 1, placed
    # Clients: every request the dead replicas held was retried or fell back; none failed.
    assert after["sent"] > before["sent"] > 0
    assert after["failed"] == 0, after["failures"]
