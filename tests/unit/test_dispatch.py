"""The Dispatcher: breaker, deadline, fallback and shadow copies, with a fake clock and call."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import numpy as np
import pytest

from app.adapters.recommender import RecommenderAdapter
from app.config import ShadowRule, TrafficConfig
from app.errors import (
    DeadlineExceeded,
    InjectedFault,
    InvalidInput,
    LoadShed,
    ModelFailure,
    ReplicaLost,
    ReplicaWaitTimeout,
    ServingError,
    Unavailable,
    http_status,
)
from app.serving.breaker import BreakerSettings, BreakerState
from app.serving.dispatch import Dispatcher, Served, failure_is_evidence, fallback_is_evidence
from app.serving.traffic import Decision, Route, TrafficTable
from tests.support.fakes import FakeClock

VERSIONS = ("v1", "v2", "v3")
ALL = frozenset(VERSIONS)
NOW = 1000.0
INPUTS = {
    "user": np.array(["likes science fiction"], dtype=object),
    "items": np.array(["a", "b", "c", "d", "e", "f"], dtype=object),
}


class FixedRng:
    """Stands in for random.Random: `random()` returns what the test sets."""

    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


def outputs(scores, ranking) -> dict[str, np.ndarray]:
    return {
        "scores": np.array([scores], dtype=np.float32),
        "ranking": np.array([ranking], dtype=np.int64),
    }


# Distinct outputs per version, so a test can tell who answered.
OUTPUTS = {
    "v1": outputs([0.9, 0.7, 0.5, 0.3, 0.2, 0.1], [0, 1, 2, 3, 4, 5]),
    "v2": outputs([0.8, 0.8, 0.5, 0.3, 0.2, 0.2], [5, 1, 2, 3, 4, 0]),
    "v3": outputs([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [5, 4, 3, 2, 1, 0]),
}


class FakeCall:
    """Records every call; `script[version]` is what the version does.

    A behaviour is: an exception instance or class (raised), a callable (awaited with the call's
    arguments; it returns the result), or a dict of outputs. A list of behaviours is consumed one
    per call (the last one repeats). Unscripted versions answer with OUTPUTS[version].
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []
        self.script: dict[str, Any] = {}

    async def __call__(self, version, inputs, parameters, timeout_s):
        self.calls.append((version, timeout_s))
        behaviour = self.script.get(version)
        if isinstance(behaviour, list):
            behaviour = behaviour.pop(0) if len(behaviour) > 1 else behaviour[0]
        if isinstance(behaviour, BaseException) or (
            isinstance(behaviour, type) and issubclass(behaviour, BaseException)
        ):
            raise behaviour if isinstance(behaviour, BaseException) else behaviour("scripted")
        if callable(behaviour):
            return await behaviour(version, inputs, parameters, timeout_s)
        result = behaviour if behaviour is not None else OUTPUTS[version]
        return {"outputs": result, "config": f"cfg-{version}"}

    def versions(self) -> list[str]:
        return [v for v, _ in self.calls]


def table(**config: Any) -> TrafficTable:
    base: dict[str, Any] = {"stable": "v1", "weights": {"v1": 80, "v2": 20, "v3": 0}}
    base.update(config)
    return TrafficTable.from_config(TrafficConfig(**base), VERSIONS, generation=1)


def make(
    breaker: BreakerSettings | None = None,
    rng: Any = None,
    adapters: dict[str, type] | None = None,
    running: Any = None,
) -> tuple[Dispatcher, FakeCall, FakeClock]:
    call, clock = FakeCall(), FakeClock()
    dispatcher = Dispatcher(
        call,
        adapters or {v: RecommenderAdapter for v in VERSIONS},
        clock=clock,
        rng=rng or random.Random(0),
        breaker=breaker,
        running=running,
    )
    return dispatcher, call, clock


def serve(
    dispatcher: Dispatcher,
    t: TrafficTable,
    version: str,
    decision: Decision = Decision.WEIGHTED,
    *,
    deadline: float = NOW + 10.0,
    available=ALL,
    allow_fallback: bool = True,
    parameters: dict[str, Any] | None = None,
):
    async def go():
        return await dispatcher.serve(
            t, Route(version, decision), INPUTS, parameters or {},
            deadline=deadline, available=available, allow_fallback=allow_fallback,
        )  # fmt: skip

    return asyncio.run(go())


# -- the primary path --------------------------------------------------------------------------


