"""deployments/capacity_floor.py: the floors the controller publishes, read back by the policy."""

from __future__ import annotations

import json

import pytest

from app.constants import KV_NAMESPACE
from deployments.builder import autoscaling_config
from deployments.capacity_floor import CapacityFloors, capacity_settings
from deployments.capacity_policy import CapacityFloorPolicy
from tests.unit.test_builder_capacity import model_config


class Kv:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def put(self, key: str, value: bytes) -> None:
        self.data[key] = value

    def delete(self, key: str) -> None:
        self.data.pop(key, None)


def floors(kv: Kv, now: float = 5_000.0, **kwargs) -> CapacityFloors:
    return CapacityFloors("recommender", "recommender", kv.put, kv.delete, lambda: now, **kwargs)


def test_publish_writes_the_floor_with_its_generation_and_expiry():
    kv = Kv()
    value = floors(kv).publish("v2", 3, generation=7, ttl_s=30)
    key = "recommender/recommender/capacity/v2"
    assert (
        json.loads(kv.data[key]) == value == {"floor": 3, "generation": 7, "expires_at_s": 5030.0}
    )
    floors(kv).clear("v2")
    assert key not in kv.data
    floors(kv).clear("v2")  # clearing twice is fine


def test_in_version_apps_mode_the_key_names_the_versions_own_application():
    assert floors(Kv(), version_apps=True).key("v2") == "recommender-v2/recommender/capacity/v2"


@pytest.mark.parametrize(("floor", "ttl_s", "message"), [(-1, 5, "floor"), (1, 0, "ttl_s")])
def test_bad_values_name_the_field(floor, ttl_s, message):
    with pytest.raises(ValueError, match=message):
        floors(Kv()).publish("v2", floor, generation=1, ttl_s=ttl_s)


def test_the_policy_reads_what_the_publisher_wrote():
    kv, now = Kv(), 5_000.0
    floors(kv, now).publish("v2", 4, generation=1, ttl_s=30)
    policy = CapacityFloorPolicy("recommender", "v2", app="recommender",
                                 read_kv=kv.data.get, clock=lambda: now, background=False)  # fmt: skip
    policy.refresh()
    assert policy.floor(now) == 4
    assert policy.floor(now + 30) == 0  # expired


def details(config: dict, states: list[str]) -> dict:
    return {"deployment_config": {"autoscaling_config": config},
            "replicas": [{"state": s} for s in states]}  # fmt: skip


def test_capacity_settings_come_from_the_builders_policy_kwargs():
    config = autoscaling_config(model_config(capacity_aware=True, replica_capacity_rps=25))
    assert config["policy"]["policy_kwargs"]["namespace"] == KV_NAMESPACE
    settings = capacity_settings(details(config, ["RUNNING", "STARTING", "RUNNING"]))
    assert settings is not None
    assert (settings.replica_capacity_rps, settings.headroom) == (25.0, 1.5)
    assert (settings.min_replicas, settings.max_replicas, settings.running_replicas) == (1, 4, 2)


def test_a_version_that_did_not_opt_in_has_no_capacity_settings():
    assert capacity_settings(None) is None
    assert capacity_settings(details(autoscaling_config(model_config()), ["RUNNING"])) is None
    broken = {"policy": {"policy_function": "deployments.capacity_policy:CapacityFloorPolicy",
                         "policy_kwargs": {"replica_capacity_rps": "fast"}}}  # fmt: skip
    assert capacity_settings(details(broken, [])) is None


# ----------------------------------------------------------------------------- the controller's side


def keeper_world(running: dict[str, int], opted_in=("v2", "v1")):
    import asyncio

    from app.rollout import Observation, RolloutPlan, RolloutState, step
    from deployments.capacity_floor import CapacityKeeper, CapacitySettings

    kv = Kv()
    lookups: list[str] = []

    def lookup(version: str) -> CapacitySettings | None:
        lookups.append(version)
        if version not in opted_in:
            return None
        return CapacitySettings(25.0, 1.5, 1, 6, running[version])

    keeper = CapacityKeeper(floors(kv), lookup)
    plan = RolloutPlan.model_validate({
        "strategy": "canary", "candidate": "v2", "stable": "v1",
        "canary": {"steps": [{"set_weight": 50}, {"pause_s": 5}, {"set_weight": 100}]},
    })  # fmt: skip
    state = RolloutState.start(plan, 0.0)
    return asyncio.run, kv, keeper, state, step, Observation, lookups


