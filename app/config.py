"""Config schemas: a model version's config file, the app's builder args, and the traffic split.

Three layers, each with its own update speed:

* `ModelConfig` (`configs/models/<model>/<version>.yaml`): what a version *is*: artifact,
  checksum, adapter, resources, autoscaling. Read once when Serve builds the application.
* `ModelUserConfig`: the hot-patchable part of a version (hyperparameters, batching, faults).
  Serve applies it in place through `reconfigure` when a `serve deploy` changes it.
* `TrafficConfig`: the Router's `user_config` (weights per version, the stable version), also
  applied in place.

Every model is `extra="forbid"`, so a typo in a field name is an error that names the field.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from app.access_log import AccessLogSettings
from app.breaker import BreakerSettings
from app.cache import CacheSettings
from app.drift import DriftSettings
from app.errors import ConfigError

__all__ = [
    "AppArgs",
    "Autoscaling",
    "Batching",
    "FaultInjection",
    "ModelConfig",
    "ModelUserConfig",
    "Resources",
    "RouterSettings",
    "ShadowRule",
    "TrafficConfig",
    "config_hash",
    "format_validation_error",
    "load_model_config",
    "load_yaml",
    "project_root",
]

NAME_PATTERN = r"^[a-z0-9]([a-z0-9_.-]{0,62}[a-z0-9])?$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
ROUTER_DEPLOYMENT = "Router"
CONTROLLER_DEPLOYMENT = "RolloutController"
# The Ray node label a region overlay pins replicas to (cluster/*.yaml label every node type).
REGION_LABEL = "region"
# A Kubernetes-style label value, as Ray's label_selector accepts it.
LABEL_VALUE_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(_Strict):
    """Ray resources for each replica of a version."""

    num_cpus: float = Field(default=1.0, ge=0, description="Logical CPUs per replica.")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per replica (fractions allowed).")
    memory_mb: int | None = Field(
        default=None, ge=1, description="Memory reserved per replica, in MiB (Ray's `memory`)."
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="torch intra-op threads per replica; default: ceil(num_cpus), at least 1.",
    )

    def ray_actor_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory_mb is not None:
            options["memory"] = self.memory_mb * 1024 * 1024
        return options

    def threads(self) -> int:
        return self.torch_threads or max(1, math.ceil(self.num_cpus))


class Autoscaling(_Strict):
    """Serve autoscaling bounds for a version's replicas."""

    min_replicas: int = Field(default=1, ge=0, description="Replicas kept even when idle.")
    max_replicas: int = Field(default=1, ge=1, description="Upper bound on replicas.")
    target_ongoing_requests: float = Field(
        default=2.0, gt=0, description="Ongoing requests per replica the autoscaler aims for."
    )

    @model_validator(mode="after")
    def _max_at_least_min(self) -> Autoscaling:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) must be greater than or equal to "
                f"min_replicas ({self.min_replicas})"
            )
        return self

    def serve_config(self) -> dict[str, Any]:
        return {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
        }


class Batching(_Strict):
    """Dynamic batching inside each replica (app/batching.py: a batch forms when the model is
    free); hot-patchable."""

    max_batch_size: int = Field(default=16, ge=1, le=1024, description="Requests per batch.")
    batch_wait_timeout_s: float = Field(
        default=0.005, ge=0, le=10, description="Longest wait for a batch to fill, in seconds."
    )


class FaultInjection(_Strict):
    """Faults injected on purpose, like a service mesh's, to rehearse rollbacks; hot-patchable."""

    error_rate: float = Field(
        default=0.0, ge=0, le=1, description="Fraction of requests that fail with a 500."
    )
    added_latency_ms: float = Field(
        default=0.0, ge=0, le=600_000, description="Latency added to delayed requests, in ms."
    )
    latency_rate: float = Field(
        default=1.0, ge=0, le=1, description="Fraction of requests that get added_latency_ms."
    )


