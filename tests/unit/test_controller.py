"""The RolloutController's logic without Ray: ControllerCore over an in-memory store and a fake
clock. Declarations, persistence across a restart, refused declarations and commands, feedback
accounting, a failing store, hold timers across restarts and clock steps, and the progress
deadline, each as a Serve replica would see them. Fencing: test_controller_fencing.py."""

from __future__ import annotations

import asyncio
import json
import math
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app import ray_compat
from app.constants import GENERATION_EPOCH_STRIDE, OUTCOMES_WRITE_INTERVAL_S
from app.errors import CommandRefused, InvalidInput, Unavailable, http_status
from app.observability.stats import RouterStats
from deployments.controller import (
    CHECKPOINT_S,
    OUTCOMES_SUFFIX,
    ControllerCore,
    RolloutController,
    deployment_ready,
    stored_command_keys,
)
from deployments.store import InMemoryStore
from tests.support.fakes import FakeClock

PLAN = {
    "strategy": "canary",
    "candidate": "v2",
    "stable": "v1",
    "canary": {"steps": [{"set_weight": 10}, {"pause_s": 60}, {"set_weight": 50}]},
    "gates": {"min_requests": 5},
}
DECLARED = {"plan": PLAN, "tick_interval_s": 0.25}
# Three steps, each waiting for promote: every applied promote moves the step index on.
WAITING_STEPS = [{"set_weight": 10}, {"pause_s": None}, {"set_weight": 30}, {"pause_s": None},
                 {"set_weight": 50}, {"pause_s": None}]  # fmt: skip
KEY = "recommender/recommender/rollout-state"


def controller(
    store: InMemoryStore, clock: FakeClock, versions=("v1", "v2"), **options
) -> ControllerCore:
    return ControllerCore("recommender", list(versions), app_name="recommender", store=store,
                          clock=clock, monotonic=clock.monotonic, **options)  # fmt: skip


def run(coroutine):
    return asyncio.run(coroutine)


async def declared(core: ControllerCore, user_config=DECLARED) -> ControllerCore:
    await core.reconfigure(user_config)
    await core.tick()
    return core


async def waiting_for_promotes(store: InMemoryStore, clock: FakeClock) -> ControllerCore:
    """A controller whose declared canary waits for promote at each of its three steps."""
    plan = {**PLAN, "canary": {"steps": WAITING_STEPS}}
    return await declared(controller(store, clock), {**DECLARED, "plan": plan})


def test_a_declared_plan_starts_publishes_and_persists():
    store, clock = InMemoryStore(), FakeClock()
    core = run(declared(controller(store, clock)))
    assert core.state is not None and core.state.phase.value == "progressing"
    assert core.override is not None
    assert core.override["weights"] == {"v2": 10.0, "v1": 90.0}
    assert core.override["stable"] == "v1" and core.override["shadow"] == "declared"
    saved = json.loads(store.data[KEY])
    assert saved["step_index"] == core.state.step_index
    assert core.message.startswith("started plan ")


