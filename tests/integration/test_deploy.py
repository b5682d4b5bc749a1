"""`serve deploy` end to end: the repo's serve_config.yaml with the real MiniLM model, in-place
traffic and hyperparameter updates, a version whose checksum fails, and fault injection."""

from __future__ import annotations

import copy
import time
from collections import Counter

import pytest
import yaml

from app.config import project_root
from app.ops.declare import patch_version
from tests.support.configs import router_app, set_config_root
from tests.support.loadgen import Load
from tests.support.serving import (
    APP,
    infer_body,
    model_config,
    serve_config,
    version_apps_config,
)
from tests.support.waiting import wait_for_condition

pytestmark = pytest.mark.integration

USER = ["works as a nurse, has two cats and likes science fiction films about space travel"]
ITEMS = ["an epic space opera among the stars", "a cooking show about italian pasta"]


def _repo_config() -> dict:
    config = yaml.safe_load((project_root() / "serve_config.yaml").read_text())
    # Relative paths in the repo's config start from the checkout, wherever the test runs.
    config = set_config_root(config, str(project_root()))
    router_app(config)["args"]["router"]["public_status"] = True  # the harness reads /status
    return config


def _router_user_config(config: dict) -> dict:
    deployments = router_app(config)["deployments"]
    return next(d for d in deployments if d["name"] == "Router")["user_config"]


def _scores(client, version: str, users=USER, items=ITEMS) -> list[float]:
    r = client.post(f"/v2/models/{APP}/versions/{version}/infer", json=infer_body(users, items))
    assert r.status_code == 200, r.text
    return next(o for o in r.json()["outputs"] if o["name"] == "scores")["data"]


