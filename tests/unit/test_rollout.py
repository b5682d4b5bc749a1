"""The rollout plan schema and state machine, ticked every 250 ms with a fake clock.

A small simulated world turns a state and a time into the observation a controller would
gather: 4,000 requests/s split by the state's weights, and at least 400/s of preview or
shadow traffic to the candidate (so blue-green's 0% preview still has evidence).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace

import pytest
import yaml
from pydantic import ValidationError

from app.config import TrafficConfig
from app.rollout import (
    MAX_HISTORY_EVENTS,
    Command,
    Decision,
    GateStatus,
    Hold,
    Observation,
    Phase,
    RolloutPlan,
    RolloutState,
    ScaleDown,
    SetWeight,
    Switch,
    VersionStats,
    WaitForPromote,
    apply_command,
    evaluate_gates,
    step,
)
from tests.support.fakes import FakeClock

T0 = 1_700_000_000.0
TICK = 0.25
TOTAL_RPS = 4000.0
PREVIEW_RPS = 400.0
CAND, STABLE = "v2", "v1"

World = Callable[[RolloutState, float], Observation]


def world(
    *,
    cand_error_rate: float = 0.0,
    stable_error_rate: float = 0.0,
    cand_p99_ms: float = 50.0,
    stable_p99_ms: float = 50.0,
    cand_p50_ms: float = 10.0,
    stable_p50_ms: float = 10.0,
    shadow_agreement: float | None = None,
    prometheus_value: float | None = None,
    prometheus_available: bool = False,
) -> World:
    """Stats for the window since the state's current step started, as the controller sees."""

    def observe(state: RolloutState, now: float) -> Observation:
        window_s = max(0.0, now - state.window_started_at)
        weight = state.candidate_weight
        cand_n = int(max(TOTAL_RPS * weight / 100, PREVIEW_RPS) * window_s)
        stable_n = int(TOTAL_RPS * (100 - weight) / 100 * window_s)

        def stats(n: int, rate: float, p50: float, p99: float) -> VersionStats:
            if n == 0:
                return VersionStats()
            return VersionStats(n, round(n * rate), p50, p99)

        return Observation(
            stats={
                CAND: stats(cand_n, cand_error_rate, cand_p50_ms, cand_p99_ms),
                STABLE: stats(stable_n, stable_error_rate, stable_p50_ms, stable_p99_ms),
            },
            shadow_agreement=shadow_agreement,
            prometheus_value=prometheus_value,
            prometheus_available=prometheus_available,
        )

    return observe


HEALTHY = world()
BROKEN = world(cand_error_rate=0.6)  # above fail_fast_error_rate (0.5)


def plan(strategy: str = "canary", **fields) -> RolloutPlan:
    data: dict = {"strategy": strategy, "candidate": CAND, "stable": STABLE}
    if strategy == "canary":
        data["canary"] = {
            "steps": [
                {"set_weight": 5}, {"analysis_s": 2},
                {"set_weight": 10}, {"analysis_s": 2},
                {"set_weight": 25}, {"analysis_s": 2},
                {"set_weight": 50}, {"analysis_s": 2},
                {"set_weight": 100}, {"analysis_s": 2},
            ]
        }  # fmt: skip
    elif strategy == "blue_green":
        data["blue_green"] = {
            "preview_s": 1, "shadow_percent": 10, "analysis_s": 2, "scale_down_delay_s": 1,
        }  # fmt: skip
    else:
        data["linear"] = {"step_percent": 30, "interval_s": 1}
    data.update(fields)
    return RolloutPlan.model_validate(data)


def canary(*steps: dict, **fields) -> RolloutPlan:
    return plan("canary", canary={"steps": list(steps)}, **fields)


def run(
    state: RolloutState,
    clock: FakeClock,
    ticks: int,
    observe: World = HEALTHY,
) -> list[Decision]:
    """Tick `ticks` times (the first at clock.now); the clock ends one tick past the last."""
    decisions = []
    for _ in range(ticks):
        decision = step(state, observe(state, clock.now), clock.now)
        decisions.append(decision)
        state = decision.state
        clock.advance()
    return decisions


def tick(state: RolloutState, clock: FakeClock, observe: World = HEALTHY) -> Decision:
    return run(state, clock, 1, observe)[0]


def weights(decisions: list[Decision]) -> list[float]:
    return [d.weights[CAND] for d in decisions]


def phases(decisions: list[Decision]) -> list[Phase]:
    return [d.state.phase for d in decisions]


def assert_fixed_point(decision: Decision, observe: World, now: float) -> None:
    """Reconciling the result again at the same instant changes nothing."""
    again = step(decision.state, observe(decision.state, now), now)
    assert again.events == ()
    assert again.state == decision.state


# -- whole rollouts --------------------------------------------------------------------------


def test_whole_canary_succeeds_tick_by_tick():
    clock = FakeClock(T0, tick_s=TICK)
    state = RolloutState.start(plan(), clock.now)
    assert state.phase is Phase.IDLE and state.weights == {CAND: 0.0, STABLE: 100.0}
    decisions = run(state, clock, 44)

    # each analysis hold is 2 s = 8 ticks; the tick that ends it applies the next weight
    assert weights(decisions) == [5.0] * 8 + [10.0] * 8 + [25.0] * 8 + [50.0] * 8 + [100.0] * 12
    assert phases(decisions) == [Phase.PROGRESSING] * 40 + [Phase.SUCCEEDED] * 4
    for d in decisions:
        assert sum(d.weights.values()) == pytest.approx(100.0)
    assert [d.stable for d in decisions] == [STABLE] * 40 + [CAND] * 4
    final = decisions[40].state
    # the end of steps went through PROMOTING to SUCCEEDED on that one tick
    assert [(e.from_phase, e.to_phase) for e in decisions[40].events][-2:] == [
        (Phase.PROGRESSING, Phase.PROMOTING),
        (Phase.PROMOTING, Phase.SUCCEEDED),
    ]
    assert "analysis 2s passed" in decisions[40].events[0].reason
    # one generation per traffic change: 5, 10, 25, 50, 100, then the stable version changes
    assert final.generation == 6
    assert [d.traffic_changed for d in decisions].count(True) == 6
    # terminal phases are absorbing
    assert decisions[-1].state == final and decisions[-1].events == ()


