"""The improvement and non-inferiority gates inside the rollout state machine.

A simulated feedback stream (seeded) gives each tick the outcomes since the rollout started:
conversions at a true rate per version, in proportion to the state's weights.
"""

from __future__ import annotations

import json
import random

import pytest
from pydantic import ValidationError

from app.rollout import (
    GateStatus,
    Observation,
    Phase,
    RolloutPlan,
    RolloutState,
    VersionStats,
    evaluate_lift_gates,
    step,
)
from app.rollout.abtest import ArmStats

T0 = 1_700_000_000.0
TICK = 0.25
CAND, STABLE = "v2", "v1"


def plan(gates: dict, steps: list | None = None) -> RolloutPlan:
    return RolloutPlan.model_validate({
        "strategy": "canary", "candidate": CAND, "stable": STABLE,
        "canary": {"steps": steps or [{"set_weight": 10}, {"analysis_s": 5}, {"set_weight": 50},
                                      {"analysis_s": 5}]},
        "gates": {"min_requests": 1, "max_p99_latency_ratio": None, **gates},
    })  # fmt: skip


class Feedback:
    """Conversions per version at true rates; `rate_per_s` outcomes/s split by weight."""

    def __init__(
        self, cand_rate: float, stable_rate: float, rate_per_s: float = 2000, seed: int = 1
    ):
        self.rates = {CAND: cand_rate, STABLE: stable_rate}
        self.rate_per_s = rate_per_s
        self.rng = random.Random(seed)
        self.counts = {CAND: [0, 0], STABLE: [0, 0]}  # successes, n

    def tick(self, state: RolloutState) -> Observation:
        for version, weight in state.weights.items():
            n = round(self.rate_per_s * TICK * weight / 100)
            hits = sum(self.rng.random() < self.rates[version] for _ in range(n))
            self.counts[version][0] += hits
            self.counts[version][1] += n
        requests = {v: VersionStats(max(1, c[1]), 0) for v, c in self.counts.items()}
        arms = {v: ArmStats.binary(c[0], c[1]) for v, c in self.counts.items()}
        return Observation(stats=requests, outcomes={"conversion": arms})


def run(state: RolloutState, feedback: Feedback, seconds: float) -> tuple[RolloutState, list]:
    now = state.step_started_at
    decisions = []
    for _ in range(int(seconds / TICK)):
        now += TICK
        decision = step(state, feedback.tick(state), now)
        decisions.append(decision)
        state = decision.state
        if state.phase.terminal or state.phase is Phase.PAUSED:
            break
    return state, decisions


IMPROVE = {"outcome": "conversion", "min_lift": 0.0, "mde": 0.2, "min_samples_per_arm": 200}


def test_a_better_candidate_passes_the_improvement_gate_and_succeeds():
    state = RolloutState.start(plan({"improvement": {**IMPROVE, "max_wait_s": 120}}), T0)
    state, decisions = run(state, Feedback(0.30, 0.20), 300)
    assert state.phase is Phase.SUCCEEDED
    lift = [v for v in decisions[-1].verdicts if v.gate == "improvement"][0]
    assert lift.status is GateStatus.PASSED
    reading = lift.reading()
    assert reading["conclusion"] == "better"
    assert 0 < reading["low"] < 0.5 < reading["high"]  # true relative lift +50%
    assert "always-valid interval" in lift.reason and "better than" in lift.reason
    # The history records the verdict with its interval at each analysis that passed.
    passed = [e for e in state.history if "analysis 5s passed" in e.reason]
    assert passed and passed[0].gates["improvement"]["conclusion"] == "better"


def test_a_worse_candidate_is_rolled_back_by_the_improvement_gate():
    state = RolloutState.start(plan({"improvement": {**IMPROVE, "max_wait_s": 120}}), T0)
    state, _ = run(state, Feedback(0.12, 0.20), 300)
    assert state.phase is Phase.ROLLED_BACK
    assert state.candidate_weight == 0
    last = state.history[-1]
    assert "gate improvement failed" in last.reason and "worse than" in last.reason
    assert last.gates["improvement"]["conclusion"] == "worse"
    assert last.gates["improvement"]["high"] < 0