@pytest.mark.parametrize("decision", [Decision.WEIGHTED, Decision.STICKY, Decision.PINNED])
def test_success_on_chosen_version(decision):
    d, call, _ = make()
    served = serve(d, table(), "v2", decision)
    assert isinstance(served, Served)
    assert served.version == "v2"
    assert served.decision is decision
    assert served.config == "cfg-v2"
    assert served.outputs is OUTPUTS["v2"]
    assert served.fell_back_from is None and served.fallback_reason is None
    assert call.versions() == ["v2"]
    assert d.fallbacks == 0
    assert d.breaker_states()["v2"] is BreakerState.CLOSED


def test_parameters_and_inputs_reach_call():
    d, call, _ = make()
    seen = {}

    async def spy(version, inputs, parameters, timeout_s):
        seen.update(version=version, inputs=inputs, parameters=parameters)
        return {"outputs": OUTPUTS[version], "config": "c"}

    call.script["v2"] = spy
    serve(d, table(), "v2", parameters={"top_k": 3})
    assert seen["version"] == "v2"
    assert seen["inputs"] is INPUTS
    assert seen["parameters"] == {"top_k": 3}


@pytest.mark.parametrize(
    "error, reason",
    [
        (ModelFailure("boom"), "error"),
        (InjectedFault("injected"), "error"),
        (Unavailable("no replica"), "unavailable"),
        (DeadlineExceeded("slow"), "timeout"),
        (ReplicaLost("lost a replica: ActorDiedError"), "replica_lost"),
    ],
)
def test_fallback_to_stable_on_error(error, reason):
    d, call, _ = make()
    call.script["v2"] = error
    served = serve(d, table(), "v2")
    assert served.version == "v1"
    assert served.decision is Decision.FALLBACK
    assert served.fell_back_from == "v2"
    assert served.fallback_reason == reason
    assert served.config == "cfg-v1"
    assert served.outputs is OUTPUTS["v1"]
    assert call.versions() == ["v2", "v1"]
    assert d.fallbacks == 1


def test_fallbacks_counter_counts_each_fallback():
    d, call, _ = make()
    call.script["v2"] = ModelFailure("boom")
    t = table()
    for expected in (1, 2, 3):
        serve(d, t, "v2")
        assert d.fallbacks == expected
    serve(d, t, "v1")  # a success on stable: no fallback
    assert d.fallbacks == 3


def test_invalid_input_is_reraised_without_fallback():
    d, call, _ = make()
    call.script["v2"] = InvalidInput("bad top_k")
    with pytest.raises(InvalidInput, match="bad top_k"):
        serve(d, table(), "v2")
    assert call.versions() == ["v2"]
    assert d.fallbacks == 0


def test_pinned_request_without_allow_fallback_does_not_fall_back():
    d, call, _ = make()
    call.script["v2"] = ModelFailure("boom")
    with pytest.raises(ModelFailure, match="boom"):
        serve(d, table(), "v2", Decision.PINNED, allow_fallback=False)
    assert call.versions() == ["v2"]
    assert d.fallbacks == 0


def test_pinned_request_with_allow_fallback_falls_back():
    d, call, _ = make()
    call.script["v2"] = ModelFailure("boom")
    served = serve(d, table(), "v2", Decision.PINNED, allow_fallback=True)
    assert (served.version, served.decision, served.fell_back_from) == (
        "v1", Decision.FALLBACK, "v2",
    )  # fmt: skip


def test_no_fallback_when_fallback_version_unavailable():
    d, call, _ = make()
    call.script["v2"] = Unavailable("down")
    with pytest.raises(Unavailable, match="down"):
        serve(d, table(), "v2", available=frozenset({"v2", "v3"}))
    assert call.versions() == ["v2"]
    assert d.fallbacks == 0


def test_null_fallback_disables_it():
    d, call, _ = make()
    call.script["v2"] = ModelFailure("boom")
    with pytest.raises(ModelFailure):
        serve(d, table(fallbacks={"v2": None}), "v2")
    assert call.versions() == ["v2"]


def test_configured_fallback_other_than_stable():
    d, call, _ = make()
    call.script["v3"] = ModelFailure("boom")
    served = serve(d, table(fallbacks={"v3": "v2"}), "v3")
    assert (served.version, served.fell_back_from, served.fallback_reason) == ("v2", "v3", "error")
    assert call.versions() == ["v3", "v2"]


