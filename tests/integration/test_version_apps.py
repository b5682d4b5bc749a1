"""version_apps mode under steady load (8 clients): each version is a Serve application of its
own, so adding v3, patching or redeploying v2's code, and retiring v3 restart no other
version's replicas (and not the router's). Every change goes through the real `serve deploy`;
no client request may fail."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import APP, infer_body, model_config, wait_for_condition
from tests.integration.loadgen import Load

pytestmark = pytest.mark.integration

BODY = infer_body(["likes space opera films"], ["a space opera", "a cooking show"])


def apps_config(versions: dict[str, Path], weights: dict[str, float],
                user_configs: dict[str, dict] | None = None,
                env: dict[str, dict] | None = None) -> dict[str, Any]:  # fmt: skip
    """Version apps `recommender-<v>` plus the router app in version_apps mode."""
    applications = []
    for version, path in versions.items():
        app: dict[str, Any] = {"name": f"{APP}-{version}", "route_prefix": None,
                               "import_path": "app.builder:build_version", "args": {"config": str(path)}}  # fmt: skip
        if version in (user_configs or {}):
            app["deployments"] = [{"name": f"{APP}-{version}", "user_config": user_configs[version]}]
        if version in (env or {}):
            app["runtime_env"] = {"env_vars": env[version]}
        applications.append(app)
    applications.append({
        "name": APP, "route_prefix": "/", "import_path": "app.builder:build_app",
        "args": {"model": APP, "version_apps": True},
        "deployments": [{"name": "Router", "user_config": {"stable": "v1", "weights": weights}}],
    })  # fmt: skip
    return {"applications": applications}


def replicas() -> dict[str, list[str]]:
    """app/deployment -> RUNNING replica ids, for every app."""
    from ray.serve.context import _get_global_client

    result = {}
    for app, details in _get_global_client().get_serve_details()["applications"].items():
        for name, deployment in details["deployments"].items():
            result[f"{app}/{name}"] = sorted(
                r["replica_id"] for r in deployment["replicas"] if r["state"] == "RUNNING"
            )
    return result


def _routed(client: httpx.Client, rng: random.Random, index: int) -> str | None:
    r = client.post(f"/v2/models/{APP}/infer", json=BODY, headers={"x-user-id": f"u{rng.randrange(10**6)}"})
    return None if r.status_code == 200 else f"{r.status_code} {r.text[:200]}"


def unchanged(before: dict, after: dict, keys: list[str]) -> None:
    for key in keys:
        assert after.get(key) == before[key], f"{key} restarted: {before[key]} -> {after.get(key)}"


@pytest.fixture(scope="module")
def version_apps(cluster, tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("version-apps")
    versions = {
        "v1": model_config(tmp, tmp, "v1", tiny_models["a"]),
        "v2": model_config(tmp, tmp, "v2", tiny_models["b"]),
        "v3": model_config(tmp, tmp, "v3", tiny_models["b"], hyperparameters={"temperature": 0.5}),
    }
    cluster.serve_deploy(apps_config({v: versions[v] for v in ("v1", "v2")}, {"v1": 50, "v2": 50}), tmp)
    for name in (f"{APP}-v1", f"{APP}-v2", APP):
        cluster.wait_running(name)
    wait_for_condition(lambda: cluster.client.get("/v2/health/ready").status_code == 200,
                       timeout_s=60, message="the router's first table")  # fmt: skip
    return cluster, versions, tmp


def test_adding_patching_redeploying_and_retiring_versions_restart_nothing_else(version_apps):
    cluster, versions, tmp = version_apps
    pinned = lambda v: cluster.client.post(f"/v2/models/{APP}/versions/{v}/infer", json=BODY)  # noqa: E731
    assert pinned("v3").status_code == 404  # not deployed yet
    start = replicas()
    router_keys = [f"{APP}/Router", f"{APP}/RolloutController"]
    with Load(cluster.url, _routed, clients=8) as load:
        # 1. Add v3: a new application, and the router's weights name it (in place).
        three = {"v1": 40, "v2": 40, "v3": 20}
        cluster.serve_deploy(apps_config(versions, three), tmp)
        cluster.wait_running(f"{APP}-v3")
        wait_for_condition(lambda: cluster.router_status()["weights"] == three, timeout_s=60,
                           message="the router to route to v3")  # fmt: skip
        r = pinned("v3")
        assert r.status_code == 200 and r.headers["x-model-version"] == "v3", r.text
        after_add = replicas()
        unchanged(start, after_add, [f"{APP}-v1/{APP}-v1", f"{APP}-v2/{APP}-v2", *router_keys])

        # 2. Hot patch v2 (its own app's user_config): nothing restarts.
        patch = {"hyperparameters": {"temperature": 0.25}}
        cluster.serve_deploy(apps_config(versions, three, user_configs={"v2": patch}), tmp)
        wait_for_condition(
            lambda: cluster.replica_info_in(f"{APP}-v2")["hyperparameters"]["temperature"] == 0.25,
            timeout_s=60, message="v2 patched",
        )  # fmt: skip
        unchanged(after_add, replicas(), list(after_add))

        # 3. New code for v2 (its runtime_env): only v2's replicas are replaced.
        cluster.serve_deploy(apps_config(versions, three, user_configs={"v2": patch},
                                         env={"v2": {"ROLLOUT_BUILD": "2"}}), tmp)  # fmt: skip
        wait_for_condition(
            lambda: (now := replicas()).get(f"{APP}-v2/{APP}-v2")
            and now[f"{APP}-v2/{APP}-v2"] != after_add[f"{APP}-v2/{APP}-v2"]
            and cluster.app_status(f"{APP}-v2").status == "RUNNING" and now,
            timeout_s=120, message="v2's rolling update",
        )  # fmt: skip
        unchanged(after_add, replicas(), [f"{APP}-v1/{APP}-v1", f"{APP}-v3/{APP}-v3", *router_keys])

        # 4. Retire v3: weights back to v1/v2 and its application removed, in one deploy.
        two = {"v1": 50, "v2": 50}
        cluster.serve_deploy(apps_config({v: versions[v] for v in ("v1", "v2")}, two,
                                         user_configs={"v2": patch}, env={"v2": {"ROLLOUT_BUILD": "2"}}), tmp)  # fmt: skip
        wait_for_condition(lambda: cluster.app_status(f"{APP}-v3") is None, timeout_s=60,
                           message="v3's application removed")  # fmt: skip
        wait_for_condition(lambda: cluster.router_status()["weights"] == two, timeout_s=30,
                           message="the router's weights without v3")  # fmt: skip
        final = replicas()
        unchanged(after_add, final, [f"{APP}-v1/{APP}-v1", *router_keys])
    assert load.errors == [], load.errors[:5]
    assert load.sent > 100