def test_whole_blue_green_succeeds_tick_by_tick():
    clock = FakeClock(T0, tick_s=TICK)
    decisions = run(RolloutState.start(plan("blue_green"), clock.now), clock, 18)

    # preview 1 s (4 ticks) + analysis 2 s (8 ticks) at 0%, then switch; old warm for 1 s
    assert weights(decisions) == [0.0] * 12 + [100.0] * 6
    assert phases(decisions) == (
        [Phase.PROGRESSING] * 12 + [Phase.PROMOTING] * 4 + [Phase.SUCCEEDED] * 2
    )
    assert [d.shadow_percent for d in decisions] == [10.0] * 12 + [0.0] * 6
    # the old version stays the stable (fallback) version until the scale-down delay is over
    assert [d.stable for d in decisions] == [STABLE] * 16 + [CAND] * 2
    # the analysis judged the preview traffic (0% public)
    analysis_done = decisions[12].events[0]
    assert "analysis 2s passed" in analysis_done.reason
    assert analysis_done.gates["min_requests"]["status"] == "passed"


def test_whole_linear_succeeds_tick_by_tick():
    clock = FakeClock(T0, tick_s=TICK)
    decisions = run(RolloutState.start(plan("linear"), clock.now), clock, 18)
    # 30, 60, 90, then 100 (analysed too), 1 s = 4 ticks each
    assert weights(decisions) == [30.0] * 4 + [60.0] * 4 + [90.0] * 4 + [100.0] * 6
    assert phases(decisions) == [Phase.PROGRESSING] * 16 + [Phase.SUCCEEDED] * 2


def test_linear_bake_is_left_out_of_the_analysis_window():
    clock = FakeClock(T0, tick_s=TICK)
    state = RolloutState.start(plan("linear", bake_s=0.5), clock.now)
    decisions = run(state, clock, 26)
    # per weight: 0.5 s bake (2 ticks) then 1 s analysis (4 ticks)
    assert weights(decisions) == [30.0] * 6 + [60.0] * 6 + [90.0] * 6 + [100.0] * 8
    assert decisions[24].state.phase is Phase.SUCCEEDED
    assert decisions[1].state.window_started_at == T0  # still baking
    assert decisions[2].state.window_started_at == T0 + 0.5  # analysis window starts afresh
    assert isinstance(decisions[2].state.current_step, Hold)
    assert decisions[2].state.current_step.analyze


@pytest.mark.parametrize("strategy", ["canary", "blue_green", "linear"])
def test_every_tick_is_repeatable_and_a_fixed_point(strategy):
    clock = FakeClock(T0, tick_s=TICK)
    state = RolloutState.start(plan(strategy), clock.now)
    for _ in range(50):
        observation = HEALTHY(state, clock.now)
        first = step(state, observation, clock.now)
        assert step(state, observation, clock.now) == first  # same inputs, same decision
        assert_fixed_point(first, HEALTHY, clock.now)
        state = first.state
        clock.advance()
    assert state.phase is Phase.SUCCEEDED


# -- failure at every step -------------------------------------------------------------------

FAILURE_PLANS = {
    "canary": lambda: canary(
        {"set_weight": 5},
        {"analysis_s": 1},
        {"pause_s": 1},
        {"set_weight": 25},
        {"pause_s": None},
        {"set_weight": 50},
        {"analysis_s": 1},
        {"set_weight": 100},
        {"analysis_s": 1},
    ),  # fmt: skip
    "blue_green": lambda: plan("blue_green"),
    "linear": lambda: plan("linear", bake_s=0.5),
}


def waiting_steps(rollout_plan: RolloutPlan) -> list[int]:
    return [
        i
        for i, item in enumerate(rollout_plan.expand())
        if isinstance(item, (Hold, WaitForPromote, ScaleDown))
    ]


FAILURE_CASES = [
    (name, index) for name, make in FAILURE_PLANS.items() for index in waiting_steps(make())
]


def test_failure_cases_cover_every_kind_of_waiting_step():
    kinds = {type(FAILURE_PLANS[name]().expand()[i]) for name, i in FAILURE_CASES}
    assert kinds == {Hold, WaitForPromote, ScaleDown}
    assert len(FAILURE_CASES) == 5 + 3 + 8


@pytest.mark.parametrize(("strategy", "index"), FAILURE_CASES)
def test_failure_at_every_step_rolls_back_within_one_tick(strategy, index):
    clock = FakeClock(T0, tick_s=TICK)
    state = RolloutState.start(FAILURE_PLANS[strategy](), clock.now)
    for _ in range(200):  # healthy until the rollout rests on step `index`
        if state.phase is not Phase.IDLE and state.step_index == index:
            break
        if state.phase is Phase.PAUSED and isinstance(state.current_step, WaitForPromote):
            state = apply_command(state, Command.PROMOTE, clock.now)
        state = tick(state, clock).state
    else:
        pytest.fail(f"never reached step {index}")
    weight_before = state.candidate_weight
    assert state.phase in (Phase.PROGRESSING, Phase.PAUSED, Phase.PROMOTING)

    decision = tick(state, clock, BROKEN)  # the first bad observation

    assert decision.state.phase is Phase.ROLLED_BACK
    assert decision.weights == {CAND: 0.0, STABLE: 100.0}
    assert decision.stable == STABLE and decision.shadow_percent == 0.0
    assert decision.traffic_changed == (weight_before != 0.0 or strategy == "blue_green")
    event = decision.state.history[-1]
    assert event.to_phase is Phase.ROLLED_BACK and event.weight == 0.0
    assert "gate fail_fast_error_rate failed" in event.reason
    assert "0.6000" in event.reason  # the reading
    assert event.gates["fail_fast_error_rate"]["status"] == "failed"
    # absorbing: healthy ticks and time do not bring it back
    later = run(decision.state, clock, 8)
    assert all(d.state == decision.state and d.weights[CAND] == 0.0 for d in later)


def test_fail_fast_ignores_min_requests_but_needs_ten_requests():
    gates_plan = plan(gates={"min_requests": 1000})
    state = step(RolloutState.start(gates_plan, T0), Observation(), T0).state
    nine_failures = Observation(stats={CAND: VersionStats(9, 9)})
    assert step(state, nine_failures, T0 + TICK).state.phase is Phase.PROGRESSING
    ten = step(state, Observation(stats={CAND: VersionStats(10, 6)}), T0 + TICK)
    assert ten.state.phase is Phase.ROLLED_BACK
    verdict = {v.gate: v for v in ten.verdicts}
    assert verdict["fail_fast_error_rate"].status is GateStatus.FAILED
    assert verdict["max_error_rate"].status is GateStatus.PENDING  # 10 of 1000


# -- gates -----------------------------------------------------------------------------------