def test_stable_version_has_no_fallback():
    d, call, _ = make()
    call.script["v1"] = ModelFailure("stable is broken")
    with pytest.raises(ModelFailure, match="stable is broken"):
        serve(d, table(), "v1", Decision.STABLE)
    assert call.versions() == ["v1"]
    assert d.fallbacks == 0


def test_fallback_with_another_adapter_class_is_not_tried():
    class OtherAdapter(RecommenderAdapter):  # other tensors, as far as identity goes
        pass

    adapters = {"v1": OtherAdapter, "v2": RecommenderAdapter, "v3": RecommenderAdapter}
    d, call, _ = make(adapters=adapters)
    call.script["v2"] = ModelFailure("boom")
    with pytest.raises(ModelFailure):
        serve(d, table(), "v2")
    assert call.versions() == ["v2"]


def test_fallback_error_propagates():
    d, call, _ = make()
    call.script["v2"] = ModelFailure("candidate broken")
    call.script["v1"] = Unavailable("stable down too")
    with pytest.raises(Unavailable, match="stable down too"):
        serve(d, table(), "v2")
    assert call.versions() == ["v2", "v1"]
    assert d.fallbacks == 1


# -- deadlines ---------------------------------------------------------------------------------


def test_first_attempt_gets_half_the_deadline_when_a_fallback_exists():
    d, call, clock = make()
    serve(d, table(), "v2", deadline=NOW + 8.0)
    assert call.calls == [("v2", pytest.approx(4.0))]


def test_first_attempt_gets_all_of_the_deadline_without_a_fallback():
    d, call, clock = make()
    t = table(fallbacks={"v2": None})
    serve(d, t, "v2", deadline=NOW + 8.0)
    serve(d, table(), "v1", Decision.STABLE, deadline=NOW + 8.0)  # stable: no fallback
    serve(d, table(), "v2", Decision.PINNED, deadline=NOW + 8.0, allow_fallback=False)
    serve(d, table(), "v2", deadline=NOW + 8.0, available=frozenset({"v2"}))  # v1 is down
    assert call.calls == [
        ("v2", pytest.approx(8.0)),
        ("v1", pytest.approx(8.0)),
        ("v2", pytest.approx(8.0)),
        ("v2", pytest.approx(8.0)),
    ]


def test_deadline_share_is_of_what_remains_now():
    d, call, clock = make()
    clock.advance(2.0)  # 6 s of the 8 s are left
    serve(d, table(), "v2", deadline=NOW + 8.0)
    assert call.calls == [("v2", pytest.approx(3.0))]


def test_fallback_gets_all_that_remains_after_a_timeout():
    d, call, clock = make()

    async def slow(version, inputs, parameters, timeout_s):
        clock.advance(timeout_s)  # used all of its share, then timed out
        raise DeadlineExceeded("timed out")

    call.script["v2"] = slow
    served = serve(d, table(), "v2", deadline=NOW + 10.0)
    assert served.version == "v1" and served.fallback_reason == "timeout"
    assert call.calls == [("v2", pytest.approx(5.0)), ("v1", pytest.approx(5.0))]


def test_deadline_already_passed_raises_without_calling():
    d, call, clock = make()
    for deadline in (NOW, NOW - 1.0):
        with pytest.raises(DeadlineExceeded):
            serve(d, table(), "v2", deadline=deadline)
        with pytest.raises(DeadlineExceeded):
            serve(d, table(), "v1", Decision.STABLE, deadline=deadline)
    assert call.calls == []
    assert d.fallbacks == 0


def test_no_fallback_when_the_deadline_passed_during_the_first_try():
    d, call, clock = make()

    async def too_slow(version, inputs, parameters, timeout_s):
        clock.advance(20.0)
        raise ModelFailure("late failure")

    call.script["v2"] = too_slow
    with pytest.raises(ServingError):
        serve(d, table(), "v2", deadline=NOW + 10.0)
    assert call.versions() == ["v2"]
    assert d.fallbacks == 0


def test_a_real_short_await_is_served():
    d, call, _ = make()

    async def sleepy(version, inputs, parameters, timeout_s):
        await asyncio.sleep(0.002)
        return {"outputs": OUTPUTS[version], "config": "slept"}

    call.script["v2"] = sleepy
    served = serve(d, table(), "v2")
    assert (served.version, served.config) == ("v2", "slept")


# -- circuit breaker ---------------------------------------------------------------------------


def tight_breaker(**overrides) -> BreakerSettings:
    base = dict(consecutive_failures=3, min_requests=1000, cooldown_s=5.0)
    base.update(overrides)
    return BreakerSettings(**base)