def test_non_inferiority_passes_within_the_margin_and_fails_beyond_it():
    gate = {"outcome": "conversion", "margin": 0.10, "mde": 0.1, "min_samples_per_arm": 200,
            "max_wait_s": 600}  # fmt: skip
    ok, _ = run(RolloutState.start(plan({"non_inferiority": gate}), T0), Feedback(0.20, 0.20), 900)
    assert ok.phase is Phase.SUCCEEDED
    bad, _ = run(RolloutState.start(plan({"non_inferiority": gate}), T0), Feedback(0.14, 0.20), 900)
    assert bad.phase is Phase.ROLLED_BACK
    assert "gate non_inferiority failed" in bad.history[-1].reason


def test_an_undecided_lift_gate_holds_the_analysis_up_to_max_wait_then_pauses():
    # A/A: the test stays undecided (almost surely, with this little data): the analysis keeps
    # holding past its 5 s for max_wait_s = 3 s more, then is inconclusive.
    gate = {**IMPROVE, "max_wait_s": 3}
    state = RolloutState.start(plan({"improvement": gate}), T0)
    state, decisions = run(state, Feedback(0.2, 0.2, rate_per_s=400), 60)
    assert state.phase is Phase.PAUSED
    inconclusive = state.history[-1]
    assert "analysis inconclusive" in inconclusive.reason and "improvement" in inconclusive.reason
    # Paused after 5 + 3 s of holding at 10%, not after 5.
    held = inconclusive.time_s - state.step_started_at
    assert held == pytest.approx(8.0, abs=TICK)


def test_a_horizon_test_that_ended_undecided_does_not_hold_the_analysis_for_max_wait():
    # A/A under a horizon of 300 outcomes per arm (n_eff, the arms' harmonic mean, reaches it
    # at ~4.2 s at 10%): the test ends undecided before the 5 s analysis is up, so waiting
    # max_wait_s (600 s) for it to decide is pointless; the analysis is inconclusive at 5 s.
    gate = {**IMPROVE, "min_samples_per_arm": 50, "max_wait_s": 600, "boundary": "horizon",
            "horizon_samples_per_arm": 300}  # fmt: skip
    state = RolloutState.start(plan({"improvement": gate}), T0)
    state, decisions = run(state, Feedback(0.2, 0.2, rate_per_s=400), 60)
    assert state.phase is Phase.PAUSED, state.history[-1].reason
    inconclusive = state.history[-1]
    assert "analysis inconclusive" in inconclusive.reason
    assert inconclusive.time_s - state.step_started_at == pytest.approx(5.0, abs=TICK)
    lift = [v for v in decisions[-1].verdicts if v.gate == "improvement"][0]
    assert lift.detail["ended"] is True and lift.detail["information_time"] == 1.0
    assert lift.detail["boundary"] == "horizon" and lift.detail["horizon_samples_per_arm"] == 300
    assert "95% horizon-bounded interval" in lift.reason and "t=1.00 of 300/arm" in lift.reason
    assert "reached its horizon and ended without a call" in lift.reason


def test_without_max_wait_an_undecided_lift_gate_makes_the_analysis_inconclusive_at_once():
    state = RolloutState.start(plan({"improvement": IMPROVE}), T0)
    state, _ = run(state, Feedback(0.2, 0.2, rate_per_s=400), 60)
    assert state.phase is Phase.PAUSED
    assert state.history[-1].time_s - state.step_started_at == pytest.approx(5.0, abs=TICK)


def test_no_feedback_is_pending_with_a_reason():
    gates = plan({"improvement": IMPROVE}).gates
    verdicts, carried = evaluate_lift_gates(gates, Observation(), {}, candidate=CAND, stable=STABLE)
    assert [(v.gate, v.status) for v in verdicts] == [("improvement", GateStatus.PENDING)]
    assert "no feedback yet" in verdicts[0].reason
    assert carried == {}


def test_lift_state_survives_persistence_and_intervals_only_narrow():
    state = RolloutState.start(plan({"improvement": {**IMPROVE, "max_wait_s": 600}}), T0)
    feedback = Feedback(0.22, 0.20, rate_per_s=800)
    widths, now = [], T0
    for _ in range(200):
        now += TICK
        state = step(state, feedback.tick(state), now).state
        # What the controller stores and a restarted replica reads back.
        state = RolloutState.from_dict(json.loads(json.dumps(state.to_dict())))
        reading = state.lift.get("improvement")
        if (
            reading
            and reading["difference_low"] is not None
            and reading["difference_high"] is not None
        ):
            widths.append(reading["difference_high"] - reading["difference_low"])
    assert len(widths) > 10
    assert all(b <= a + 1e-12 for a, b in zip(widths, widths[1:]))