def started(rollout_plan: RolloutPlan) -> RolloutState:
    """A rollout after its first tick, resting in its first hold at T0."""
    return step(RolloutState.start(rollout_plan, T0), Observation(), T0).state


def observation(cand: VersionStats, base: VersionStats | None = None, **kw) -> Observation:
    stats = {CAND: cand} if base is None else {CAND: cand, STABLE: base}
    return Observation(stats=stats, **kw)


def gate(decision: Decision, name: str):
    return next(v for v in decision.verdicts if v.gate == name)


def test_relative_error_rate_gate():
    state = started(plan())
    # 4% is under max_error_rate (5%) but 3.9 points over stable's 0.1% (limit 2 points)
    worse = step(state, observation(VersionStats(1000, 40), VersionStats(10000, 10)), T0 + 1)
    assert worse.state.phase is Phase.ROLLED_BACK
    assert gate(worse, "max_error_rate").status is GateStatus.PASSED
    increase = gate(worse, "max_error_rate_increase")
    assert increase.status is GateStatus.FAILED
    assert increase.value == pytest.approx(0.039) and increase.threshold == 0.02
    assert "gate max_error_rate_increase failed" in worse.state.history[-1].reason
    assert "+0.0390" in worse.state.history[-1].reason

    # the same candidate next to a stable at 3% is only 1 point worse
    similar = step(state, observation(VersionStats(1000, 40), VersionStats(10000, 300)), T0 + 1)
    assert similar.state.phase is Phase.PROGRESSING
    assert gate(similar, "max_error_rate_increase").status is GateStatus.PASSED

    # no stable traffic: nothing to compare with, so skipped rather than failed or pending
    alone = step(state, observation(VersionStats(1000, 40)), T0 + 1)
    assert gate(alone, "max_error_rate_increase").status is GateStatus.SKIPPED
    assert alone.state.phase is Phase.PROGRESSING


def test_absolute_error_rate_gate():
    state = started(plan())
    decision = step(state, observation(VersionStats(200, 12), VersionStats(4000, 200)), T0 + 1)
    assert decision.state.phase is Phase.ROLLED_BACK
    assert gate(decision, "max_error_rate").status is GateStatus.FAILED
    assert "gate max_error_rate failed: candidate error rate 0.0600 (12/200) > 0.05" in (
        decision.state.history[-1].reason
    )


def test_p99_latency_ratio_gate():
    state = started(plan())
    slow = observation(VersionStats(500, 0, 10, 160), VersionStats(5000, 0, 10, 100))
    decision = step(state, slow, T0 + 1)
    assert decision.state.phase is Phase.ROLLED_BACK
    verdict = gate(decision, "max_p99_latency_ratio")
    assert verdict.status is GateStatus.FAILED and verdict.value == pytest.approx(1.6)
    assert "gate max_p99_latency_ratio failed" in decision.state.history[-1].reason
    assert "1.600 (160 ms / 100 ms) > 1.5" in decision.state.history[-1].reason

    fine = observation(VersionStats(500, 0, 10, 140), VersionStats(5000, 0, 10, 100))
    assert step(state, fine, T0 + 1).state.phase is Phase.PROGRESSING

    no_baseline = step(state, observation(VersionStats(500, 0, 10, 900)), T0 + 1)
    assert gate(no_baseline, "max_p99_latency_ratio").status is GateStatus.SKIPPED
    no_latency = step(state, observation(VersionStats(500, 0), VersionStats(5000, 0, 10, 100)), T0)
    assert gate(no_latency, "max_p99_latency_ratio").status is GateStatus.PENDING


def test_p50_latency_ratio_gate_is_off_by_default_and_judges_when_set():
    slow_median = observation(VersionStats(500, 0, 30, 50), VersionStats(5000, 0, 10, 50))
    default = step(started(plan()), slow_median, T0 + 1)
    assert "max_p50_latency_ratio" not in {v.gate for v in default.verdicts}
    assert default.state.phase is Phase.PROGRESSING
    strict = step(started(plan(gates={"max_p50_latency_ratio": 2})), slow_median, T0 + 1)
    assert strict.state.phase is Phase.ROLLED_BACK
    assert "max_p50_latency_ratio" in strict.state.history[-1].reason


def test_shadow_agreement_gate():
    bg = plan("blue_green", gates={"min_shadow_agreement": 0.9})
    state = started(bg)
    enough = VersionStats(500, 0, 10, 50)
    pending = step(state, observation(enough), T0 + 1)
    assert gate(pending, "min_shadow_agreement").status is GateStatus.PENDING
    assert step(state, observation(enough, shadow_agreement=0.95), T0 + 1).state.phase is (
        Phase.PROGRESSING
    )
    low = step(state, observation(enough, shadow_agreement=0.8), T0 + 1)
    assert low.state.phase is Phase.ROLLED_BACK
    assert "gate min_shadow_agreement failed: shadow top-k agreement 0.8000 < 0.9" in (
        low.state.history[-1].reason
    )


def test_below_min_requests_no_gate_judges():
    state = started(plan(gates={"min_requests": 100}))
    # 9 of 99 failing is 9%, over max_error_rate (5%) but under fail-fast: no verdict yet
    decision = step(state, observation(VersionStats(99, 9), VersionStats(2000, 0)), T0 + 1)
    assert decision.state.phase is Phase.PROGRESSING
    statuses = {v.gate: v.status for v in decision.verdicts}
    assert statuses == {
        "min_requests": GateStatus.PENDING,
        "fail_fast_error_rate": GateStatus.PASSED,
        "max_error_rate": GateStatus.PENDING,
        "max_error_rate_increase": GateStatus.PENDING,
        "max_p99_latency_ratio": GateStatus.PENDING,
    }
    max_rate = gate(decision, "max_error_rate")
    assert max_rate.value == pytest.approx(9 / 99)  # the reading is shown while pending
    assert max_rate.reason.startswith("waiting for min_requests (99 of 100)")
    # the hundredth request makes it a verdict
    judged = step(state, observation(VersionStats(100, 10), VersionStats(2000, 0)), T0 + 1)
    assert judged.state.phase is Phase.ROLLED_BACK
    assert gate(judged, "max_error_rate").status is GateStatus.FAILED