def _check_digests(value: str | dict[str, str]) -> str | dict[str, str]:
    import re

    digests = value.values() if isinstance(value, dict) else [value]
    if isinstance(value, dict) and not value:
        raise ValueError("sha256 mapping must name at least one weights file")
    for digest in digests:
        if not re.fullmatch(SHA256_PATTERN, digest):
            raise ValueError(f"{digest!r} is not a lowercase hex sha256 (64 characters)")
    return value


class WeightsPatch(_Strict):
    """New weights for a running version: loaded beside the old ones, checked, smoke-tested,
    then swapped in at once. Anything wrong and the old weights keep serving."""

    artifact: str = Field(
        min_length=1,
        description="Model directory (relative to the model config's folder) or package:<module>.",
    )
    sha256: str | dict[str, str] = Field(
        description="sha256 of the weights file, or a mapping file -> sha256, as in a model config."
    )

    @field_validator("sha256")
    @classmethod
    def _hex_digests(cls, value: str | dict[str, str]) -> str | dict[str, str]:
        return _check_digests(value)


class ModelUserConfig(_Strict):
    """The part of a version that Serve changes in place (`user_config` -> `reconfigure`)."""

    hyperparameters: dict[str, Any] = Field(
        default_factory=dict, description="Adapter hyperparameters; checked by the adapter."
    )
    batching: Batching = Field(default_factory=Batching)
    faults: FaultInjection = Field(default_factory=FaultInjection)
    weights: WeightsPatch | None = Field(
        default=None,
        description="Hot-swap the weights (null: the model config's own artifact and sha256).",
    )


class ModelConfig(_Strict):
    """One model version: `configs/models/<name>/<version>.yaml`."""

    name: str = Field(pattern=NAME_PATTERN, description="Model name, as in /v2/models/<name>.")
    version: str = Field(pattern=NAME_PATTERN, description="Version label, e.g. v1.")
    artifact: str = Field(
        min_length=1,
        description=(
            "Model directory (save_pretrained or sentence-transformers layout). Relative paths are "
            "resolved from the config file's folder; `package:<module>` uses a Python package "
            "that ships its model (its get_model_path())."
        ),
    )
    sha256: str | dict[str, str] = Field(
        description=(
            "sha256 of the weights file, or a mapping from each weights file (relative path) to its "
            "sha256. Checked when a replica loads. `rollout checksum <dir>` prints it."
        )
    )
    adapter: str = Field(
        min_length=1,
        description="Adapter (task): a registered name such as `recommender`, or `module:Class`.",
    )
    description: str = Field(default="", description="Free text shown in model metadata.")
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    max_ongoing_requests: int = Field(
        default=32, ge=1, le=10_000, description="Requests a replica works on at once."
    )
    max_queued_requests: int = Field(
        default=-1,
        ge=-1,
        description="Requests each caller may queue for this version (-1: unbounded).",
    )
    batching: Batching = Field(default_factory=Batching)
    faults: FaultInjection = Field(default_factory=FaultInjection)
    cacheable: bool = Field(
        default=True,
        description="Whether the router may cache this version's responses (when its cache is on).",
    )
    health_check_period_s: float = Field(default=10.0, gt=0)
    health_check_timeout_s: float = Field(default=30.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(default=20.0, ge=0)

    # Where the file was read from; used to resolve a relative artifact path. Not a YAML field.
    source: str | None = Field(default=None, exclude=True, repr=False)

    @field_validator("sha256")
    @classmethod
    def _hex_digests(cls, value: str | dict[str, str]) -> str | dict[str, str]:
        return _check_digests(value)

    @model_validator(mode="after")
    def _batch_fits_in_flight(self) -> ModelConfig:
        if self.max_ongoing_requests < self.batching.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be greater than or equal "
                f"to batching.max_batch_size ({self.batching.max_batch_size}), or batches never fill"
            )
        return self

    @property
    def deployment_name(self) -> str:
        return f"{self.name}-{self.version}"

    def user_config(self) -> ModelUserConfig:
        return ModelUserConfig(
            hyperparameters=self.hyperparameters, batching=self.batching, faults=self.faults
        )

    def base_dir(self) -> Path:
        return Path(self.source).resolve().parent if self.source else Path.cwd()


