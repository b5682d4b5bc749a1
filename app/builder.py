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

from pydantic import ValidationError

from app.adapters import adapter_class
from app.config import (
    CONTROLLER_DEPLOYMENT,
    ROUTER_DEPLOYMENT,
    AppArgs,
    ModelConfig,
    VersionAppArgs,
    format_validation_error,
)
from app.errors import ConfigError

__all__ = ["build_app", "build_version", "load_app_args", "load_version_args"]


def load_app_args(args: dict[str, Any] | AppArgs) -> tuple[AppArgs, list[ModelConfig]]:
    """Validate builder args and every model config they name (hyperparameters included)."""
    if not isinstance(args, AppArgs):
        try:
            args = AppArgs.model_validate(args)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, "args")) from None
    configs, errors = args.load_models_collecting()
    unknown = sorted(set(args.version_resources) - {c.version for c in configs})
    if unknown and not errors:
        errors.append(
            f"args.version_resources: {unknown} are not versions of this app; "
            f"versions: {[c.version for c in configs]}"
        )
    # A region's replica resources (e.g. num_gpus: 1) replace the model config's, so everything
    # downstream (the deployment's ray_actor_options, torch threads, validate) sees the same.
    configs = [
        c.model_copy(update={"resources": args.version_resources[c.version]})
        if c.version in args.version_resources
        else c
        for c in configs
    ]
    for config in configs:
        try:
            adapter = adapter_class(config.adapter)
        except ValueError as exc:
            errors.append(f"{config.source}: adapter: {exc}")
            continue
        try:
            adapter.parse_hyperparameters(config.hyperparameters)
        except ValidationError as exc:
            errors.append(format_validation_error(exc, f"{config.source}: hyperparameters"))
    if errors:
        raise ConfigError("\n".join(errors))
    return args, configs


def load_version_args(args: dict[str, Any] | VersionAppArgs) -> tuple[VersionAppArgs, ModelConfig]:
    """Validate a version app's args and its model config (adapter and hyperparameters)."""
    if not isinstance(args, VersionAppArgs):
        try:
            args = VersionAppArgs.model_validate(args)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, "args")) from None
    config = args.load()
    try:
        adapter_class(config.adapter).parse_hyperparameters(config.hyperparameters)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, f"{config.source}: hyperparameters")) from None
    except ValueError as exc:
        raise ConfigError(f"{config.source}: adapter: {exc}") from None
    return args, config


def _model_server(config: ModelConfig, placement: dict[str, Any]):
    from deployments.model_server import ModelServer

    return ModelServer.options(
        name=config.deployment_name,
        ray_actor_options={**config.resources.ray_actor_options(), **placement},
        autoscaling_config=config.autoscaling.serve_config(),
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


def build_app(args: dict[str, Any]):
    from deployments.controller import RolloutController
    from deployments.router import Router

    app_args, configs = load_app_args(args)
    # A region overlay pins every replica to nodes labelled with its region (Ray label_selector).
    placement = {"label_selector": app_args.label_selector()} if app_args.region else {}
    handles = {config.version: _model_server(config, placement) for config in configs}
    # No plan until serve_config.yaml declares one in the controller's user_config.
    controller = RolloutController.options(
        name=CONTROLLER_DEPLOYMENT,
        user_config={"plan": None},
        **({"ray_actor_options": {**(RolloutController.ray_actor_options or {}), **placement}}
           if placement else {}),
    ).bind(app_args.model, None if app_args.version_apps else [c.version for c in configs])
    router = Router.options(
        name=ROUTER_DEPLOYMENT,
        num_replicas=app_args.router_replicas,
        max_ongoing_requests=app_args.router_max_ongoing_requests,
        ray_actor_options={"num_cpus": app_args.router_num_cpus, **placement},
    )
    if not app_args.version_apps:
        # Until serve_config.yaml gives the Router a user_config, all traffic goes to the first.
        first = configs[0].version
        router = router.options(user_config={"stable": first, "weights": {first: 100}})
    return router.bind(app_args.model, handles, configs, app_args.router, controller,
                       version_apps=app_args.version_apps)  # fmt: skip