def test_analysis_that_ends_pending_pauses_as_inconclusive_and_resume_retries():
    rollout_plan = canary(
        {"set_weight": 5}, {"analysis_s": 2}, {"set_weight": 10}, {"pause_s": 600}
    )
    clock = FakeClock(T0, tick_s=TICK)
    state = RolloutState.start(rollout_plan, clock.now)
    trickle: World = lambda s, now: observation(  # noqa: E731 - 20 requests/s: too few
        VersionStats(int(20 * (now - s.window_started_at)), 0, 10, 50), VersionStats(4000, 0)
    )
    decisions = run(state, clock, 12, trickle)
    assert weights(decisions) == [5.0] * 12
    assert phases(decisions) == [Phase.PROGRESSING] * 8 + [Phase.PAUSED] * 4
    paused = decisions[-1].state
    assert not paused.paused_by_user
    assert "analysis inconclusive: min_requests: 40 of 100" in paused.history[-1].reason
    # gates still judge while paused
    assert step(paused, BROKEN(paused, clock.now), clock.now).state.phase is Phase.ROLLED_BACK

    # resume: the hold timer runs again, the stats window keeps what it has
    resumed_at = clock.now  # T0 + 3
    resumed = apply_command(paused, Command.RESUME, resumed_at)
    assert resumed.phase is Phase.PROGRESSING and resumed.window_started_at == T0
    decisions = run(resumed, clock, 9, trickle)
    assert weights(decisions) == [5.0] * 8 + [10.0]  # 2 s after resume, 100 requests by then
    assert decisions[-1].events[0].time_s == resumed_at + 2


def test_prometheus_gate_skipped_when_unavailable_only_if_declared_so():
    rollout_plan = canary(
        {"set_weight": 5}, {"analysis_s": 1}, {"set_weight": 10}, {"pause_s": 600},
        gates={"prometheus_query": "sum(rate(gpu_oom_total[1m]))", "prometheus_max": 1.0,
               "prometheus_on_error": "skip"},
    )  # fmt: skip
    clock = FakeClock(T0, tick_s=TICK)
    decisions = run(RolloutState.start(rollout_plan, clock.now), clock, 5)
    verdict = gate(decisions[-1], "prometheus_max")
    assert verdict.status is GateStatus.SKIPPED
    assert "prometheus unavailable" in verdict.reason
    assert weights(decisions) == [5.0] * 4 + [10.0]  # skipped does not hold the analysis


def test_an_unreachable_prometheus_fails_closed_by_default_the_analysis_pauses():
    # F12: an unreadable metric is not a passing one. Pending until the error limit, then
    # (prometheus_on_error: pause) still pending: the analysis ends inconclusive and pauses.
    rollout_plan = canary(
        {"set_weight": 5}, {"analysis_s": 1}, {"set_weight": 10},
        gates={"prometheus_query": "q", "prometheus_max": 1.0},
    )  # fmt: skip
    state, clock = RolloutState.start(rollout_plan, T0), FakeClock(T0, tick_s=TICK)
    unreachable = world()
    for errors in range(12):
        seen = replace(unreachable(state, clock.now), prometheus_errors=errors)
        decision = step(state, seen, clock.now)
        state = decision.state
        clock.advance()
    assert gate(decision, "prometheus_max").status is GateStatus.PENDING
    assert "prometheus_on_error: pause" in gate(decision, "prometheus_max").reason
    assert state.phase is Phase.PAUSED and state.candidate_weight == 5.0


def test_prometheus_on_error_fail_rolls_back_after_the_error_limit():
    rollout_plan = plan(gates={"prometheus_query": "q", "prometheus_max": 1.0,
                               "prometheus_on_error": "fail", "prometheus_error_limit": 2})  # fmt: skip
    state = started(rollout_plan)
    seen = observation(VersionStats(500, 0, 10, 50), prometheus_available=False)
    first = step(state, replace(seen, prometheus_errors=1), T0 + 1)
    assert gate(first, "prometheus_max").status is GateStatus.PENDING
    second = step(first.state, replace(seen, prometheus_errors=2), T0 + 2)
    assert gate(second, "prometheus_max").status is GateStatus.FAILED
    assert second.state.phase is Phase.ROLLED_BACK


@pytest.mark.parametrize(
    ("value", "status", "phase"),
    [
        (2.0, GateStatus.FAILED, Phase.ROLLED_BACK),
        (1.0, GateStatus.PASSED, Phase.PROGRESSING),
        (None, GateStatus.PENDING, Phase.PROGRESSING),
        (float("nan"), GateStatus.PENDING, Phase.PROGRESSING),
    ],
)
def test_prometheus_gate_when_available(value, status, phase):
    rollout_plan = plan(gates={"prometheus_query": "errors_total", "prometheus_max": 1.0})
    seen = observation(
        VersionStats(500, 0, 10, 50), prometheus_value=value, prometheus_available=True
    )
    decision = step(started(rollout_plan), seen, T0 + 1)
    assert gate(decision, "prometheus_max").status is status
    assert decision.state.phase is phase
    if phase is Phase.ROLLED_BACK:
        assert "gate prometheus_max failed: errors_total = 2 > 1" in (
            decision.state.history[-1].reason
        )


def test_gate_readings_in_history_are_json_safe():
    rollout_plan = plan(gates={"prometheus_query": "q", "prometheus_max": 1.0})
    seen = observation(
        VersionStats(500, 400, 10, 50), prometheus_value=float("nan"), prometheus_available=True
    )
    decision = step(started(rollout_plan), seen, T0 + 1)
    json.dumps(decision.state.to_dict(), allow_nan=False)


def test_evaluate_gates_lists_only_configured_gates_in_order():
    gates = plan(
        gates={
            "max_error_rate": None,
            "max_error_rate_increase": None,
            "max_p99_latency_ratio": None,
            "fail_fast_error_rate": None,
        }
    ).gates
    verdicts = evaluate_gates(gates, Observation(), candidate=CAND, stable=STABLE)
    assert [v.gate for v in verdicts] == ["min_requests"]
    all_on = plan(
        gates={"max_p50_latency_ratio": 2, "prometheus_query": "q", "prometheus_max": 1}
    ).gates
    names = [v.gate for v in evaluate_gates(all_on, Observation(), candidate=CAND, stable=STABLE)]
    assert names == [
        "min_requests",
        "fail_fast_error_rate",
        "max_error_rate",
        "max_error_rate_increase",
        "max_p99_latency_ratio",
        "max_p50_latency_ratio",
        "prometheus_max",
    ]


# -- commands --------------------------------------------------------------------------------