class RouterSettings(_Strict):
    """Router knobs fixed at build time (builder args)."""

    routing_key_header: str = Field(
        default="x-user-id", min_length=1, description="Header that carries the routing key."
    )
    pin_header: str = Field(
        default="x-model-version", min_length=1, description="Header that pins a version."
    )
    max_body_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 above)."
    )
    routing_key_parameter: str = Field(
        default="user_id", min_length=1,
        description="Request parameter that carries the routing key when the header is absent.",
    )  # fmt: skip
    fallback_header: str = Field(
        default="x-allow-fallback", min_length=1,
        description="Header (value 'true') that lets a pinned request fall back.",
    )  # fmt: skip
    timeout_header: str = Field(
        default="x-request-timeout-s", min_length=1,
        description="Header with the client's deadline in seconds (capped by request_timeout_s).",
    )  # fmt: skip
    health_poll_interval_s: float = Field(
        default=1.0, gt=0, le=60, description="How often the router refreshes version health."
    )
    access_log: AccessLogSettings = Field(
        default_factory=AccessLogSettings,
        description="One structured log record per inference (app/access_log.py).",
    )
    drift: DriftSettings = Field(
        default_factory=DriftSettings,
        description="Output score drift per version against the stable version (app/drift.py).",
    )
    model_transport: Literal["grpc", "actor"] = Field(
        default="grpc",
        description="How the Router calls model replicas: 'grpc' (Serve's inter-deployment gRPC "
        "server that every replica runs; handle option _by_reference=False) or 'actor' (Ray "
        "actor calls, Serve's default). bench/throughput.py measures both.",
    )


class ShadowRule(_Strict):
    """Mirror a sample of requests to a version, fire-and-forget, to compare it with primary."""

    version: str = Field(pattern=NAME_PATTERN, description="The version that gets the copies.")
    percent: float = Field(ge=0, le=100, description="Percent of requests mirrored.")
    max_in_flight: int = Field(
        default=4, ge=1, le=1024, description="Mirrored requests at once per router; more are dropped."
    )


class TrafficConfig(_Strict):
    """The Router's `user_config`: traffic split and per-request protection, changed in place.

    Everything here is hot-patchable: a `serve deploy` that changes it reaches every router
    replica through `reconfigure`, without a restart."""

    stable: str = Field(pattern=NAME_PATTERN, description="The version that serves by default.")
    weights: dict[str, float] = Field(
        description="Percent of unpinned traffic per version; must sum to 100."
    )
    fallbacks: dict[str, str | None] = Field(
        default_factory=dict,
        description=(
            "Version -> the version that retries its failed requests; default: the stable "
            "version. null: no fallback for that version."
        ),
    )
    shadow: ShadowRule | None = Field(default=None, description="Shadow traffic, if any.")
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    request_timeout_s: float = Field(
        default=30.0, gt=0, le=3600,
        description="Default end-to-end deadline per request (504); a client may ask for less "
        "with the x-request-timeout-s header.",
    )  # fmt: skip

    @field_validator("weights")
    @classmethod
    def _weights_valid(cls, weights: dict[str, float]) -> dict[str, float]:
        if not weights:
            raise ValueError("weights must name at least one version")
        for version, weight in weights.items():
            if not (0 <= weight <= 100) or math.isnan(weight):
                raise ValueError(f"weight of {version!r} ({weight}) must be between 0 and 100")
        total = sum(weights.values())
        if abs(total - 100.0) > 1e-6:
            raise ValueError(f"weights must sum to 100, got {total:g}")
        return weights

    @model_validator(mode="after")
    def _stable_is_weighted(self) -> TrafficConfig:
        if self.stable not in self.weights:
            raise ValueError(
                f"stable version {self.stable!r} must appear in weights ({sorted(self.weights)})"
            )
        return self

    @model_validator(mode="after")
    def _no_self_fallback(self) -> TrafficConfig:
        for version, fallback in self.fallbacks.items():
            if fallback == version:
                raise ValueError(f"fallbacks: {version!r} cannot fall back to itself")
        return self

    def fallback_for(self, version: str) -> str | None:
        """Where `version`'s failed requests retry; None if nowhere."""
        if version in self.fallbacks:
            return self.fallbacks[version]
        return None if version == self.stable else self.stable

    def versions_used(self) -> set[str]:
        """Every version this config sends traffic (or fallbacks, or shadow copies) to."""
        used = set(self.weights) | set(self.fallbacks) | {self.stable}
        used |= {v for v in self.fallbacks.values() if v is not None}
        if self.shadow is not None:
            used.add(self.shadow.version)
        return used

    def check_versions(self, known: set[str] | list[str]) -> None:
        """Raise ValueError naming any version this config uses that the app does not serve."""
        unknown = sorted(self.versions_used() - set(known))
        if unknown:
            raise ValueError(
                f"names versions that are not deployed: {unknown}; deployed: {sorted(known)}"
            )


