"""Fault injection decisions (a version's `faults` config), drawn from a given random source."""

from __future__ import annotations

import random
from dataclasses import dataclass

from app.config import FaultInjection

__all__ = ["FaultPlan", "plan_fault"]


@dataclass(frozen=True)
class FaultPlan:
    delay_s: float
    fail: bool


def plan_fault(faults: FaultInjection, rng: random.Random) -> FaultPlan:
    """What to do to one request: how long to delay it, and whether to fail it."""
    delay = 0.0
    if faults.added_latency_ms > 0 and rng.random() < faults.latency_rate:
        delay = faults.added_latency_ms / 1000.0
    fail = faults.error_rate > 0 and rng.random() < faults.error_rate
    return FaultPlan(delay_s=delay, fail=fail)
