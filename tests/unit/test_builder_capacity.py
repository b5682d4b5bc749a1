"""deployments/builder.py: the version deployment's autoscaling_config, with and without
capacity-aware steps (built as Serve builds it, no cluster)."""

from __future__ import annotations

import inspect

import cloudpickle
import pytest

from app.config import ModelConfig
from app.constants import KV_NAMESPACE
from deployments.builder import (
    CAPACITY_POLICY,
    REQUEST_LOAD_POLICY,
    _model_server,
    autoscaling_config,
)

SHA = "0" * 64


def model_config(**autoscaling) -> ModelConfig:
    return ModelConfig(
        name="recommender", version="v2", artifact="model", sha256=SHA, adapter="recommender",
        autoscaling={"min_replicas": 1, "max_replicas": 4, "upscale_delay_s": 30, **autoscaling},
    )  # fmt: skip


def test_a_version_that_does_not_opt_in_scales_on_requests_with_its_own_delays():
    config = autoscaling_config(model_config())
    # Serve's queue-length policy counting a Router's coalesced call as its requests.
    assert config["policy"] == {"policy_function": REQUEST_LOAD_POLICY}
    assert config["upscale_delay_s"] == 30.0
    app = _model_server(model_config(), {})
    scaling = app._bound_deployment._deployment_config.autoscaling_config
    function = cloudpickle.loads(scaling.policy.get_serialized_policy_def())
    assert function.__name__ == "request_load_policy" and not inspect.isclass(function)


def test_a_version_that_opts_in_gets_the_floor_policy_and_keeps_its_delay_there():
    config = autoscaling_config(model_config(capacity_aware=True, replica_capacity_rps=25))
    assert config["upscale_delay_s"] == 0.0  # Serve would delay a floor rise too
    assert config["policy"] == {
        "policy_function": CAPACITY_POLICY,
        "policy_kwargs": {
            "model": "recommender",
            "version": "v2",
            "upscale_delay_s": 30.0,
            "namespace": KV_NAMESPACE,
            "replica_capacity_rps": 25.0,
            "headroom": 1.5,
        },
    }
    assert config["downscale_delay_s"] == 600.0  # scaling down stays Serve's


def test_serve_takes_the_deployment_and_builds_the_policy_from_its_kwargs():
    app = _model_server(model_config(capacity_aware=True, replica_capacity_rps=25), {})
    scaling = app._bound_deployment._deployment_config.autoscaling_config
    assert scaling.upscale_delay_s == 0
    assert scaling.policy.policy_function == CAPACITY_POLICY
    # What Serve's controller does with it (autoscaling_state._resolve_policy_callable).
    policy_class = cloudpickle.loads(scaling.policy.get_serialized_policy_def())
    assert inspect.isclass(policy_class)
    policy = policy_class(**scaling.policy.policy_kwargs)
    assert (policy.model, policy.version, policy.upscale_delay_s) == ("recommender", "v2", 30.0)


@pytest.mark.parametrize("opted_in", [False, True])
def test_the_bounds_pass_through_either_way(opted_in):
    extra = {"capacity_aware": True, "replica_capacity_rps": 10} if opted_in else {}
    config = autoscaling_config(model_config(**extra))
    assert (config["min_replicas"], config["max_replicas"]) == (1, 4)
