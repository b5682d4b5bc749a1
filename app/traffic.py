"""The traffic table and the choice of a version for one request.

Order of precedence (DESIGN.md): an explicit pin, then (issue 3) a sticky bucket, then the
weighted split. Versions that have no running replica are left out of the split, so a version
that failed to load costs its share of users nothing but a re-draw among the healthy ones.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import Enum

from app.config import TrafficConfig
from app.errors import ModelNotFound, Unavailable

__all__ = ["Decision", "Route", "TrafficTable"]


class Decision(str, Enum):
    """Why a request went where it went (a bounded metric tag and log field)."""

    PINNED = "pinned"
    WEIGHTED = "weighted"
    STABLE = "stable"  # no weighted version was available; the stable one took it


@dataclass(frozen=True)
class Route:
    version: str
    decision: Decision


@dataclass(frozen=True)
class TrafficTable:
    """An immutable split. A router swaps whole tables, so no request sees half an update."""

    generation: int
    stable: str
    weights: Mapping[str, float]

    @classmethod
    def from_config(
        cls, config: TrafficConfig, versions: Collection[str], generation: int
    ) -> TrafficTable:
        config.check_versions(versions)
        return cls(generation=generation, stable=config.stable, weights=dict(config.weights))

    def choose(
        self,
        rng: random.Random,
        *,
        versions: Collection[str],
        available: Collection[str],
        pin: str | None = None,
    ) -> Route:
        """Pick the version for one request.

        `versions`: every version the app serves; `available`: those with a running replica.
        """
        if pin is not None:
            if pin not in versions:
                raise ModelNotFound(f"version {pin!r} not found; versions: {sorted(versions)}")
            if pin not in available:
                raise Unavailable(f"version {pin!r} has no running replica")
            return Route(pin, Decision.PINNED)
        candidates = [(v, w) for v, w in self.weights.items() if w > 0 and v in available]
        if not candidates:
            if self.stable in available:
                return Route(self.stable, Decision.STABLE)
            raise Unavailable("no version of this model has a running replica")
        total = sum(w for _, w in candidates)
        point = rng.random() * total
        for version, weight in candidates:
            point -= weight
            if point < 0:
                return Route(version, Decision.WEIGHTED)
        return Route(candidates[-1][0], Decision.WEIGHTED)
