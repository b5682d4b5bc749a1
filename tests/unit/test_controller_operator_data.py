"""What the controller publishes for the operator page (issue 22), without Ray: ControllerCore
over an in-memory store and a fake clock. `status["waves"]` (the waves orchestrator's latest
state, kept if not older, stored, shown after a restart), `status["notifications"]` (the
webhooks' counters) and `status["ab_series"]` (the A/B lift tick by tick: grows, is thinned
at its cap, restarts with a new rollout, never holds a non-finite number)."""

from __future__ import annotations

import asyncio
import copy
import json
import math
import random

import pytest

from app.errors import InvalidInput, http_status
from app.rollout import GateStatus, GateVerdict
from deployments.controller import AB_SERIES_MAX, WAVES_SUFFIX, ControllerCore, LiftSeries
from deployments.store import InMemoryStore
from tests.support.fakes import FakeClock
from tests.support.webhooks import WebhookReceiver

KEY = "recommender/recommender/rollout-state"
PLAN = {
    "strategy": "canary",
    "candidate": "v2",
    "stable": "v1",
    "canary": {"steps": [{"set_weight": 50}, {"pause_s": 7200}]},
    "gates": {"min_requests": 1},
}
LIFT_PLAN = {
    **PLAN,
    "gates": {"min_requests": 1, "max_p99_latency_ratio": None,
              "improvement": {"outcome": "click", "mde": 0.2, "min_samples_per_arm": 20}},
}  # fmt: skip


def controller(store: InMemoryStore, clock: FakeClock) -> ControllerCore:
    return ControllerCore("recommender", ["v1", "v2"], app_name="recommender", store=store,
                          clock=clock, monotonic=clock.monotonic)  # fmt: skip


def run(coroutine):
    return asyncio.run(coroutine)


def declared(store: InMemoryStore, clock: FakeClock, user_config: dict) -> ControllerCore:
    core = controller(store, clock)

    async def go() -> None:
        await core.reconfigure(user_config)
        await core.tick()

    run(go())
    return core


def status_json(core: ControllerCore) -> dict:
    """The status as the router sends it: strict JSON (NaN or Infinity would be a 500)."""
    return json.loads(json.dumps(run(core.status()), allow_nan=False))


def waves_document(published_at: float, *, phase: str = "running", b_state: str = "pending"):
    return {
        "name": "recommender-v2", "published_at": published_at, "on_failure": "halt",
        "phase": phase, "current_wave": 0,
        "waves": [
            {"index": 0, "state": "running", "bake_until": None, "regions": [
                {"region": "us-east-1", "state": "running", "phase": "progressing",
                 "step": "set_weight 10", "weights": {"v1": 90.0, "v2": 10.0}, "reason": None}]},
            {"index": 1, "state": "pending", "bake_until": None, "regions": [
                {"region": "eu-west-1", "state": b_state, "phase": None, "step": None,
                 "weights": None, "reason": None}]},
        ],
    }  # fmt: skip


# ----------------------------------------------------------------------------- waves


def test_the_waves_state_is_kept_shown_and_an_older_publish_ignored():
    store, clock = InMemoryStore(), FakeClock()
    core = declared(store, clock, {"plan": PLAN})
    assert status_json(core)["waves"] is None  # nothing published yet

    answer = run(core.publish_waves(waves_document(5000.0)))
    assert answer["accepted"] and answer["stored"]
    waves = status_json(core)["waves"]
    assert waves["name"] == "recommender-v2" and waves["published_at"] == 5000.0
    assert waves["received_at"] == clock()  # the controller's clock
    assert [r["region"] for w in waves["waves"] for r in w["regions"]] == ["us-east-1", "eu-west-1"]

    older = run(core.publish_waves(waves_document(4000.0, phase="baking")))
    assert older["accepted"] is False
    assert status_json(core)["waves"]["phase"] == "running"  # still the newer one

    clock.advance(5)
    newer = run(core.publish_waves(waves_document(5005.0, b_state="running")))
    assert newer["accepted"]
    shown = status_json(core)["waves"]
    assert shown["published_at"] == 5005.0 and shown["waves"][1]["regions"][0]["state"] == "running"