def test_promote_ends_a_wait_for_promote():
    rollout_plan = canary(
        {"set_weight": 5}, {"pause_s": None}, {"set_weight": 50}, {"analysis_s": 1}
    )
    clock = FakeClock(T0, tick_s=TICK)
    decisions = run(RolloutState.start(rollout_plan, clock.now), clock, 20)
    assert weights(decisions) == [5.0] * 20
    assert phases(decisions) == [Phase.PAUSED] * 20  # waits for as long as it takes
    waiting = decisions[-1].state
    assert not waiting.paused_by_user and "waiting for promote" in waiting.history[-1].reason

    promoted = apply_command(waiting, "promote", clock.now, reason="by alice")
    assert promoted.phase is Phase.PROGRESSING and promoted.candidate_weight == 50.0
    assert "command promote (by alice)" in [e.reason for e in promoted.history]
    assert promoted.generation == waiting.generation + 1
    decisions = run(promoted, clock, 5)
    assert weights(decisions) == [50.0] * 4 + [100.0]
    assert decisions[-1].state.phase is Phase.SUCCEEDED


def test_promote_skips_a_timed_pause_and_an_analysis():
    rollout_plan = canary(
        {"set_weight": 5}, {"pause_s": 600}, {"set_weight": 10}, {"analysis_s": 600},
        {"set_weight": 20}, {"pause_s": 600},
    )  # fmt: skip
    clock = FakeClock(T0, tick_s=TICK)
    state = run(RolloutState.start(rollout_plan, clock.now), clock, 4)[-1].state
    assert state.candidate_weight == 5.0
    state = apply_command(state, Command.PROMOTE, clock.now)
    assert state.candidate_weight == 10.0 and state.window_started_at == clock.now
    # twice before the next tick: each promote ends one wait, no weight is skipped
    state = apply_command(state, Command.PROMOTE, clock.now)
    assert state.candidate_weight == 20.0
    assert [e.weight for e in state.history if "set_weight" in e.reason] == [5.0, 10.0, 20.0]
    assert tick(state, clock).weights[CAND] == 20.0


def test_promote_does_not_override_a_failing_gate():
    state = started(plan())
    promoted = apply_command(state, Command.PROMOTE, T0 + 1)
    assert promoted.candidate_weight == 10.0
    assert step(promoted, BROKEN(promoted, T0 + 1.25), T0 + 1.25).state.phase is (Phase.ROLLED_BACK)


def test_promote_full_goes_straight_to_100():
    clock = FakeClock(T0, tick_s=TICK)
    state = run(RolloutState.start(plan(), clock.now), clock, 3)[-1].state
    assert state.candidate_weight == 5.0
    done = apply_command(state, Command.PROMOTE_FULL, clock.now)
    assert done.phase is Phase.SUCCEEDED and done.candidate_weight == 100.0
    assert tick(done, clock).stable == CAND


def test_promote_full_in_blue_green_keeps_the_old_version_warm():
    clock = FakeClock(T0, tick_s=TICK)
    state = run(RolloutState.start(plan("blue_green"), clock.now), clock, 2)[-1].state
    assert state.candidate_weight == 0.0
    switched = apply_command(state, Command.PROMOTE_FULL, clock.now)
    assert switched.phase is Phase.PROMOTING and switched.candidate_weight == 100.0
    assert isinstance(switched.current_step, ScaleDown)
    decisions = run(switched, clock, 5)
    assert phases(decisions) == [Phase.PROMOTING] * 4 + [Phase.SUCCEEDED]
    # promote_full again finishes the scale-down wait at once
    finished = apply_command(switched, Command.PROMOTE_FULL, T0)
    assert finished.phase is Phase.SUCCEEDED


def test_pause_time_does_not_count_against_a_hold():
    rollout_plan = canary(
        {"set_weight": 5}, {"analysis_s": 2}, {"set_weight": 10}, {"pause_s": 600}
    )
    clock = FakeClock(T0, tick_s=TICK)
    state = run(RolloutState.start(rollout_plan, clock.now), clock, 4)[-1].state  # 0.75 s in
    paused = apply_command(state, Command.PAUSE, clock.now)  # paused at 1.0 s into the hold
    assert paused.phase is Phase.PAUSED and paused.paused_by_user
    assert paused.remaining_s(clock.now + 30) == pytest.approx(1.0)
    decisions = run(paused, clock, 40)  # 10 s paused
    assert weights(decisions) == [5.0] * 40
    assert phases(decisions) == [Phase.PAUSED] * 40
    assert all(d.verdicts for d in decisions)  # gates are judged while paused
    resumed = apply_command(decisions[-1].state, Command.RESUME, clock.now)
    assert resumed.phase is Phase.PROGRESSING and resumed.paused_at is None
    decisions = run(resumed, clock, 5)
    # 1 s (4 ticks) of the hold was left when it was paused
    assert weights(decisions) == [5.0] * 4 + [10.0]


def test_a_paused_rollout_still_rolls_back():
    clock = FakeClock(T0, tick_s=TICK)
    state = run(RolloutState.start(plan(), clock.now), clock, 2)[-1].state
    paused = apply_command(state, Command.PAUSE, clock.now)
    assert tick(paused, clock, BROKEN).state.phase is Phase.ROLLED_BACK


def test_abort_sends_everything_back_to_stable():
    clock = FakeClock(T0, tick_s=TICK)
    state = run(RolloutState.start(plan(), clock.now), clock, 20)[-1].state
    assert state.candidate_weight == 25.0
    aborted = apply_command(state, Command.ABORT, clock.now, reason="bad vibes")
    assert aborted.phase is Phase.ABORTED and aborted.candidate_weight == 0.0
    assert aborted.history[-1].reason == "aborted: command abort (bad vibes)"
    assert aborted.generation == state.generation + 1
    decisions = run(aborted, clock, 8)
    assert all(d.weights == {CAND: 0.0, STABLE: 100.0} for d in decisions)
    assert all(d.state == aborted and not d.traffic_changed for d in decisions)


def test_abort_during_blue_green_scale_down_switches_back():
    clock = FakeClock(T0, tick_s=TICK)
    state = run(RolloutState.start(plan("blue_green"), clock.now), clock, 14)[-1].state
    assert state.phase is Phase.PROMOTING and state.candidate_weight == 100.0
    aborted = apply_command(state, Command.ABORT, clock.now)
    assert aborted.weights == {CAND: 0.0, STABLE: 100.0}


