"""Per-version request stats: router-side recording, histogram quantiles, the controller window."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from app.observability.stats import (
    LATENCY_BOUNDS_MS,
    LEGACY_BOUNDS_MS,
    RouterStats,
    StatsWindow,
    bucket_index,
    quantile,
    rebin_legacy,
)
from app.rollout import VersionStats

N = len(LATENCY_BOUNDS_MS) + 1


def hist(**by_bound: int) -> list[int]:
    """Buckets with counts at named bounds: hist(b10=3) puts 3 in the (8.2, 10] bucket."""
    out = [0] * N
    for key, count in by_bound.items():
        out[bucket_index(float(key[1:].replace("_", ".")))] = count
    return out


def report(version: str = "v1", requests: int = 1, errors: int = 0, buckets=None) -> dict:
    if buckets is None:
        buckets = [0] * N
        buckets[0] = requests
    return {version: {"requests": requests, "errors": errors, "buckets": buckets}}


# -- RouterStats ----------------------------------------------------------------------------


def test_record_drain_round_trip_and_reset():
    s = RouterStats()
    s.record("v1", True, 4.0)
    s.record("v1", False, 4.0)
    s.record("v1", True, 120.0)
    s.record("v2", False, 0.5)
    out = s.drain()
    assert json.loads(json.dumps(out)) == out  # JSON-safe as is
    assert set(out) == {"v1", "v2"}
    assert out["v1"]["requests"] == 3 and out["v1"]["errors"] == 1
    assert out["v2"]["requests"] == 1 and out["v2"]["errors"] == 1
    assert out["v1"]["buckets"][bucket_index(4.0)] == 2
    assert out["v1"]["buckets"][bucket_index(120.0)] == 1
    assert sum(out["v1"]["buckets"]) == 3 and len(out["v1"]["buckets"]) == N
    # drained: the next drain holds only what came after
    assert s.drain() == {}
    s.record("v2", True, 1.0)
    again = s.drain()
    assert list(again) == ["v2"]
    assert again["v2"]["requests"] == 1 and again["v2"]["errors"] == 0


def test_drain_lists_only_versions_with_traffic():
    s = RouterStats()
    s.record("v1", True, 1.0)
    s.drain()
    s.record("v2", True, 1.0)
    assert list(s.drain()) == ["v2"]  # v1 had no requests since the last drain


def test_drained_report_is_not_aliased_to_later_records():
    s = RouterStats()
    s.record("v1", True, 1.0)
    first = s.drain()
    s.record("v1", True, 1.0)
    assert first["v1"]["requests"] == 1 and sum(first["v1"]["buckets"]) == 1


def test_totals_are_cumulative_across_drains():
    s = RouterStats()
    assert s.totals() == {}
    s.record("v1", True, 1.0)
    s.record("v1", False, 1.0)
    s.drain()
    s.record("v1", False, 1.0)
    s.record("v2", True, 1.0)
    assert s.totals() == {"v1": {"requests": 3, "errors": 2}, "v2": {"requests": 1, "errors": 0}}
    s.drain()
    assert s.totals()["v1"] == {"requests": 3, "errors": 2}


def test_buckets_by_latency_boundaries():
    # a latency equal to a bound goes in that bound's bucket (edges are inclusive above)
    for i, bound in enumerate(LATENCY_BOUNDS_MS):
        assert bucket_index(bound) == i
        assert bucket_index(bound + 1e-9) == i + 1
        assert bucket_index(np.nextafter(bound, 0)) == i
    assert bucket_index(0.0) == 0
    assert bucket_index(-3.0) == 0  # a clock step backwards counts as 0 ms
    assert bucket_index(8.3) == LATENCY_BOUNDS_MS.index(10)
    assert bucket_index(8.2) == LATENCY_BOUNDS_MS.index(8.2)
    assert bucket_index(68000) == N - 2
    assert bucket_index(68000.001) == N - 1  # overflow
    assert bucket_index(float("inf")) == N - 1
    with pytest.raises(ValueError, match="NaN"):
        bucket_index(float("nan"))

    s = RouterStats()
    for latency in (1, 1.1, 1.2, 10, 10.01, 68000, 1e9):
        s.record("v1", True, latency)
    buckets = s.drain()["v1"]["buckets"]
    expected = [0] * N
    expected[0] = 1  # 1
    expected[1] = 2  # 1.1, 1.2
    expected[LATENCY_BOUNDS_MS.index(10)] = 1
    expected[LATENCY_BOUNDS_MS.index(12)] = 1  # 10.01
    expected[N - 2] = 1  # 68000
    expected[N - 1] = 1  # 1e9
    assert buckets == expected


# -- quantile -------------------------------------------------------------------------------


def test_quantile_empty_is_none():
    assert quantile([0] * N, 0.5) is None
    assert quantile([0] * N, 0.99) is None


def test_quantile_interpolates_inside_the_bucket():
    # 4 observations in [0, 1]: the median is halfway through the bucket
    assert quantile(hist(b1=4), 0.5) == pytest.approx(0.5)
    assert quantile(hist(b1=4), 1.0) == pytest.approx(1.0)
    assert quantile(hist(b1=4), 0.0) == pytest.approx(0.0)
    # 10 in (12, 15]: rank 5 of 10 -> 13.5; rank 9.9 of 10 -> 14.97
    assert quantile(hist(b15=10), 0.5) == pytest.approx(13.5)
    assert quantile(hist(b15=10), 0.99) == pytest.approx(14.97)
    # 50 in [0,1] and 50 in (120,150]: p50 is the top of the first, p99 near the top of the last
    two = hist(b1=50, b150=50)
    assert quantile(two, 0.5) == pytest.approx(1.0)
    assert quantile(two, 0.51) == pytest.approx(120.6)
    assert quantile(two, 0.99) == pytest.approx(149.4)
    # empty buckets between are skipped, not interpolated across
    assert quantile(hist(b1=1, b1000=1), 0.75) == pytest.approx(910.0)


def test_quantile_overflow_reports_last_bound():
    mostly_slow = hist(b1=1)
    mostly_slow[-1] = 99
    assert quantile(mostly_slow, 0.99) == LATENCY_BOUNDS_MS[-1]
    assert quantile(mostly_slow, 0.005) == pytest.approx(0.5)
    only_overflow = [0] * N
    only_overflow[-1] = 5
    assert quantile(only_overflow, 0.5) == LATENCY_BOUNDS_MS[-1]
    assert quantile(only_overflow, 0.0) == LATENCY_BOUNDS_MS[-1]


def test_quantile_rejects_bad_input():
    with pytest.raises(ValueError, match="buckets"):
        quantile([1, 2, 3], 0.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        quantile(hist(b1=1), 1.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        quantile(hist(b1=1), -0.1)


def test_quantile_custom_bounds():
    assert quantile([2, 2, 0], 0.75, bounds=(10, 20)) == pytest.approx(15.0)


def _bucket_width(value: float) -> float:
    i = bucket_index(value)
    if i == len(LATENCY_BOUNDS_MS):
        return float("inf")
    return LATENCY_BOUNDS_MS[i] - (LATENCY_BOUNDS_MS[i - 1] if i else 0.0)


@pytest.mark.parametrize("median_ms,sigma", [(20.0, 0.8), (3.0, 0.5), (400.0, 1.2)])
def test_quantile_matches_numpy_within_one_bucket(median_ms, sigma):
    rng = np.random.default_rng(7)
    samples = rng.lognormal(mean=np.log(median_ms), sigma=sigma, size=10_000)
    s = RouterStats()
    for latency in samples:
        s.record("v1", True, float(latency))
    buckets = s.drain()["v1"]["buckets"]
    for q in (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999):
        exact = float(np.percentile(samples, q * 100))
        estimate = quantile(buckets, q)
        assert estimate is not None
        if exact > LATENCY_BOUNDS_MS[-1]:
            assert estimate == LATENCY_BOUNDS_MS[-1]
            continue
        assert abs(estimate - exact) <= _bucket_width(exact), (q, exact, estimate)
        # the estimate lies in the bucket that holds the true quantile (or on its edge)
        lo = LATENCY_BOUNDS_MS[bucket_index(exact) - 1] if bucket_index(exact) else 0.0
        assert lo - 1e-9 <= estimate <= LATENCY_BOUNDS_MS[bucket_index(exact)] + 1e-9


# -- StatsWindow ----------------------------------------------------------------------------


def test_merging_three_routers_equals_one_router_of_all():
    rnd = random.Random(3)
    events = [
        (rnd.choice(["v1", "v2"]), rnd.random() > 0.1, rnd.lognormvariate(3, 1))
        for _ in range(3000)
    ]
    single = RouterStats()
    routers = [RouterStats() for _ in range(3)]
    window = StatsWindow()
    t = 1000.0
    for i, (version, ok, latency) in enumerate(events):
        single.record(version, ok, latency)
        routers[i % 3].record(version, ok, latency)
        if i % 250 == 249:  # each router pushes now and then
            for r in routers:
                t += 0.1
                window.add(r.drain(), at=t)
    for r in routers:
        t += 0.1
        window.add(r.drain(), at=t)

    merged = window.observe(since=0.0, now=t)
    whole = StatsWindow()
    whole.add(single.drain(), at=t)
    assert merged == whole.observe(since=0.0, now=t)
    assert set(merged) == {"v1", "v2"}
    assert sum(v.requests for v in merged.values()) == 3000
    for version in ("v1", "v2"):
        got = merged[version]
        assert got.requests == sum(1 for e in events if e[0] == version)
        assert got.errors == sum(1 for e in events if e[0] == version and not e[1])
        assert isinstance(got, VersionStats) and 0 < got.p50_ms < got.p99_ms


def test_observe_respects_since_and_now_inclusive():
    w = StatsWindow()
    w.add(report(requests=1), at=10.0)
    w.add(report(requests=2), at=20.0)
    w.add(report(requests=4), at=30.0)
    assert w.observe(10.0, 30.0)["v1"].requests == 7  # both ends inclusive
    assert w.observe(10.0001, 30.0)["v1"].requests == 6
    assert w.observe(10.0, 29.9999)["v1"].requests == 3
    assert w.observe(20.0, 20.0)["v1"].requests == 2
    assert w.observe(31.0, 40.0) == {}
    assert w.observe(0.0, 9.0) == {}
    assert w.observe(30.0, 10.0) == {}


def test_observe_percentiles_and_zero_request_versions():
    w = StatsWindow()
    w.add(report("v1", 10, 3, hist(b15=10)), at=1.0)
    w.add({"v2": {"requests": 0, "errors": 0, "buckets": [0] * N}}, at=1.0)
    got = w.observe(0.0, 2.0)
    v1 = got["v1"]
    assert (v1.requests, v1.errors) == (10, 3)
    assert v1.p50_ms == pytest.approx(13.5) and v1.p99_ms == pytest.approx(14.97)
    assert got["v2"] == VersionStats(0, 0, None, None)


def test_out_of_order_reports_are_slotted_in():
    w = StatsWindow()
    w.add(report(requests=1), at=10.0)
    w.add(report(requests=2), at=30.0)
    w.add(report(requests=4), at=20.0)  # late
    assert w.observe(15.0, 25.0)["v1"].requests == 4
    assert w.observe(0.0, 100.0)["v1"].requests == 7


def test_prune_after_horizon():
    w = StatsWindow(horizon_s=60.0)
    w.add(report(requests=1), at=100.0)
    w.add(report(requests=2), at=130.0)
    assert len(w) == 2
    w.prune(160.0)  # exactly one horizon after the first: still kept
    assert len(w) == 2
    w.prune(160.5)
    assert len(w) == 1
    assert w.observe(0.0, 1000.0)["v1"].requests == 2
    w.add(report(requests=4), at=191.0)  # add prunes: 130 is now over a horizon old
    assert len(w) == 1
    assert w.observe(0.0, 1000.0)["v1"].requests == 4
    # a report that arrives already older than the horizon is not kept
    w.add(report(requests=8), at=10.0)
    assert w.observe(0.0, 1000.0)["v1"].requests == 4


def test_memory_is_capped_by_max_reports():
    w = StatsWindow(horizon_s=1e9, max_reports=5)
    for i in range(20):
        w.add(report(requests=1), at=float(i))
    assert len(w) == 5
    assert w.observe(0.0, 100.0)["v1"].requests == 5
    assert w.observe(15.0, 19.0)["v1"].requests == 5  # the newest stay


def test_empty_report_is_not_stored():
    w = StatsWindow()
    w.add({}, at=1.0)
    assert len(w) == 0


def test_rates():
    w = StatsWindow()
    w.add({**report("v1", 10), **report("v2", 5)}, at=101.0)
    w.add(report("v1", 20), at=105.0)
    w.add(report("v1", 30), at=110.0)
    rates = w.rates(window_s=10.0, now=110.0)  # (100, 110]
    assert rates == {"v1": pytest.approx(6.0), "v2": pytest.approx(0.5)}
    assert w.rates(window_s=5.0, now=110.0) == {"v1": pytest.approx(6.0)}  # (105, 110]
    assert w.rates(window_s=5.0, now=105.0) == {"v1": pytest.approx(6.0), "v2": pytest.approx(1.0)}
    assert w.rates(window_s=1.0, now=200.0) == {}
    with pytest.raises(ValueError, match="window_s"):
        w.rates(window_s=0.0, now=110.0)


@pytest.mark.parametrize(
    "bad,message",
    [
        (["v1"], "must be a mapping"),
        ({"v1": 5}, "must be a mapping"),
        ({1: {"requests": 1, "errors": 0, "buckets": [1] + [0] * (N - 1)}}, "non-empty strings"),
        ({"v1": {"errors": 0, "buckets": [0] * N}}, "missing 'requests'"),
        ({"v1": {"requests": 0, "buckets": [0] * N}}, "missing 'errors'"),
        ({"v1": {"requests": -1, "errors": 0, "buckets": [0] * N}}, "non-negative int"),
        ({"v1": {"requests": 1, "errors": -1, "buckets": [1] + [0] * (N - 1)}}, "non-negative"),
        ({"v1": {"requests": 1.0, "errors": 0, "buckets": [1] + [0] * (N - 1)}}, "int"),
        ({"v1": {"requests": True, "errors": 0, "buckets": [1] + [0] * (N - 1)}}, "int"),
        ({"v1": {"requests": 1, "errors": 2, "buckets": [1] + [0] * (N - 1)}}, "exceed"),
        ({"v1": {"requests": 1, "errors": 0, "buckets": [1] + [0] * (N - 2)}}, "expected 60"),
        ({"v1": {"requests": 1, "errors": 0, "buckets": [1] + [0] * N}}, "expected 60"),
        ({"v1": {"requests": 1, "errors": 0, "buckets": "x" * N}}, "list of ints"),
        ({"v1": {"requests": 1, "errors": 0}}, "list of ints"),
        ({"v1": {"requests": 0, "errors": 0, "buckets": [1, -1] + [0] * (N - 2)}}, "bucket"),
        ({"v1": {"requests": 1, "errors": 0, "buckets": [0.5, 0.5] + [0] * (N - 2)}}, "bucket"),
        ({"v1": {"requests": 3, "errors": 0, "buckets": [1] + [0] * (N - 1)}}, "add up"),
    ],
)
def test_invalid_reports_raise_and_store_nothing(bad, message):
    w = StatsWindow()
    good = report("v0", 1)
    mixed = {**good, **bad} if isinstance(bad, dict) else bad
    with pytest.raises(ValueError, match=message):
        w.add(mixed, at=1.0)
    assert len(w) == 0 and w.observe(0.0, 2.0) == {}  # the valid part was not kept either


def test_invalid_times_and_settings_raise():
    w = StatsWindow()
    with pytest.raises(ValueError, match="finite"):
        w.add(report(), at=float("nan"))
    with pytest.raises(ValueError, match="horizon_s"):
        StatsWindow(horizon_s=0)
    with pytest.raises(ValueError, match="max_reports"):
        StatsWindow(max_reports=0)


def test_stored_report_is_a_copy():
    w = StatsWindow()
    r = report("v1", 1)
    w.add(r, at=1.0)
    r["v1"]["buckets"][0] = 0
    r["v1"]["buckets"][-1] = 1
    r["v1"]["requests"] = 1000
    assert w.observe(0.0, 2.0)["v1"].requests == 1
    assert w.observe(0.0, 2.0)["v1"].p50_ms == pytest.approx(0.5)


def test_observe_merges_a_large_window_and_then_only_new_reports():
    w = StatsWindow()
    rnd = random.Random(0)
    for i in range(10_000):
        buckets = [rnd.randint(0, 5) for _ in range(N)]
        w.add(
            {
                "v1": {"requests": sum(buckets), "errors": 0, "buckets": buckets},
                "v2": {"requests": sum(buckets), "errors": 1, "buckets": list(buckets)},
            },
            at=float(i) * 0.025,
        )
    got = w.observe(0.0, 1e6)  # a fresh merge of every report
    assert got["v2"].errors == 10_000

    # the next tick adds only the reports that arrived since
    for i in range(40):
        w.add(report("v1", 1), at=500.0 + i * 0.001)
    got = w.observe(0.0, 1e6)
    assert got["v2"].errors == 10_000 and got["v1"].requests > 10_040


def _naive_observe(kept: list[tuple[float, dict]], since: float, now: float) -> dict:
    """The reference: merge every kept report in [since, now] from scratch, the slow way."""
    sums: dict[str, list] = {}
    for at, rep in kept:
        if since <= at <= now:
            for version, data in rep.items():
                s = sums.setdefault(version, [0, 0, [0] * N])
                s[0] += data["requests"]
                s[1] += data["errors"]
                s[2] = [a + b for a, b in zip(s[2], data["buckets"])]
    return {
        v: VersionStats(r, e, quantile(b, 0.5), quantile(b, 0.99)) if r else VersionStats(0, 0)
        for v, (r, e, b) in sums.items()
    }


def test_incremental_observe_equals_a_fresh_merge_under_random_use():
    """observe keeps its last merge and extends it; whatever the call pattern, the answer must
    be the one a merge from scratch gives (ticks, new steps, late reports, prunes, caps)."""
    rnd = random.Random(11)
    horizon = 50.0
    w = StatsWindow(horizon_s=horizon, max_reports=40)
    kept: list[tuple[float, dict]] = []  # the reference's copy of what the window holds
    clock = 0.0
    since = 0.0
    checks = 0
    for _ in range(3000):
        op = rnd.random()
        if op < 0.45:  # a router pushes: usually now, sometimes late
            clock += rnd.uniform(0.0, 1.0)
            at = clock if rnd.random() < 0.9 else clock - rnd.uniform(0.0, 10.0)
            rep = {}
            for version in rnd.sample(["v1", "v2", "v3"], rnd.randint(0, 2)):
                buckets = [0] * N
                for _ in range(rnd.randint(0, 6)):
                    buckets[rnd.randrange(N)] += 1
                rep[version] = {
                    "requests": sum(buckets),
                    "errors": rnd.randint(0, sum(buckets)),
                    "buckets": buckets,
                }
            w.add(rep, at=at)
            if rep:
                kept.append((at, rep))
                kept.sort(key=lambda item: item[0])  # stable: ties keep arrival order
            newest = kept[-1][0] if kept else at
            kept = [item for item in kept if item[0] >= max(at, newest) - horizon][-40:]
        elif op < 0.5:  # a new step: the window restarts
            since = clock - rnd.uniform(0.0, 5.0)
        elif op < 0.55:
            w.prune(clock)
            kept = [item for item in kept if item[0] >= clock - horizon]
        else:  # a tick, or now and then a look at some other range
            now = clock if rnd.random() < 0.9 else clock - rnd.uniform(0.0, 20.0)
            assert w.observe(since, now) == _naive_observe(kept, since, now)
            checks += 1
        assert len(w) == len(kept)
    assert checks > 1000


# -- resolution and the legacy layout ----------------------------------------------------------


def test_bounds_resolve_every_latency_from_1ms_to_60s_within_25_percent():
    """Each bucket's upper edge is at most 1.25x its lower edge, from 1 ms past 60 s, so a
    quantile interpolated inside its bucket is within 25% of the truth (the old layout jumped
    1000 -> 2000 -> 5000 ms: 2.5x)."""
    bounds = LATENCY_BOUNDS_MS
    assert bounds[0] <= 1.0 and bounds[-1] >= 60_000
    assert all(b > a for a, b in zip(bounds, bounds[1:]))
    assert max(b / a for a, b in zip(bounds, bounds[1:])) <= 1.25
    for exact in (1.3, 37.0, 999.0, 1_500.0, 2_900.0, 41_000.0):
        buckets = [0] * N
        buckets[bucket_index(exact)] = 100
        assert abs(quantile(buckets, 0.99) - exact) <= 0.25 * exact


def test_a_p99_of_1500ms_is_told_from_1000ms_and_2000ms():
    """The saw: with 1000/2000/5000 bounds a p99 anywhere in (1000, 2000] read the same
    bucket; now 1.5x a 1 s stable p99 is told apart from 1.2x and 1.9x."""
    stats = RouterStats()
    for latency in [50.0] * 95 + [1_450.0] * 5:
        stats.record("v1", True, latency)
    w = StatsWindow()
    w.add(stats.drain(), at=1.0)
    p99 = w.observe(0.0, 2.0)["v1"].p99_ms
    assert p99 is not None and 1_200 < p99 <= 1_500


def test_a_report_in_the_legacy_layout_is_rebinned_not_refused():
    legacy = [0] * (len(LEGACY_BOUNDS_MS) + 1)
    legacy[LEGACY_BOUNDS_MS.index(10)] = 3  # (7.5, 10] -> the new bucket holding 10
    legacy[LEGACY_BOUNDS_MS.index(2000)] = 2  # (1000, 2000] -> the one holding 2000
    legacy[-1] = 1  # overflow stays overflow
    assert sum(rebin_legacy(legacy)) == 6
    w = StatsWindow()
    w.add({"v1": {"requests": 6, "errors": 0, "buckets": legacy}}, at=1.0)
    got = w.observe(0.0, 2.0)["v1"]
    assert got.requests == 6
    expected = [0] * N
    expected[bucket_index(10)], expected[bucket_index(2000)], expected[-1] = 3, 2, 1
    assert rebin_legacy(legacy) == expected
