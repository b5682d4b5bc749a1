"""Monotonic reads across Router replicas (issue 18 item 8) and the early stats push (item 6),
on RouterSync's real methods over a stand-in Router (no Ray).

Two Routers apply a controller decision a few ms apart; a user the decision moved could be
answered by v2 on one and then by v1 on the other. Every answer now carries the controller
generation it was routed with (`x-traffic-generation`); a request that echoes a newer one
waits, bounded, for its Router to apply it."""

from __future__ import annotations

import asyncio
import time

import pytest

from app.errors import InvalidInput, http_status
from deployments.router import _traffic_generation
from deployments.router_sync import RouterSync
from tests.unit.test_router_reconfigure import FakeRouter


async def _sync_at(generation: int | None) -> tuple[FakeRouter, RouterSync]:
    router = FakeRouter()
    router.deployed.add("v2")
    router.refused_override = None
    await router.reconfigure({"stable": "v1", "weights": {"v1": 100, "v2": 0}})
    sync = RouterSync(router)  # the real loops' methods; router.sync stays the fake lookups
    if generation is not None:
        sync._apply_override(_override(generation, 10))
    return router, sync


def _override(generation: int, v2: float) -> dict:
    return {"generation": generation, "weights": {"v1": 100 - v2, "v2": v2}, "stable": "v1",
            "shadow": "declared"}  # fmt: skip


def test_a_request_that_saw_a_newer_generation_waits_for_it_then_routes_with_it():
    async def scenario():
        router, sync = await _sync_at(5)
        waiting = asyncio.create_task(sync.catch_up(6, timeout_s=5.0))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # generation 6 is not here yet: the request waits
        sync._apply_override(_override(6, 50))  # the long-poll brings it
        return await waiting, dict(router.table.weights), sync.applied_generation

    caught_up, weights, applied = asyncio.run(scenario())
    assert caught_up is True and applied == 6
    assert weights == {"v1": 50.0, "v2": 50.0}  # the table the request then routes with


def test_the_wait_is_bounded_and_needless_waits_do_not_happen():
    async def scenario():
        router, sync = await _sync_at(5)
        started = time.monotonic()
        late = await sync.catch_up(9, timeout_s=0.05)  # never comes (or a forged number)
        waited = time.monotonic() - started
        return late, waited, await sync.catch_up(5, 5.0), await sync.catch_up(1, 5.0)

    late, waited, same, older = asyncio.run(scenario())
    assert late is False and waited < 5.0  # routed with what it had, after the bound
    assert same is True and older is True  # at or past the generation: no wait


def test_no_wait_when_no_rollout_steers_the_traffic():
    async def scenario():
        router, sync = await _sync_at(None)  # declared traffic only: the same on every Router
        return sync.applied_generation, await sync.catch_up(7, timeout_s=5.0)

    assert asyncio.run(scenario()) == (None, True)


def test_a_refused_generation_is_not_waited_for_past_the_bound():
    async def scenario():
        router, sync = await _sync_at(5)
        sync._apply_override({**_override(6, 10), "weights": {"v1": 90, "v9": 10}})  # no v9
        return await sync.catch_up(6, timeout_s=0.05), sync.applied_generation

    assert asyncio.run(scenario()) == (False, 5)


@pytest.mark.parametrize("raw", ["-1", "1.5", "abc", "١٢", "9" * 19, " 7"])
def test_a_malformed_generation_header_is_a_400_naming_it(raw):
    with pytest.raises(InvalidInput, match="x-traffic-generation") as refused:
        _traffic_generation(raw)
    assert http_status(refused.value) == 400


def test_a_well_formed_generation_header():
    assert _traffic_generation(None) is None and _traffic_generation("") is None
    assert _traffic_generation("1000000007") == 1_000_000_007


def test_a_candidate_failure_pushes_the_stats_before_the_interval_ends():
    """Item 6: the evidence a rollback waits for left the Router up to 250 ms after it
    happened (the push interval); a candidate failure now ends the wait."""

    async def scenario():
        sync = RouterSync(FakeRouter())
        started = time.monotonic()
        waiting = asyncio.create_task(sync._until_next_push(last=started - 1.0))
        await asyncio.sleep(0.01)
        sync.candidate_failed()
        await asyncio.wait_for(waiting, timeout=0.2)  # well before the 250 ms interval
        quiet = time.monotonic()
        await sync._until_next_push(last=quiet)  # nothing failed: the whole interval
        return time.monotonic() - quiet

    assert asyncio.run(scenario()) >= 0.2
