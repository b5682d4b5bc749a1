"""app/rollout/machine.py: a step that raises the candidate's weight waits for its capacity
(docs/capacity-aware-steps.md), bounded by the plan's progress deadline."""

from __future__ import annotations

from app.rollout import Command, Observation, Phase, RolloutPlan, RolloutState, apply_command, step
from app.rollout.capacity import StepCapacity, step_capacity

CAND, STABLE = "v2", "v1"
T0 = 1_000.0


def plan(**fields) -> RolloutPlan:
    data = {
        "strategy": "canary", "candidate": CAND, "stable": STABLE,
        "canary": {"steps": [{"set_weight": 50}, {"pause_s": 10}, {"set_weight": 100}]},
        "progress_deadline_s": 60,
        **fields,
    }  # fmt: skip
    return RolloutPlan.model_validate(data)


def capacity(weight: float, running: int | None, floor: int = 3) -> StepCapacity:
    return StepCapacity(CAND, weight, candidate_floor=floor, stable_floor=2,
                        candidate_running=running)  # fmt: skip


def test_the_step_waits_until_the_candidate_runs_its_floor():
    state = RolloutState.start(plan(), T0)
    d = step(state, Observation(), T0, capacity=capacity(50, running=1))
    assert d.state.candidate_weight == 0
    assert d.capacity_wait == "scaling v2 to 3 replicas for 50%: 1 running"
    assert not d.traffic_changed
    # Again and again while the replicas start: same answer, nothing published.
    d = step(d.state, Observation(), T0 + 5, capacity=capacity(50, running=2))
    assert (d.state.candidate_weight, d.state.phase) == (0, Phase.PROGRESSING)
    d = step(d.state, Observation(), T0 + 9, capacity=capacity(50, running=3))
    assert d.state.candidate_weight == 50
    assert d.capacity_wait is None
    assert d.traffic_changed


def test_without_a_capacity_input_or_with_an_unknown_count_the_step_does_not_wait():
    state = RolloutState.start(plan(), T0)
    assert step(state, Observation(), T0).state.candidate_weight == 50
    unknown = step(state, Observation(), T0, capacity=capacity(50, running=None))
    assert unknown.state.candidate_weight == 50
    # A capacity input for another weight does not hold this step.
    other = step(state, Observation(), T0, capacity=capacity(100, running=0))
    assert other.state.candidate_weight == 50


def test_the_final_step_to_100_waits_too():
    state = step(RolloutState.start(plan(), T0), Observation(), T0).state
    d = step(state, Observation(), T0 + 10, capacity=capacity(100, running=2, floor=6))
    assert d.state.candidate_weight == 50
    assert d.capacity_wait == "scaling v2 to 6 replicas for 100%: 2 running"
    d = step(d.state, Observation(), T0 + 12, capacity=capacity(100, running=6, floor=6))
    assert d.state.candidate_weight == 100


def test_a_wait_past_the_progress_deadline_pauses_and_promote_goes_on():
    state = RolloutState.start(plan(), T0)
    d = step(state, Observation(), T0, capacity=capacity(50, running=1))
    d = step(d.state, Observation(), T0 + 59, capacity=capacity(50, running=1))
    assert d.state.phase is Phase.PROGRESSING
    d = step(d.state, Observation(), T0 + 60, capacity=capacity(50, running=1))
    assert (d.state.phase, d.state.candidate_weight) == (Phase.PAUSED, 0)
    assert "no capacity after 60s (progress_deadline_s: 60)" in d.events[-1].reason
    # Paused: the ticks only judge gates.
    assert step(d.state, Observation(), T0 + 70, capacity=capacity(50, running=3)).state.phase \
        is Phase.PAUSED  # fmt: skip
    # resume waits again, from now; promote goes on without the capacity.
    resumed = apply_command(d.state, Command.RESUME, T0 + 80)
    again = step(resumed, Observation(), T0 + 80, capacity=capacity(50, running=1))
    assert (again.state.phase, again.state.candidate_weight) == (Phase.PROGRESSING, 0)
    promoted = apply_command(d.state, Command.PROMOTE, T0 + 80)
    assert promoted.candidate_weight == 50


def test_a_step_that_does_not_raise_the_weight_never_waits():
    p = plan(canary={"steps": [{"set_weight": 50}, {"set_weight": 50}, {"pause_s": 5}]})
    state = step(RolloutState.start(p, T0), Observation(), T0).state  # at 50, the next is 50
    assert step(state, Observation(), T0, capacity=capacity(50, running=0)).state.step_index == 2


def test_the_pure_floors_drive_the_wait():
    need = step_capacity(CAND, 50, traffic_rps=100, replica_rps=25, candidate_running=2,
                         stable_running=4)  # fmt: skip
    state = RolloutState.start(plan(), T0)
    assert step(state, Observation(), T0, capacity=need).state.candidate_weight == 0
    ready = step_capacity(CAND, 50, traffic_rps=100, replica_rps=25, candidate_running=3,
                          stable_running=4)  # fmt: skip
    assert step(state, Observation(), T0, capacity=ready).state.candidate_weight == 50
