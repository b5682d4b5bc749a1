"""Region overlays: one `serve_config.yaml`, a small per-region file on top.

Ray Serve has no overlays, so this is a deep merge, kustomize-style, keyed by name:

    configs/regions/eu-west-1.yaml
        region: eu-west-1                        # the region (Ray node label `region`)
        clusters: [cluster/aws-eu-west-1.yaml]   # launcher files that serve it (capacity checks)
        admin:                                   # how `rollout waves` reaches the region
          url: https://eu-west-1.rollout.example.com      # its router (admin API)
          token_file: ~/.rollout/eu-west-1.admin_token     # its admin bearer token
          dashboard_url: http://127.0.0.1:8266            # its dashboard (serve deploy)
        serve:                                   # merged into serve_config.yaml
          http_options: {host: 0.0.0.0}
          applications:
            - name: recommender                  # matched by name, never by position
              args: {region: eu-west-1, version_resources: {v1: {num_cpus: 2, num_gpus: 1}}}
              deployments:
                - name: Router                   # matched by name; a new name is appended
                  user_config: {weights: {v1: 100, v2: 0}}

Merge rules (`merge`):
* mappings merge key by key, recursively; a scalar or `null` in the overlay replaces;
* `applications` and `deployments` are lists of mappings keyed by `name`: an overlay entry
  merges into the base entry of the same name; an overlay application whose name the base does
  not have is an error (a typo would otherwise deploy a half-configured second app);
* every other list replaces the base list whole;
* a few values are atomic, replaced whole rather than merged, because a partial merge of them
  is always wrong: `weights` (an overlay `{v1: 100}` must not inherit the base's `v2: 10` and
  sum to 110), `fallbacks`, `shadow`, `plan` (steps of two plans never make a plan).

Pure functions; `rollout render` writes the result, `rollout validate --region` checks it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.config import (
    LABEL_VALUE_PATTERN,
    load_checked,
    project_root,
)
from app.errors import ConfigError

__all__ = [
    "ATOMIC_KEYS",
    "RegionAdmin",
    "RegionOverlay",
    "load_overlay",
    "merge",
    "overlay_path",
    "region_overlays",
    "render",
]

ATOMIC_KEYS = frozenset({"weights", "fallbacks", "shadow", "plan"})
NAMED_LISTS = frozenset({"applications", "deployments"})
REGIONS_DIR = Path("configs/regions")


class RegionAdmin(BaseModel):
    """How operators' tools (`rollout waves`, `rollout status --all-regions`) reach a region:
    its router's admin API and the file holding its admin token. The token itself never goes
    into a config file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(
        pattern=r"^https?://[^\s/]+(/[^\s]*)?$",
        description="Base URL of the region's router (its load balancer or Serve HTTP port); "
        "the admin API is under /admin/rollout.",
    )
    token_file: str = Field(
        min_length=1,
        description="File holding the region's admin bearer token (`~` is expanded; read when "
        "the tool runs, never stored).",
    )
    dashboard_url: str | None = Field(
        default=None,
        pattern=r"^https?://[^\s/]+(/[^\s]*)?$",
        description="The region's Ray dashboard (what `serve deploy --address` takes; usually "
        "a `ray dashboard` tunnel). `rollout waves` declares each region's plan through it; "
        "without it the plan must already be deployed and is started with the admin API.",
    )


class RegionOverlay(BaseModel):
    """`configs/regions/<region>.yaml`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    region: str = Field(
        pattern=LABEL_VALUE_PATTERN,
        description="Region name; also the value of the `region` node label replicas require.",
    )
    clusters: list[str] = Field(
        default_factory=list,
        description="Cluster launcher files (relative to the project root) that serve this region; "
        "`rollout validate --region` checks every replica fits their node types.",
    )
    admin: RegionAdmin | None = Field(
        default=None,
        description="How `rollout waves` and `rollout status --all-regions` reach the region.",
    )
    serve: dict[str, Any] = Field(
        default_factory=dict, description="Merged into serve_config.yaml (see the merge rules)."
    )
    # Where the file was read from. Not a YAML field.
    source: str | None = Field(default=None, exclude=True, repr=False)


def overlay_path(region: str, root: Path | None = None) -> Path:
    return (root or project_root()) / REGIONS_DIR / f"{region}.yaml"


def region_overlays(root: Path | None = None) -> list[Path]:
    """Every overlay file in configs/regions/, sorted."""
    return sorted(((root or project_root()) / REGIONS_DIR).glob("*.yaml"))


def load_overlay(path: Path | str) -> RegionOverlay:
    path = Path(path)
    overlay = load_checked(path, RegionOverlay, "a mapping with region, clusters, serve",
                           extra={"source": str(path)})  # fmt: skip
    if path.stem != overlay.region:
        raise ConfigError(
            f"{path}: region: {overlay.region!r} does not match the file name {path.name!r}"
        )
    return overlay


def merge(base: Any, overlay: Any, where: str = "") -> Any:
    """`overlay` deep-merged onto `base` (neither is modified). See the module docstring."""
    if not isinstance(base, dict) or not isinstance(overlay, dict):
        return copy.deepcopy(overlay)
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        path = f"{where}.{key}" if where else str(key)
        if key in ATOMIC_KEYS or key not in merged:
            merged[key] = copy.deepcopy(value)
        elif key in NAMED_LISTS:
            merged[key] = _merge_named(merged[key], value, path, strict=key == "applications")
        else:
            merged[key] = merge(merged[key], value, path)
    return merged


def _merge_named(base: Any, overlay: Any, where: str, *, strict: bool) -> list[Any]:
    if not isinstance(overlay, list) or not isinstance(base, list):
        raise ConfigError(f"{where}: must be a list of mappings with a name")
    result = copy.deepcopy(base)
    index = {
        item["name"]: i
        for i, item in enumerate(result)
        if isinstance(item, dict) and isinstance(item.get("name"), str)
    }
    for i, item in enumerate(overlay):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ConfigError(f"{where}[{i}]: must be a mapping with a name")
        name = item["name"]
        if name in index:
            result[index[name]] = merge(result[index[name]], item, f"{where}[{name}]")
        elif strict:
            raise ConfigError(
                f"{where}[{i}].name: {name!r} is not in the base config; names: {sorted(index)}"
            )
        else:
            result.append(copy.deepcopy(item))
    return result


def render(base: dict[str, Any], overlay: RegionOverlay) -> dict[str, Any]:
    """The serve config for `overlay.region`: the overlay merged onto `base`, then checked
    that every builder application carries the overlay's region (a region file that forgot
    `args.region` would deploy replicas that land anywhere)."""
    where = overlay.source or f"region {overlay.region}"
    try:
        merged = merge(base, overlay.serve)
    except ConfigError as exc:
        raise ConfigError(f"{where}: serve.{exc}") from None
    for i, application in enumerate(merged.get("applications") or []):
        if (
            not isinstance(application, dict)
            or application.get("import_path") != "app.builder:build_app"
        ):
            continue
        region = (application.get("args") or {}).get("region")
        if region != overlay.region:
            raise ConfigError(
                f"{where}: serve.applications[{i}].args.region: must be {overlay.region!r} "
                f"(the overlay's region), got {region!r}"
            )
    return merged
