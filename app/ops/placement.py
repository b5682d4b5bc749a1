"""Will the replicas fit? A serve config's replica demands against a cluster launcher file.

Offline, before `ray up` or `serve deploy`: each deployment's replica resources (what Ray will
ask for: CPU, GPU, memory, custom resources, and the `region` label selector of a region
overlay) are matched against the node types a launcher file declares (`available_node_types`,
their `resources` and `labels`).

Two questions, two answers:
1. *Fits somewhere*: every replica fits at least one node type whose labels satisfy its
   selector. A `num_gpus: 1` version in a cluster without GPU workers is an error here,
   because Ray would leave it pending forever.
2. *Fits at max scale*: every deployment at its max replicas packs (first fit, biggest first)
   into the head plus every worker type at its `max_workers` (capped by the global
   `max_workers`). An error: the autoscaler could never reach max_replicas. The same packing
   at min replicas into the head plus `min_workers` nodes only makes a note: the autoscaler
   adds nodes, the app just takes longer to become ready.

Launcher files are first checked by Ray's own code: `ray-schema.json` from the installed
package (every violation, with its path) and then `prepare_config` + `validate_config`, which
`ray up` runs; neither talks to a cloud.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.config import CONTROLLER_DEPLOYMENT, ROUTER_DEPLOYMENT, load_yaml
from app.errors import ConfigError

__all__ = [
    "Demand",
    "FitReport",
    "NodeType",
    "check_fit",
    "launcher_errors",
    "load_launcher",
    "node_types",
    "replica_demands",
    "rolling_headroom",
]

BUILDER = "app.builder:build_app"
VERSION_BUILDER = "app.builder:build_version"
MIB = 1024 * 1024


@dataclass(frozen=True)
class NodeType:
    """One `available_node_types` entry: what one node of it offers."""

    name: str
    resources: dict[str, float]
    labels: dict[str, str]
    min_workers: int
    max_workers: int
    head: bool = False

    def label_mismatch(self, selector: dict[str, str] | None) -> str | None:
        """Why this type's labels fail a label_selector (equality only, as ours use)."""
        for key, value in (selector or {}).items():
            if self.labels.get(key) != value:
                return f"label {key}={self.labels.get(key)!r}, needs {value!r}"
        return None

    def missing(self, demand: Demand) -> str | None:
        """Why one replica of `demand` cannot run on an empty node of this type (None: it can)."""
        if reason := self.label_mismatch(demand.selector):
            return reason
        for resource, amount in demand.resources.items():
            if amount > self.resources.get(resource, 0) + 1e-9:
                return f"{resource} {_fmt(resource, self.resources.get(resource, 0))} < {_fmt(resource, amount)}"
        return None


@dataclass(frozen=True)
class Demand:
    """One deployment's replicas: per-replica resources, selector, min and max count."""

    app: str
    deployment: str
    resources: dict[str, float]
    selector: dict[str, str] | None
    min_replicas: int
    max_replicas: int

    def describe(self) -> str:
        parts = [f"{k} {_fmt(k, v)}" for k, v in self.resources.items() if v]
        parts += [f"{k}={v}" for k, v in (self.selector or {}).items()]
        return f"{self.app}/{self.deployment} ({', '.join(parts) or 'no resources'})"


@dataclass
class FitReport:
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _fmt(resource: str, amount: float) -> str:
    if resource == "memory":
        return f"{amount / MIB:g} MiB"
    return f"{amount:g}"


# ----------------------------------------------------------------------------- launcher files


def load_launcher(path: Path | str) -> dict[str, Any]:
    data = load_yaml(Path(path))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a cluster launcher file must be a mapping")
    return data


def launcher_errors(config: dict[str, Any], where: str) -> list[str]:
    """Problems Ray itself would find: every ray-schema.json violation (with its path), then
    what `ray up`'s `prepare_config` + `validate_config` refuse (they need no cloud access)."""
    import jsonschema
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    errors = []
    for error in sorted(
        jsonschema.Draft7Validator(schema).iter_errors(config), key=lambda e: list(e.absolute_path)
    ):
        location = ".".join(str(p) for p in error.absolute_path) or "(root)"
        errors.append(f"{where}: {location}: {error.message} (ray-schema.json)")
    if errors:
        return errors
    import logging

    from app import ray_compat

    prepare_config, validate_config = ray_compat.autoscaler_config_checks()

    util_logger = logging.getLogger("ray.autoscaler._private.util")
    level = util_logger.level
    util_logger.setLevel(logging.WARNING)  # its INFO lines are about filling defaults
    try:
        validate_config(prepare_config(config))
    except (Exception, SystemExit) as exc:  # cli_logger.abort raises a click exception
        errors.append(f"{where}: rejected by Ray's prepare_config/validate_config: {exc}")
    finally:
        util_logger.setLevel(level)
    return errors