def test_a_restarted_controller_resumes_the_same_rollout_and_outcomes():
    store, clock = InMemoryStore(), FakeClock()
    first = run(declared(controller(store, clock)))
    first.desk.record_served([("req-1", "v2", clock(), "weighted")], clock())
    results = run(first.feedback([{"request_id": "req-1", "outcome": "click", "value": 1.0,
                                   "kind": "binary"}], {}))  # fmt: skip
    assert results[0]["counted"] is True
    clock.advance(OUTCOMES_WRITE_INTERVAL_S)
    run(first.tick())  # persists the book (at most once per OUTCOMES_WRITE_INTERVAL_S)
    assert OUTCOMES_SUFFIX.lstrip("/") in "".join(store.data)

    clock.advance(5)
    second = controller(store, clock)  # the replica restarted: nothing in memory
    assert second.state.plan.digest() == first.state.plan.digest()
    assert second.state.step_index == first.state.step_index
    assert second.desk.book.arm("click", "v2").n == 1
    run(second.reconfigure(DECLARED))  # the same declaration again: the rollout goes on
    assert second.state.step_index == first.state.step_index
    assert second.override is not None  # and it steers the routers again


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"tick_interval_s": True}, "tick_interval_s"),
        ({"tick_interval_s": 0}, "tick_interval_s"),
        ({"prometheus_url": "ftp://prometheus:9090"}, "prometheus_url"),
        ({"surprise": 1}, "surprise"),
        ({"plan": {**PLAN, "candidate": "v9"}}, "not deployed"),
    ],
)
def test_a_bad_declaration_is_refused_and_the_live_rollout_goes_on(change, field):
    store, clock = InMemoryStore(), FakeClock()
    core = run(declared(controller(store, clock)))
    before = core.state
    run(core.reconfigure({**DECLARED, **change}))
    assert core.state is before
    assert core.message.startswith("refused the declared plan") and field in core.message


def test_commands_refused_in_the_wrong_phase_are_409_with_the_reason():
    store, clock = InMemoryStore(), FakeClock()
    core = run(declared(controller(store, clock)))
    with pytest.raises(CommandRefused, match="already progressing") as refused:
        run(core.command("start"))
    assert http_status(refused.value) == 409
    with pytest.raises(CommandRefused, match="cannot resume"):
        run(core.command("resume"))
    with pytest.raises(CommandRefused, match="unknown command 'promote-later'"):
        run(core.command("promote-later"))


def test_abort_rolls_back_publishes_and_persists_at_once():
    store, clock = InMemoryStore(), FakeClock()
    core = run(declared(controller(store, clock)))
    generation = core.override["generation"]
    status = run(core.command("abort"))
    assert status["phase"] == "aborted"
    assert core.override["weights"] == {"v1": 100.0, "v2": 0.0}
    assert core.override["generation"] == generation + 1
    assert json.loads(store.data[KEY])["phase"] == "aborted"


def test_every_command_records_its_caller_in_the_history():
    store, clock = InMemoryStore(), FakeClock()
    core = run(declared(controller(store, clock)))
    run(core.command("abort", "alice@laptop from 10.0.0.7"))
    assert core.state.history[-1].reason.endswith("(rollout abort by alice@laptop from 10.0.0.7)")
    run(core.command("start", "bob@ci from 10.0.0.8"))
    assert core.state.history[0].reason == "command start (rollout start by bob@ci from 10.0.0.8)"
    stored = json.loads(store.data[KEY])["history"]
    assert "by bob@ci" in stored[0]["reason"]  # persisted with the state


def test_a_command_re_sent_with_its_idempotency_key_is_applied_once():
    # HAProxy re-sends a request whose Router died before answering (app/ops/serving_mode.py):
    # the controller may then get the same promote twice, which must not skip a step.
    store, clock = InMemoryStore(), FakeClock()
    core = run(waiting_for_promotes(store, clock))
    first = run(core.command("promote", "alice", key="k-1"))
    step, events = core.state.step_index, len(core.state.history)
    again = run(core.command("promote", "alice", key="k-1"))
    assert core.state.step_index == step and len(core.state.history) == events
    assert again["step_index"] == first["step_index"] == step
    # The same key for another command is the client's mistake: 400, nothing applied.
    with pytest.raises(InvalidInput, match="Idempotency-Key 'k-1' was used for promote") as bad:
        run(core.command("abort", "alice", key="k-1"))
    assert http_status(bad.value) == 400 and core.state.phase.value != "aborted"
    # A new key is a new command.
    run(core.command("promote", "alice", key="k-2"))
    assert core.state.step_index > step


