"""Capacity-aware steps through ControllerCore (no Ray): the floor published before the step
that raises the candidate's weight, the wait until the candidate runs it, the status fields,
the progress deadline, and the floors cleared when the rollout ends."""

from __future__ import annotations

import asyncio
import json

from app.observability.stats import RouterStats
from deployments.capacity_floor import CapacityFloors, CapacityKeeper, CapacitySettings
from deployments.controller import ControllerCore
from deployments.store import InMemoryStore
from tests.support.fakes import FakeClock

PLAN = {
    "strategy": "canary", "candidate": "v2", "stable": "v1",
    "canary": {"steps": [{"set_weight": 50}, {"pause_s": 5}]},
    "gates": {"min_requests": 5}, "progress_deadline_s": 60,
}  # fmt: skip
FLOOR_KEY = "recommender/recommender/capacity/{}"


class World:
    """A controller with a capacity keeper over a fake KV and a fake Serve."""

    def __init__(self, running: dict[str, int], opted_in=("v1", "v2")) -> None:
        self.clock = FakeClock()
        self.kv: dict[str, bytes] = {}
        self.running = running
        self.lookups = 0
        floors = CapacityFloors("recommender", "recommender", self.kv.__setitem__,
                                lambda key: self.kv.pop(key, None), self.clock)  # fmt: skip

        def lookup(version: str) -> CapacitySettings | None:
            self.lookups += 1
            if version not in opted_in:
                return None
            return CapacitySettings(1.0, 1.5, 1, 4, self.running[version])

        self.core = ControllerCore(
            "recommender", ["v1", "v2"], app_name="recommender", store=InMemoryStore(),
            clock=self.clock, monotonic=self.clock.monotonic,
            capacity=CapacityKeeper(floors, lookup),
        )  # fmt: skip

    def floor(self, version: str) -> int | None:
        raw = self.kv.get(FLOOR_KEY.format(version))
        return None if raw is None else json.loads(raw)["floor"]

    def ticks(self, n: int, step_s: float = 1.0) -> list[float]:
        """`n` ticks, each after a stats report (20 req/s over both versions) and the
        capacity look-up, as the replica's loop runs them: the candidate's weight after each."""

        async def ticking() -> list[float]:
            seen = []
            for _ in range(n):
                self.clock.advance(step_s)
                stats = RouterStats()
                for _ in range(10):
                    stats.record("v1", True, 10.0)
                    stats.record("v2", True, 10.0)
                # Straight into the window, as report() adds it (report() would also start
                # the replica's own tick loop, racing these ticks).
                self.core.window.add(stats.drain(), self.core.now())
                await self.core.refresh_capacity()
                await self.core.tick()
                seen.append(self.core.state.candidate_weight)
            return seen

        return asyncio.run(ticking())


def declare(world: World, plan: dict = PLAN) -> None:
    asyncio.run(world.core.reconfigure({"plan": plan, "tick_interval_s": 0.25}))


def test_the_floor_is_published_and_the_step_waits_until_the_candidate_runs_it():
    world = World({"v1": 2, "v2": 1})
    declare(world)
    weights = world.ticks(3)
    assert weights == [0.0, 0.0, 0.0]  # 1 replica running, more needed for 50%
    status = asyncio.run(world.core.status())
    capacity = status["capacity"]
    floor = capacity["candidate_floor"]
    asyncio.run(world.core.refresh_capacity())  # the loop's next write, off the tick
    assert floor > 1 and world.floor("v2") == floor
    assert capacity["waiting"].startswith(f"scaling v2 to {floor} replicas for 50%")
    assert world.floor("v1") == 2  # the stable keeps what it ran
    world.running["v2"] = 4  # Serve honoured the floor (its max_replicas at most)
    assert world.ticks(2)[-1] == 50.0
    assert asyncio.run(world.core.status())["capacity"]["waiting"] is None


def test_the_first_step_waits_for_the_first_look_up():
    world = World({"v1": 1, "v2": 0})
    declare(world)
    asyncio.run(world.core.tick())  # no look-up yet: the rollout does not start blind
    assert world.core.state.candidate_weight == 0.0
    assert world.lookups == 0


def test_a_wait_past_the_progress_deadline_pauses_the_rollout():
    world = World({"v1": 2, "v2": 1})
    declare(world)
    world.ticks(62)
    state = world.core.state
    assert (state.phase.value, state.candidate_weight) == ("paused", 0.0)
    assert "no capacity after" in state.history[-1].reason
    assert json.loads(world.core.store.data["recommender/recommender/rollout-state"])["phase"] == (
        "paused"
    )


def test_a_candidate_that_did_not_opt_in_never_waits_and_gets_no_floor():
    world = World({"v1": 2, "v2": 1}, opted_in=())
    declare(world)
    assert world.ticks(1) == [50.0]
    assert world.kv == {}
    assert asyncio.run(world.core.status()).get("capacity") is None


def test_the_floors_are_cleared_when_the_rollout_ends():
    world = World({"v1": 2, "v2": 4})
    declare(world)
    assert world.ticks(1) == [50.0]
    world.ticks(1)
    assert world.floor("v2") is not None
    asyncio.run(world.core.command("abort"))
    world.ticks(1)
    assert world.floor("v2") is None  # cleared at once
    assert world.floor("v1") == 2  # the stable's lapses on its own (time to settle)
    world.running["v2"] = 4
    declare(world, {**PLAN, "canary": {"steps": [{"set_weight": 60}]}})
    world.ticks(4)
    assert world.core.state.phase.value == "succeeded"
    world.ticks(1)
    assert world.kv == {}
