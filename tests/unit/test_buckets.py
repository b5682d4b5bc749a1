"""Sticky buckets: a stable hash, exact bucket counts, a layout that only moves users forward."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from app.serving.buckets import BUCKETS, BucketMap, bucket_counts, bucket_of

KEYS = 100_000
TOLERANCE = 0.5  # percentage points
ROOT = Path(__file__).resolve().parents[2]

# Computed once with blake2b(digest_size=8), big-endian, % 10_000. If these change, every
# user's bucket changed: a deploy would reshuffle who sees the canary.
EXPECTED_BUCKETS = {"user-1": 3768, "alice": 4729, "": 9876, "user-42": 598, "é": 3743}


@pytest.fixture(scope="module")
def key_buckets() -> list[int]:
    return [bucket_of(f"user-{i}") for i in range(KEYS)]


def assign(key_buckets: list[int], bucket_map: BucketMap) -> list[str]:
    return [bucket_map.version_for(b) for b in key_buckets]


def shares(assigned: list[str]) -> dict[str, float]:
    return {v: 100.0 * n / len(assigned) for v, n in Counter(assigned).items()}


# --- bucket_of ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "bucket"), sorted(EXPECTED_BUCKETS.items()))
def test_bucket_of_known_values(key, bucket):
    assert bucket_of(key) == bucket


def test_bucket_of_in_range(key_buckets):
    assert min(key_buckets) >= 0
    assert max(key_buckets) <= BUCKETS - 1
    assert BUCKETS == 10_000


def test_bucket_of_same_in_another_process_with_another_hash_seed():
    keys = list(EXPECTED_BUCKETS) + [f"user-{i}" for i in range(50)]
    code = (
        "import json, sys\n"
        "from app.serving.buckets import bucket_of\n"
        "print(json.dumps([bucket_of(k) for k in json.loads(sys.stdin.read())]))\n"
    )
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        out = subprocess.run(
            [sys.executable, "-c", code],
            input=json.dumps(keys),
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            check=True,
            timeout=60,
        )
        assert json.loads(out.stdout) == [bucket_of(k) for k in keys]


def test_bucket_of_uniform_by_decile(key_buckets):
    deciles = Counter(b * 10 // BUCKETS for b in key_buckets)
    assert set(deciles) == set(range(10))
    for decile, n in sorted(deciles.items()):
        assert 100.0 * n / KEYS == pytest.approx(10.0, abs=TOLERANCE), decile


# --- bucket_counts -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weights",
    [
        {"a": 33.33, "b": 33.33, "c": 33.34},
        {"a": 0.01, "b": 99.99},
        {"a": 100 / 3, "b": 100 / 3, "c": 100 / 3},
        {"v1": 100 / 3, "v2": 200 / 3},
        {"a": 12.345, "b": 45.678, "c": 41.977},
        {"a": 0.004, "b": 0.004, "c": 99.992},
        {"only": 100},
    ],
)
def test_bucket_counts_sum_exactly(weights):
    counts = bucket_counts(weights)
    assert sum(counts.values()) == BUCKETS
    assert list(counts) == list(weights)
    for version, weight in weights.items():
        # Largest remainder never strays a whole bucket from the exact quota.
        assert abs(counts[version] - weight * BUCKETS / 100) < 1 + 1e-9
    # Deterministic, whatever the input order.
    assert bucket_counts(weights) == counts
    assert bucket_counts(dict(reversed(list(weights.items())))) == counts


def test_bucket_counts_specific_values():
    assert bucket_counts({"a": 33.33, "b": 33.33, "c": 33.34}) == {"a": 3333, "b": 3333, "c": 3334}
    assert bucket_counts({"a": 0.01, "b": 99.99}) == {"a": 1, "b": 9999}
    # A true three-way tie: the spare bucket goes to the name that sorts first.
    thirds = {"c": 100 / 3, "b": 100 / 3, "a": 100 / 3}
    assert bucket_counts(thirds) == {"c": 3333, "b": 3333, "a": 3334}
    assert bucket_counts({"v1": 95, "v2": 5}) == {"v1": 9500, "v2": 500}


def test_bucket_counts_zero_weight_gets_zero():
    assert bucket_counts({"v1": 100, "v2": 0}) == {"v1": 10_000, "v2": 0}
    assert bucket_counts({"v1": 0, "v2": 0, "v3": 100}) == {"v1": 0, "v2": 0, "v3": 10_000}
    assert bucket_counts({"v1": 50, "v2": 0, "v3": 50}) == {"v1": 5000, "v2": 0, "v3": 5000}


@pytest.mark.parametrize(
    "weights", [{}, {"a": 0}, {"a": 0, "b": 0}, {"a": -1, "b": 101}, {"a": float("nan")}]
)
def test_bucket_counts_rejects_bad_weights(weights):
    with pytest.raises(ValueError):
        bucket_counts(weights)


def test_candidate_count_never_falls_as_its_weight_rises():
    # Every 0.01 step from 0 to 100: with two versions the candidate's count is monotone,
    # which is the whole of the one-candidate stickiness guarantee.
    previous = -1
    for hundredths in range(10_001):
        w = hundredths / 100
        n = bucket_counts({"v1": 100 - w, "v2": w})["v2"]
        assert n >= previous, w
        assert n == hundredths  # 0.01 pp is exactly one bucket
        previous = n


def test_stable_count_never_grows_when_candidates_only_grow():
    # Random growth paths with awkward weights: the stable count must never rise, even where
    # largest-remainder rounding takes a bucket from one candidate to give it to another.
    rng = random.Random(7)
    for _ in range(200):
        cands = {"v2": 0.0, "v3": 0.0, "v4": 0.0}
        previous = BUCKETS
        for _ in range(12):
            for name in cands:
                if rng.random() < 0.6:
                    cands[name] += rng.uniform(0, 3) * rng.choice([1, 1 / 3, 1 / 7])
            weights = {"v1": 100 - sum(cands.values()), **cands}
            counts = bucket_counts(weights)
            assert counts["v1"] <= previous, weights
            previous = counts["v1"]


# --- BucketMap layout --------------------------------------------------------------------------


def test_layout_stable_at_bottom_candidates_from_top_in_name_order():
    bucket_map = BucketMap.build({"v3": 20, "v1": 50, "v2": 30}, stable="v1")
    assert bucket_map.ranges == ((0, 5000, "v1"), (5000, 7000, "v3"), (7000, 10_000, "v2"))
    # Name order, not size order: the smaller v2 still takes the top.
    bucket_map = BucketMap.build({"v1": 50, "v2": 10, "v3": 40}, stable="v1")
    assert bucket_map.ranges == ((0, 5000, "v1"), (5000, 9000, "v3"), (9000, 10_000, "v2"))
    # The stable version sits at the bottom whatever its name sorts as.
    bucket_map = BucketMap.build({"a": 20, "m": 70, "z": 10}, stable="m")
    assert bucket_map.ranges == ((0, 7000, "m"), (7000, 8000, "z"), (8000, 10_000, "a"))


def test_build_omits_zero_weight_versions():
    bucket_map = BucketMap.build({"v1": 90, "v2": 0, "v3": 10}, stable="v1")
    assert bucket_map.ranges == ((0, 9000, "v1"), (9000, 10_000, "v3"))
    assert all(bucket_map.version_for(b) != "v2" for b in range(BUCKETS))
    full = BucketMap.build({"v1": 0, "v2": 100}, stable="v1")
    assert full.ranges == ((0, 10_000, "v2"),)
    none = BucketMap.build({"v1": 100, "v2": 0}, stable="v1")
    assert none.ranges == ((0, 10_000, "v1"),)


def test_version_for_at_edges():
    bucket_map = BucketMap.build({"v1": 75, "v2": 15, "v3": 10}, stable="v1")
    assert bucket_map.ranges == ((0, 7500, "v1"), (7500, 8500, "v3"), (8500, 10_000, "v2"))
    assert bucket_map.version_for(0) == "v1"
    assert bucket_map.version_for(7499) == "v1"
    assert bucket_map.version_for(7500) == "v3"
    assert bucket_map.version_for(8499) == "v3"
    assert bucket_map.version_for(8500) == "v2"
    assert bucket_map.version_for(9999) == "v2"
    for start, end, version in bucket_map.ranges:
        assert bucket_map.version_for(start) == version
        assert bucket_map.version_for(end - 1) == version
    for bad in (-1, BUCKETS):
        with pytest.raises(ValueError):
            bucket_map.version_for(bad)


def test_version_for_agrees_with_ranges_everywhere():
    bucket_map = BucketMap.build({"v1": 33.33, "v2": 33.33, "v3": 33.34}, stable="v2")
    owners = [bucket_map.version_for(b) for b in range(BUCKETS)]
    expected = [v for start, end, v in bucket_map.ranges for _ in range(start, end)]
    assert owners == expected
    assert Counter(owners) == bucket_counts({"v1": 33.33, "v2": 33.33, "v3": 33.34})


def test_build_requires_stable_in_weights():
    with pytest.raises(ValueError, match="stable"):
        BucketMap.build({"v1": 50, "v2": 50}, stable="v9")


@pytest.mark.parametrize(
    "ranges",
    [
        (),
        ((0, 5000, "v1"),),
        ((0, 5000, "v1"), (5001, 10_000, "v2")),
        ((0, 5000, "v1"), (4000, 10_000, "v2")),
        ((1, 10_000, "v1"),),
        ((0, 0, "v1"), (0, 10_000, "v2")),
    ],
)
def test_hand_built_map_must_partition_buckets(ranges):
    with pytest.raises(ValueError):
        BucketMap(ranges=ranges)


def test_bucket_map_is_immutable_and_comparable():
    a = BucketMap.build({"v1": 90, "v2": 10}, stable="v1")
    b = BucketMap.build({"v2": 10, "v1": 90}, stable="v1")
    assert a == b
    with pytest.raises(AttributeError):
        a.ranges = ()  # type: ignore[misc]


# --- The acceptance test: a canary rollout over 100k keys ---------------------------------------


def test_canary_rollout_only_moves_users_forward(key_buckets):
    steps = [5, 10, 25, 50, 100]
    previous: list[str] | None = None
    for weight in steps:
        bucket_map = BucketMap.build({"v1": 100 - weight, "v2": weight}, stable="v1")
        assigned = assign(key_buckets, bucket_map)
        got = shares(assigned)
        assert got.get("v2", 0.0) == pytest.approx(weight, abs=TOLERANCE), weight
        assert got.get("v1", 0.0) == pytest.approx(100 - weight, abs=TOLERANCE), weight
        if previous is not None:
            back = sum(1 for old, new in zip(previous, assigned) if old == "v2" and new != "v2")
            assert back == 0, f"{back} keys moved from v2 back to v1 at {weight}%"
            # And the move really happened: some keys did go v1 -> v2.
            assert any(old == "v1" and new == "v2" for old, new in zip(previous, assigned))
        previous = assigned
    assert previous is not None and set(previous) == {"v2"}


def test_rollback_only_moves_users_back_to_stable(key_buckets):
    before = assign(key_buckets, BucketMap.build({"v1": 50, "v2": 50}, stable="v1"))
    after = assign(key_buckets, BucketMap.build({"v1": 100, "v2": 0}, stable="v1"))
    assert set(after) == {"v1"}
    moved = Counter((old, new) for old, new in zip(before, after) if old != new)
    assert set(moved) == {("v2", "v1")}
    assert sum(moved.values()) == before.count("v2")
    # Every intermediate rollback step is one-directional too.
    previous = before
    for weight in (40, 25, 10, 5, 0):
        assigned = assign(key_buckets, BucketMap.build({"v1": 100 - weight, "v2": weight}, "v1"))
        assert not any(old == "v1" and new == "v2" for old, new in zip(previous, assigned))
        previous = assigned


def test_three_versions_shares_and_no_return_to_stable(key_buckets):
    steps = [
        {"v2": 5, "v3": 0},
        {"v2": 5, "v3": 5},
        {"v2": 10, "v3": 5},
        {"v2": 10, "v3": 20},
        {"v2": 33.33, "v3": 33.33},
        {"v2": 40, "v3": 60},
    ]
    previous: list[str] | None = None
    for cands in steps:
        weights = {"v1": 100 - sum(cands.values()), **cands}
        assigned = assign(key_buckets, BucketMap.build(weights, stable="v1"))
        got = shares(assigned)
        for version, weight in weights.items():
            assert got.get(version, 0.0) == pytest.approx(weight, abs=TOLERANCE), (weights, version)
        if previous is not None:
            back = sum(1 for old, new in zip(previous, assigned) if old != "v1" and new == "v1")
            assert back == 0, f"{back} keys went back to v1 at {weights}"
        previous = assigned
    assert previous is not None and "v1" not in previous