def test_the_keeper_sizes_the_next_raise_publishes_before_it_and_clears_at_the_end():
    running = {"v2": 1, "v1": 4}
    run, kv, keeper, state, step, Observation, _ = keeper_world(running)
    rates = {"v1": 100.0}  # 100 req/s, all on the stable so far
    run(keeper.refresh(state, 0.0))
    need = keeper.plan(state, rates, 0.0)
    assert need is not None
    assert (need.weight, need.candidate_floor, need.stable_floor, need.waits) == (50, 3, 4, True)
    run(keeper.sync(state, 0.0))
    v2, v1 = (json.loads(kv.data[f"recommender/recommender/capacity/{v}"]) for v in ("v2", "v1"))
    assert (v2["floor"], v1["floor"]) == (3, 4)
    # The machine waits on it; once the replicas run, the step goes on.
    d = step(state, Observation(), 0.0, capacity=need)
    assert d.state.candidate_weight == 0 and d.capacity_wait is not None
    running["v2"] = 3
    run(keeper.refresh(state, 2.0))
    need = keeper.plan(state, rates, 2.0)
    state = step(state, Observation(), 2.0, capacity=need).state
    assert state.candidate_weight == 50
    # During the pause the floor of the next raise (100%) is asked for already.
    run(keeper.refresh(state, 4.0))
    need = keeper.plan(state, rates, 4.0)
    assert (need.weight, need.candidate_floor) == (100, 6)
    run(keeper.sync(state, 4.0))
    assert json.loads(kv.data["recommender/recommender/capacity/v2"])["floor"] == 6
    # The rollout succeeds: both floors are cleared.
    from dataclasses import replace

    from app.rollout import Phase

    done = replace(state, phase=Phase.SUCCEEDED, candidate_weight=100.0)
    assert keeper.plan(done, rates, 5.0) is None
    run(keeper.sync(done, 5.0))
    assert not kv.data


def test_a_rollback_clears_the_candidates_floor_and_lets_the_stables_lapse():
    from dataclasses import replace

    from app.rollout import Phase

    run, kv, keeper, state, *_ = keeper_world({"v2": 1, "v1": 4})
    run(keeper.refresh(state, 0.0))
    keeper.plan(state, {"v1": 100.0}, 0.0)
    run(keeper.sync(state, 0.0))
    rolled_back = replace(state, phase=Phase.ROLLED_BACK)
    run(keeper.sync(rolled_back, 1.0))
    assert list(kv.data) == ["recommender/recommender/capacity/v1"]


def test_a_candidate_that_did_not_opt_in_gets_no_floor_and_never_waits():
    run, kv, keeper, state, *_ = keeper_world({"v2": 1, "v1": 4}, opted_in=("v1",))
    run(keeper.refresh(state, 0.0))
    assert keeper.plan(state, {"v1": 100.0}, 0.0) is None
    run(keeper.sync(state, 0.0))
    assert not kv.data
    assert keeper.status() is None


def test_a_stale_or_failed_reading_does_not_hold_the_step():
    run, kv, keeper, state, *_ = keeper_world({"v2": 1, "v1": 4})
    run(keeper.refresh(state, 0.0))
    assert keeper.plan(state, {}, 31.0) is None  # 31 s old

    def broken(version):
        raise ConnectionError("Serve controller gone")

    keeper._lookup = broken
    keeper.reading = None
    run(keeper.refresh(state, 40.0))
    assert keeper.reading is None and keeper.plan(state, {}, 40.0) is None


def test_floors_are_rewritten_before_they_lapse():
    run, kv, keeper, state, *_ = keeper_world({"v2": 1, "v1": 4})
    run(keeper.refresh(state, 0.0))
    keeper.plan(state, {"v1": 100.0}, 0.0)
    writes = []
    keeper.floors._put = lambda key, value: writes.append(key)
    run(keeper.sync(state, 0.0))
    run(keeper.sync(state, 5.0))  # unchanged and fresh: nothing written
    assert len(writes) == 2
    run(keeper.sync(state, 10.0))  # REPUBLISH_S later: rewritten
    assert len(writes) == 4