def test_breaker_opens_and_sends_requests_straight_to_fallback():
    d, call, clock = make(breaker=tight_breaker())
    call.script["v2"] = ModelFailure("boom")
    t = table()
    for _ in range(2):
        assert serve(d, t, "v2").fallback_reason == "error"
    assert d.breaker_states()["v2"] is BreakerState.CLOSED
    assert serve(d, t, "v2").fallback_reason == "error"
    assert d.breaker_states()["v2"] is BreakerState.OPEN
    assert call.versions() == ["v2", "v1"] * 3

    call.calls.clear()
    served = serve(d, t, "v2")
    assert served.version == "v1"
    assert served.decision is Decision.FALLBACK
    assert served.fell_back_from == "v2"
    assert served.fallback_reason == "breaker_open"
    assert call.versions() == ["v1"]  # the broken version was not called
    assert call.calls[0][1] == pytest.approx(10.0)  # the fallback gets the whole deadline
    assert d.fallbacks == 4
    assert d.breaker_states()["v1"] is BreakerState.CLOSED


def test_breaker_probes_again_after_cooldown():
    d, call, clock = make(breaker=tight_breaker(consecutive_failures=1))
    call.script["v2"] = [ModelFailure("boom"), OUTPUTS["v2"]]
    t = table()
    serve(d, t, "v2")
    assert d.breaker_states()["v2"] is BreakerState.OPEN
    clock.advance(5.0)
    assert d.breaker_states()["v2"] is BreakerState.HALF_OPEN
    call.calls.clear()
    served = serve(d, t, "v2", deadline=clock.now + 10.0)
    assert served.version == "v2" and served.decision is Decision.WEIGHTED
    assert call.versions() == ["v2"]
    assert d.breaker_states()["v2"] is BreakerState.CLOSED


def test_open_breaker_without_fallback_raises_503():
    d, call, _ = make(breaker=tight_breaker(consecutive_failures=1))
    call.script["v2"] = ModelFailure("boom")
    t = table(fallbacks={"v2": None})
    with pytest.raises(ModelFailure):
        serve(d, t, "v2")
    assert d.breaker_states()["v2"] is BreakerState.OPEN
    call.calls.clear()
    with pytest.raises(Unavailable) as info:
        serve(d, t, "v2")
    assert type(info.value) is not Unavailable  # the breaker's own subclass
    assert http_status(info.value) == 503
    assert "v2" in info.value.message
    assert call.calls == []


def test_invalid_input_does_not_count_as_breaker_failure():
    d, call, _ = make(breaker=tight_breaker(consecutive_failures=2))
    call.script["v2"] = InvalidInput("bad")
    t = table()
    for _ in range(5):
        with pytest.raises(InvalidInput):
            serve(d, t, "v2")
    assert d.breaker_states()["v2"] is BreakerState.CLOSED
    assert d.breakers["v2"].snapshot()["consecutive_failures"] == 0
    assert call.versions() == ["v2"] * 5


@pytest.mark.parametrize("error", [Unavailable("down"), DeadlineExceeded("slow")])
def test_unavailable_and_timeouts_count_as_breaker_failures(error):
    d, call, _ = make(breaker=tight_breaker(consecutive_failures=2))
    call.script["v2"] = error
    t = table()
    serve(d, t, "v2")
    serve(d, t, "v2")
    assert d.breaker_states()["v2"] is BreakerState.OPEN


def test_timeouts_while_the_version_has_no_running_replica_do_not_open_its_breaker():
    # The stable version (no fallback) lost its only replica: requests wait out their deadline
    # on Serve replacing it. Once the replacement runs, the version must serve at once, not
    # answer 503 from a breaker those waits opened (a CI run of test_router saw that).
    running = {"v1": False}
    d, call, _ = make(tight_breaker(consecutive_failures=2),
                      running=lambda version: running.get(version, True))  # fmt: skip
    call.script["v1"] = [DeadlineExceeded("waited on a replica")] * 3 + [OUTPUTS["v1"]]
    for _ in range(3):
        with pytest.raises(ReplicaWaitTimeout) as info:
            serve(d, table(), "v1")
        assert http_status(info.value) == 504
        assert not failure_is_evidence(info.value, client_deadline=False)  # nor a gate's
    assert d.breakers["v1"].state is BreakerState.CLOSED
    running["v1"] = True
    assert serve(d, table(), "v1").version == "v1"