def test_a_re_sent_command_whose_first_send_was_not_stored_is_not_applied_again():
    # The first promote changed the state but its write failed (503): HAProxy or the client
    # sends it again with the same key. It must not advance a second step.
    store, clock = InMemoryStore(), FakeClock()
    core = run(waiting_for_promotes(store, clock))
    store.fail_puts = True
    with pytest.raises(Unavailable, match="not stored yet"):
        run(core.command("promote", key="k-9"))
    step = core.state.step_index
    with pytest.raises(Unavailable, match="not stored yet"):
        run(core.command("promote", key="k-9"))
    assert core.state.step_index == step
    store.fail_puts = False
    run(core.tick())  # the write succeeds
    assert run(core.command("promote", key="k-9"))["step_index"] == step


def test_a_command_re_sent_to_the_replica_that_took_over_is_not_applied_again():
    # The controller replica stored a promote and died before it answered: the client sends it
    # again with the same key, and the replica that takes over reads the key with the state.
    store, clock = InMemoryStore(), FakeClock()
    first = run(waiting_for_promotes(store, clock))
    answered = run(first.command("promote", "alice", key="k-7"))
    assert json.loads(store.data[KEY])["command_keys"][-1] == ["k-7", "promote"]

    second = controller(store, clock)  # the replica that took over: nothing in memory
    again = run(second.command("promote", "alice", key="k-7"))  # before its first tick
    assert again["step_index"] == answered["step_index"] == second.state.step_index
    with pytest.raises(InvalidInput, match="Idempotency-Key 'k-7' was used for promote"):
        run(second.command("abort", key="k-7"))
    run(second.command("promote", key="k-8"))  # a new key is a new command
    assert second.state.step_index > answered["step_index"]


def test_the_state_stores_only_the_newest_keys_and_reads_back_what_it_can(monkeypatch):
    from deployments import controller as module

    monkeypatch.setattr(module, "STORED_COMMAND_KEYS", 2)
    store, clock = InMemoryStore(), FakeClock()
    core = run(declared(controller(store, clock)))
    for key in ("a", "b", "c"):
        run(core.command("pause", key=key))
        run(core.command("resume", key=key + "-resume"))
    stored = json.loads(store.data[KEY])
    assert stored["command_keys"] == [["c", "pause"], ["c-resume", "resume"]]
    assert len(core._command_keys) == 6  # memory keeps COMMAND_KEYS

    # A state stored before keys were, or with damaged entries: the state still resumes.
    del stored["command_keys"]
    store.data[KEY] = json.dumps(stored).encode()
    assert controller(store, clock).state is not None
    stored["command_keys"] = [["ok", "abort"], ["", "abort"], ["x" * 257, "abort"],
                              ["k", "reboot"], "k", ["k", "abort", 1], [1, "abort"]]  # fmt: skip
    store.data[KEY] = json.dumps(stored).encode()
    resumed = controller(store, clock)
    assert resumed.state is not None and dict(resumed._command_keys) == {"ok": "abort"}


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=4), inner, max_size=3)))  # fmt: skip
def test_stored_command_keys_never_raise_on_any_json(raw):
    keys = stored_command_keys(raw)
    assert all(isinstance(k, str) and v in ("start", "promote", "promote-full", "pause",
                                            "resume", "abort") for k, v in keys.items())  # fmt: skip


def test_only_the_newest_idempotency_keys_are_remembered(monkeypatch):
    from deployments import controller as module

    monkeypatch.setattr(module, "COMMAND_KEYS", 2)
    core = run(declared(controller(InMemoryStore(), FakeClock())))
    for key in ("a", "b", "c"):
        run(core.command("pause", key=key))
        run(core.command("resume", key=key + "-resume"))
    assert list(core._command_keys) == ["c", "c-resume"]


def test_promote_full_spelled_either_way():
    for spelling in ("promote-full", "promote_full"):
        core = run(declared(controller(InMemoryStore(), FakeClock())))
        assert run(core.command(spelling))["phase"] in ("promoting", "succeeded")