def test_the_waves_state_survives_a_controller_restart_through_the_store():
    store, clock = InMemoryStore(), FakeClock()
    first = declared(store, clock, {"plan": PLAN})
    run(first.publish_waves(waves_document(5000.0, phase="baking")))
    assert KEY + WAVES_SUFFIX in store.data  # next to the rollout state
    received = status_json(first)["waves"]["received_at"]

    clock.advance(30)
    second = controller(store, clock)  # the replica restarted: nothing in memory
    waves = status_json(second)["waves"]
    assert waves["phase"] == "baking" and waves["published_at"] == 5000.0
    assert waves["received_at"] == received  # when it arrived, not when it was read back
    # The restored one still orders publishes: an older one stays out after the restart too.
    assert run(second.publish_waves(waves_document(4999.0)))["accepted"] is False


def test_a_bad_waves_document_is_refused_naming_the_field():
    store, clock = InMemoryStore(), FakeClock()
    core = declared(store, clock, {"plan": PLAN})
    bad = copy.deepcopy(waves_document(5000.0))
    bad["waves"][0]["regions"][0]["state"] = "exploded"
    with pytest.raises(InvalidInput, match=r"waves\.0\.regions\.0\.state") as refused:
        run(core.publish_waves(bad))
    assert http_status(refused.value) == 400
    assert status_json(core)["waves"] is None


# ----------------------------------------------------------------------------- notifications


def test_notifications_are_null_without_webhooks_and_their_counters_with_them(tmp_path):
    store, clock = InMemoryStore(), FakeClock()
    assert status_json(declared(store, clock, {"plan": PLAN}))["notifications"] is None

    receiver = WebhookReceiver()
    try:
        (tmp_path / "url").write_text(receiver.url + "/json")
        webhooks = [{"name": "ops", "url_file": str(tmp_path / "url")}]
        core = controller(InMemoryStore(), clock)

        async def go() -> None:
            await core.reconfigure({"plan": PLAN, "notifications": {"webhooks": webhooks}})
            await core.tick()
            await core.notifier.drain()
            await core.notifier.aclose()

        run(go())
        shown = status_json(core)["notifications"]
    finally:
        receiver.close()
    assert set(shown) == {"ops"}
    assert set(shown["ops"]) == {"queued", "sent", "failed", "dropped", "retries",
                                 "last_error", "pending"}  # fmt: skip
    assert shown["ops"]["queued"] >= 1 and shown["ops"]["sent"] == shown["ops"]["queued"]
    assert shown["ops"] == core.notifier.stats()["ops"]


# ----------------------------------------------------------------------------- ab_series


def feedback_tick(core: ControllerCore, clock: FakeClock, rng: random.Random, n: int) -> None:
    """One second: `n` answers per version and their clicks (v2 converts far better), then a tick."""

    async def go() -> None:
        clock.advance(1.0)
        items = []
        for version, rate in (("v2", 0.8), ("v1", 0.2)):
            for _ in range(n):
                request_id = f"req-{rng.getrandbits(64):x}"
                core.desk.record_served([(request_id, version, clock(), "weighted")], clock())
                items.append({"request_id": request_id, "outcome": "click",
                              "value": 1.0 if rng.random() < rate else 0.0, "kind": "binary"})  # fmt: skip
        await core.feedback(items, {})
        await core.tick()

    run(go())


def test_the_ab_series_follows_the_lift_gate_tick_by_tick():
    store, clock, rng = InMemoryStore(), FakeClock(), random.Random(7)
    core = declared(store, clock, {"plan": LIFT_PLAN})
    for _ in range(12):
        feedback_tick(core, clock, rng, 10)
    series = status_json(core)["ab_series"]
    assert 10 <= len(series) <= 13  # one point per tick, at most one a second
    assert set(series[0]) == {"t", "lift", "low", "high", "verdict"}
    times = [p["t"] for p in series]
    assert times == sorted(times) and all(b - a >= 1.0 for a, b in zip(times, times[1:]))
    assert series[0]["lift"] is None and series[0]["verdict"] == "not_yet_known"  # no outcomes
    last = series[-1]
    improvement = next(v for v in status_json(core)["verdicts"] if v["gate"] == "improvement")
    # The values are the gate's own reading on that tick, not recomputed.
    assert (last["lift"], last["low"], last["high"], last["verdict"]) == (
        improvement["lift"], improvement["low"], improvement["high"], improvement["conclusion"])  # fmt: skip
    assert last["lift"] > 0 and last["low"] <= last["lift"] <= last["high"]