@pytest.mark.parametrize("running", [False, True])
def test_a_fallback_from_a_timeout_is_evidence_only_if_the_version_had_a_running_replica(running):
    d, call, _ = make(running=lambda version: running)
    call.script["v2"] = DeadlineExceeded("slow")
    served = serve(d, table(), "v2")
    assert (served.version, served.fell_back_from, served.fallback_reason) == (
        "v1",
        "v2",
        "timeout",
    )
    assert served.fallback_evidence is running


@pytest.mark.parametrize(
    ("error", "client_deadline", "evidence"),
    [
        (ModelFailure("boom"), False, True),
        (Unavailable("down"), False, True),
        (DeadlineExceeded("slow"), False, True),
        (DeadlineExceeded("slow"), True, False),  # the client's own short deadline
        (ReplicaWaitTimeout("slow"), False, False),
        (ReplicaLost("node gone"), False, False),
        (LoadShed("full"), False, False),
    ],
)
def test_which_failures_are_evidence_against_the_version(error, client_deadline, evidence):
    assert failure_is_evidence(error, client_deadline=client_deadline) is evidence


def test_timeouts_while_the_version_has_a_running_replica_still_open_its_breaker():
    d, call, _ = make(tight_breaker(consecutive_failures=2), running=lambda version: True)
    call.script["v1"] = DeadlineExceeded("a hung model")
    for _ in range(2):
        with pytest.raises(DeadlineExceeded):
            serve(d, table(), "v1")
    assert d.breakers["v1"].state is BreakerState.OPEN


def test_success_resets_consecutive_failures():
    d, call, _ = make(breaker=tight_breaker(consecutive_failures=2))
    call.script["v2"] = [ModelFailure("a"), OUTPUTS["v2"], ModelFailure("b"), OUTPUTS["v2"]]
    t = table()
    for _ in range(4):
        serve(d, t, "v2")
    assert d.breaker_states()["v2"] is BreakerState.CLOSED


def test_reconfigure_applies_new_thresholds():
    d, call, _ = make()  # default: 5 failures in a row
    call.script["v2"] = ModelFailure("boom")
    t = table()
    serve(d, t, "v2")
    assert d.breaker_states()["v2"] is BreakerState.CLOSED
    d.reconfigure(BreakerSettings(consecutive_failures=2, min_requests=1000))
    for b in d.breakers.values():
        assert b.settings.consecutive_failures == 2
    serve(d, t, "v2")  # the second failure in a row
    assert d.breaker_states()["v2"] is BreakerState.OPEN
    assert serve(d, t, "v2").fallback_reason == "breaker_open"


def test_reconfigure_disabled_breaker_admits_everything():
    d, call, _ = make(breaker=tight_breaker(consecutive_failures=1))
    call.script["v2"] = ModelFailure("boom")
    t = table()
    serve(d, t, "v2")
    assert d.breaker_states()["v2"] is BreakerState.OPEN
    d.reconfigure(BreakerSettings(enabled=False))
    call.calls.clear()
    assert serve(d, t, "v2").fallback_reason == "error"
    assert call.versions() == ["v2", "v1"]


def test_open_fallback_breaker_propagates_503():
    d, call, _ = make(breaker=tight_breaker(consecutive_failures=1))
    call.script["v1"] = ModelFailure("stable boom")
    with pytest.raises(ModelFailure):
        serve(d, table(), "v1", Decision.STABLE)
    assert d.breaker_states()["v1"] is BreakerState.OPEN
    call.script["v2"] = ModelFailure("candidate boom")
    call.calls.clear()
    with pytest.raises(Unavailable) as info:
        serve(d, table(), "v2")
    assert http_status(info.value) == 503
    assert call.versions() == ["v2"]


# -- shadow copies -----------------------------------------------------------------------------


def shadow_table(percent: float = 100, version: str = "v3", max_in_flight: int = 4):
    return table(shadow=ShadowRule(version=version, percent=percent, max_in_flight=max_in_flight))


def primary(version: str = "v1") -> Served:
    return Served(version, Decision.WEIGHTED, OUTPUTS[version], f"cfg-{version}")


