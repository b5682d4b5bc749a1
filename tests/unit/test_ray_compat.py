"""Every private Ray symbol app/ray_compat.py relies on still exists in the installed Ray: a
Ray upgrade that moves one fails here, by name, not in a running cluster. Nothing starts Ray."""

from __future__ import annotations

import importlib

import pytest

from app import ray_compat

PRIVATE_SYMBOLS = [
    ("ray.experimental.internal_kv", "_internal_kv_get"),
    ("ray.experimental.internal_kv", "_internal_kv_put"),
    ("ray.experimental.internal_kv", "_internal_kv_del"),
    ("ray.serve.context", "_get_global_client"),
    ("ray.autoscaler._private.util", "prepare_config"),
    ("ray.autoscaler._private.util", "validate_config"),
    ("ray._private.worker", "_global_node"),
    ("ray.serve.exceptions", "BackPressureError"),
    ("ray.exceptions", "RayActorError"),
    ("ray.serve._private.constants", "SERVE_CONTROLLER_NAME"),
    ("ray.serve._private.constants", "SERVE_NAMESPACE"),
    ("ray.serve._private.controller", "ServeController"),
]


@pytest.mark.parametrize(("module", "name"), PRIVATE_SYMBOLS)
def test_private_ray_symbol_exists(module, name):
    assert hasattr(importlib.import_module(module), name), f"{module}.{name} is gone"


def test_serve_controller_lists_ingress_targets_for_a_proxy_manager():
    """`ingress_targets` asks the controller what it tells HAProxy: the method and its
    `from_proxy_manager` argument must still be there."""
    import inspect

    controller = importlib.import_module("ray.serve._private.controller").ServeController
    parameters = list(inspect.signature(controller.get_target_groups).parameters)
    assert parameters[1:3] == ["app_name", "from_proxy_manager"]


def test_serve_handle_options_take_by_reference():
    import inspect

    from ray.serve.handle import DeploymentHandle

    assert "_by_reference" in inspect.signature(DeploymentHandle.options).parameters


def test_exception_classes_cover_the_errors_the_router_maps():
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    lost = ray_compat.actor_error_class()
    assert issubclass(ActorDiedError, lost) and issubclass(ActorUnavailableError, lost)
    assert ray_compat.backpressure_error_class().__name__ == "BackPressureError"


def test_autoscaler_checks_are_callable():
    prepare, validate = ray_compat.autoscaler_config_checks()
    assert callable(prepare) and callable(validate)
