"""The traffic table and the choice of a version for one request.

Order of precedence (DESIGN.md): an explicit pin, then the routing key's sticky bucket, then
the weighted split for requests without a key. Versions that have no running replica are left
out: a sticky user whose version is down is served by the stable version (without moving
their bucket), and the weighted split re-draws among the healthy versions.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import Enum

from app.config import ShadowRule, TrafficConfig
from app.config.traffic import apply_override
from app.errors import ModelNotFound, Unavailable
from app.serving.buckets import BucketMap, bucket_of

__all__ = ["Decision", "Route", "TrafficTable", "apply_override"]


class Decision(str, Enum):
    """Why a request went where it went (a bounded metric tag and log field)."""

    PINNED = "pinned"
    STICKY = "sticky"
    WEIGHTED = "weighted"
    STABLE = "stable"  # the chosen version had no running replica; the stable one took it
    FALLBACK = "fallback"  # the chosen version failed or its breaker was open; retried


@dataclass(frozen=True)
class Route:
    version: str
    decision: Decision


@dataclass(frozen=True)
class TrafficTable:
    """An immutable split. A router swaps whole tables, so no request sees half an update."""

    generation: int
    config: TrafficConfig
    buckets: BucketMap

    @classmethod
    def from_config(
        cls, config: TrafficConfig, versions: Collection[str], generation: int
    ) -> TrafficTable:
        config.check_versions(versions)
        return cls(
            generation=generation,
            config=config,
            buckets=BucketMap.build(config.weights, config.stable),
        )

    @property
    def stable(self) -> str:
        return self.config.stable

    @property
    def weights(self) -> Mapping[str, float]:
        return self.config.weights

    @property
    def shadow(self) -> ShadowRule | None:
        return self.config.shadow

    def fallback_for(self, version: str) -> str | None:
        return self.config.fallback_for(version)

    def choose(
        self,
        rng: random.Random,
        *,
        versions: Collection[str],
        available: Collection[str],
        pin: str | None = None,
        key: str | None = None,
        waitable: Collection[str] = (),
    ) -> Route:
        """Pick the version for one request.

        `versions`: every version the app serves; `available`: those with a running replica;
        `waitable`: those Serve is bringing back (replicas restarting): when no available
        version can take the request, it goes to a waitable one, whose handle queues it until
        a replica is up, within the request's deadline, as a plain Serve deployment does
        (Unavailable, a 503, only when none is waitable either). `key`: the routing key (user
        id), if the request has one.
        """
        try:
            return self._choose(rng, versions, available, pin, key)
        except Unavailable:
            if not waitable:
                raise
            return self._choose(rng, versions, waitable, pin, key)

    def _choose(
        self,
        rng: random.Random,
        versions: Collection[str],
        available: Collection[str],
        pin: str | None,
        key: str | None,
    ) -> Route:
        if pin is not None:
            if pin not in versions:
                raise ModelNotFound(f"version {pin!r} not found; versions: {sorted(versions)}")
            if pin not in available:
                raise Unavailable(f"version {pin!r} has no running replica")
            return Route(pin, Decision.PINNED)
        if key is not None:
            version = self.buckets.version_for(bucket_of(key))
            if version in available:
                return Route(version, Decision.STICKY)
            return self._stable_or_weighted(rng, available)
        return self._weighted(rng, available)

    def _weighted(self, rng: random.Random, available: Collection[str]) -> Route:
        candidates = [(v, w) for v, w in self.weights.items() if w > 0 and v in available]
        if not candidates:
            return self._stable_or_weighted(rng, available)
        total = sum(w for _, w in candidates)
        point = rng.random() * total
        for version, weight in candidates:
            point -= weight
            if point < 0:
                return Route(version, Decision.WEIGHTED)
        return Route(candidates[-1][0], Decision.WEIGHTED)

    def _stable_or_weighted(self, rng: random.Random, available: Collection[str]) -> Route:
        if self.stable in available:
            return Route(self.stable, Decision.STABLE)
        candidates = [v for v, w in self.weights.items() if w > 0 and v in available]
        if candidates:
            return self._weighted(rng, available)
        raise Unavailable("no version of this model has a running replica")
