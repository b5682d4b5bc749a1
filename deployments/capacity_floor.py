"""Replica floors for capacity-aware steps: what the rollout controller publishes, and what it
reads back from Serve about a version that opted in (docs/capacity-aware-steps.md).

    CapacityFloors.publish(version, floor, generation, ttl_s)   before a step raises a weight
    CapacityFloors.clear(version)                               when the rollout ends
    capacity_settings(serve deployment details)                 opted in? capacity, bounds, RUNNING
    CapacityKeeper                                              the controller's side: reads
                                                                Serve off-tick, sizes the step
                                                                (app.rollout.capacity), publishes

A floor lives in Ray's GCS key-value store (`KV_NAMESPACE`) under
`<app>/<model>/capacity/<version>`, `<app>` being the Serve application the version runs in
(the model's application, or the version's own in version_apps mode), as JSON
`{"floor", "generation", "expires_at_s"}`. Each version's `CapacityFloorPolicy`
(deployments/capacity_policy.py) reads it in Serve's controller. `expires_at_s` is epoch
seconds (the policy runs in another process, on another node's clock), so a floor whose
controller died lapses on its own. The KV calls block: the controller makes them off its tick.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from app import ray_compat
from app.config import version_app_name
from app.constants import KV_NAMESPACE, KV_TIMEOUT_S
from app.rollout import Phase, RolloutState, SetWeight, Switch
from app.rollout.capacity import StepCapacity, step_capacity
from deployments.capacity_policy import floor_key

__all__ = [
    "CAPACITY_POLICY_CLASS",
    "CapacityFloors",
    "CapacityKeeper",
    "CapacityReading",
    "CapacitySettings",
    "capacity_settings",
    "gcs_floors",
    "next_raise",
]

logger = logging.getLogger("ray.serve")

CAPACITY_POLICY_CLASS = "CapacityFloorPolicy"
# A floor lapses this long after its last write (a controller that died leaves none behind);
# the keeper rewrites it well before.
FLOOR_TTL_S = 30.0
REPUBLISH_S = 10.0
# How often Serve's details are read for the rollout's versions, and how old a reading may be
# before the step stops waiting on it (an unknown count never holds a step).
LOOKUP_INTERVAL_S = 1.0
READING_MAX_AGE_S = 30.0
# A rollout's first step may raise the weight on its first tick: it waits this long at most
# for the first look-up (one that hangs must not hold every rollout).
FIRST_READING_WAIT_S = 10.0


class CapacityFloors:
    """Publishes and clears the floors of one model's versions."""

    def __init__(
        self,
        app_name: str,
        model: str,
        kv_put: Callable[[str, bytes], None],
        kv_delete: Callable[[str], None],
        clock: Callable[[], float] = time.time,
        *,
        version_apps: bool = False,
    ) -> None:
        self.app_name, self.model = app_name, model
        self._put, self._delete, self._clock = kv_put, kv_delete, clock
        self.version_apps = version_apps

    def key(self, version: str) -> str:
        app = version_app_name(self.model, version) if self.version_apps else self.app_name
        return floor_key(app, self.model, version)

    def publish(self, version: str, floor: int, generation: int, ttl_s: float) -> dict[str, Any]:
        """Ask Serve to keep at least `floor` replicas of `version` for `ttl_s` seconds (the
        controller republishes while the floor holds). Returns the value written."""
        if floor < 0:
            raise ValueError(f"floor ({floor}) must be >= 0")
        if not ttl_s > 0:
            raise ValueError(f"ttl_s ({ttl_s}) must be > 0")
        value = {"floor": floor, "generation": generation, "expires_at_s": self._clock() + ttl_s}
        self._put(self.key(version), json.dumps(value).encode())
        return value

    def clear(self, version: str) -> None:
        self._delete(self.key(version))


def gcs_floors(app_name: str, model: str, *, version_apps: bool) -> CapacityFloors:
    """Floors in Ray's GCS key-value store, where the versions' policies read them."""
    return CapacityFloors(
        app_name,
        model,
        lambda key, value: ray_compat.kv_put(key, value, KV_NAMESPACE),
        lambda key: ray_compat.kv_delete(key, KV_NAMESPACE),
        version_apps=version_apps,
    )


@dataclass(frozen=True)
class CapacitySettings:
    """What Serve's details say about a version that opted in to capacity-aware steps."""

    replica_capacity_rps: float
    headroom: float
    min_replicas: int
    max_replicas: int | None
    running_replicas: int


