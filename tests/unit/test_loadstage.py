"""The load stage: its plan block, the pacing schedule and verdict (`app/rollout/loadstage.py`),
the state machine's LoadTest step, and the controller's replay with a fake candidate (no Ray)."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
from pydantic import ValidationError

from app.ops.cli.render import render_history, render_status
from app.rollout import Observation, Phase, RolloutPlan, RolloutState, apply_command, step
from app.rollout.loadstage import (
    ERROR_GATE,
    P99_GATE,
    THROUGHPUT_GATE,
    LoadRecorder,
    LoadResult,
    percentile,
    rate_at,
    send_offsets,
    stage_failure,
)
from app.rollout.plan import LoadStage, LoadTest, SetWeight
from app.serving.capture import CaptureRecord, write_sample
from deployments.controller import ControllerCore, load_requests
from deployments.store import InMemoryStore
from tests.support.fakes import FakeClock

T0 = 1_700_000_000.0
STAGE = {"sample": "/tmp/sample", "target_rps": 50, "ramp_s": 2, "hold_s": 4, "max_p99_ms": 100}


def plan(strategy: str = "canary", **stage) -> RolloutPlan:
    data: dict = {"strategy": strategy, "candidate": "v2", "stable": "v1",
                  "load_stage": {**STAGE, **stage}}  # fmt: skip
    if strategy == "canary":
        data["canary"] = {"steps": [{"set_weight": 10}, {"pause_s": 5}]}
    elif strategy == "blue_green":
        data["blue_green"] = {"preview_s": 1, "analysis_s": 1}
    else:
        data["linear"] = {"step_percent": 50, "interval_s": 1}
    return RolloutPlan.model_validate(data)


# -- the plan block ------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["canary", "blue_green", "linear"])
def test_every_strategy_runs_the_load_stage_first(strategy):
    steps = plan(strategy).expand()
    assert isinstance(steps[0], LoadTest) and steps[0].stage.target_rps == 50
    assert not any(isinstance(s, LoadTest) for s in steps[1:])
    without = RolloutPlan.model_validate(
        {**plan(strategy).model_dump(mode="json"), "load_stage": None}
    )
    assert not any(isinstance(s, LoadTest) for s in without.expand())


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"target_rps": None}, "target_rps"),  # neither rate rule
        ({"headroom": 2.0}, "headroom"),  # both
        ({"target_rps": 0.5, "min_rps": 2}, "min_rps"),
        ({"hold_s": 0}, "hold_s"),
        ({"concurrency": 0}, "concurrency"),
        ({"max_error_rate": 1.5}, "max_error_rate"),
        ({"min_throughput_ratio": 1.2}, "min_throughput_ratio"),
        ({"sample": ""}, "sample"),
        ({"max_p99": 100}, "max_p99"),  # a typo: extra fields are refused
    ],
)
def test_a_bad_load_stage_is_refused_naming_the_field(change, field):
    with pytest.raises(ValidationError) as info:
        plan(**change)
    assert field in str(info.value) and "load_stage" in str(info.value)


def test_the_target_rate_is_declared_or_headroom_times_observed_with_a_floor():
    assert LoadStage(sample="s", target_rps=20).target(observed_rps=500) == 20
    by_headroom = LoadStage(sample="s", headroom=1.5, min_rps=5)
    assert by_headroom.target(observed_rps=100) == 150
    assert by_headroom.target(observed_rps=0) == 5  # no traffic seen: the floor


def test_rollout_validate_accepts_a_load_stage_and_names_a_bad_field(tmp_path):
    from app.ops.validate import Report, _validate_plan

    good = plan(sample=str(tmp_path)).model_dump(mode="json")
    report = Report()
    _validate_plan({"plan": good}, ["v1", "v2"], "RolloutController.user_config", report)
    assert report.errors == [] and report.notes == []
    missing = Report()
    _validate_plan({"plan": plan().model_dump(mode="json")}, ["v1", "v2"], "c", missing)
    assert missing.errors == [] and "c.plan.load_stage.sample" in missing.notes[0]
    bad = Report()
    _validate_plan({"plan": {**good, "load_stage": {**good["load_stage"], "hold_s": -1}}},
                   ["v1", "v2"], "c", bad)  # fmt: skip
    assert bad.errors and bad.errors[0].startswith("c.plan.load_stage.hold_s")


# -- pacing and verdicts -------------------------------------------------------------------


def test_the_schedule_ramps_linearly_then_holds_the_target_rate():
    offsets = list(send_offsets(target_rps=100, ramp_s=10, hold_s=5))
    assert offsets == sorted(offsets) and offsets[-1] < 15
    # 0.5 * 100 * 10 requests in the ramp, 100 * 5 in the hold
    assert len([o for o in offsets if o < 10]) == pytest.approx(500, abs=1)
    assert len([o for o in offsets if o >= 10]) == pytest.approx(500, abs=1)
    assert len([o for o in offsets if 4 <= o < 5]) == pytest.approx(45, abs=1)  # rate 40..50
    assert rate_at(5, 100, 10) == 50 and rate_at(12, 100, 10) == 100
    assert len(list(send_offsets(target_rps=10, ramp_s=0, hold_s=2))) == 19  # 0.1 .. 1.9


def test_percentile_is_nearest_rank():
    assert percentile([], 0.99) is None
    assert percentile(list(range(1, 101)), 0.99) == 99
    assert percentile([5.0], 0.99) == 5.0


def recorded(latency_ms: float, errors_every: int = 0, rps: float = 50) -> LoadRecorder:
    """A replay that sent on schedule and got each answer after latency_ms."""
    recorder = LoadRecorder(rps, 2, 4)
    for i, offset in enumerate(send_offsets(rps, 2, 4)):
        recorder.on_send()
        ok = not (errors_every and i % errors_every == 0)
        recorder.on_done(offset, offset + latency_ms / 1000, latency_ms, ok)
    return recorder


def test_a_healthy_replay_passes_every_gate():
    result = recorded(20).verdict(LoadStage(**STAGE))
    assert result.passed and result.failed == []
    assert set(result.readings) == {P99_GATE, ERROR_GATE, THROUGHPUT_GATE}
    assert result.readings[P99_GATE]["value"] == 20


@pytest.mark.parametrize(
    ("recorder", "gate"),
    [
        (recorded(250), P99_GATE),
        (recorded(20, errors_every=10), ERROR_GATE),  # 10% > 1%
    ],
)
def test_a_replay_fails_the_gate_it_breaks(recorder, gate):
    result = recorder.verdict(LoadStage(**STAGE))
    assert not result.passed and gate in result.failed
    assert result.readings[gate]["status"] == "failed"


def test_a_candidate_that_falls_behind_fails_the_throughput_gate():
    recorder = LoadRecorder(50, 2, 4)
    for i in range(100):  # half the 200 the hold asks for
        recorder.on_send()
        recorder.on_done(2 + i * 0.04, 2 + i * 0.04 + 0.01, 10, True)
    result = recorder.verdict(LoadStage(**STAGE))
    assert result.failed == [THROUGHPUT_GATE]
    assert result.readings[THROUGHPUT_GATE]["value"] == pytest.approx(0.5, abs=0.01)


def test_nothing_answered_fails_closed():
    result = LoadRecorder(50, 2, 4).verdict(LoadStage(**STAGE))
    assert set(result.failed) == {P99_GATE, ERROR_GATE, THROUGHPUT_GATE}


# -- the state machine -----------------------------------------------------------------------

PASSED = LoadResult(True, {P99_GATE: {"status": "passed", "value": 12.0, "threshold": 100,
                                      "reason": "p99 12 ms <= 100 ms"}}, "50 rps, p99 12 ms")  # fmt: skip
FAILED = LoadResult(False, {P99_GATE: {"status": "failed", "value": 900.0, "threshold": 100,
                                       "reason": "p99 900 ms > 100 ms"}}, "50 rps, p99 900 ms")  # fmt: skip


def started(rollout_plan: RolloutPlan | None = None) -> RolloutState:
    return step(RolloutState.start(rollout_plan or plan(), T0), Observation(), T0).state


def test_the_load_stage_holds_the_candidate_at_zero_until_its_verdict():
    state = started()
    assert state.phase is Phase.PROGRESSING and state.step_index == 0
    for i in range(1, 20):  # however long the replay takes
        decision = step(state, Observation(), T0 + i)
        assert decision.state.step_index == 0 and decision.weights["v2"] == 0.0
        assert not decision.traffic_changed
        state = decision.state


def test_a_passed_load_stage_moves_on_to_the_first_step_with_its_readings():
    decision = step(started(), Observation(), T0 + 10, load=PASSED)
    assert decision.state.step_index == 2  # past the load stage and set_weight 10
    assert decision.weights["v2"] == 10.0 and decision.traffic_changed
    passed = decision.events[0]
    assert "load stage passed" in passed.reason and passed.gates[P99_GATE]["value"] == 12.0
    assert passed.weight == 0.0 and passed.step_index == 0


def test_a_failed_load_stage_rolls_back_before_any_user_weight():
    decision = step(started(), Observation(), T0 + 10, load=FAILED)
    assert decision.state.phase is Phase.ROLLED_BACK
    assert decision.weights == {"v2": 0.0, "v1": 100.0}
    (event,) = decision.events
    assert P99_GATE in event.reason and "900" in event.reason
    assert event.gates[P99_GATE]["status"] == "failed"
    # every weight the candidate ever had in this rollout: 0
    assert all(e.weight == 0.0 for e in decision.state.history)
    assert P99_GATE in render_history([e.to_dict() for e in decision.state.history])


def test_a_sample_failure_rolls_back_too():
    decision = step(started(), Observation(), T0 + 1, load=stage_failure("empty sample"))
    assert decision.state.phase is Phase.ROLLED_BACK and "empty sample" in decision.events[0].reason


def test_abort_and_pause_work_during_the_load_stage_and_pause_holds_the_verdict():
    assert apply_command(started(), "abort", T0 + 1).phase is Phase.ABORTED
    paused = apply_command(started(), "pause", T0 + 1)
    assert paused.phase is Phase.PAUSED
    # a paused rollout does not consume a verdict (the controller stopped the replay)
    assert step(paused, Observation(), T0 + 2, load=FAILED).state.phase is Phase.PAUSED
    resumed = apply_command(paused, "resume", T0 + 3)
    assert resumed.phase is Phase.PROGRESSING and resumed.step_index == 0
    assert step(resumed, Observation(), T0 + 4, load=PASSED).state.step_index == 2


def test_promote_skips_the_load_stage():
    promoted = apply_command(started(), "promote", T0 + 1)
    assert promoted.step_index == 2 and promoted.candidate_weight == 10.0
    assert "load stage" in promoted.history[-2].reason and "skipped" in promoted.history[-2].reason


def test_a_result_outside_the_load_stage_is_ignored():
    after = step(started(), Observation(), T0 + 1, load=PASSED).state
    again = step(after, Observation(), T0 + 2, load=FAILED)
    assert again.state.phase is Phase.PROGRESSING and again.state.candidate_weight == 10.0


def test_a_restarted_controller_resumes_in_the_load_stage():
    state = started()
    data = json.loads(json.dumps(state.to_dict(now=T0 + 5)))
    resumed = RolloutState.resume(data, now=500.0)
    assert isinstance(resumed.current_step, LoadTest) and resumed.phase is Phase.PROGRESSING
    assert isinstance(resumed.steps[1], SetWeight)


# -- the controller's replay, with a fake candidate ----------------------------------------------


def sample(tmp_path, model="recommender", n=5) -> str:
    body = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}]}
    write_sample(tmp_path, model, [CaptureRecord(model, "v1", T0 + i, body) for i in range(n)])
    return str(tmp_path)


def test_load_requests_decodes_the_models_records(tmp_path):
    requests, stats = load_requests(sample(tmp_path), "recommender", 3)
    assert len(requests) == 3 and stats.records == 3
    inputs, parameters = requests[0]
    assert inputs["x"].shape == (1, 2) and parameters == {}
    assert load_requests(str(tmp_path), "other-model", 3)[0] == []


def replay(directory: str, latency_s: float, **stage) -> tuple[ControllerCore, list[int]]:
    """A controller whose candidate answers after latency_s, one at a time (a lock: one
    replica with max_ongoing_requests 1), through a whole load stage."""
    calls: list[int] = []
    lock = asyncio.Lock()

    def call_version(version: str):
        async def call(inputs, parameters):
            async with lock:
                calls.append(1)
                await asyncio.sleep(latency_s)
            return {"outputs": {}}

        return call

    clock = FakeClock(now=T0)
    core = ControllerCore("recommender", ["v1", "v2"], app_name="recommender",
                          store=InMemoryStore(), clock=clock, monotonic=clock.monotonic,
                          call_version=call_version)  # fmt: skip
    load = {"sample": directory, "target_rps": 40, "ramp_s": 0.2, "hold_s": 0.6,
            "max_p99_ms": 100, **stage}  # fmt: skip
    declared = {"plan": {"strategy": "canary", "candidate": "v2", "stable": "v1",
                         "canary": {"steps": [{"set_weight": 10}, {"pause_s": 60}]},
                         "load_stage": load}}  # fmt: skip

    async def scenario():
        await core.reconfigure(declared)
        for _ in range(100):
            await core.tick()
            clock.advance(0.05)
            state = core.state
            assert state is not None
            if state.step_index > 0 or state.phase.terminal:
                return
            await asyncio.sleep(0.05)

    asyncio.run(scenario())
    return core, calls


def test_the_controller_replays_and_a_fast_candidate_passes(tmp_path):
    core, calls = replay(sample(tmp_path), latency_s=0.001)
    assert core.state is not None and core.state.candidate_weight == 10.0
    assert len(calls) > 10  # the candidate was called directly
    status = core._status()
    assert status["load_stage"]["phase"] == "passed" and status["load_stage"]["sent"] == len(calls)
    assert core.window.observe(0, math.inf) == {}  # not one request counted as user evidence
    text = render_status(status)
    assert "Load stage" in text and "passed" in text


def test_the_controller_rolls_back_a_candidate_too_slow_for_the_rate(tmp_path):
    core, calls = replay(sample(tmp_path), latency_s=0.06)  # 1/0.06 = 16 rps < 40 rps
    assert core.state is not None and core.state.phase is Phase.ROLLED_BACK
    assert all(e.weight == 0.0 for e in core.state.history)
    assert core._status()["load_stage"]["phase"] == "failed"
    assert "load stage" in core.state.history[-1].reason


def test_an_empty_sample_rolls_back_naming_the_sample(tmp_path):
    core, calls = replay(str(tmp_path / "missing"), latency_s=0.001)
    assert core.state is not None and core.state.phase is Phase.ROLLED_BACK and calls == []
    assert "load_stage.sample" in core.state.history[-1].reason


def test_pause_stops_the_replay_resume_runs_it_again_and_abort_stops_it(tmp_path):
    calls: list[int] = []

    def call_version(version: str):
        async def call(inputs, parameters):
            calls.append(1)
            return {"outputs": {}}

        return call

    clock = FakeClock(now=T0)
    core = ControllerCore("recommender", ["v1", "v2"], app_name="recommender",
                          store=InMemoryStore(), clock=clock, monotonic=clock.monotonic,
                          call_version=call_version)  # fmt: skip
    declared = {"plan": {"strategy": "canary", "candidate": "v2", "stable": "v1",
                         "canary": {"steps": [{"set_weight": 10}]},
                         "load_stage": {"sample": sample(tmp_path), "target_rps": 50,
                                        "ramp_s": 0, "hold_s": 30}}}  # fmt: skip

    async def scenario():
        await core.reconfigure(declared)
        await core.tick()
        await core.tick()
        first = core.load
        assert first is not None and first.running
        await asyncio.sleep(0.2)
        assert calls
        await core.command("pause")
        assert not first.running and first.phase.startswith("stopped")
        sent = len(calls)
        await asyncio.sleep(0.2)
        assert len(calls) == sent  # nothing more is sent while paused
        await core.command("resume")
        second = core.load
        assert second is not first and second is not None and second.running
        await core.command("abort")
        assert not second.running and core._status()["load_stage"]["phase"].startswith("stopped")
        assert core.state is not None and core.state.phase is Phase.ABORTED

    asyncio.run(scenario())