@pytest.mark.parametrize(
    ("prepare", "command", "message"),
    [
        (lambda s: s, Command.PROMOTE, "cannot promote: the rollout is idle"),
        (lambda s: s, Command.PAUSE, "cannot pause: the rollout is idle"),
        (
            lambda s: tick(s, FakeClock(T0, tick_s=TICK)).state,
            Command.RESUME,
            "rollout is progressing",
        ),
        (
            lambda s: apply_command(tick(s, FakeClock(T0, tick_s=TICK)).state, Command.PAUSE, T0),
            Command.PAUSE,
            r"rollout is paused \(it is already paused\)",
        ),
        (
            lambda s: apply_command(tick(s, FakeClock(T0, tick_s=TICK)).state, Command.ABORT, T0),
            Command.RESUME,
            "cannot resume: the rollout is aborted",
        ),
    ],
)
def test_invalid_command_for_phase_raises(prepare, command, message):
    state = prepare(RolloutState.start(plan(), T0))
    with pytest.raises(ValueError, match=message):
        apply_command(state, command, T0)


@pytest.mark.parametrize("command", list(Command))
def test_every_command_raises_once_succeeded(command):
    state = apply_command(started(plan()), Command.PROMOTE_FULL, T0)
    assert state.phase is Phase.SUCCEEDED
    with pytest.raises(ValueError, match="the rollout is succeeded"):
        apply_command(state, command, T0)


def test_resume_at_wait_for_promote_says_use_promote():
    state = started(canary({"set_weight": 5}, {"pause_s": None}))
    with pytest.raises(ValueError, match="waiting for promote; use promote"):
        apply_command(state, Command.RESUME, T0)


def test_pause_while_promoting_is_refused():
    clock = FakeClock(T0, tick_s=TICK)
    state = run(RolloutState.start(plan("blue_green"), clock.now), clock, 14)[-1].state
    with pytest.raises(ValueError, match="promoting.*traffic has already switched"):
        apply_command(state, Command.PAUSE, clock.now)


def test_without_auto_promote_waits_at_the_end():
    clock = FakeClock(T0, tick_s=TICK)
    rollout_plan = plan("linear", auto_promote=False)
    assert isinstance(rollout_plan.expand()[-2], WaitForPromote)
    decisions = run(RolloutState.start(rollout_plan, clock.now), clock, 24)
    assert decisions[-1].state.phase is Phase.PAUSED and decisions[-1].weights[CAND] == 100.0
    assert decisions[-1].stable == STABLE
    done = apply_command(decisions[-1].state, Command.PROMOTE, clock.now)
    assert done.phase is Phase.SUCCEEDED


# -- persistence -----------------------------------------------------------------------------

COMMANDS_AT = {6: Command.PAUSE, 14: Command.RESUME, 30: Command.PROMOTE}


def scripted(state: RolloutState, clock: FakeClock, ticks: int, restart_at: int | None):
    """A canary with a pause, a resume and a promote; optionally persisted and reloaded."""
    decisions = []
    for n in range(ticks):
        if n == restart_at:
            state = RolloutState.from_dict(json.loads(json.dumps(state.to_dict())))
        if n in COMMANDS_AT:
            state = apply_command(state, COMMANDS_AT[n], clock.now)
        decisions.append(tick(state, clock))
        state = decisions[-1].state
    return decisions


@pytest.mark.parametrize("restart_at", [1, 10, 21, 33])
def test_restart_from_persisted_state_gives_the_same_rollout(restart_at):
    straight = scripted(RolloutState.start(plan(), T0), FakeClock(T0, tick_s=TICK), 48, None)
    restarted = scripted(RolloutState.start(plan(), T0), FakeClock(T0, tick_s=TICK), 48, restart_at)
    assert restarted == straight
    assert straight[-1].state.phase is Phase.SUCCEEDED
    assert any(d.state.phase is Phase.PAUSED for d in straight)


def test_state_round_trip_is_exact_in_every_phase():
    clock = FakeClock(T0, tick_s=TICK)
    state = RolloutState.start(plan("blue_green"), clock.now)
    seen = set()
    for _ in range(20):
        loaded = RolloutState.from_dict(json.loads(json.dumps(state.to_dict(), allow_nan=False)))
        assert loaded == state
        seen.add(state.phase)
        state = tick(state, clock).state
    paused = apply_command(started(plan()), Command.PAUSE, T0 + 0.5)
    assert RolloutState.from_dict(json.loads(json.dumps(paused.to_dict()))) == paused
    assert seen == {Phase.IDLE, Phase.PROGRESSING, Phase.PROMOTING, Phase.SUCCEEDED}


def test_from_dict_refuses_an_unknown_schema():
    data = started(plan()).to_dict() | {"schema": 99}
    with pytest.raises(ValueError, match="schema 99"):
        RolloutState.from_dict(data)


# -- restarts: timers travel as elapsed seconds (issue 18 item 4, F6.5, F16) --------------

ELSEWHERE = 42.0  # another process's clock: another node, another origin


def test_resume_carries_the_timers_as_elapsed_seconds_onto_another_clock():
    rollout_plan = canary({"set_weight": 5}, {"analysis_s": 60}, {"set_weight": 10})
    state = started(rollout_plan)
    data = json.loads(json.dumps(state.to_dict(now=T0 + 20), allow_nan=False))
    assert data["timers"] == {"step_elapsed_s": 20.0, "unready_s": None}
    resumed = RolloutState.resume(data, ELSEWHERE)
    assert resumed.elapsed_s(ELSEWHERE) == pytest.approx(20.0)
    assert resumed.remaining_s(ELSEWHERE + 5) == pytest.approx(35.0)
    assert resumed.window_started_at == ELSEWHERE  # the evidence was in the old process
    assert (resumed.step_index, resumed.candidate_weight) == (state.step_index, 5.0)
    # a user pause stays frozen across the restart
    paused = apply_command(state, Command.PAUSE, T0 + 20)
    frozen = RolloutState.resume(paused.to_dict(now=T0 + 500), ELSEWHERE)
    assert frozen.paused_by_user and frozen.elapsed_s(ELSEWHERE + 300) == pytest.approx(20.0)
    thawed = apply_command(frozen, Command.RESUME, ELSEWHERE + 300)
    assert thawed.remaining_s(ELSEWHERE + 310) == pytest.approx(30.0)
    # a state stored by a controller from before the timers restarts its step, as it did
    legacy = RolloutState.resume(state.to_dict(), ELSEWHERE)
    assert legacy.elapsed_s(ELSEWHERE) == 0.0
    with pytest.raises(ValueError, match="step_elapsed_s"):
        RolloutState.resume(data | {"timers": {"step_elapsed_s": -1}}, ELSEWHERE)


