"""Config schemas: a model version's config file, the app's builder args, and the traffic split.

Three layers, each with its own update speed:

* `ModelConfig` (`configs/models/<model>/<version>.yaml`, `model.py`): what a version *is*:
  artifact, checksum, adapter, resources, autoscaling. Read once when Serve builds the app.
* `ModelUserConfig` (`model.py`): the hot-patchable part of a version (hyperparameters,
  batching, faults). Serve applies it in place through `reconfigure`.
* `TrafficConfig` (`traffic.py`): the Router's `user_config` (weights per version, the stable
  version), also applied in place.

`AppArgs` (`app.py`) are the builders' args; `RouterSettings` and its parts (`router.py`) the
Router's build-time knobs; `io.py` reads and validates files. Every model derives from
`StrictModel` (`_base.py`): a typo in a field name is an error that names the field.
"""

from app.config._base import (
    CONTROLLER_DEPLOYMENT,
    LABEL_VALUE_PATTERN,
    NAME_PATTERN,
    REGION_LABEL,
    ROUTER_DEPLOYMENT,
    SHA256_PATTERN,
    FiniteStrictModel,
    StrictModel,
)
from app.config.app import (
    AppArgs,
    VersionAppArgs,
    load_app_args,
    load_version_args,
    version_app_name,
)
from app.config.io import (
    config_hash,
    format_validation_error,
    load_checked,
    load_model_config,
    load_yaml,
    project_root,
)
from app.config.model import (
    Autoscaling,
    Batching,
    FaultInjection,
    ModelConfig,
    ModelUserConfig,
    RequestLimits,
    Resources,
    WeightsPatch,
)
from app.config.router import (
    AccessLogSettings,
    BreakerSettings,
    CacheSettings,
    DriftSettings,
    RouterSettings,
)
from app.config.traffic import ShadowRule, TrafficConfig

__all__ = [
    "CONTROLLER_DEPLOYMENT",
    "LABEL_VALUE_PATTERN",
    "NAME_PATTERN",
    "REGION_LABEL",
    "ROUTER_DEPLOYMENT",
    "SHA256_PATTERN",
    "AccessLogSettings",
    "AppArgs",
    "Autoscaling",
    "Batching",
    "BreakerSettings",
    "CacheSettings",
    "DriftSettings",
    "FaultInjection",
    "FiniteStrictModel",
    "ModelConfig",
    "ModelUserConfig",
    "RequestLimits",
    "Resources",
    "RouterSettings",
    "ShadowRule",
    "StrictModel",
    "TrafficConfig",
    "VersionAppArgs",
    "WeightsPatch",
    "config_hash",
    "format_validation_error",
    "load_app_args",
    "load_checked",
    "load_model_config",
    "load_version_args",
    "load_yaml",
    "project_root",
    "version_app_name",
]