def test_shadow_copy_is_sent_and_agreement_accumulated():
    d, call, _ = make()
    t = shadow_table(version="v2")

    async def go():
        served = await d.serve(
            t, Route("v1", Decision.STABLE), INPUTS, {}, deadline=NOW + 10, available=ALL,
            allow_fallback=True,
        )  # fmt: skip
        started = d.maybe_shadow(t, served, INPUTS, {}, available=ALL, timeout_s=2.5)
        await d.drain_shadows()
        return served, started

    served, started = asyncio.run(go())
    assert started is True
    assert served.version == "v1" and served.outputs is OUTPUTS["v1"]
    assert call.calls == [("v1", pytest.approx(10.0)), ("v2", pytest.approx(2.5))]
    stats = d.shadow_stats["v2"]
    assert (stats.sent, stats.completed, stats.failed, stats.dropped) == (1, 1, 0, 0)
    agreement = stats.snapshot()["agreement"]
    assert set(agreement) == {"top_k_overlap", "scores_mean_abs_diff"}
    # rankings [0,1,2,3,4] vs [5,1,2,3,4] in the top 5: 4 shared
    assert agreement["top_k_overlap"] == pytest.approx(0.8)
    # |0.9-0.8| + |0.7-0.8| + 0 + 0 + 0 + |0.1-0.2| over 6 scores
    assert agreement["scores_mean_abs_diff"] == pytest.approx(0.05, abs=1e-6)


def test_shadow_agreement_is_a_mean_over_copies():
    d, call, _ = make()
    t = shadow_table(version="v2")
    call.script["v2"] = [OUTPUTS["v2"], OUTPUTS["v1"]]  # second copy agrees exactly

    async def go():
        for _ in range(2):
            d.maybe_shadow(t, primary("v1"), INPUTS, {}, available=ALL, timeout_s=1)
            await d.drain_shadows()

    asyncio.run(go())
    snap = d.shadow_stats["v2"].snapshot()
    assert snap["completed"] == 2 and snap["sent"] == 2
    assert snap["agreement"]["top_k_overlap"] == pytest.approx(0.9)
    assert snap["agreement"]["scores_mean_abs_diff"] == pytest.approx(0.025, abs=1e-6)


def test_shadow_percent_zero_sends_nothing():
    d, call, _ = make()
    t = shadow_table(percent=0)

    async def go():
        sent = [d.maybe_shadow(t, primary(), INPUTS, {}, available=ALL, timeout_s=1)
                for _ in range(20)]  # fmt: skip
        await d.drain_shadows()
        return sent

    assert asyncio.run(go()) == [False] * 20
    assert call.calls == []
    assert d.shadow_stats.get("v3") is None or d.shadow_stats["v3"].sent == 0


def test_no_shadow_without_a_rule():
    d, call, _ = make()

    async def go():
        return d.maybe_shadow(table(), primary(), INPUTS, {}, available=ALL, timeout_s=1)

    assert asyncio.run(go()) is False
    assert call.calls == [] and d.shadow_stats == {}


@pytest.mark.parametrize("draw, expected", [(0.0, True), (0.299, True), (0.3, False), (0.9, False)])
def test_shadow_percent_samples_with_the_rng(draw, expected):
    d, call, _ = make(rng=FixedRng(draw))
    t = shadow_table(percent=30)

    async def go():
        sent = d.maybe_shadow(t, primary(), INPUTS, {}, available=ALL, timeout_s=1)
        await d.drain_shadows()
        return sent

    assert asyncio.run(go()) is expected
    assert call.versions() == (["v3"] if expected else [])


def test_shadow_failure_is_counted_and_never_reaches_the_client():
    d, call, _ = make()
    t = shadow_table(version="v2")
    call.script["v2"] = [ModelFailure("shadow broke"), RuntimeError("a bug in the shadow")]

    async def go():
        served = await d.serve(
            t, Route("v1", Decision.STABLE), INPUTS, {}, deadline=NOW + 10, available=ALL,
            allow_fallback=True,
        )  # fmt: skip
        first = d.maybe_shadow(t, served, INPUTS, {}, available=ALL, timeout_s=1)
        await d.drain_shadows()
        second = d.maybe_shadow(t, served, INPUTS, {}, available=ALL, timeout_s=1)
        await d.drain_shadows()
        return served, first, second

    served, first, second = asyncio.run(go())
    assert first is True and second is True
    assert served.version == "v1" and served.decision is Decision.STABLE
    assert served.outputs is OUTPUTS["v1"] and served.config == "cfg-v1"
    stats = d.shadow_stats["v2"]
    assert (stats.sent, stats.completed, stats.failed, stats.dropped) == (2, 0, 2, 0)
    assert stats.snapshot()["agreement"] == {}
    # a failing shadow feeds no breaker of the primary path
    assert d.breakers["v2"].snapshot()["consecutive_failures"] == 0
    assert d._shadow_in_flight == 0


