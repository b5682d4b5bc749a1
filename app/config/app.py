"""`args` of the Serve application builders: `build_app` (AppArgs) and `build_version`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from app.adapters import adapter_class
from app.config._base import (
    LABEL_VALUE_PATTERN,
    NAME_PATTERN,
    REGION_LABEL,
    StrictModel,
)
from app.config.io import format_validation_error, load_model_config, project_root
from app.config.model import ModelConfig, Resources
from app.config.router import RouterSettings
from app.errors import ConfigError


class AppArgs(StrictModel):
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
    router_max_queued_requests: int = Field(
        default=200,
        ge=-1,
        description="Requests each proxy may queue for a router replica beyond the ones it "
        "works on; more get a 503 with Retry-After at once (-1: unbounded, which lets an "
        "overload grow the proxies' memory and every client's latency without end).",
    )
    router_memory_mb: int | None = Field(
        default=1024,
        ge=64,
        description="Memory reserved per router replica, in MiB (Ray's `memory`): request bodies "
        "it holds (router_max_ongoing_requests x the body limit) and the large bodies it parses "
        "(about 20x their size, PARSE_SLOTS at once). null: no reservation.",
    )
    router_main_loop: bool = Field(
        default=True,
        description="Run the Router's code and its handles' replica choice on each router "
        "replica's main event loop (Serve's RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 and "
        "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0, what RAY_SERVE_THROUGHPUT_OPTIMIZED sets, "
        "here for the router replicas only): no hand-off between loops and threads per request. "
        "The Router's blocking calls (Serve's details, looking a version up, large bodies, "
        "capture writes) run in threads. false: Serve's defaults (a loop of its own for each).",
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


class VersionAppArgs(StrictModel):
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
        raise ConfigError(
            format_validation_error(exc, f"{config.source}: hyperparameters")
        ) from None
    except ValueError as exc:
        raise ConfigError(f"{config.source}: adapter: {exc}") from None
    return args, config