def test_a_change_is_stored_before_routers_hear_of_it_and_a_command_not_stored_is_a_503():
    # Persist, then publish: traffic the store does not hold could be undone by a restart.
    store, clock = InMemoryStore(), FakeClock()
    core = run(declared(controller(store, clock)))
    canary = dict(core.override)
    store.fail_puts = True
    with pytest.raises(Unavailable, match="abort is not stored yet") as refused:
        run(core.command("abort"))
    assert http_status(refused.value) == 503
    assert core.state.phase.value == "aborted"  # decided, in memory
    assert core.override == canary  # routers not told: the store does not hold it
    assert json.loads(store.data[KEY])["phase"] == "progressing"
    run(core.tick())  # still failing: still not published
    assert core.override == canary
    store.fail_puts = False
    run(core.tick())  # stored, then published
    assert json.loads(store.data[KEY])["phase"] == "aborted"
    assert core.override["weights"] == {"v1": 100.0, "v2": 0.0}
    assert core.override["generation"] == canary["generation"] + 1


def test_a_restart_after_a_failed_write_does_not_undo_what_routers_were_told():
    # The restarted controller resumes what the store holds, which is all routers ever saw.
    store, clock = InMemoryStore(), FakeClock()
    core = run(declared(controller(store, clock)))
    published = core.override["weights"]
    store.fail_puts = True
    with pytest.raises(Unavailable):
        run(core.command("abort"))
    store.fail_puts = False
    restarted = controller(store, clock)
    run(restarted.reconfigure(DECLARED))
    assert restarted.state.phase.value == "progressing"
    assert restarted.override["weights"] == published


def test_removing_the_plan_aborts_and_hands_traffic_back_to_the_routers():
    core = run(declared(controller(InMemoryStore(), FakeClock())))
    run(core.reconfigure({"plan": None}))
    assert core.state.phase.value == "aborted"
    assert core.override is None


def test_version_apps_controller_asks_serve_for_the_deployed_versions():
    asked = []

    def deployed() -> list[str]:
        asked.append(True)
        return ["v1", "v2"]

    core = ControllerCore("recommender", None, app_name="recommender", store=InMemoryStore(),
                          deployed_versions=deployed, clock=(clock := FakeClock()),
                          monotonic=clock.monotonic)  # fmt: skip
    run(core.reconfigure(DECLARED))
    assert asked and core.state is not None


# -- timers: restarts and clock steps (issue 18 item 4, F6.5, F16) ---------------------------

HOLD = {"strategy": "canary", "candidate": "v2", "stable": "v1",
        "canary": {"steps": [{"set_weight": 10}, {"analysis_s": 120}, {"set_weight": 50},
                              {"pause_s": None}]},
        "gates": {"min_requests": 5}}  # fmt: skip


def healthy_stats() -> dict:
    stats = RouterStats()
    for _ in range(10):
        stats.record("v2", True, 10.0)
        stats.record("v1", True, 10.0)
    return stats.drain()


def live(core: ControllerCore, clock: FakeClock, ticks: int, *, step_s: float = 1.0,
         traffic: bool = True) -> list[tuple[str, float]]:  # fmt: skip
    """`ticks` ticks `step_s` apart, each after the readiness lookup and (with `traffic`) a
    healthy stats report, as the replica's loops run them: (phase, candidate weight) after each."""

    async def ticking() -> list[tuple[str, float]]:
        seen = []
        for _ in range(ticks):
            clock.advance(step_s)
            if traffic:
                await core.report(healthy_stats())
            await core.refresh_readiness()
            await core.tick()
            seen.append((core.state.phase.value, core.state.candidate_weight))
        return seen

    return run(ticking())


