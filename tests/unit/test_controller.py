"""The RolloutController's logic without Ray: ControllerCore over an in-memory store and a fake
clock. Declarations, persistence across a restart, refused declarations and commands, feedback
accounting and a failing store, each as a Serve replica would see them."""

from __future__ import annotations

import asyncio
import json

import pytest

from app.errors import CommandRefused, Unavailable, http_status
from deployments.controller import OUTCOMES_SUFFIX, ControllerCore
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
KEY = "recommender/recommender/rollout-state"


def controller(store: InMemoryStore, clock: FakeClock, versions=("v1", "v2")) -> ControllerCore:
    return ControllerCore(
        "recommender", list(versions), app_name="recommender", store=store, clock=clock
    )


def run(coroutine):
    return asyncio.run(coroutine)


async def declared(core: ControllerCore, user_config=DECLARED) -> ControllerCore:
    await core.reconfigure(user_config)
    await core.tick(core.clock())
    return core


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
    run(first.tick(clock()))  # persists the book
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
    run(core.tick(clock()))  # still failing: still not published
    assert core.override == canary
    store.fail_puts = False
    run(core.tick(clock()))  # stored, then published
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
                          deployed_versions=deployed, clock=FakeClock())  # fmt: skip
    run(core.reconfigure(DECLARED))
    assert asked and core.state is not None