def node_types(config: dict[str, Any]) -> list[NodeType]:
    """The node types of a launcher file, with what they declare. A type that declares no
    `resources` (the local provider detects them on the machine) offers nothing we can check."""
    head = config.get("head_node_type")
    global_max = config.get("max_workers")
    types = []
    for name, spec in (config.get("available_node_types") or {}).items():
        max_workers = spec.get("max_workers", global_max if global_max is not None else 0)
        if global_max is not None:
            max_workers = min(max_workers, global_max)
        types.append(
            NodeType(
                name=name,
                resources={k: float(v) for k, v in (spec.get("resources") or {}).items()},
                labels=dict(spec.get("labels") or {}),
                min_workers=spec.get("min_workers", 0),
                max_workers=max_workers,
                head=name == head,
            )
        )
    return types


# ----------------------------------------------------------------------------- replica demands


def _actor_demand(options: dict[str, Any]) -> dict[str, float]:
    """Ray resources of a replica actor with these ray_actor_options (Serve's default: 1 CPU)."""
    cpus = options.get("num_cpus")
    resources = {
        "CPU": float(1 if cpus is None else cpus),
        "GPU": float(options.get("num_gpus") or 0),
    }
    if options.get("memory"):
        resources["memory"] = float(options["memory"])
    for name, amount in (options.get("resources") or {}).items():
        resources[name] = float(amount)
    return resources


def _demands_for_app(application: dict[str, Any]) -> list[Demand]:
    from app.config import load_app_args

    args, configs = load_app_args(application.get("args") or {})
    from deployments.controller import (
        RolloutController,  # its decorator holds its options
    )

    controller_options = dict(RolloutController.ray_actor_options or {})  # type: ignore[attr-defined]  # @serve.deployment returns a Deployment; stubs keep the class
    router_options: dict[str, Any] = {"num_cpus": args.router_num_cpus}
    if args.router_memory_mb is not None:
        router_options["memory"] = args.router_memory_mb * MIB
    base: dict[str, tuple[dict[str, Any], int, int]] = {
        ROUTER_DEPLOYMENT: (router_options, args.router_replicas, args.router_replicas),
        CONTROLLER_DEPLOYMENT: (controller_options, 1, 1),
    }
    for config in configs:
        base[config.deployment_name] = (
            config.resources.ray_actor_options(),
            config.autoscaling.min_replicas,
            config.autoscaling.max_replicas,
        )
    return _with_overrides(application, base, args.label_selector())


def _demands_for_version_app(application: dict[str, Any]) -> list[Demand]:
    """One version as an application of its own (`app.builder:build_version`)."""
    from app.config import load_version_args

    args, config = load_version_args(application.get("args") or {})
    base = {
        config.deployment_name: (
            config.resources.ray_actor_options(),
            config.autoscaling.min_replicas,
            config.autoscaling.max_replicas,
        )
    }
    return _with_overrides(application, base, args.label_selector())


def _with_overrides(
    application: dict[str, Any],
    base: dict[str, tuple[dict[str, Any], int, int]],
    selector: dict[str, str] | None,
) -> list[Demand]:
    """The builder's options for each deployment, then the config's overrides, as Serve
    applies them."""
    app_name = application.get("name", "default")
    overrides = {
        d.get("name"): d for d in application.get("deployments") or [] if isinstance(d, dict)
    }
    demands = []
    for name, (options, low, high) in base.items():
        override = overrides.get(name, {})
        if isinstance(override.get("ray_actor_options"), dict):
            options = override["ray_actor_options"]  # Serve replaces the code's dict whole
            this_selector = options.get("label_selector") or None
        else:
            this_selector = selector
        # A version's replica count comes from the builder's autoscaling_config; with Ray 2.60 a
        # config `num_replicas` did not override it (seen in tests/multinode), so only the
        # fixed-size deployments (Router, RolloutController) take it.
        if isinstance(override.get("num_replicas"), int) and name in (
            ROUTER_DEPLOYMENT,
            CONTROLLER_DEPLOYMENT,
        ):
            low = high = override["num_replicas"]
        scaling = override.get("autoscaling_config")
        if isinstance(scaling, dict):
            low = scaling.get("min_replicas", low)
            high = scaling.get("max_replicas", high)
        demands.append(Demand(app_name, name, _actor_demand(options), this_selector, low, high))
    return demands