@pytest.fixture(scope="module")
def repo_app(cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deploy")
    config = _repo_config()
    cluster.serve_deploy(config, tmp)
    cluster.wait_all_running()
    return cluster, config, tmp


def test_repo_serve_config_serves_minilm_at_declared_weights(repo_app):
    cluster, config, _ = repo_app
    status = cluster.router_status()
    assert status["weights"] == {"v1": 90, "v2": 10} and status["stable"] == "v1"
    counts = Counter()
    for _ in range(300):
        r = cluster.client.post(f"/v2/models/{APP}/infer", json=infer_body(USER, ITEMS))
        assert r.status_code == 200, r.text
        counts[r.headers["x-model-version"]] += 1
    # Binomial(300, 0.1): 30 expected; 10..55 holds with probability > 1 - 1e-4.
    assert 10 <= counts["v2"] <= 55, counts
    # The real encoder ranks the space opera first for a science-fiction fan, in both versions.
    for version in ("v1", "v2"):
        scores = _scores(cluster.client, version)
        assert scores[0] > scores[1], (version, scores)
    # v2 scores each clause of the profile on its own (best_line): different outputs.
    assert _scores(cluster.client, "v1") != _scores(cluster.client, "v2")


def test_traffic_and_hyperparameters_change_in_place(repo_app):
    cluster, config, tmp = repo_app
    before = cluster.router_status()
    replicas = {v: cluster.replica_info(f"{APP}-{v}")["replica"] for v in ("v1", "v2")}
    v2_scores = _scores(cluster.client, "v2")

    updated = copy.deepcopy(config)
    _router_user_config(updated)["weights"] = {"v1": 0, "v2": 100}
    hot = {"hyperparameters": {"profile_scoring": "best_line", "temperature": 0.5}}
    patch_version(updated, f"{APP}-v2", hot)  # in v2's own application
    cluster.serve_deploy(updated, tmp)

    status = wait_for_condition(
        lambda: (s := cluster.router_status())["generation"] > before["generation"] and s,
        timeout_s=60, message="router to apply the new traffic table",
    )  # fmt: skip
    assert status["weights"] == {"v1": 0, "v2": 100}
    wait_for_condition(
        lambda: cluster.replica_info(f"{APP}-v2")["hyperparameters"]["temperature"] == 0.5,
        timeout_s=60, message="v2 hot patch",
    )  # fmt: skip
    cluster.wait_all_running()
    for _ in range(20):
        r = cluster.client.post(f"/v2/models/{APP}/infer", json=infer_body(USER, ITEMS))
        assert r.headers["x-model-version"] == "v2"
    # Temperature halved: every score doubles.
    patched = _scores(cluster.client, "v2")
    assert patched == pytest.approx([2 * s for s in v2_scores], rel=1e-4)
    # Nothing restarted: same router replica, same model replicas.
    assert cluster.router_status()["router_replica"] == before["router_replica"]
    assert {v: cluster.replica_info(f"{APP}-{v}")["replica"] for v in ("v1", "v2")} == replicas


def test_bad_traffic_update_is_refused_and_old_table_kept(repo_app):
    cluster, config, tmp = repo_app
    before = cluster.router_status()
    bad = copy.deepcopy(config)
    _router_user_config(bad)["weights"] = {"v1": 50, "v3": 50}
    cluster.serve_deploy(bad, tmp)
    status = wait_for_condition(
        lambda: (s := cluster.router_status())["rejected_update"] and s,
        timeout_s=60, message="router to refuse the update",
    )  # fmt: skip
    assert "v3" in status["rejected_update"]["error"]
    assert status["weights"] == before["weights"]
    assert status["generation"] == before["generation"]
    r = cluster.client.post(f"/v2/models/{APP}/infer", json=infer_body(USER, ITEMS))
    assert r.status_code == 200


@pytest.fixture(scope="module")
def broken_app(cluster, tiny_models, tmp_path_factory, repo_app):  # after the repo-config tests
    tmp = tmp_path_factory.mktemp("broken")
    v1 = model_config(tmp, tmp, "v1", tiny_models["a"])
    v2 = model_config(tmp, tmp, "v2", tiny_models["b"], faults={"error_rate": 1.0})
    v3 = model_config(tmp, tmp, "v3", tiny_models["b"], sha256="0" * 64)
    cluster.serve_deploy(serve_config([v1, v2, v3], {"v1": 50, "v3": 50}), tmp)

    def settled():
        status = cluster.app_status()
        deployments = status.deployments if status else {}
        ok = deployments.get(f"{APP}-v1") and deployments[f"{APP}-v1"].status == "HEALTHY"
        failed = deployments.get(f"{APP}-v3") and deployments[f"{APP}-v3"].status == "DEPLOY_FAILED"
        return ok and failed and status

    status = wait_for_condition(settled, timeout_s=120, message="v1 healthy and v3 failed")
    return cluster, status


def test_checksum_mismatch_fails_only_that_version(broken_app):
    cluster, status = broken_app
    message = status.deployments[f"{APP}-v3"].message
    assert "sha256 mismatch" in message and "0" * 64 in message
    wait_for_condition(
        lambda: not cluster.router_status()["versions"]["v3"]["available"],
        timeout_s=30, message="router to drop v3",
    )  # fmt: skip
    # v3 holds half the weight but has no replica: its share is served by v1.
    for _ in range(40):
        r = cluster.client.post(f"/v2/models/{APP}/infer", json=infer_body(USER, ITEMS))
        assert r.status_code == 200 and r.headers["x-model-version"] == "v1"
    r = cluster.client.post(f"/v2/models/{APP}/versions/v3/infer", json=infer_body(USER, ITEMS))
    assert r.status_code == 503 and "v3" in r.json()["error"] and r.headers["retry-after"]
    assert cluster.client.get(f"/v2/models/{APP}/versions/v3/ready").status_code == 503
    assert cluster.client.get("/v2/health/ready").status_code == 200


def test_fault_injection_fails_requests_with_500(broken_app):
    cluster, _ = broken_app
    r = cluster.client.post(f"/v2/models/{APP}/versions/v2/infer", json=infer_body(USER, ITEMS))
    assert r.status_code == 500
    assert "injected fault" in r.json()["error"] and r.headers["x-model-version"] == "v2"
    # The replica survives its injected faults.
    info = cluster.replica_info(f"{APP}-v2")
    assert info["faults"]["error_rate"] == 1.0


# -- the default layout: adding and retiring versions is routine (issue 17 item 6) -------------


def _replica_ids(cluster) -> dict[str, set[str]]:
    """Every running replica's id, per deployment, across all applications."""
    from app import ray_compat

    return {
        name: {r["replica_id"] for r in d["replicas"] if r["state"] == "RUNNING"}
        for app in ray_compat.serve_details()["applications"].values()
        for name, d in app["deployments"].items()
    }


def test_adding_and_retiring_versions_under_load_restarts_nothing_else(
    cluster, tiny_models, tmp_path_factory
):
    """With one application per version (serve_config.yaml), adding v3 at weight 0, moving
    traffic, and retiring v1 (weight 0, then its application dropped) under steady load fails
    no request and restarts no other replica: the Router, the controller and the versions that
    stay keep their replicas. In the single-application layout the same change replaced all
    five replicas and failed 374 of 8,455 requests (issue 17)."""
    tmp = tmp_path_factory.mktemp("layout")
    paths = {v: model_config(tmp, tmp, v, tiny_models["ab"[i % 2]]) for i, v in
             enumerate(("v1", "v2", "v3"))}  # fmt: skip
    cluster.serve_deploy(version_apps_config({v: paths[v] for v in ("v1", "v2")},
                                             {"v1": 50, "v2": 50}), tmp)  # fmt: skip
    cluster.wait_all_running()
    before = _replica_ids(cluster)
    assert before["Router"] and before["recommender-v1"] and before["recommender-v2"]

    def call(client, rng, index):
        r = client.post(f"/v2/models/{APP}/infer", json=infer_body(USER, ITEMS),
                        headers={"x-user-id": f"user-{index}-{rng.randrange(100)}"})  # fmt: skip
        return None if r.status_code == 200 else f"{r.status_code} {r.text[:200]}"

    with Load(cluster.url, call, clients=6) as load:
        # 1. add v3 at weight 0
        cluster.serve_deploy(version_apps_config(paths, {"v1": 50, "v2": 50, "v3": 0}), tmp)
        wait_for_condition(lambda: "v3" in cluster.router_status()["weights"], timeout_s=120,
                           message="router to take v3")  # fmt: skip
        cluster.wait_all_running()
        # 2. v1 to weight 0, v2 stable
        cluster.serve_deploy(
            version_apps_config(paths, {"v1": 0, "v2": 90, "v3": 10}, stable="v2"), tmp
        )
        wait_for_condition(lambda: cluster.router_status()["weights"].get("v1") == 0,
                           timeout_s=60, message="v1 at weight 0")  # fmt: skip
        # 3. retire v1: its application dropped
        rest = {v: paths[v] for v in ("v2", "v3")}
        cluster.serve_deploy(version_apps_config(rest, {"v2": 90, "v3": 10}, stable="v2"), tmp)
        wait_for_condition(lambda: "v1" not in cluster.router_status()["weights"],
                           timeout_s=60, message="router to drop v1")  # fmt: skip
        wait_for_condition(lambda: f"{APP}-v1" not in _replica_ids(cluster), timeout_s=120,
                           message="v1's application gone")  # fmt: skip
        served_before_end = load.sent
        time.sleep(3)  # a little load after the last change
    after = _replica_ids(cluster)
    assert load.errors == [], load.errors[:5]
    assert load.sent > served_before_end > 50
    for deployment in ("Router", "RolloutController", "recommender-v2"):
        assert after[deployment] == before[deployment], deployment  # never restarted
    assert after["recommender-v3"]