def test_the_ab_series_is_empty_without_lift_gates():
    store, clock = InMemoryStore(), FakeClock()
    core = declared(store, clock, {"plan": PLAN})
    for _ in range(5):
        clock.advance(1.0)
        run(core.tick())
    assert status_json(core)["ab_series"] == []


def test_the_ab_series_is_thinned_at_its_cap_and_still_spans_the_experiment():
    store, clock = InMemoryStore(), FakeClock()
    core = declared(store, clock, {"plan": LIFT_PLAN})
    first_t = status_json(core)["ab_series"][0]["t"]

    async def ticks(n: int) -> None:
        for _ in range(n):
            clock.advance(1.0)
            await core.tick()

    run(ticks(AB_SERIES_MAX + 150))
    series = status_json(core)["ab_series"]
    assert len(series) <= AB_SERIES_MAX
    assert len(series) >= AB_SERIES_MAX // 2  # thinned by half, not cut
    assert series[0]["t"] == first_t  # the start of the experiment is still there
    assert core.now() - series[-1]["t"] <= 2.0  # and so is its latest second
    gaps = {round(b["t"] - a["t"], 6) for a, b in zip(series, series[1:])}
    assert gaps == {2.0}, gaps  # evenly spread: every other point went, the spacing doubled


def test_a_new_rollout_starts_a_new_ab_series():
    store, clock, rng = InMemoryStore(), FakeClock(), random.Random(3)
    core = declared(store, clock, {"plan": LIFT_PLAN})
    for _ in range(5):
        feedback_tick(core, clock, rng, 10)
    assert len(status_json(core)["ab_series"]) >= 5
    run(core.command("abort"))
    clock.advance(1.0)
    run(core.command("start"))
    series = status_json(core)["ab_series"]
    assert len(series) == 1 and series[0]["lift"] is None  # only the new rollout's first tick
    assert series[0]["t"] == core.now()


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_the_ab_series_never_holds_a_non_finite_number(bad):
    series = LiftSeries()
    detail = {"conclusion": "not_yet_known", "lift": bad, "low": -math.inf, "high": bad}
    verdict = GateVerdict("improvement", GateStatus.PENDING, bad, 0.0, "reading", detail)
    assert series.record(1000.0, [verdict])
    (point,) = series.to_list()
    assert point == {"t": 1000.0, "lift": None, "low": None, "high": None,
                     "verdict": "not_yet_known"}  # fmt: skip
    json.dumps(series.to_list(), allow_nan=False)  # valid JSON


def test_the_lift_series_takes_the_improvement_gate_first_and_ignores_other_gates():
    series = LiftSeries(max_points=4)
    other = GateVerdict("max_error_rate", GateStatus.PASSED, 0.0, 0.05, "ok")
    assert not series.record(1.0, [other])  # no lift gate: no point
    ni = GateVerdict("non_inferiority", GateStatus.PASSED, 0.1, -0.05, "r",
                     {"conclusion": "better", "lift": 0.1, "low": 0.0, "high": 0.2})  # fmt: skip
    imp = GateVerdict("improvement", GateStatus.PENDING, 0.1, 0.0, "r",
                      {"conclusion": "not_yet_known", "lift": 0.1, "low": -0.1, "high": 0.3})  # fmt: skip
    assert series.record(1.0, [ni, imp])
    assert series.to_list()[0]["verdict"] == "not_yet_known" and series.to_list()[0]["low"] == -0.1
    assert not series.record(1.5, [imp])  # within a second of the last point
    for t in (2.0, 3.0, 4.0):  # the fourth point fills it: thinned to two, two seconds apart
        series.record(t, [imp])
    assert [p["t"] for p in series.to_list()] == [1.0, 3.0]
    assert not series.record(4.5, [imp]) and series.record(5.0, [imp])
