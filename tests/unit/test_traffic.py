"""The traffic table: pins, the weighted split, and what happens when versions are down."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from app.config import TrafficConfig
from app.errors import ModelNotFound, Unavailable, http_status
from app.serving.traffic import Decision, Route, TrafficTable

DRAWS = 20_000
TOLERANCE = 1.5  # percentage points


def table(weights: dict[str, float], stable: str | None = None) -> TrafficTable:
    config = TrafficConfig(stable=stable or next(iter(weights)), weights=weights)
    return TrafficTable.from_config(config, weights, generation=1)


def shares(
    tab: TrafficTable, *, versions, available, seed: int = 1234
) -> tuple[dict[str, float], Counter]:
    rng = random.Random(seed)
    counts: Counter = Counter()
    decisions: Counter = Counter()
    for _ in range(DRAWS):
        route = tab.choose(rng, versions=versions, available=available)
        counts[route.version] += 1
        decisions[route.decision] += 1
    return {v: 100.0 * n / DRAWS for v, n in counts.items()}, decisions


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ninety_ten_split(seed):
    tab = table({"v1": 90, "v2": 10})
    got, decisions = shares(tab, versions={"v1", "v2"}, available={"v1", "v2"}, seed=seed)
    assert set(got) == {"v1", "v2"}
    assert got["v1"] == pytest.approx(90, abs=TOLERANCE)
    assert got["v2"] == pytest.approx(10, abs=TOLERANCE)
    assert decisions == {Decision.WEIGHTED: DRAWS}


def test_three_way_split():
    tab = table({"v1": 50, "v2": 30, "v3": 20})
    versions = {"v1", "v2", "v3"}
    got, _ = shares(tab, versions=versions, available=versions)
    assert got["v1"] == pytest.approx(50, abs=TOLERANCE)
    assert got["v2"] == pytest.approx(30, abs=TOLERANCE)
    assert got["v3"] == pytest.approx(20, abs=TOLERANCE)


def test_small_canary_share():
    tab = table({"v1": 99, "v2": 1})
    got, _ = shares(tab, versions={"v1", "v2"}, available={"v1", "v2"})
    assert 0 < got["v2"] <= 2.5


def test_zero_weight_version_never_chosen():
    tab = table({"v1": 100, "v2": 0, "v3": 0})
    versions = {"v1", "v2", "v3"}
    got, decisions = shares(tab, versions=versions, available=versions)
    assert got == {"v1": 100.0}
    assert decisions == {Decision.WEIGHTED: DRAWS}


def test_zero_weight_stable_is_not_drawn_while_others_serve():
    tab = table({"v1": 0, "v2": 100}, stable="v1")
    got, _ = shares(tab, versions={"v1", "v2"}, available={"v1", "v2"})
    assert got == {"v2": 100.0}


def test_unavailable_version_excluded_and_weights_renormalized():
    tab = table({"v1": 50, "v2": 30, "v3": 20})
    got, decisions = shares(tab, versions={"v1", "v2", "v3"}, available={"v2", "v3"})
    assert "v1" not in got
    assert got["v2"] == pytest.approx(60, abs=TOLERANCE)  # 30 / (30 + 20)
    assert got["v3"] == pytest.approx(40, abs=TOLERANCE)
    assert decisions == {Decision.WEIGHTED: DRAWS}


def test_unavailable_canary_sends_everything_to_the_rest():
    tab = table({"v1": 90, "v2": 10})
    got, _ = shares(tab, versions={"v1", "v2"}, available={"v1"})
    assert got == {"v1": 100.0}


def test_all_weighted_unavailable_falls_back_to_stable():
    tab = table({"v1": 0, "v2": 100}, stable="v1")
    rng = random.Random(7)
    for _ in range(100):
        route = tab.choose(rng, versions={"v1", "v2"}, available={"v1"})
        assert route == Route("v1", Decision.STABLE)
    assert Decision.STABLE.value == "stable"


def test_nothing_available_is_unavailable():
    tab = table({"v1": 90, "v2": 10})
    with pytest.raises(Unavailable, match="no version of this model has a running replica") as info:
        tab.choose(random.Random(0), versions={"v1", "v2"}, available=set())
    assert http_status(info.value) == 503
    assert info.value.retry_after_s == 1.0


def test_only_a_zero_weight_non_stable_version_available_is_unavailable():
    tab = table({"v1": 100, "v2": 0}, stable="v1")
    with pytest.raises(Unavailable):
        tab.choose(random.Random(0), versions={"v1", "v2"}, available={"v2"})


def test_pin_to_known_version():
    tab = table({"v1": 100, "v2": 0})
    rng = random.Random(0)
    assert tab.choose(rng, versions={"v1", "v2"}, available={"v1", "v2"}, pin="v2") == Route(
        "v2", Decision.PINNED
    )
    assert tab.choose(rng, versions=["v1", "v2"], available=["v1", "v2"], pin="v1") == Route(
        "v1", Decision.PINNED
    )


def test_pin_does_not_consume_randomness():
    tab = table({"v1": 50, "v2": 50})
    rng = random.Random(42)
    tab.choose(rng, versions={"v1", "v2"}, available={"v1", "v2"}, pin="v1")
    assert rng.random() == random.Random(42).random()


def test_pin_to_unknown_version():
    tab = table({"v1": 100})
    with pytest.raises(
        ModelNotFound, match=re.escape("version 'v9' not found; versions: ['v1', 'v2']")
    ) as info:
        tab.choose(random.Random(0), versions={"v2", "v1"}, available={"v1", "v2"}, pin="v9")
    assert http_status(info.value) == 404


def test_pin_to_unavailable_version():
    tab = table({"v1": 100})
    with pytest.raises(Unavailable, match=re.escape("version 'v2' has no running replica")) as info:
        tab.choose(random.Random(0), versions={"v1", "v2"}, available={"v1"}, pin="v2")
    assert http_status(info.value) == 503


class FixedRandom(random.Random):
    """A random source whose random() returns a chosen value."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