def test_an_analysis_resumed_after_a_restart_ends_on_time_when_the_new_evidence_decides():
    rollout_plan = canary({"set_weight": 5}, {"analysis_s": 2}, {"set_weight": 10},
                          {"pause_s": 600})  # fmt: skip
    clock = FakeClock(T0, tick_s=TICK)
    state = run(RolloutState.start(rollout_plan, clock.now), clock, 6)[-1].state
    resumed = RolloutState.resume(state.to_dict(now=clock.now), ELSEWHERE)  # 1.5 s in
    clock = FakeClock(ELSEWHERE, tick_s=TICK)
    # 0.5 s left (not 2 s): 400 candidate requests/s since the restart decide the gates by then
    assert weights(run(resumed, clock, 4)) == [5.0] * 2 + [10.0] * 2


def test_an_analysis_cut_short_by_a_restart_is_not_inconclusive_before_a_full_window():
    rollout_plan = canary({"set_weight": 5}, {"analysis_s": 2}, {"set_weight": 10},
                          {"pause_s": 600})  # fmt: skip
    clock = FakeClock(T0, tick_s=TICK)
    state = run(RolloutState.start(rollout_plan, clock.now), clock, 6)[-1].state
    resumed = RolloutState.resume(state.to_dict(now=clock.now), ELSEWHERE)
    clock = FakeClock(ELSEWHERE, tick_s=TICK)
    trickle: World = lambda s, now: observation(  # noqa: E731 - 20 requests/s: too few
        VersionStats(int(20 * (now - s.window_started_at)), 0, 10, 50), VersionStats(4000, 0)
    )
    decisions = run(resumed, clock, 12, trickle)
    # the hold's time is up after 0.5 s, but its window has 2 s only after 2 s: pending until
    # then (not inconclusive on a sliver), then inconclusive as without a restart
    assert phases(decisions) == [Phase.PROGRESSING] * 8 + [Phase.PAUSED] * 4
    assert "analysis inconclusive: min_requests: 40 of 100" in decisions[8].events[0].reason


# -- progress deadline (issue 18 item 5; Flagger's progressDeadlineSeconds) ------------------


def readiness(*ready: bool | None, tick_s: float = 10.0, deadline_s: float | None = 60.0,
              rollout_plan: RolloutPlan | None = None) -> list[Decision]:  # fmt: skip
    """Tick every tick_s with the candidate's readiness given per tick."""
    rollout_plan = rollout_plan or canary({"set_weight": 5}, {"pause_s": 600},
                                          progress_deadline_s=deadline_s)  # fmt: skip
    clock = FakeClock(T0, tick_s=tick_s)
    state = RolloutState.start(rollout_plan, clock.now)
    decisions = []
    for value in ready:
        decisions.append(step(state, Observation(candidate_ready=value), clock.now))
        state = decisions[-1].state
        clock.advance()
    return decisions


def test_a_candidate_without_a_running_replica_is_rolled_back_at_the_deadline():
    decisions = readiness(*[False] * 8)
    assert phases(decisions) == [Phase.PROGRESSING] * 6 + [Phase.ROLLED_BACK] * 2
    rolled_back = decisions[6]
    assert rolled_back.weights == {CAND: 0.0, STABLE: 100.0} and rolled_back.traffic_changed
    assert rolled_back.events[0].reason == (
        "rolled back: progress deadline exceeded: candidate v2 has had no running replica for "
        "60s (progress_deadline_s: 60)"
    )


def test_the_deadline_clock_stops_when_the_candidate_runs_and_ignores_unknowns():
    # not ready 50 s, ready, not ready 50 s, unknown for 100 s: never 60 s seen not ready
    decisions = readiness(*[False] * 6, True, *[False] * 6, *[None] * 10)
    assert Phase.ROLLED_BACK not in phases(decisions)
    # ... but the next reading that says not ready finds it overdue (unknowns do not stop it)
    decisions = readiness(*[False] * 6, True, *[False] * 6, *[None] * 10, False)
    assert phases(decisions)[-1] is Phase.ROLLED_BACK
    assert readiness(*[None] * 20)[-1].state.unready_since is None
    assert Phase.ROLLED_BACK not in phases(readiness(*[False] * 20, deadline_s=None))


def test_the_deadline_is_not_restarted_by_each_step():
    # short timed pauses must not carry a candidate that never runs to 100%
    steps = [{"set_weight": w} if i % 2 == 0 else {"pause_s": 20}
             for i, w in enumerate([5, 0, 10, 0, 25, 0, 50, 0, 100])]  # fmt: skip
    rollout_plan = canary(*steps, progress_deadline_s=60)
    decisions = readiness(*[False] * 12, rollout_plan=rollout_plan)
    assert phases(decisions)[6] is Phase.ROLLED_BACK
    assert max(weights(decisions)) < 100.0


def test_a_user_pause_suspends_the_deadline_and_resume_restarts_it():
    decisions = readiness(*[False] * 3)  # 20 s of the 60 s deadline
    paused = apply_command(decisions[-1].state, Command.PAUSE, T0 + 25)
    clock = FakeClock(T0 + 30, tick_s=10.0)
    held = run(paused, clock, 10, lambda s, now: Observation(candidate_ready=False))
    assert phases(held) == [Phase.PAUSED] * 10  # 100 s paused, not rolled back
    resumed = apply_command(held[-1].state, Command.RESUME, clock.now)
    assert resumed.unready_since == clock.now
    after = run(resumed, clock, 7, lambda s, now: Observation(candidate_ready=False))
    assert phases(after)[-1] is Phase.ROLLED_BACK and phases(after)[-2] is not Phase.ROLLED_BACK


def test_the_deadline_clock_survives_a_restart_as_elapsed_seconds():
    decisions = readiness(*[False] * 4)  # first seen not ready at T0, now T0 + 30
    state = decisions[-1].state
    resumed = RolloutState.resume(state.to_dict(now=T0 + 40), ELSEWHERE)
    assert resumed.unready_s(ELSEWHERE) == pytest.approx(40.0)
    late = step(resumed, Observation(candidate_ready=False), ELSEWHERE + 20)
    assert late.state.phase is Phase.ROLLED_BACK


def test_progress_deadline_defaults_to_600_s_and_null_turns_it_off():
    assert plan().progress_deadline_s == 600.0
    assert plan(progress_deadline_s=None).progress_deadline_s is None
    assert "progress_deadline_s" in error_text(progress_deadline_s=0)
    assert "progress_deadline_s" in error_text(progress_deadline_s=float("inf"))


def test_history_is_bounded():
    state = started(plan())
    for n in range(MAX_HISTORY_EVENTS):
        state = apply_command(state, Command.PAUSE, T0 + n)
        state = apply_command(state, Command.RESUME, T0 + n)
    assert len(state.history) == MAX_HISTORY_EVENTS
    assert state.history[-1].reason == "command resume"


