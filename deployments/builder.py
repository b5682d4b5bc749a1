"""`build_app`: the Serve application builder named in serve_config.yaml.

    import_path: app.builder:build_app
    args: {model: recommender, versions: [configs/models/recommender/v1.yaml, ...]}

One `ModelServer` deployment per version (`<model>-<version>`) and one `Router` ingress. Only
the deployments' `user_config` is meant to change between `serve deploy`s: Serve applies it in
place. Changing `args` changes the app's code version, which restarts every replica.

With `version_apps: true` each version is an application of its own instead:

    - name: recommender-v1                      # one per version, no HTTP route
      route_prefix: null
      import_path: app.builder:build_version
      args: {config: configs/models/recommender/v1.yaml}
    - name: recommender                         # the router app: Router + RolloutController
      route_prefix: /
      import_path: app.builder:build_app
      args: {model: recommender, version_apps: true}

Serve derives one code version per application, so adding, removing or changing a version's
application restarts only that version's replicas; the Router finds versions by name from its
`user_config` (weights, fallbacks, shadow), in place.
"""

from __future__ import annotations

from typing import Any

from app.config import (
    CONTROLLER_DEPLOYMENT,
    ROUTER_DEPLOYMENT,
    ModelConfig,
    load_app_args,
    load_version_args,
)
from app.constants import KV_NAMESPACE

# `router_main_loop`: the Router's code and its handles' replica choice on the replica's main
# event loop (what RAY_SERVE_THROUGHPUT_OPTIMIZED sets, for the router replicas only; added to
# the application's runtime_env by `_router_runtime_env`). docs/benchmarks.md, tuning record.
MAIN_LOOP_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}

__all__ = [
    "build_app",
    "build_version",
    "load_app_args",
    "load_version_args",
]  # loaders: app.config


CAPACITY_POLICY = "deployments.capacity_policy:CapacityFloorPolicy"
# Serve's queue-length policy, counting a coalesced call's requests one by one.
REQUEST_LOAD_POLICY = "deployments.capacity_policy:request_load_policy"


def autoscaling_config(config: ModelConfig) -> dict[str, Any]:
    """The version deployment's Serve `autoscaling_config`. A version that opts in to
    capacity-aware steps gets the floor policy (docs/capacity-aware-steps.md), and Serve's own
    upscale delay becomes 0: Serve delays a custom policy's answer too, which would hold a
    floor rise back, so the policy applies the declared delay itself, to the load part only.
    Its kwargs also carry what the rollout controller needs to size the floor (read back from
    Serve's deployment details)."""
    scaling = config.autoscaling
    serve_config = scaling.serve_config()
    if not scaling.capacity_aware:
        # Serve's default policy, on the requests the replicas hold (a Router's coalesced call
        # counts each request it carries; those still waiting in a Router's coalescer do not).
        serve_config["policy"] = {"policy_function": REQUEST_LOAD_POLICY}
        return serve_config
    serve_config["upscale_delay_s"] = 0.0
    serve_config["policy"] = {
        "policy_function": CAPACITY_POLICY,
        "policy_kwargs": {
            "model": config.name,
            "version": config.version,
            "upscale_delay_s": scaling.upscale_delay_s,
            "namespace": KV_NAMESPACE,
            "replica_capacity_rps": scaling.replica_capacity_rps,
            "headroom": scaling.capacity_headroom,
        },
    }
    return serve_config


def _model_server(config: ModelConfig, placement: dict[str, Any]):
    from deployments.model_server import ModelServer

    return ModelServer.options(  # type: ignore[attr-defined]  # @serve.deployment returns a Deployment; stubs keep the class
        name=config.deployment_name,
        ray_actor_options={**config.resources.ray_actor_options(), **placement},
        autoscaling_config=autoscaling_config(config),
        max_ongoing_requests=config.max_ongoing_requests,
        max_queued_requests=config.max_queued_requests,
        user_config=config.user_config().model_dump(mode="json"),
        health_check_period_s=config.health_check_period_s,
        health_check_timeout_s=config.health_check_timeout_s,
        graceful_shutdown_timeout_s=config.graceful_shutdown_timeout_s,
    ).bind(config)


def build_version(args: dict[str, Any]):
    """One model version as an application of its own (version_apps mode)."""
    version_args, config = load_version_args(args)
    selector = version_args.label_selector()
    return _model_server(config, {"label_selector": selector} if selector else {})


def _router_runtime_env() -> dict[str, Any]:
    """The application's runtime_env plus MAIN_LOOP_ENV, for the Router deployment.

    A deployment that sets a runtime_env of its own keeps it, and Serve adds only the app's
    `working_dir` to it unless the serve config lists the deployment (then it merges the app's
    `env_vars` too): so the app's own (the admin token file, HF_HUB_OFFLINE, pip) are copied
    here, as Serve gives them to a deployment that sets none. Outside Ray (unit tests): only
    MAIN_LOOP_ENV."""
    import ray

    app_env: dict[str, Any] = {}
    if ray.is_initialized():  # a Serve build task: its runtime_env is the application's
        app_env = dict(ray.get_runtime_context().runtime_env or {})
    return {**app_env, "env_vars": {**(app_env.get("env_vars") or {}), **MAIN_LOOP_ENV}}


def build_app(args: dict[str, Any]):
    from deployments.controller import RolloutController
    from deployments.router import Router

    app_args, configs = load_app_args(args)
    # A region overlay pins every replica to nodes labelled with its region (Ray label_selector).
    placement = {"label_selector": app_args.label_selector()} if app_args.region else {}
    handles = {config.version: _model_server(config, placement) for config in configs}
    # No plan until serve_config.yaml declares one in the controller's user_config.
    controller = RolloutController.options(  # type: ignore[attr-defined]  # @serve.deployment returns a Deployment; stubs keep the class
        name=CONTROLLER_DEPLOYMENT,
        user_config={"plan": None},
        **(
            {"ray_actor_options": {**(RolloutController.ray_actor_options or {}), **placement}}  # type: ignore[attr-defined]  # @serve.deployment (see above)
            if placement
            else {}
        ),
    ).bind(app_args.model, None if app_args.version_apps else [c.version for c in configs])
    router = Router.options(  # type: ignore[attr-defined]  # @serve.deployment returns a Deployment; stubs keep the class
        name=ROUTER_DEPLOYMENT,
        num_replicas=app_args.router_replicas,
        max_ongoing_requests=app_args.router_max_ongoing_requests,
        max_queued_requests=app_args.router_max_queued_requests,
        ray_actor_options={
            "num_cpus": app_args.router_num_cpus,
            **(
                {"memory": app_args.router_memory_mb * 1024 * 1024}
                if app_args.router_memory_mb is not None
                else {}
            ),
            **({"runtime_env": _router_runtime_env()} if app_args.router_main_loop else {}),
            **placement,
        },
    )
    if not app_args.version_apps:
        # Until serve_config.yaml gives the Router a user_config, all traffic goes to the first.
        first = configs[0].version
        router = router.options(user_config={"stable": first, "weights": {first: 100}})
    return router.bind(app_args.model, handles, configs, app_args.router, controller,
                       version_apps=app_args.version_apps)  # fmt: skip