class AppArgs(_Strict):
    """`args` of `import_path: app.builder:build_app` in serve_config.yaml."""

    model: str = Field(pattern=NAME_PATTERN, description="The model this application serves.")
    version_apps: bool = Field(
        default=False,
        description=(
            "Each version runs in a Serve application of its own, `<model>-<version>` "
            "(import_path app.builder:build_version); this app holds the Router and the "
            "RolloutController and finds versions by name from the Router's user_config. "
            "Adding, removing or redeploying a version then restarts nothing else."
        ),
    )
    versions: list[str] = Field(
        default_factory=list,
        description="Model config files, one per version; relative paths from config_root. "
        "Empty with version_apps.",
    )
    config_root: str | None = Field(
        default=None,
        description="Folder that relative paths start from; default: the project checkout.",
    )
    router: RouterSettings = Field(default_factory=RouterSettings)
    router_replicas: int = Field(default=1, ge=1, le=64, description="Router replicas.")
    router_num_cpus: float = Field(
        default=0.25, ge=0, description="Logical CPUs reserved per router replica."
    )
    router_max_ongoing_requests: int = Field(
        default=100,
        ge=1,
        le=10_000,
        description="Requests one router replica works on at once (Serve's default, 5, starves "
        "the model replicas behind it: the router mostly waits on them).",
    )
    region: str | None = Field(
        default=None,
        pattern=LABEL_VALUE_PATTERN,
        description=(
            "Region this app serves (set by a region overlay, configs/regions/<region>.yaml). "
            f"When set, every replica requires a node labelled {REGION_LABEL}=<region> (Ray "
            "label_selector); the cluster/ launcher files label every node type so."
        ),
    )
    version_resources: dict[str, Resources] = Field(
        default_factory=dict,
        description=(
            "Version -> replica resources that replace that version's model-config `resources` "
            "in this deployment (e.g. num_gpus: 1 in a region with GPU workers)."
        ),
    )

    @field_validator("versions")
    @classmethod
    def _versions_here_or_in_their_apps(cls, value: list[str], info) -> list[str]:
        version_apps = info.data.get("version_apps", False)
        if version_apps and value:
            raise ValueError(
                f"must be empty with version_apps: true, got {value}; each version is an "
                "application of its own (import_path app.builder:build_version)"
            )
        if not version_apps and not value:
            raise ValueError(
                "must name at least one model config file (or set version_apps: true and "
                "deploy each version as an application of its own)"
            )
        return value

    @model_validator(mode="after")
    def _no_version_resources_with_version_apps(self) -> AppArgs:
        if self.version_apps and self.version_resources:
            raise ValueError(
                "version_resources must be empty with version_apps: true; give each version "
                "app its own `resources`"
            )
        return self

    def resources_for(self, config: ModelConfig) -> Resources:
        """The replica resources `config`'s version gets in this app."""
        return self.version_resources.get(config.version, config.resources)

    def label_selector(self) -> dict[str, str] | None:
        """Ray's label_selector that pins every replica to this app's region (None: anywhere)."""
        return {REGION_LABEL: self.region} if self.region else None

    def root(self) -> Path:
        return Path(self.config_root).resolve() if self.config_root else project_root()

    def config_paths(self) -> list[Path]:
        root = self.root()
        return [p if p.is_absolute() else root / p for p in map(Path, self.versions)]

    def load_models(self) -> list[ModelConfig]:
        """Load every version's config; one ConfigError lists every problem, one per line."""
        configs, errors = self.load_models_collecting()
        if errors:
            raise ConfigError("\n".join(errors))
        return configs

    def load_models_collecting(self) -> tuple[list[ModelConfig], list[str]]:
        """The configs that load, and the problems found (also whether they agree with
        each other and with `model`)."""
        configs: list[ModelConfig] = []
        errors: list[str] = []
        for path in self.config_paths():
            try:
                configs.append(load_model_config(path))
            except ConfigError as exc:
                errors.append(str(exc))
        seen: dict[str, str] = {}
        for config in configs:
            if config.name != self.model:
                errors.append(
                    f"{config.source}: name: {config.name!r} does not match the app's model "
                    f"{self.model!r}"
                )
            if config.version in seen:
                errors.append(
                    f"{config.source}: version: {config.version!r} is also declared in "
                    f"{seen[config.version]}"
                )
            seen[config.version] = str(config.source)
        return configs, errors