# -- traffic ---------------------------------------------------------------------------------


def test_decision_traffic_config():
    base = TrafficConfig(stable=STABLE, weights={STABLE: 100, "v0": 0})
    decision = step(RolloutState.start(plan(), T0), Observation(), T0)
    config = decision.traffic_config(base)
    assert config.weights == {STABLE: 95.0, "v0": 0.0, CAND: 5.0}
    assert config.stable == STABLE and config.shadow is None

    clock = FakeClock(T0, tick_s=TICK)
    bg = run(RolloutState.start(plan("blue_green"), clock.now), clock, 17)
    preview = bg[0].traffic_config(base)
    assert preview.shadow is not None
    assert (preview.shadow.version, preview.shadow.percent) == (CAND, 10.0)
    finished = bg[-1].traffic_config(base)
    assert finished.stable == CAND and finished.weights[CAND] == 100.0
    assert finished.shadow is None


# -- plan schema -----------------------------------------------------------------------------

EXAMPLE_YAML = """
strategy: canary
candidate: v2
stable: v1
canary:
  steps:
    - set_weight: 5
    - analysis_s: 60
    - set_weight: 25
    - pause_s: 30
    - set_weight: 50
    - pause_s: null
    - set_weight: 100
    - analysis_s: 120
gates:
  min_requests: 200
  max_error_rate: 0.02
  max_p99_latency_ratio: 1.3
  prometheus_query: sum(rate(gpu_oom_total[1m]))
  prometheus_max: 0
auto_promote: true
"""


def test_yaml_plan_parses_and_expands():
    rollout_plan = RolloutPlan.model_validate(yaml.safe_load(EXAMPLE_YAML))
    assert rollout_plan.expand() == [
        SetWeight(set_weight=5),
        Hold(duration_s=60, analyze=True, label="analysis"),
        SetWeight(set_weight=25),
        Hold(duration_s=30, analyze=False, label="pause"),
        SetWeight(set_weight=50),
        WaitForPromote(),
        SetWeight(set_weight=100),
        Hold(duration_s=120, analyze=True, label="analysis"),
        Switch(weight=100),
    ]
    assert len(rollout_plan.digest()) == 16
    assert rollout_plan.digest() != plan().digest()


def test_blue_green_and_linear_expand():
    assert plan("blue_green").expand() == [
        SetWeight(set_weight=0),
        Hold(duration_s=1, analyze=False, label="preview"),
        Hold(duration_s=2, analyze=True, label="analysis"),
        Switch(),
        ScaleDown(delay_s=1),
    ]
    linear = plan("linear", linear={"step_percent": 12.5, "interval_s": 5})
    weights_ = [s.set_weight for s in linear.expand() if isinstance(s, SetWeight)]
    assert weights_ == [12.5, 25, 37.5, 50, 62.5, 75, 87.5, 100]
    thirds = plan("linear", linear={"step_percent": 33.3, "interval_s": 5})
    assert [s.set_weight for s in thirds.expand() if isinstance(s, SetWeight)] == [
        33.3, 66.6, 99.9, 100,
    ]  # fmt: skip
    tenth = plan("linear", linear={"step_percent": 10, "interval_s": 5})
    assert [s.set_weight for s in tenth.expand() if isinstance(s, SetWeight)][2] == 30.0


def error_text(**changes) -> str:
    data = {"strategy": "canary", "candidate": CAND, "stable": STABLE}
    data["canary"] = {"steps": [{"set_weight": 5}]}
    data.update(changes)
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(ValidationError) as info:
        RolloutPlan.model_validate(data)
    return str(info.value)


def test_plan_validation_errors_name_the_field():
    decreasing = {"steps": [{"set_weight": 50}, {"pause_s": 10}, {"set_weight": 10}]}
    text = error_text(canary=decreasing)
    assert "steps[2].set_weight (10) must be greater than or equal to steps[0].set_weight (50)" in (
        text
    )
    assert "candidate ('v1') must differ from stable ('v1')" in error_text(candidate=STABLE)
    assert "strategy 'canary' needs a `canary` block" in error_text(canary=None)
    assert "strategy 'linear' needs a `linear` block (blocks given: ['canary'])" in error_text(
        strategy="linear"
    )
    both = error_text(linear={"step_percent": 10, "interval_s": 1})
    assert "`linear` block does not apply to strategy 'canary'" in both
    assert "bake_s (30) applies to strategy 'linear' only" in error_text(bake_s=30)
    assert "strategy" in error_text(strategy="a_b")
    assert "auto_promot" in error_text(auto_promot=True)  # a typo is an error, not ignored


def test_step_shape_errors():
    assert "a canary step is a mapping with one of: set_weight, pause_s, analysis_s" in (
        error_text(canary={"steps": [{"weight": 5}]})
    )
    assert "canary.steps.0.set_weight.pause_s" in error_text(
        canary={"steps": [{"set_weight": 5, "pause_s": 3}]}
    )
    assert "less than or equal to 100" in error_text(canary={"steps": [{"set_weight": 120}]})
    assert "greater than 0" in error_text(canary={"steps": [{"analysis_s": 0}]})
    assert "at least 1 item" in error_text(canary={"steps": []})


def test_gate_validation_errors_name_the_field():
    text = error_text(gates={"prometheus_query": "up"})
    assert "prometheus_query ('up') and prometheus_max (None) must be set together" in text
    text = error_text(gates={"fail_fast_error_rate": 0.01})
    assert "fail_fast_error_rate (0.01) must be greater than or equal to max_error_rate (0.05)" in (
        text
    )
    assert "gates.min_requests" in error_text(gates={"min_requests": 0})
    assert "gates.max_error_rate" in error_text(gates={"max_error_rate": float("nan")})


def test_blue_green_shadow_gate_needs_shadow_traffic():
    text = error_text(
        strategy="blue_green",
        canary=None,
        blue_green={"preview_s": 10, "analysis_s": 10},
        gates={"min_shadow_agreement": 0.9},
    )
    assert "gates.min_shadow_agreement (0.9) needs blue_green.shadow_percent above 0" in text


def test_version_stats_are_checked():
    with pytest.raises(ValueError, match=r"errors \(5\) must be between 0 and requests \(4\)"):
        VersionStats(4, 5)
    with pytest.raises(ValueError, match="p99_ms"):
        VersionStats(4, 0, 1.0, -1.0)
    assert VersionStats().error_rate is None and VersionStats(4, 1).error_rate == 0.25