def test_shadow_max_in_flight_drops_the_excess():
    d, call, _ = make()
    t = shadow_table(version="v3", max_in_flight=2)
    gate = asyncio.Event
    state: dict[str, Any] = {}

    async def blocked(version, inputs, parameters, timeout_s):
        state["waiting"] = state.get("waiting", 0) + 1
        await state["event"].wait()
        return {"outputs": OUTPUTS[version], "config": "c"}

    call.script["v3"] = blocked

    async def go():
        state["event"] = gate()
        sent = [d.maybe_shadow(t, primary(), INPUTS, {}, available=ALL, timeout_s=1)
                for _ in range(5)]  # fmt: skip
        for _ in range(3):
            await asyncio.sleep(0)  # let the copies start and block
        stats = d.shadow_stats["v3"]
        during = (stats.sent, stats.completed, stats.dropped, state.get("waiting", 0))
        state["event"].set()
        await d.drain_shadows()
        after = d.maybe_shadow(t, primary(), INPUTS, {}, available=ALL, timeout_s=1)
        await d.drain_shadows()
        return sent, during, after

    sent, during, after = asyncio.run(go())
    assert sent == [True, True, False, False, False]
    assert during == (2, 0, 3, 2)
    assert after is True  # slots are freed once copies finish
    stats = d.shadow_stats["v3"]
    assert (stats.sent, stats.completed, stats.failed, stats.dropped) == (3, 3, 0, 3)
    assert call.versions() == ["v3"] * 3


def test_shadow_not_sent_to_the_served_version():
    d, call, _ = make()
    t = shadow_table(version="v1")

    async def go():
        sent = d.maybe_shadow(t, primary("v1"), INPUTS, {}, available=ALL, timeout_s=1)
        await d.drain_shadows()
        return sent

    assert asyncio.run(go()) is False
    assert call.calls == []
    assert "v1" not in d.shadow_stats or d.shadow_stats["v1"].sent == 0


def test_shadow_not_sent_when_its_version_is_unavailable():
    d, call, _ = make()
    t = shadow_table(version="v3")

    async def go():
        sent = d.maybe_shadow(
            t, primary("v1"), INPUTS, {}, available=frozenset({"v1", "v2"}), timeout_s=1
        )
        await d.drain_shadows()
        return sent

    assert asyncio.run(go()) is False
    assert call.calls == []
    stats = d.shadow_stats["v3"]
    assert (stats.sent, stats.completed, stats.dropped) == (0, 0, 1)


def test_shadow_of_a_fallback_answer_compares_with_what_was_served():
    d, call, _ = make()
    t = shadow_table(version="v3")
    call.script["v2"] = ModelFailure("boom")

    async def go():
        served = await d.serve(
            t, Route("v2", Decision.WEIGHTED), INPUTS, {}, deadline=NOW + 10, available=ALL,
            allow_fallback=True,
        )  # fmt: skip
        sent = d.maybe_shadow(t, served, INPUTS, {}, available=ALL, timeout_s=1)
        await d.drain_shadows()
        return served, sent

    served, sent = asyncio.run(go())
    assert served.version == "v1" and sent is True
    assert d.fallbacks == 1
    agreement = d.shadow_stats["v3"].snapshot()["agreement"]
    # v1 ranking [0..5] vs v3 [5,4,3,2,1,0], top 5: {0,1,2,3,4} & {5,4,3,2,1} = 4
    assert agreement["top_k_overlap"] == pytest.approx(0.8)
    expected = float(np.mean(np.abs(OUTPUTS["v1"]["scores"] - OUTPUTS["v3"]["scores"])))
    assert agreement["scores_mean_abs_diff"] == pytest.approx(expected)


# -- a replica lost under the request (node failure) ---------------------------------------------


def test_replica_lost_on_stable_is_retried_on_the_same_version():
    from app.errors import ReplicaLost

    d, call, _ = make()
    call.script["v1"] = [ReplicaLost("node gone"), OUTPUTS["v1"]]
    served = serve(d, table(), "v1")  # the stable version: no fallback to go to
    assert served.version == "v1" and served.decision is Decision.WEIGHTED
    assert served.fell_back_from is None
    assert call.versions() == ["v1", "v1"]
    assert d.replica_retries == 1 and d.fallbacks == 0


def test_replica_lost_with_a_fallback_falls_back_at_once():
    from app.errors import ReplicaLost

    d, call, _ = make()
    call.script["v2"] = ReplicaLost("node gone")
    served = serve(d, table(), "v2")
    assert served.version == "v1" and served.fallback_reason == "replica_lost"
    assert call.versions() == ["v2", "v1"] and d.replica_retries == 0


