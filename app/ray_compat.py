"""Every private Ray API this project calls, in one place, plus the Ray exception classes the
router maps to HTTP statuses.

Ray's private APIs (`_internal_kv_*`, `_get_global_client`, the handle's `_by_reference`
option, `ray.autoscaler._private.util`, `ray._private.worker`) can change in any release.
Calling them only from here, each behind a small function, means a Ray upgrade touches one
file, and `tests/unit/test_ray_compat.py` (which imports each symbol) fails loudly when one
moves. Imports are deferred to the call, so importing this module starts nothing and the
Ray-free core stays importable without Ray's heavy modules.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "actor_error_class",
    "autoscaler_config_checks",
    "backpressure_error_class",
    "handle_with_transport",
    "ingress_targets",
    "kv_delete",
    "kv_get",
    "kv_put",
    "serve_details",
    "session_dir",
]


def kv_get(key: str, namespace: str) -> bytes | None:
    """A value from Ray's GCS key-value store (what Serve's own controller checkpoints to)."""
    from ray.experimental.internal_kv import _internal_kv_get

    return _internal_kv_get(key, namespace=namespace)


def kv_put(key: str, value: bytes, namespace: str) -> None:
    """Store `value` under `key`, replacing what was there."""
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(key, value, overwrite=True, namespace=namespace)


def kv_delete(key: str, namespace: str) -> None:
    from ray.experimental.internal_kv import _internal_kv_del

    _internal_kv_del(key, namespace=namespace)


def serve_details() -> dict[str, Any]:
    """Serve's view of every application (what `serve status` and the dashboard read): each
    deployment's replica states and target user_config. Blocking: call it off the event loop."""
    from ray.serve.context import _get_global_client

    # Ray types it Optional, but with the default raise_if_no_controller_running=True it raises.
    return _get_global_client().get_serve_details()  # type: ignore[union-attr]


def ingress_targets(app: str, timeout_s: float = 10.0) -> list[tuple[str, int]]:
    """(node IP, port) of each running ingress replica's own HTTP server of `app` under direct
    ingress (`RAY_SERVE_ENABLE_DIRECT_INGRESS`, or HAProxy mode): what HAProxy balances over.
    `get_serve_details()["target_groups"]` lists HAProxy itself in HAProxy mode, so this asks
    Serve's controller what it tells HAProxy (`from_proxy_manager=True`). Empty without direct
    ingress or before a replica has its port. On a single node a replica listens on 127.0.0.1
    unless HAProxy mode binds it to every interface."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    groups: list[Any] = ray.get(controller.get_target_groups.remote(app, True), timeout=timeout_s)
    return [
        (target.ip, target.port)
        for group in groups
        if getattr(group.protocol, "value", group.protocol) == "HTTP" and group.app_name == app
        for target in group.targets
    ]


def handle_with_transport(handle: Any, transport: str) -> Any:
    """`handle` calling its replicas over Serve's inter-deployment gRPC (`"grpc"`:
    `_by_reference=False`) or over Ray actor calls (`"actor"`, Serve's default)."""
    return handle.options(_by_reference=transport == "actor")


def autoscaler_config_checks() -> tuple[Any, Any]:
    """(prepare_config, validate_config): how `ray up` fills in and checks a launcher file."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    return prepare_config, validate_config


def session_dir() -> str:
    """The connected Ray node's session directory (its logs live under it)."""
    import ray._private.worker

    # `_global_node = None` at module level (so mypy infers None); ray.init sets it.
    return ray._private.worker._global_node.get_session_dir_path()  # type: ignore[attr-defined]


def backpressure_error_class() -> type[BaseException]:
    """What a handle raises when a deployment's queue is full (`max_queued_requests`)."""
    from ray.serve.exceptions import BackPressureError

    return BackPressureError


def actor_error_class() -> type[BaseException]:
    """What a call raises when its replica died or is unreachable (ActorDiedError and
    ActorUnavailableError are subclasses)."""
    from ray.exceptions import RayActorError

    return RayActorError


def serve_loops() -> dict[str, bool]:
    """Where this replica runs its user code and its handles' replica choice: on loops of their
    own (Serve's default) or on the main loop (`router_main_loop`, deployments/builder.py)."""
    from ray.serve._private import constants

    return {
        "user_code_on_main_loop": not constants.RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD,
        "handles_on_main_loop": not constants.RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP,
    }