def capacity_settings(deployment: dict[str, Any] | None) -> CapacitySettings | None:
    """A version's capacity settings from its Serve deployment details (`serve_details()`, one
    deployment entry): None when the deployment is missing or does not run the floor policy
    (it did not opt in, or an override replaced its autoscaling_config)."""
    if not deployment:
        return None
    config = deployment.get("deployment_config") or {}
    scaling = config.get("autoscaling_config") or {}
    policy = scaling.get("policy") or {}
    function = str(policy.get("policy_function") or "")
    if not function.endswith(":" + CAPACITY_POLICY_CLASS):
        return None
    kwargs = policy.get("policy_kwargs") or {}
    try:
        rps = float(kwargs["replica_capacity_rps"])
        headroom = float(kwargs.get("headroom") or 1.0)
        min_replicas = int(scaling.get("min_replicas") or 0)
        max_raw = scaling.get("max_replicas")
        max_replicas = None if max_raw is None else int(max_raw)
    except (KeyError, TypeError, ValueError):
        return None
    if not rps > 0:
        return None
    running = sum(1 for r in deployment.get("replicas") or [] if r.get("state") == "RUNNING")
    return CapacitySettings(rps, max(1.0, headroom), min_replicas, max_replicas, running)


def next_raise(state: RolloutState) -> float | None:
    """The weight of the next step that raises the candidate's weight (the current step or a
    later one: the floor is asked for before the step, while the step before it holds), or
    None when no step raises it any more."""
    if state.phase not in (Phase.IDLE, Phase.PROGRESSING, Phase.PAUSED):
        return None
    for item in state.steps[state.step_index :]:
        weight = item.set_weight if isinstance(item, SetWeight) else None
        if isinstance(item, Switch):
            weight = item.weight
        if weight is not None and weight > state.candidate_weight:
            return weight
    return None


class CapacityReading(NamedTuple):
    """The last lookup of the rollout's two versions in Serve (None: did not opt in, or the
    lookup failed)."""

    candidate: CapacitySettings | None
    stable: CapacitySettings | None
    at: float  # the controller's steady clock
    key: tuple[Any, ...]  # (plan digest, candidate, stable): which rollout it belongs to


