"""Capacity-aware steps: how many replicas a version needs before its share of traffic rises.

Before the controller raises the candidate from weight `w` to `w'`, the candidate should run
enough replicas to carry `w'`% of the model's traffic with some headroom; the stable version
keeps the replicas it ran at the step until the switch has settled. The controller publishes
these as replica floors that a Serve autoscaling policy honours (docs/capacity-aware-steps.md);
this module only computes them, from numbers it is given (no clock, no Ray).

    need = ceil(traffic_rps x w'/100 x headroom / replica_rps), at least 1 when w' > 0,
           then bounded by [min_replicas, max_replicas] (`capped` says the bound cut it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "DEFAULT_HEADROOM",
    "CapacityNeed",
    "StepCapacity",
    "replicas_for_share",
    "settling_floor",
    "step_capacity",
    "total_traffic",
]

DEFAULT_HEADROOM = 1.5
# Rates come from counters divided by window lengths: 2.0000000000000004 replicas' worth of
# traffic is two replicas, not three.
_EPS = 1e-9


@dataclass(frozen=True)
class CapacityNeed:
    """What the candidate must run before the step."""

    replicas: int  # the floor to publish: `wanted` within [min_replicas, max_replicas]
    wanted: int  # replicas the projected load needs, before the bounds
    projected_rps: float  # the share's requests per second, headroom included
    capped: bool  # max_replicas is below `wanted`: the step cannot get the capacity it wants


def _check_rate(name: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} ({value}) must be a finite number >= 0")


def total_traffic(version_rps: float, weight: float) -> float:
    """The model's whole public traffic, from one version's observed rate and its weight (%):
    a stable version serving 60 req/s at weight 75 means 80 req/s in all."""
    _check_rate("version_rps", version_rps)
    if not 0 < weight <= 100:
        raise ValueError(f"weight ({weight}) must be in (0, 100] to infer the total traffic")
    return version_rps * 100.0 / weight


def replicas_for_share(
    traffic_rps: float,
    replica_rps: float,
    next_weight: float,
    headroom: float = DEFAULT_HEADROOM,
    *,
    min_replicas: int = 1,
    max_replicas: int | None = None,
) -> CapacityNeed:
    """Replicas a version needs to carry `next_weight`% of `traffic_rps` (the model's public
    requests per second, every version together) when one replica sustains `replica_rps`
    within its latency goal, with `headroom` (>= 1) for bursts and for the traffic growing
    while the step holds. A version with a share of 0 needs only `min_replicas`."""
    _check_rate("traffic_rps", traffic_rps)
    if not math.isfinite(replica_rps) or replica_rps <= 0:
        raise ValueError(f"replica_rps ({replica_rps}) must be a finite number > 0")
    if not 0 <= next_weight <= 100:
        raise ValueError(f"next_weight ({next_weight}) must be between 0 and 100")
    if not math.isfinite(headroom) or headroom < 1:
        raise ValueError(f"headroom ({headroom}) must be a finite number >= 1")
    if min_replicas < 0:
        raise ValueError(f"min_replicas ({min_replicas}) must be >= 0")
    if max_replicas is not None and max_replicas < min_replicas:
        raise ValueError(
            f"max_replicas ({max_replicas}) must be greater than or equal to "
            f"min_replicas ({min_replicas})"
        )

    projected = traffic_rps * next_weight / 100.0 * headroom
    wanted = math.ceil(projected / replica_rps - _EPS) if projected > 0 else 0
    if next_weight > 0:
        wanted = max(wanted, 1)  # a share with no traffic yet still needs a replica to serve it
    replicas = max(wanted, min_replicas)
    capped = max_replicas is not None and replicas > max_replicas
    if max_replicas is not None:
        replicas = min(replicas, max_replicas)
    return CapacityNeed(replicas=replicas, wanted=wanted, projected_rps=projected, capped=capped)


def settling_floor(replicas_at_step: int, step_at: float, now: float, settle_s: float) -> int:
    """The floor that keeps a version losing traffic at the replicas it ran when the step
    began, until `settle_s` seconds after it (then 0: the autoscaler alone decides, with its
    own downscale delay). Times are the caller's clock, in seconds."""
    if replicas_at_step < 0:
        raise ValueError(f"replicas_at_step ({replicas_at_step}) must be >= 0")
    if not math.isfinite(settle_s) or settle_s < 0:
        raise ValueError(f"settle_s ({settle_s}) must be a finite number >= 0")
    return replicas_at_step if now < step_at + settle_s else 0


@dataclass(frozen=True)
class StepCapacity:
    """The capacity side of one step that raises the candidate's weight: the floors to publish
    and whether the step must wait. The state machine takes it as an input of `step`."""

    candidate: str
    weight: float  # the candidate's weight after the step, %
    candidate_floor: int  # replicas the candidate must run before the step
    stable_floor: int  # replicas the stable keeps through the step (what it ran at the step)
    candidate_running: int | None  # the candidate's RUNNING replicas (None: not known)
    capped: bool = False  # max_replicas is below what the share wants: the p99 gate judges

    @property
    def waits(self) -> bool:
        """Whether the step must wait: the candidate runs fewer replicas than its floor. An
        unknown count (Serve's details unreadable) does not hold the step: without the
        reading the step goes on as it would without the feature."""
        running = self.candidate_running
        return running is not None and running < self.candidate_floor

    def reason(self) -> str:
        cap = " (capped at max_replicas)" if self.capped else ""
        return (
            f"scaling {self.candidate} to {self.candidate_floor} replicas for "
            f"{self.weight:g}%{cap}: {self.candidate_running} running"
        )


def step_capacity(
    candidate: str,
    next_weight: float,
    *,
    traffic_rps: float,
    replica_rps: float,
    headroom: float = DEFAULT_HEADROOM,
    candidate_running: int | None,
    stable_running: int | None,
    min_replicas: int = 1,
    max_replicas: int | None = None,
) -> StepCapacity:
    """The floors for a step that moves the candidate to `next_weight`% of `traffic_rps` (the
    model's public requests per second, every version together): the candidate's from
    `replicas_for_share`, the stable's the replicas it runs now (0 when not known), kept until
    the switch has settled (`settling_floor`)."""
    need = replicas_for_share(
        traffic_rps, replica_rps, next_weight, headroom,
        min_replicas=min_replicas, max_replicas=max_replicas,
    )  # fmt: skip
    if stable_running is not None and stable_running < 0:
        raise ValueError(f"stable_running ({stable_running}) must be >= 0")
    return StepCapacity(
        candidate=candidate,
        weight=next_weight,
        candidate_floor=need.replicas,
        stable_floor=stable_running or 0,
        candidate_running=candidate_running,
        capped=need.capped,
    )