def test_replica_lost_on_every_retry_without_a_fallback_is_a_503():
    from app.constants import REPLICA_RETRIES
    from app.errors import ReplicaLost

    d, call, _ = make()
    call.script["v2"] = ReplicaLost("node gone")
    with pytest.raises(ReplicaLost) as caught:
        serve(d, table(fallbacks={"v2": None}), "v2")
    assert http_status(caught.value) == 503
    assert call.versions() == ["v2"] * (1 + REPLICA_RETRIES)
    assert d.replica_retries == REPLICA_RETRIES


def test_a_dead_replica_picked_again_is_retried_until_the_handle_learns_of_its_death():
    # Serve's handle can pick the dead replica a second time before it hears of the death
    # (seen under a node kill: one 503 in 1,000 requests with a single retry).
    from app.errors import ReplicaLost

    d, call, _ = make()
    call.script["v1"] = [ReplicaLost("node gone"), ReplicaLost("node gone"), OUTPUTS["v1"]]
    served = serve(d, table(), "v1")
    assert served.version == "v1" and call.versions() == ["v1", "v1", "v1"]
    assert d.replica_retries == 2


def test_replica_lost_is_not_retried_past_the_deadline():
    from app.errors import ReplicaLost

    d, call, clock = make()

    async def lost_slowly(version, inputs, parameters, timeout_s):
        clock.advance(20.0)
        raise ReplicaLost("node gone")

    call.script["v1"] = lost_slowly
    with pytest.raises(ReplicaLost):
        serve(d, table(), "v1", deadline=NOW + 10.0)
    assert call.versions() == ["v1"] and d.replica_retries == 0


def test_lost_replicas_do_not_open_the_breaker():
    from app.errors import ReplicaLost

    d, call, _ = make(BreakerSettings(consecutive_failures=2))
    # A node dies with requests in flight: ten calls in a row are lost.
    call.script["v1"] = [ReplicaLost("node gone")] * 10 + [OUTPUTS["v1"]]
    for _ in range(2):
        with pytest.raises(ReplicaLost):
            serve(d, table(), "v1")  # lost on every retry: the stable version has no fallback
    assert d.breakers["v1"].state is BreakerState.CLOSED
    assert serve(d, table(), "v1").version == "v1"  # not refused by an open breaker
    assert d.replica_retries == 8


def test_a_pin_with_allow_fallback_to_a_restarting_version_falls_back_at_once():
    # v2 has no running replica (restarting): waiting half the deadline for it would only delay
    # the answer the fallback can give now.
    d, call, _ = make()
    served = serve(d, table(), "v2", Decision.PINNED, allow_fallback=True,
                   available=frozenset({"v1", "v3"}))  # fmt: skip
    assert call.versions() == ["v1"]
    assert (served.version, served.fell_back_from, served.fallback_reason) == (
        "v1",
        "v2",
        "unavailable",
    )


def test_a_pin_without_allow_fallback_to_a_restarting_version_waits_on_it():
    d, call, _ = make()
    served = serve(d, table(), "v2", Decision.PINNED, allow_fallback=False,
                   available=frozenset({"v1", "v3"}))  # fmt: skip
    assert call.versions() == ["v2"] and served.version == "v2"
    assert call.calls[0][1] == pytest.approx(10.0)  # the whole deadline to wait for a replica


@pytest.mark.parametrize(
    ("reason", "client_deadline", "available", "evidence"),
    [
        ("error", False, True, True),  # the model failed: the candidate's fault
        ("breaker_open", False, True, True),
        ("unavailable", False, False, True),
        ("timeout", False, True, True),  # slow with a replica running: the candidate's fault
        ("timeout", True, True, False),  # the client's own short deadline
        ("timeout", False, False, False),  # waited on Serve replacing its only replica
        ("replica_lost", False, True, False),  # a process or node died under the request
        ("shed", False, True, False),  # a full queue
    ],
)
def test_which_fallbacks_are_evidence_against_the_version(
    reason, client_deadline, available, evidence
):
    """`rollout bench chaos` rolled a healthy canary back in 4 of 6 runs: killing its only
    replica made its in-flight requests fall back (replica lost) and the ones waiting for the
    replacement time out, and both counted as its failures."""
    assert fallback_is_evidence(reason, client_deadline=client_deadline,
                                version_available=available) is evidence  # fmt: skip