def test_step_is_repeatable_with_lift_gates():
    state = RolloutState.start(plan({"improvement": {**IMPROVE, "max_wait_s": 60}}), T0)
    feedback = Feedback(0.3, 0.2)
    now = T0
    for _ in range(40):
        now += TICK
        observation = feedback.tick(state)
        first = step(state, observation, now)
        assert step(state, observation, now) == first
        state = first.state


def test_lift_gate_configs_name_the_field():
    with pytest.raises(ValidationError, match="outcome"):
        plan({"improvement": {"min_lift": 0.01}})
    with pytest.raises(ValidationError, match="max_wait_s"):
        plan({"improvement": {**IMPROVE, "max_wait_s": -1}})


def test_no_new_outcome_leaves_the_state_equal_so_nothing_is_persisted_again():
    state = RolloutState.start(plan({"improvement": {**IMPROVE, "max_wait_s": 600}}), T0)
    feedback = Feedback(0.22, 0.20, rate_per_s=800)
    now = T0
    for _ in range(40):  # enough for both arms to pass min_samples_per_arm
        now += TICK
        observation = feedback.tick(state)
        state = step(state, observation, now).state
    assert state.lift["improvement"]["looks"] > 0
    again = step(state, observation, now + TICK).state  # the same outcomes, a tick later
    assert again.lift == state.lift


def test_a_continuous_outcome_gate_declares_bounds_naming_the_field():
    """Issue 18 item 1: a continuous outcome is judged only with declared bounds (its values
    are clipped to them), and gates that judge one outcome agree on them."""
    revenue = {"outcome": "revenue", "kind": "continuous", "mde": 0.05}
    with pytest.raises(ValidationError, match=r"improvement\n.*needs min_value \(None\)"):
        plan({"improvement": revenue})
    bounded = {**revenue, "min_value": 0, "max_value": 1000}
    declared = plan({"improvement": bounded, "non_inferiority": {**bounded, "margin": 0.02}})
    assert declared.gates.outcome_bounds() == {"revenue": (0.0, 1000.0)}
    with pytest.raises(ValidationError, match="outcome 'revenue' is declared twice"):
        plan({"improvement": bounded,
              "non_inferiority": {**bounded, "max_value": 500, "margin": 0.02}})  # fmt: skip
    assert plan({"improvement": IMPROVE}).gates.outcome_bounds() == {}  # binary: nothing to clip


def test_a_continuous_gate_judges_only_feedback_clipped_to_its_bounds():
    """The gate's reason tells the operator why a continuous outcome is not judged: here the
    feedback desk was not given the plan's bounds (a controller that does not pass them)."""
    from app.rollout.feedback import FeedbackDesk

    gate = {"outcome": "revenue", "kind": "continuous", "min_value": 0, "max_value": 100,
            "mde": 0.1, "min_samples_per_arm": 50}  # fmt: skip
    declared = plan({"improvement": gate})
    rng = random.Random(3)
    verdicts = {}
    for bounds in ({}, declared.gates.outcome_bounds()):
        desk = FeedbackDesk([CAND, STABLE])
        desk.reset(now=0.0, bounds=bounds)
        served, items = [], []
        for version, mean in ((CAND, 60.0), (STABLE, 50.0)):
            for i in range(200):
                request_id = f"{version}-{i}"
                served.append((request_id, version, 1.0, "sticky", f"user-{version}-{i % 80}"))
                value = 1e6 if i == 0 else rng.gauss(mean, 10.0)  # one forged value each
                items.append({"request_id": request_id, "outcome": "revenue", "value": value,
                              "kind": "continuous"})  # fmt: skip
        desk.record_served(served, now=1.0)
        desk.count(items, {}, now=2.0)
        observation = Observation(outcomes=desk.arms([CAND, STABLE]))
        (verdict,), _ = evaluate_lift_gates(declared.gates, observation, {}, candidate=CAND,
                                            stable=STABLE)  # fmt: skip
        verdicts[bool(bounds)] = verdict
    assert verdicts[False].status is GateStatus.PENDING
    assert "values are not clipped" in verdicts[False].reason
    assert verdicts[True].status is GateStatus.PASSED, verdicts[True].reason
    assert verdicts[True].detail["conclusion"] == "better"
