"""The Router's `user_config`: the traffic split (weights, stable version, fallbacks, shadow)."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from app.config._base import NAME_PATTERN, StrictModel
from app.config.router import BreakerSettings, CacheSettings, MicroBatchSettings
from app.messages import SHADOW_DECLARED


class ShadowRule(StrictModel):
    """Mirror a sample of requests to a version, fire-and-forget, to compare it with primary."""

    version: str = Field(pattern=NAME_PATTERN, description="The version that gets the copies.")
    percent: float = Field(ge=0, le=100, description="Percent of requests mirrored.")
    max_in_flight: int = Field(
        default=4,
        ge=1,
        le=1024,
        description="Mirrored requests at once per router; more are dropped.",
    )


class TrafficConfig(StrictModel):
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
    microbatch: MicroBatchSettings = Field(default_factory=MicroBatchSettings)
    pinnable: list[str] = Field(
        default_factory=list,
        description="Versions any client may pin while they take no weighted traffic (a "
        "preview); pinning any other version at weight 0 needs the admin token.",
    )
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
        used |= set(self.pinnable)
        if self.shadow is not None:
            used.add(self.shadow.version)
        return used

    def check_versions(self, known: Collection[str]) -> None:
        """Raise ValueError naming any version this config uses that the app does not serve."""
        unknown = sorted(self.versions_used() - set(known))
        if unknown:
            raise ValueError(
                f"names versions that are not deployed: {unknown}; deployed: {sorted(known)}"
            )


def apply_override(base: TrafficConfig, override: Mapping[str, Any] | None) -> TrafficConfig:
    """The declared router config `base` with a rollout controller's traffic on top.

    The controller owns the weights (versions it does not name get 0), the stable version and,
    when it says so, the shadow rule; breaker, cache, fallbacks and timeouts stay declared.
    `override`: {"weights": {...}, "stable": str, "shadow": None | {"version", "percent"} |
    "declared"}; None means no rollout is steering traffic."""
    if override is None:
        return base
    data = base.model_dump()
    data["weights"] = {version: 0.0 for version in base.weights} | dict(override["weights"])
    data["stable"] = override["stable"]
    shadow = override.get("shadow", SHADOW_DECLARED)
    if shadow != SHADOW_DECLARED:
        keep = base.shadow.model_dump() if base.shadow is not None else {}
        data["shadow"] = None if shadow is None else {**keep, **shadow}
    return TrafficConfig.model_validate(data)