def test_a_restarted_controller_resumes_an_analysis_hold_where_it_was():
    store, clock = InMemoryStore(), FakeClock()
    first = run(declared(controller(store, clock), {"plan": HOLD}))
    assert live(first, clock, 40)[-1] == ("progressing", 10.0)
    # The replica dies; Serve starts another 30 s later, on a node whose wall clock is 500 s
    # behind (and whose monotonic clock has another origin).
    clock.advance(30)
    clock.jump(-500)
    clock.mono = 7.0
    second = controller(store, clock)
    run(second.reconfigure({"plan": HOLD}))
    elapsed = second.state.elapsed_s(second.now())
    assert 40 - CHECKPOINT_S <= elapsed <= 40  # the stored timer, not 0 (reset) nor 70
    assert run(second.status())["time_in_step_s"] == pytest.approx(elapsed, abs=0.01)
    weights = [weight for _, weight in live(second, clock, math.ceil(120 - elapsed))]
    # the analysis passes when its 120 s are up, on the evidence since the restart
    assert weights == [10.0] * (len(weights) - 1) + [50.0]


def test_a_crash_looping_controller_still_finishes_a_long_analysis():
    # Each replica lives 20 s, the next one starts 10 s later: a 300 s analysis restarted at
    # every start would never end; resumed, it ends after about 300 / 15 lives.
    long_hold = {**HOLD, "canary": {"steps": [{"set_weight": 10}, {"analysis_s": 300},
                                              {"set_weight": 50}, {"pause_s": None}]}}  # fmt: skip
    store, clock = InMemoryStore(), FakeClock()
    core = run(declared(controller(store, clock), {"plan": long_hold}))
    lives = 1
    while core.state.candidate_weight < 50.0 and lives < 40:
        live(core, clock, 20)
        if core.state.candidate_weight < 50.0:
            clock.advance(10)
            core = controller(store, clock)
            run(core.reconfigure({"plan": long_hold}))
            lives += 1
    assert core.state.candidate_weight == 50.0
    assert lives <= 300 / (20 - CHECKPOINT_S) + 1


def test_the_stored_timers_are_refreshed_while_a_timer_runs_and_only_then():
    store, clock = InMemoryStore(), FakeClock()
    core = run(declared(controller(store, clock), {"plan": HOLD}))
    live(core, clock, 12)
    assert json.loads(store.data[KEY])["timers"]["step_elapsed_s"] >= 12 - CHECKPOINT_S
    # waiting for promote, nothing moves by itself: no rewrites (so a state an operator or a
    # test deleted is not brought back by a replica that is only waiting)
    waiting = {**HOLD, "canary": {"steps": [{"set_weight": 10}, {"pause_s": None}]}}
    core = run(declared(controller(InMemoryStore(), clock), {"plan": waiting}))
    assert core.state.phase.value == "paused"
    del core.store.data[KEY]
    live(core, clock, 3 * int(CHECKPOINT_S))
    assert KEY not in core.store.data


@pytest.mark.parametrize("jump_s", [3600.0, -3600.0])
def test_a_wall_clock_step_neither_ends_nor_stretches_a_hold(jump_s):
    # A 60 s pause ends after 60 s of real time, whatever the wall clock does meanwhile.
    plan = {**HOLD, "canary": {"steps": [{"set_weight": 10}, {"pause_s": 60},
                                         {"set_weight": 50}, {"pause_s": None}]}}  # fmt: skip
    store, clock = InMemoryStore(), FakeClock()
    core = run(declared(controller(store, clock), {"plan": plan}))
    live(core, clock, 10)
    clock.jump(jump_s)
    weights = [weight for _, weight in live(core, clock, 50)]
    assert weights == [10.0] * 49 + [50.0]
    assert core.state.history[-1].time_s == pytest.approx(core.state.history[0].time_s + 60)


# -- progress deadline (issue 18 item 5) -----------------------------------------------------

STUCK = {**HOLD, "progress_deadline_s": 120}