@pytest.mark.parametrize(
    ("draw", "version"),
    [(0.0, "v1"), (0.4999, "v1"), (0.5, "v2"), (0.7999, "v2"), (0.8, "v3"), (0.999999, "v3")],
)
def test_draw_maps_onto_cumulative_weights(draw, version):
    tab = table({"v1": 50, "v2": 30, "v3": 20})
    versions = {"v1", "v2", "v3"}
    assert tab.choose(FixedRandom(draw), versions=versions, available=versions) == Route(
        version, Decision.WEIGHTED
    )


@pytest.mark.parametrize(
    ("draw", "version"), [(0.0, "v2"), (0.5999, "v2"), (0.6, "v3"), (0.9999, "v3")]
)
def test_draw_maps_onto_renormalized_weights(draw, version):
    tab = table({"v1": 50, "v2": 30, "v3": 20})
    route = tab.choose(FixedRandom(draw), versions={"v1", "v2", "v3"}, available={"v2", "v3"})
    assert route == Route(version, Decision.WEIGHTED)


def test_same_seed_same_routes():
    tab = table({"v1": 50, "v2": 30, "v3": 20})
    versions = {"v1", "v2", "v3"}

    def routes(seed):
        rng = random.Random(seed)
        return [tab.choose(rng, versions=versions, available=versions).version for _ in range(200)]

    assert routes(5) == routes(5)
    assert routes(5) != routes(6)


def test_from_config():
    config = TrafficConfig(stable="v1", weights={"v1": 80, "v2": 20})
    tab = TrafficTable.from_config(config, ["v1", "v2", "v3"], generation=4)
    assert tab.generation == 4
    assert tab.stable == "v1"
    assert dict(tab.weights) == {"v1": 80.0, "v2": 20.0}


def test_from_config_rejects_unknown_versions():
    config = TrafficConfig(stable="v1", weights={"v1": 80, "v3": 20})
    with pytest.raises(ValueError, match=re.escape("names versions that are not deployed: ['v3']")):
        TrafficTable.from_config(config, {"v1", "v2"}, generation=1)


def test_table_is_immutable():
    tab = table({"v1": 100})
    with pytest.raises(AttributeError):
        tab.stable = "v2"  # type: ignore[misc]


# -- versions whose replicas are restarting (issue 17: replica loss costs nothing) -------------


def test_with_no_running_replica_a_request_waits_on_a_version_serve_is_bringing_back():
    tab = table({"v1": 100})
    rng = random.Random(0)
    with pytest.raises(Unavailable):  # nothing running, nothing coming back: 503
        tab.choose(rng, versions={"v1"}, available=set())
    route = tab.choose(rng, versions={"v1"}, available=set(), waitable={"v1"})
    assert route == Route("v1", Decision.WEIGHTED)
    sticky = tab.choose(rng, versions={"v1"}, available=set(), waitable={"v1"}, key="alice")
    assert sticky.version == "v1"


def test_a_pin_to_a_restarting_version_waits_for_it():
    tab = table({"v1": 90, "v2": 10})
    rng = random.Random(0)
    route = tab.choose(
        rng, versions={"v1", "v2"}, available={"v1"}, pin="v2", waitable={"v1", "v2"}
    )
    assert route == Route("v2", Decision.PINNED)
    with pytest.raises(Unavailable, match="'v2' has no running replica"):
        tab.choose(rng, versions={"v1", "v2"}, available={"v1"}, pin="v2", waitable={"v1"})


def test_a_running_version_is_still_preferred_over_a_restarting_one():
    tab = table({"v1": 50, "v2": 50})
    rng = random.Random(0)
    chosen = {
        tab.choose(rng, versions={"v1", "v2"}, available={"v1"}, waitable={"v1", "v2"}).version
        for _ in range(50)
    }
    assert chosen == {"v1"}
