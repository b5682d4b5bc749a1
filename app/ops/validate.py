"""`rollout validate`: check serve_config.yaml and every model config before they touch traffic.

Checks, in order, collecting every problem rather than stopping at the first:
1. serve_config.yaml against Ray Serve's own schema (`ServeDeploySchema`);
2. each `app.builder:build_app` application's args and the model configs they name;
3. `user_config` overrides in `deployments:` (the Router's traffic split, each version's
   hyperparameters/batching/faults) and that every override names a real deployment;
4. unless told not to, each version's artifact: checksum, load, and one smoke inference whose
   outputs must match what the adapter declares.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from app.adapters import adapter_class
from app.config import (
    CONTROLLER_DEPLOYMENT,
    ROUTER_DEPLOYMENT,
    ModelConfig,
    ModelUserConfig,
    TrafficConfig,
    format_validation_error,
    load_app_args,
    load_version_args,
    load_yaml,
    version_app_name,
)
from app.errors import ArtifactError, ConfigError
from app.serving.artifacts import resolve_artifact, verify_artifact

__all__ = ["Report", "is_waves_file", "smoke_test", "validate_serve_config", "validate_waves"]

BUILDER = "app.builder:build_app"
VERSION_BUILDER = "app.builder:build_version"


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def is_waves_file(path: Path) -> bool:
    """A waves file (configs/waves/*.yaml, or any YAML mapping with `waves:`), not a serve
    config: `rollout validate` checks it with `validate_waves`."""
    if path.parent.name == "waves":
        return True
    try:
        data = load_yaml(path)
    except ConfigError:
        return False
    return isinstance(data, dict) and "waves" in data and "applications" not in data


def validate_waves(path: Path, root: Path | None = None) -> Report:
    """A waves file: its schema, then each region against configs/regions/ (an overlay with an
    `admin:` block) and each plan against configs/rollouts/ (a valid plan)."""
    from app.ops.waves import load_waves, resolve_waves

    report = Report()
    try:
        spec = load_waves(path)
        targets = resolve_waves(spec, root, where=str(path))
    except ConfigError as exc:
        report.errors.extend(str(exc).splitlines())
        return report
    for i, wave in enumerate(spec.waves):
        regions = ", ".join(
            f"{t.region} ({t.plan_file}, plan {t.plan_digest})" for t in targets if t.wave == i
        )
        report.notes.append(f"wave {i + 1}: {regions}; bake {wave.bake_s:g}s")
    report.notes.append(f"on_failure: {spec.on_failure}")
    return report


def smoke_test(
    config: ModelConfig, hyperparameters: dict[str, Any] | None = None, weights: Any = None
) -> str:
    """Verify, load and run one example through a version (with the weights a user_config
    patch names, if any); return a one-line summary."""
    started = time.perf_counter()
    artifact, sha256 = (
        (weights.artifact, weights.sha256) if weights else (config.artifact, config.sha256)
    )
    directory = resolve_artifact(artifact, config.base_dir())
    verify_artifact(directory, sha256)
    cls = adapter_class(config.adapter)
    params = cls.parse_hyperparameters(
        config.hyperparameters if hyperparameters is None else hyperparameters
    )
    adapter = cls(directory, params, threads=config.resources.threads())
    loaded = time.perf_counter()
    adapter.max_tokens = config.limits.max_tokens
    (result,) = adapter.predict([adapter.example()], [{}])
    if isinstance(result, Exception):
        raise ArtifactError(f"smoke inference refused the adapter's own example: {result}")
    for spec in cls.outputs:
        if spec.name not in result:
            raise ArtifactError(f"smoke inference returned no output {spec.name!r}")
        if result[spec.name].ndim != len(spec.shape):
            raise ArtifactError(
                f"smoke inference output {spec.name!r} has shape {list(result[spec.name].shape)}, "
                f"declared {list(spec.shape)}"
            )
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in result.items())
    return (
        f"loaded in {loaded - started:.2f}s, smoke inference ok in "
        f"{time.perf_counter() - loaded:.2f}s ({shapes})"
    )


def validate_serve_config(
    path: Path,
    *,
    load_models: bool = True,
    progress: Callable[[str], None] = lambda _: None,
    overlay: Path | None = None,
) -> Report:
    """Check `path`, or with `overlay` (configs/regions/<region>.yaml) the region's config:
    the overlay merged onto `path`, checked like any serve config, then every replica against
    the node types of the overlay's cluster launcher files (app/ops/placement.py)."""
    report = Report()
    region = None
    try:
        document = load_yaml(path)
        if overlay is not None:
            from app.ops.overlay import load_overlay, render

            region = load_overlay(overlay)
            document = render(document, region)
    except ConfigError as exc:
        report.errors.append(str(exc))
        return report
    if region is not None:
        path = f"{path} + {overlay}"  # type: ignore[assignment]  # errors name both files; fields are of the merged config
    from ray.serve.schema import (
        ServeDeploySchema,  # Ray's own schema; importing starts nothing
    )

    try:
        ServeDeploySchema.model_validate(document)
    except ValidationError as exc:
        report.errors.append(format_validation_error(exc, str(path)))
        return report
    # Serve ignores unknown top-level keys and checks route prefixes only at deploy time.
    for key in sorted(set(document) - set(ServeDeploySchema.model_fields)):
        report.errors.append(
            f"{path}: {key}: not a serve config field ({', '.join(sorted(ServeDeploySchema.model_fields))})"
        )
    for index, application in enumerate(document["applications"]):
        prefix = application.get("route_prefix")
        if prefix is not None and not str(prefix).startswith("/"):
            report.errors.append(
                f"{path}: applications[{index}].route_prefix: {prefix!r} must start with '/'"
            )
    # Version apps first: a router app in version_apps mode routes to the ones in this file.
    version_apps: dict[str, list[ModelConfig]] = {}
    for index, application in enumerate(document["applications"]):
        if application.get("import_path") == VERSION_BUILDER:
            where = f"{path}: applications[{index}]"
            config = _validate_version_app(application, where, report, load_models, progress)
            if config is not None:
                version_apps.setdefault(config.name, []).append(config)
    for index, application in enumerate(document["applications"]):
        where = f"{path}: applications[{index}]"
        if application.get("import_path") == VERSION_BUILDER:
            continue
        if application.get("import_path") != BUILDER:
            report.notes.append(
                f"{where}: import_path is not {BUILDER}; only Serve's schema checked"
            )
            continue
        _validate_application(application, where, report, load_models, progress, version_apps,
                              proxy_timeout_s=(document.get("http_options") or {}).get(
                                  "request_timeout_s"))  # fmt: skip
    if region is not None and report.ok:
        _validate_region_clusters(document, region, report)
    return report


def _validate_region_clusters(document: dict[str, Any], region: Any, report: Report) -> None:
    """Each launcher file the region names: Ray's schema, then whether every replica fits."""
    from app.config import project_root
    from app.ops.placement import (
        check_fit,
        launcher_errors,
        load_launcher,
        replica_demands,
    )

    demands = replica_demands(document)
    for name in region.clusters:
        cluster_path = project_root() / name
        try:
            launcher = load_launcher(cluster_path)
        except ConfigError as exc:
            report.errors.append(f"{region.source}: clusters: {exc}")
            continue
        errors = launcher_errors(launcher, name)
        report.errors += errors
        if errors:
            continue
        fit = check_fit(demands, launcher, name)
        report.errors += fit.errors
        report.notes += fit.notes


def _validate_version_app(
    application: dict[str, Any],
    where: str,
    report: Report,
    load_models: bool,
    progress: Callable[[str], None],
) -> ModelConfig | None:
    """An `app.builder:build_version` application: its args and model config, its name
    (`<model>-<version>`), no HTTP route, its user_config override, then load + smoke test."""
    try:
        _, config = load_version_args(application.get("args") or {})
    except ConfigError as exc:
        for line in str(exc).splitlines():
            report.errors.append(f"{where}.{line}" if line.startswith("args") else line)
        return None
    expected = version_app_name(config.name, config.version)
    if application.get("name") != expected:
        report.errors.append(
            f"{where}.name: {application.get('name')!r} must be {expected!r} (<model>-<version>): "
            "the router finds a version's application by that name"
        )
    if application.get("route_prefix") is not None:
        report.errors.append(
            f"{where}.route_prefix: {application.get('route_prefix')!r} must be null: a version "
            "is reached through its model's router, never directly"
        )
    update = None
    for i, deployment in enumerate(application.get("deployments") or []):
        field_path = f"{where}.deployments[{i}]"
        if deployment.get("name") != config.deployment_name:
            report.errors.append(
                f"{field_path}.name: {deployment.get('name')!r} is not a deployment of this app; "
                f"deployments: [{config.deployment_name!r}]"
            )
            continue
        if "user_config" in deployment:
            update = _check_version_user_config(
                deployment["user_config"], config, f"{field_path}.user_config", report
            )
    if load_models:
        _smoke(config, update, where, report, progress)
    return config


def _check_version_user_config(
    user_config: Any, config: ModelConfig, where: str, report: Report
) -> ModelUserConfig | None:
    try:
        update = ModelUserConfig.model_validate(user_config)
    except ValidationError as exc:
        report.errors.append(format_validation_error(exc, where))
        return None
    try:
        adapter_class(config.adapter).parse_hyperparameters(update.hyperparameters)
    except ValidationError as exc:
        report.errors.append(format_validation_error(exc, f"{where}.hyperparameters"))
        return None
    return update


def _smoke(config: ModelConfig, update: ModelUserConfig | None, where: str, report: Report,
           progress: Callable[[str], None]) -> None:  # fmt: skip
    """Load the version (with the weights its user_config names, if any) and run its example."""
    weights = update.weights if update is not None else None
    label = (
        f"{where}: {config.deployment_name}.user_config.weights"
        if weights
        else f"{config.source}: artifact"
    )
    progress(
        f"loading {config.deployment_name} from {weights.artifact if weights else config.artifact} ..."
    )
    try:
        hyperparameters = update.hyperparameters if update is not None else None
        summary = smoke_test(config, hyperparameters, weights)
    except (ArtifactError, ValueError, OSError) as exc:
        report.errors.append(f"{label}: {exc}")
        return
    except Exception as exc:  # a model that cannot load or run is a config error here
        report.errors.append(
            f"{config.source}: smoke inference failed: {type(exc).__name__}: {exc}"
        )
        return
    report.notes.append(f"{config.deployment_name}: {summary}")


def _validate_application(
    application: dict[str, Any],
    where: str,
    report: Report,
    load_models: bool,
    progress: Callable[[str], None],
    version_apps: dict[str, list[ModelConfig]] | None = None,
    *,
    proxy_timeout_s: float | None = None,
) -> None:
    try:
        args, configs = load_app_args(application.get("args") or {})
    except ConfigError as exc:
        for line in str(exc).splitlines():
            report.errors.append(f"{where}.{line}" if line.startswith("args") else line)
        return
    by_name = {c.deployment_name: c for c in configs}
    versions = [c.version for c in configs]
    if args.version_apps:
        versions = [c.version for c in (version_apps or {}).get(args.model, [])]
        if not versions:
            report.errors.append(
                f"{where}.args.version_apps: no application in this file runs a version of "
                f"{args.model!r} (import_path {VERSION_BUILDER}, name {args.model}-<version>)"
            )
        declared = {
            d.get("name") for d in application.get("deployments") or [] if "user_config" in d
        }
        if ROUTER_DEPLOYMENT not in declared:
            report.errors.append(
                f"{where}.deployments: the Router needs a user_config (stable, weights) with "
                "version_apps: there is no default version to send traffic to"
            )
    overrides: dict[str, ModelUserConfig] = {}
    for i, deployment in enumerate(application.get("deployments") or []):
        name = deployment.get("name")
        field_path = f"{where}.deployments[{i}]"
        if name not in (ROUTER_DEPLOYMENT, CONTROLLER_DEPLOYMENT) and name not in by_name:
            report.errors.append(
                f"{field_path}.name: {name!r} is not a deployment of this app; "
                f"deployments: {[ROUTER_DEPLOYMENT, CONTROLLER_DEPLOYMENT, *by_name]}"
            )
            continue
        if "user_config" not in deployment:
            continue
        user_config = deployment["user_config"]
        if name == CONTROLLER_DEPLOYMENT:
            _validate_plan(user_config, versions, f"{field_path}.user_config", report)
        elif name == ROUTER_DEPLOYMENT:
            try:
                table = TrafficConfig.model_validate(user_config)
                table.check_versions(versions)
                _check_proxy_timeout(table, proxy_timeout_s, f"{field_path}.user_config", report)
            except ValidationError as exc:
                report.errors.append(format_validation_error(exc, f"{field_path}.user_config"))
            except ValueError as exc:
                report.errors.append(f"{field_path}.user_config.weights: {exc}")
        else:
            update = _check_version_user_config(
                user_config, by_name[name], f"{field_path}.user_config", report
            )
            if update is not None:
                overrides[name] = update
    if not load_models:
        return
    for config in configs:
        _smoke(config, overrides.get(config.deployment_name), where, report, progress)


def _check_proxy_timeout(
    table: TrafficConfig, proxy_timeout_s: float | None, where: str, report: Report
) -> None:
    """The proxy's deadline (http_options.request_timeout_s) must leave the router its own: a
    proxy that gives up first answers 408 before the router's fallback or its 504 can."""
    if proxy_timeout_s is None:
        report.notes.append(
            f"{where}.request_timeout_s: http_options.request_timeout_s is not set, so the "
            "proxies queue requests without a deadline; set it a little above "
            f"{table.request_timeout_s:g}s"
        )
    elif proxy_timeout_s < table.request_timeout_s:
        report.errors.append(
            f"{where}.request_timeout_s: {table.request_timeout_s:g}s is longer than "
            f"http_options.request_timeout_s ({proxy_timeout_s:g}s): the proxy would cut every "
            "slow request off before the router's fallback or deadline answers"
        )


def _validate_plan(user_config: Any, versions: list[str], where: str, report: Report) -> None:
    """The RolloutController's user_config (`ControllerUserConfig`: plan, tick_interval_s,
    prometheus_url, feedback), checked by the same model the controller uses."""
    from app.rollout.plan import ControllerUserConfig, RolloutPlan

    if not isinstance(user_config, dict):
        report.errors.append(f"{where}: must be a mapping with a 'plan' key")
        return
    try:
        plan = ControllerUserConfig.model_validate(user_config).plan
    except ValidationError as exc:
        problems = exc.errors()
        for item in problems:
            loc = ".".join(str(part) for part in item["loc"])
            report.errors.append(f"{where}.{loc}: {item['msg'].removeprefix('Value error, ')}")
        plan_ok = not any(item["loc"][:1] == ("plan",) for item in problems)
        raw = user_config.get("plan")
        plan = RolloutPlan.model_validate(raw) if plan_ok and raw is not None else None
    if plan is None:
        return
    stage = plan.load_stage
    if stage is not None and not Path(stage.sample).is_dir():
        # A note, not an error: the controller reads the sample on its own node, which need
        # not be the machine that validates.
        report.notes.append(
            f"{where}.plan.load_stage.sample: {stage.sample!r} is not a directory here; the "
            "controller must find the sample there on its node, or the load stage rolls back"
        )
    for field_name in ("candidate", "stable"):
        version = getattr(plan, field_name)
        if version not in versions:
            report.errors.append(
                f"{where}.plan.{field_name}: {version!r} is not deployed; versions: {versions}"
            )
