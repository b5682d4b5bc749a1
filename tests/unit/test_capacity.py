"""app/rollout/capacity.py: replica floors for capacity-aware steps."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.rollout.capacity import (
    DEFAULT_HEADROOM,
    replicas_for_share,
    settling_floor,
    total_traffic,
)

rates = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False)
capacities = st.floats(min_value=0.01, max_value=1e4, allow_nan=False, allow_infinity=False)
weights = st.floats(min_value=0, max_value=100, allow_nan=False)
headrooms = st.floats(min_value=1, max_value=10, allow_nan=False)


def test_worked_examples():
    # 100 req/s, 50% next, 1.5x headroom, 25 req/s per replica: 75 req/s -> 3 replicas.
    need = replicas_for_share(100, 25, 50)
    assert (need.replicas, need.wanted, need.projected_rps, need.capped) == (3, 3, 75.0, False)
    # Exactly a whole number of replicas' worth is that many, not one more.
    assert replicas_for_share(100, 25, 50, headroom=1).replicas == 2
    assert replicas_for_share(30, 10, 10, headroom=10).replicas == 3  # 0.1 x 10 x 30 = 30.000..04
    # Stepping to 100% of 100 req/s at 25 req/s per replica with the default headroom.
    assert replicas_for_share(100, 25, 100).replicas == 6
    assert DEFAULT_HEADROOM == 1.5


def test_a_share_needs_a_replica_even_without_traffic_and_no_share_needs_only_the_minimum():
    assert replicas_for_share(0, 10, 5).replicas == 1
    assert replicas_for_share(0, 10, 5, min_replicas=0).replicas == 1
    assert replicas_for_share(1000, 10, 0, min_replicas=0).replicas == 0
    assert replicas_for_share(1000, 10, 0, min_replicas=2).replicas == 2


def test_max_replicas_caps_and_says_so():
    need = replicas_for_share(1000, 10, 100, headroom=1, max_replicas=4)
    assert (need.replicas, need.wanted, need.capped) == (4, 100, True)
    assert not replicas_for_share(10, 10, 100, headroom=1, max_replicas=4).capped


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"traffic_rps": -1}, "traffic_rps (-1) must be a finite number >= 0"),
        ({"traffic_rps": float("nan")}, "traffic_rps (nan) must be a finite number >= 0"),
        ({"replica_rps": 0}, "replica_rps (0) must be a finite number > 0"),
        ({"next_weight": 101}, "next_weight (101) must be between 0 and 100"),
        ({"next_weight": -5}, "next_weight (-5) must be between 0 and 100"),
        ({"headroom": 0.9}, "headroom (0.9) must be a finite number >= 1"),
        ({"min_replicas": -1}, "min_replicas (-1) must be >= 0"),
        ({"min_replicas": 3, "max_replicas": 2},
         "max_replicas (2) must be greater than or equal to min_replicas (3)"),
    ],
)  # fmt: skip
def test_bad_inputs_name_the_argument_and_value(kwargs, message):
    args = {"traffic_rps": 100, "replica_rps": 10, "next_weight": 50, **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        replicas_for_share(**args)


@given(rates, capacities, weights, headrooms)
def test_the_floor_carries_the_projected_load_and_is_the_smallest_that_does(
    traffic, per_replica, weight, headroom
):
    need = replicas_for_share(traffic, per_replica, weight, headroom, min_replicas=0)
    projected = traffic * weight / 100 * headroom
    assert need.projected_rps == pytest.approx(projected)
    assert need.replicas * per_replica >= projected * (1 - 1e-9)  # enough
    if need.replicas > 1:  # and no more than needed
        assert (need.replicas - 1) * per_replica < projected
    assert (need.replicas >= 1) == (weight > 0)


@given(rates, rates, capacities, weights, headrooms)
def test_more_traffic_never_needs_fewer_replicas(a, b, per_replica, weight, headroom):
    low, high = sorted((a, b))
    assert (
        replicas_for_share(low, per_replica, weight, headroom).replicas
        <= replicas_for_share(high, per_replica, weight, headroom).replicas
    )


@given(rates, capacities, weights, weights, headrooms)
def test_a_larger_share_never_needs_fewer_replicas(traffic, per_replica, a, b, headroom):
    low, high = sorted((a, b))
    assert (
        replicas_for_share(traffic, per_replica, low, headroom).replicas
        <= replicas_for_share(traffic, per_replica, high, headroom).replicas
    )


@given(rates, capacities, capacities, weights)
def test_stronger_replicas_never_need_more_of_them(traffic, a, b, weight):
    weak, strong = sorted((a, b))
    assert (
        replicas_for_share(traffic, strong, weight).replicas
        <= replicas_for_share(traffic, weak, weight).replicas
    )


@given(rates, capacities, weights, headrooms,
       st.integers(min_value=0, max_value=5), st.integers(min_value=0, max_value=50))  # fmt: skip
def test_bounds_hold_and_capped_means_the_load_wanted_more(
    traffic, per_replica, weight, headroom, low, extra
):
    high = low + extra
    need = replicas_for_share(
        traffic, per_replica, weight, headroom, min_replicas=low, max_replicas=high
    )
    assert low <= need.replicas <= high
    assert need.capped == (max(need.wanted, low) > high)
    if not need.capped:
        assert need.replicas == max(need.wanted, low)


def test_total_traffic_from_one_version():
    assert total_traffic(60, 75) == pytest.approx(80)
    assert total_traffic(5, 100) == 5
    with pytest.raises(ValueError, match=re.escape("weight (0) must be in (0, 100]")):
        total_traffic(10, 0)


def test_the_stable_keeps_its_replicas_until_the_switch_settles():
    assert settling_floor(4, step_at=100.0, now=100.0, settle_s=30) == 4
    assert settling_floor(4, step_at=100.0, now=129.9, settle_s=30) == 4
    assert settling_floor(4, step_at=100.0, now=130.0, settle_s=30) == 0
    assert settling_floor(4, step_at=100.0, now=100.0, settle_s=0) == 0
    with pytest.raises(ValueError, match=re.escape("settle_s (-1) must be a finite number >= 0")):
        settling_floor(4, 0.0, 0.0, -1)


# ----------------------------------------------------------------------------- one step's floors


def test_step_capacity_floors_and_wait():
    from app.rollout.capacity import step_capacity

    # 100 req/s in all, the candidate going to 50% at 25 req/s per replica: 3 replicas.
    plan = step_capacity(
        "v2", 50, traffic_rps=100, replica_rps=25, candidate_running=1, stable_running=4,
    )  # fmt: skip
    assert (plan.candidate_floor, plan.stable_floor, plan.waits) == (3, 4, True)
    assert plan.reason() == "scaling v2 to 3 replicas for 50%: 1 running"
    ready = step_capacity("v2", 50, traffic_rps=100, replica_rps=25,
                          candidate_running=3, stable_running=4)  # fmt: skip
    assert not ready.waits


def test_step_capacity_caps_at_max_replicas_and_does_not_wait_on_an_unknown_count():
    from app.rollout.capacity import step_capacity

    capped = step_capacity("v2", 100, traffic_rps=100, replica_rps=10, candidate_running=2,
                           stable_running=None, max_replicas=4)  # fmt: skip
    assert (capped.candidate_floor, capped.capped, capped.stable_floor) == (4, True, 0)
    assert capped.waits  # it still asks for the replicas it may have
    assert "capped at max_replicas" in capped.reason()
    unknown = step_capacity("v2", 100, traffic_rps=100, replica_rps=10,
                            candidate_running=None, stable_running=None)  # fmt: skip
    assert not unknown.waits
    with pytest.raises(ValueError, match=r"stable_running \(-1\)"):
        step_capacity("v2", 10, traffic_rps=1, replica_rps=1, candidate_running=0,
                      stable_running=-1)  # fmt: skip