class VersionAppArgs(_Strict):
    """`args` of `import_path: app.builder:build_version`: one model version, an application of
    its own named `<model>-<version>` (no HTTP route; the model's router app calls it)."""

    config: str = Field(min_length=1, description="The version's model config file.")
    config_root: str | None = Field(
        default=None, description="Folder a relative path starts from; default: the checkout."
    )
    region: str | None = Field(
        default=None, pattern=LABEL_VALUE_PATTERN,
        description=f"When set, every replica requires a node labelled {REGION_LABEL}=<region>.",
    )  # fmt: skip
    resources: Resources | None = Field(
        default=None, description="Replica resources that replace the model config's."
    )

    def path(self) -> Path:
        path = Path(self.config)
        root = Path(self.config_root).resolve() if self.config_root else project_root()
        return path if path.is_absolute() else root / path

    def load(self) -> ModelConfig:
        config = load_model_config(self.path())
        if self.resources is not None:
            config = config.model_copy(update={"resources": self.resources})
        return config

    def label_selector(self) -> dict[str, str] | None:
        return {REGION_LABEL: self.region} if self.region else None


def version_app_name(model: str, version: str) -> str:
    """The Serve application (and deployment) a version runs as in version_apps mode."""
    return f"{model}-{version}"


def config_hash(user_config: Any) -> str:
    """A short digest of a deployment's raw `user_config`, as Serve stores and delivers it.

    A replica stamps its answers with the digest of the user_config it runs; the router reads
    the digest of the target user_config from Serve. The cache serves an answer only while the
    two agree, so no answer from before a hot patch outlives it."""
    text = json.dumps(user_config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def project_root() -> Path:
    """The checkout that holds `configs/` (the folder above this package)."""
    return Path(__file__).resolve().parent.parent


def format_validation_error(error: ValidationError, where: str) -> str:
    """One line per problem: `<where>: <dotted.field>: <message>`."""
    lines = []
    for item in error.errors():
        loc = ".".join(str(part) for part in item["loc"]) or "(root)"
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {loc}: {message}")
    return "\n".join(lines)


def load_yaml(path: Path) -> Any:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc


def load_model_config(path: Path | str) -> ModelConfig:
    path = Path(path)
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of fields, got {type(data).__name__}")
    try:
        return ModelConfig.model_validate({**data, "source": str(path)})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path))) from None