class CapacityKeeper:
    """The rollout controller's side of capacity-aware steps, for a candidate that opted in.

    * `refresh` (off the tick, blocking lookups in a thread): the candidate's and the
      stable's capacity settings and RUNNING replicas from Serve's details;
    * `plan` (on the tick, no I/O): the `StepCapacity` of the next weight raise, sized from
      the model's observed traffic, which `step` waits on;
    * `sync` (off the tick): publish the floors (the candidate's for that raise, the stable's
      at the replicas it ran when the rollout first asked for capacity), rewrite them before
      they lapse, and clear them when the rollout ends. A rollback or abort clears only the
      candidate's: the stable, back at 100%, keeps its floor until it lapses (FLOOR_TTL_S),
      time for the switch back to settle.
    """

    def __init__(
        self,
        floors: CapacityFloors | None,
        lookup: Callable[[str], CapacitySettings | None] | None,
        *,
        ttl_s: float = FLOOR_TTL_S,
        republish_s: float = REPUBLISH_S,
    ) -> None:
        self.floors = floors
        self._lookup = lookup
        self.ttl_s, self.republish_s = ttl_s, republish_s
        self.reading: CapacityReading | None = None
        self._asked_at = float("-inf")
        self.step: StepCapacity | None = None  # the last tick's plan (status)
        self.waiting: str | None = None  # why the last tick's step waited (status)
        self.traffic_rps = 0.0
        self._stable_hold: tuple[tuple[Any, ...], int] | None = None  # (rollout key, replicas)
        # version -> (floor, generation, written at): what the KV holds, as far as we know
        self.published: dict[str, tuple[int, int, float]] = {}
        self._busy = False

    @property
    def enabled(self) -> bool:
        return self.floors is not None and self._lookup is not None

    @staticmethod
    def _key(state: RolloutState) -> tuple[Any, ...]:
        return (state.plan.digest(), state.plan.candidate, state.plan.stable)

    def awaits_first_reading(self, state: RolloutState, now: float) -> bool:
        """Whether a rollout that has not started yet should wait for its first look-up."""
        reading = self.reading
        if not self.enabled or (reading is not None and reading.key == self._key(state)):
            return False
        return now - state.step_started_at < FIRST_READING_WAIT_S

    async def refresh(self, state: RolloutState | None, now: float) -> None:
        lookup = self._lookup
        if lookup is None or state is None or state.phase.terminal:
            return
        # A new rollout asks at once (its first step waits for this reading), else once a second.
        new = self.reading is None or self.reading.key != self._key(state)
        if not new and now - self._asked_at < LOOKUP_INTERVAL_S:
            return
        self._asked_at = now
        plan = state.plan

        def both() -> tuple[CapacitySettings | None, CapacitySettings | None]:
            return lookup(plan.candidate), lookup(plan.stable)

        try:
            candidate, stable = await asyncio.wait_for(asyncio.to_thread(both), KV_TIMEOUT_S)
        except Exception as exc:  # unknown: the step does not wait on it
            logger.warning("RolloutController: capacity lookup failed: %r", exc)
            return
        self.reading = CapacityReading(candidate, stable, now, self._key(state))

    def plan(self, state: RolloutState, rates: dict[str, float], now: float) -> StepCapacity | None:
        """The next weight raise's capacity, or None (not opted in, no raise left, or no
        fresh reading: the step goes on as it would without the feature)."""
        self.step = None
        reading = self.reading
        weight = next_raise(state)
        if (
            reading is None
            or reading.key != self._key(state)
            or reading.candidate is None
            or now - reading.at > READING_MAX_AGE_S
            or weight is None
        ):
            return None
        settings = reading.candidate
        plan = state.plan
        # The model's traffic: what both versions served lately (the whole split moves).
        self.traffic_rps = rates.get(plan.candidate, 0.0) + rates.get(plan.stable, 0.0)
        key = self._key(state)
        if self._stable_hold is None or self._stable_hold[0] != key:
            held = reading.stable.running_replicas if reading.stable is not None else 0
            self._stable_hold = (key, held)
        self.step = step_capacity(
            plan.candidate, weight,
            traffic_rps=self.traffic_rps, replica_rps=settings.replica_capacity_rps,
            headroom=settings.headroom, candidate_running=settings.running_replicas,
            stable_running=self._stable_hold[1],
            min_replicas=settings.min_replicas, max_replicas=settings.max_replicas,
        )  # fmt: skip
        return self.step

    def wanted(self, state: RolloutState) -> dict[str, int | None]:
        """The floors the KV should hold now: version -> floor (None: clear it)."""
        plan = state.plan
        if state.phase is Phase.SUCCEEDED:
            return {plan.candidate: None, plan.stable: None}
        if state.phase.terminal:  # rolled back or aborted: see the class docstring
            return {plan.candidate: None}
        out: dict[str, int | None] = {}
        if self.step is not None:
            out[plan.candidate] = self.step.candidate_floor
        elif plan.candidate in self.published:
            out[plan.candidate] = self.published[plan.candidate][0]  # after the switch: keep it
        reading = self.reading
        if self._stable_hold is not None and reading is not None and reading.stable is not None:
            out[plan.stable] = self._stable_hold[1]
        return out

    async def sync(self, state: RolloutState | None, now: float) -> None:
        """Write what `wanted` says where the KV differs or the floor is due to be rewritten;
        one sync at a time, each write bounded (a GCS outage only lets floors lapse)."""
        floors = self.floors
        if state is not None and state.phase.terminal:
            self.step, self.waiting = None, None  # nothing to size or wait for any more
        if floors is None or state is None or self._busy:
            return
        self._busy = True
        try:
            for version, floor in self.wanted(state).items():
                known = self.published.get(version)
                if floor is None:
                    if known is not None:
                        await asyncio.wait_for(asyncio.to_thread(floors.clear, version),
                                               KV_TIMEOUT_S)  # fmt: skip
                        self.published.pop(version, None)
                    continue
                if (
                    known is not None
                    and known[:2] == (floor, state.generation)
                    and (now - known[2] < self.republish_s)
                ):
                    continue
                await asyncio.wait_for(
                    asyncio.to_thread(floors.publish, version, floor, state.generation, self.ttl_s),
                    KV_TIMEOUT_S,
                )
                self.published[version] = (floor, state.generation, now)
        except Exception as exc:
            logger.warning("RolloutController: could not publish capacity floors: %r", exc)
        finally:
            self._busy = False

    def status(self) -> dict[str, Any] | None:
        step = self.step
        if step is None and not self.published:
            return None
        return {
            "next_weight": None if step is None else step.weight,
            "candidate_floor": None if step is None else step.candidate_floor,
            "stable_floor": None if step is None else step.stable_floor,
            "candidate_running": None if step is None else step.candidate_running,
            "capped": False if step is None else step.capped,
            "traffic_rps": round(self.traffic_rps, 2),
            "waiting": self.waiting,
            "published": {v: floor for v, (floor, _, _) in self.published.items()},
        }
