"""deployments/builder.py: the Router's replica options (built as Serve builds them, no
cluster)."""

from __future__ import annotations

import pytest

from app.config import ROUTER_DEPLOYMENT
from deployments.builder import MAIN_LOOP_ENV, build_app


@pytest.fixture(autouse=True)
def outside_ray(monkeypatch):
    """As in a process with no Ray: the whole suite runs in one process, and the integration
    tests before these leave Ray initialised in it (with the driver's own runtime_env)."""
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)


def _router_options(**args) -> dict:
    app = build_app({"model": "recommender", "version_apps": True, **args})
    deployment = app._bound_deployment
    assert deployment.name == ROUTER_DEPLOYMENT
    return deployment.ray_actor_options


def test_the_router_runs_on_its_replicas_main_loop_by_default():
    options = _router_options()
    assert options["runtime_env"] == {"env_vars": MAIN_LOOP_ENV}
    assert MAIN_LOOP_ENV == {
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
        "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    }
    assert options["num_cpus"] == 0.25  # the other options stay


def test_router_main_loop_false_keeps_serves_loops():
    assert "runtime_env" not in _router_options(router_main_loop=False)


def test_the_region_placement_and_the_loop_settings_both_hold():
    options = _router_options(region="eu-west")
    assert options["runtime_env"] == {"env_vars": MAIN_LOOP_ENV}
    assert options["label_selector"]


@pytest.mark.parametrize("value", ["yes please", 2])
def test_a_bad_router_main_loop_is_refused_naming_the_field(value):
    from app.errors import ConfigError

    with pytest.raises(ConfigError, match="router_main_loop"):
        build_app({"model": "recommender", "version_apps": True, "router_main_loop": value})


def test_the_routers_runtime_env_carries_the_applications_own(monkeypatch):
    # In a Serve build task the application's runtime_env is the task's. Serve would keep the
    # Router's own runtime_env and add only the app's working_dir (the Router is not always
    # listed in the serve config), so the builder copies the app's in: the admin token file.
    import ray

    app_env = {"env_vars": {"ROLLOUT_ADMIN_TOKEN_FILE": "/secrets/admin"}, "pip": ["x==1"]}
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_runtime_context",
                        lambda: type("Context", (), {"runtime_env": app_env})())  # fmt: skip
    env = _router_options()["runtime_env"]
    assert env["pip"] == ["x==1"]
    assert env["env_vars"] == {"ROLLOUT_ADMIN_TOKEN_FILE": "/secrets/admin", **MAIN_LOOP_ENV}