def test_a_candidate_that_never_runs_is_rolled_back_at_the_progress_deadline():
    ready = {"v2": False}
    store, clock = InMemoryStore(), FakeClock()
    core = controller(store, clock, candidate_ready=lambda version: ready[version])
    run(declared(core, {"plan": STUCK}))
    phases = [phase for phase, _ in live(core, clock, 70, step_s=2.0, traffic=False)]
    # no candidate traffic: the analysis ends inconclusive (paused), and the deadline, 120 s
    # after the candidate was first seen without a replica, rolls it back
    assert "paused" in phases and phases[-1] == "rolled_back"
    assert phases.index("rolled_back") in (59, 60)
    reason = core.state.history[-1].reason
    assert "progress deadline exceeded" in reason and "progress_deadline_s: 120" in reason
    assert core.override["weights"] == {"v1": 100.0, "v2": 0.0}
    assert json.loads(store.data[KEY])["phase"] == "rolled_back"


def test_the_progress_deadline_waits_for_a_slow_start_and_ignores_unknown_readings():
    ready: dict[str, bool | None] = {"v2": False}

    def lookup(version: str) -> bool | None:
        if ready[version] is None:
            raise OSError("Serve controller unreachable")
        return ready[version]

    store, clock = InMemoryStore(), FakeClock()
    core = controller(store, clock, candidate_ready=lookup)
    run(declared(core, {"plan": STUCK}))
    for seconds, value in ((100, False), (200, None), (100, True), (100, False)):
        ready["v2"] = value
        live(core, clock, seconds // 2, step_s=2.0, traffic=False)
    # 100 s not ready, 200 s unknown, ready, then 100 s not ready again: never 120 s in a row
    assert core.state.phase.value != "rolled_back"
    assert run(core.status())["progress_deadline"]["unready_s"] == pytest.approx(98, abs=2)


@pytest.mark.parametrize(
    ("details", "ready"),
    [
        ({"status": "UPDATING", "replicas": [{"state": "RUNNING"}, {"state": "STARTING"}]}, True),
        ({"status": "HEALTHY", "replicas": []}, True),  # autoscaled to zero
        ({"status": "UPDATING", "replicas": [{"state": "STARTING"}]}, False),
        ({"status": "UPSCALING", "replicas": [{"state": "PENDING_ALLOCATION"}]}, False),
        ({"status": "DEPLOY_FAILED", "replicas": []}, False),
        ({"status": "UNHEALTHY", "replicas": [{"state": "STOPPING"}]}, False),
        (None, False),  # the candidate's deployment is gone
    ],
)
def test_which_serve_deployment_details_count_as_ready(details, ready):
    assert deployment_ready(details) is ready


@pytest.mark.parametrize("version_apps", [False, True])
def test_the_serve_controller_finds_the_candidates_deployment_in_either_mode(
    monkeypatch, version_apps
):
    running = {"status": "HEALTHY", "replicas": [{"state": "RUNNING"}]}
    starting = {"status": "UPDATING", "replicas": [{"state": "STARTING"}]}
    if version_apps:  # each version its own application <model>-<version>
        apps = {"recommender": {"deployments": {}},
                "recommender-v1": {"deployments": {"recommender-v1": running}},
                "recommender-v2": {"deployments": {"recommender-v2": starting}}}  # fmt: skip
    else:  # one application: the versions are deployments <model>-<version> in it
        apps = {"recommender": {"deployments": {"recommender-v1": running,
                                                "recommender-v2": starting}}}  # fmt: skip
    monkeypatch.setattr(ray_compat, "serve_details", lambda: {"applications": apps})
    replica = SimpleNamespace(model="recommender", app_name="recommender",
                              versions=None if version_apps else ["v1", "v2"])  # fmt: skip
    serve_ready = RolloutController.func_or_class._serve_ready
    assert serve_ready(replica, "v1") is True
    assert serve_ready(replica, "v2") is False
    assert serve_ready(replica, "v3") is False


def test_the_outcome_book_is_written_at_most_once_per_interval_and_with_a_new_rollout():
    """Issue 18 item 6: under a feedback flood the book changed between every two ticks and was
    rewritten at each (the tick's store write: 0.4 -> 11.9 ms). Now at most once per
    OUTCOMES_WRITE_INTERVAL_S; a new rollout's empty book goes with its state at once."""
    store, clock = InMemoryStore(), FakeClock()
    core = run(declared(controller(store, clock)))
    book_key = KEY + OUTCOMES_SUFFIX
    assert json.loads(store.data[book_key])  # written with the rollout's start
    writes = []
    put = store.put
    store.put = lambda key, value: (writes.append(key), put(key, value))[1]
    for n in range(8):  # 8 ticks 0.25 s apart, an outcome counted before each
        core.desk.record_served([(f"req-{n}", "v2", clock(), "weighted")], clock())
        run(core.feedback([{"request_id": f"req-{n}", "outcome": "click", "value": 1.0,
                            "kind": "binary"}], {}))  # fmt: skip
        clock.advance(0.25)
        run(core.tick())
    assert 1 <= writes.count(book_key) <= 2, writes  # was 8: one per tick
    clock.advance(OUTCOMES_WRITE_INTERVAL_S)
    run(core.tick())
    assert not core.desk.dirty  # nothing counted is left unwritten for long
    saved = json.loads(store.data[book_key])
    run(core.command("abort"))
    run(core.command("start"))  # a new rollout: its (empty) book replaces the old one now
    assert json.loads(store.data[book_key]) != saved


def test_a_replica_that_takes_over_publishes_generations_above_every_earlier_one():
    """F6.6: a restarted replica counted generations again from the stored rollout's, below
    what routers (and clients echoing x-traffic-generation) had seen. Now epoch first."""
    store, clock = InMemoryStore(), FakeClock()
    first = run(declared(controller(store, clock)))
    seen = [first.override["generation"]]
    for command in ("pause", "resume", "abort", "start"):
        run(first.command(command))
        seen.append(first.override["generation"])
    assert seen == sorted(seen) and seen[-1] > seen[0]  # publishes only ever go up
    second = run(declared(controller(store, clock)))  # the replica Serve started instead
    assert second.override is not None and second.override["generation"] > max(seen), seen
    assert second.override["generation"] // GENERATION_EPOCH_STRIDE == second.epoch == 2


def test_every_decision_is_posted_to_the_declared_webhooks(tmp_path):
    """The controller's events reach a real local receiver, in both formats, with the reason
    and the gate readings; the tick never waits for the posts (they drain afterwards)."""
    from tests.unit.test_notify import Receiver

    receiver = Receiver()
    try:
        (tmp_path / "url-json").write_text(receiver.url + "/json")
        (tmp_path / "url-slack").write_text(receiver.url + "/slack")
        webhooks = [{"name": "json", "url_file": str(tmp_path / "url-json")},
                    {"name": "slack", "format": "slack", "url_file": str(tmp_path / "url-slack")}]  # fmt: skip
        store, clock = InMemoryStore(), FakeClock()
        core = controller(store, clock)

        async def go() -> None:
            await declared(core, {**DECLARED, "notifications": {"webhooks": webhooks}})
            await core.command("abort", "test")
            await core.notifier.drain()
            await core.notifier.aclose()

        run(go())
    finally:
        receiver.close()
    kinds = [b["event"] for b in receiver.bodies("/json")]
    assert kinds == ["started", "step", "aborted"], kinds
    body = receiver.bodies("/json")[1]
    assert body["model"] == "recommender" and body["candidate"] == "v2" and body["stable"] == "v1"
    assert body["reason"] == "step 1/4: set_weight 10%" and body["weight"] == 10.0
    assert "min_requests" in json.dumps(body["gates"])  # the readings that decided it
    slack = receiver.bodies("/slack")
    assert len(slack) == 3 and "aborted" in slack[-1]["text"]
    assert core.notifier.stats()["json"]["sent"] == 3