def replica_demands(document: dict[str, Any]) -> list[Demand]:
    """What every deployment of every `app.builder:build_app` and `app.builder:build_version`
    application asks Ray for, as Serve will build it: the builder's options, then the config's
    per-deployment overrides (`ray_actor_options` replaces the whole dict, as Serve does;
    `autoscaling_config` sets a version's counts, `num_replicas` the router's). Raises
    ConfigError when args are invalid."""
    demands: list[Demand] = []
    for application in document.get("applications") or []:
        if not isinstance(application, dict):
            continue
        if application.get("import_path") == BUILDER:
            demands += _demands_for_app(application)
        elif application.get("import_path") == VERSION_BUILDER:
            demands += _demands_for_version_app(application)
    return demands


def rolling_headroom(demand: Demand) -> int:
    """Extra replicas of `demand` alive at once while Serve replaces it (a code, artifact or
    resources change): up to `rollout_size` old replicas still stopping while as many new ones
    start, rollout_size = max(1, int(20% of the target)) in Ray 2.60
    (deployment_state._rollout_size)."""
    return max(1, int(0.2 * demand.max_replicas))


# ----------------------------------------------------------------------------- the fit


def _pack(replicas: list[Demand], nodes: list[tuple[NodeType, dict[str, float]]]) -> list[Demand]:
    """First-fit decreasing: place each replica on the first node with room (GPU-heavy first);
    return the replicas that found no room. `nodes` holds each node's free resources."""
    order = sorted(replicas, key=lambda d: (-d.resources.get("GPU", 0), -d.resources.get("CPU", 0)))
    unplaced = []
    for demand in order:
        for node_type, free in nodes:
            if node_type.label_mismatch(demand.selector):
                continue
            if all(free.get(k, 0) + 1e-9 >= v for k, v in demand.resources.items()):
                for k, v in demand.resources.items():
                    free[k] = free.get(k, 0) - v
                break
        else:
            unplaced.append(demand)
    return unplaced


def _instances(types: list[NodeType], count: str) -> list[tuple[NodeType, dict[str, float]]]:
    nodes = []
    for node_type in sorted(types, key=lambda t: not t.head):
        n = 1 if node_type.head else getattr(node_type, count)
        nodes += [(node_type, dict(node_type.resources)) for _ in range(n)]
    return nodes


def check_fit(demands: list[Demand], config: dict[str, Any], where: str) -> FitReport:
    """Do `demands` fit the launcher file `config`? (See the module docstring.)"""
    report = FitReport()
    types = node_types(config)
    if not any(t.resources for t in types):
        report.notes.append(
            f"{where}: no node type declares resources (detected on the machines at `ray start`); "
            "replica fit not checked"
        )
        return report
    for demand in demands:
        reasons = {t.name: t.missing(demand) for t in types}
        if all(reasons.values()):
            why = "; ".join(f"{name}: {reason}" for name, reason in reasons.items())
            report.errors.append(f"{where}: {demand.describe()} fits no node type ({why})")
    if report.errors:
        return report
    at_max = [d for d in demands for _ in range(d.max_replicas)]
    unplaced = _pack(at_max, _instances(types, "max_workers"))
    if unplaced:
        names = sorted({d.deployment for d in unplaced})
        report.errors.append(
            f"{where}: at max_replicas, {len(unplaced)} of {len(at_max)} replicas do not fit even "
            f"with every node type at max_workers ({', '.join(names)}); raise max_workers or "
            "lower max_replicas"
        )
        return report
    # A rolling update of any one deployment at max scale needs room for its extra replicas.
    for demand in demands:
        extra = rolling_headroom(demand)
        if _pack(at_max + [demand] * extra, _instances(types, "max_workers")):
            report.errors.append(
                f"{where}: a rolling update of {demand.app}/{demand.deployment} at max_replicas "
                f"needs room for {extra} more of its replicas (old ones stop while new ones "
                "start), and there is none with every node type at max_workers; raise "
                "max_workers or lower max_replicas"
            )
    if report.errors:
        return report
    at_min = [d for d in demands for _ in range(d.min_replicas)]
    if _pack(at_min, _instances(types, "min_workers")):
        report.notes.append(
            f"{where}: min_replicas do not fit the head plus min_workers nodes; the autoscaler "
            "adds nodes before the app is ready"
        )
    gpu = [t.name for t in types if t.resources.get("GPU", 0) > 0]
    report.notes.append(
        f"{where}: {len(at_max)} replicas at max scale fit, with room for a rolling update of "
        f"any one deployment; GPU node types: {gpu or 'none'}"
    )
    return report
