"""Properties of sticky routing (`app/serving/buckets.py`, as `app/serving/traffic.py` uses it),
with hypothesis.

A routing key (user id) lands in one bucket, the same in every process; the buckets are split
in proportion to the weights; and while a rollout moves in one direction, users move only one
way: from stable to the candidates as they grow, back to stable as they shrink, and not at all
when the weights do not change. Every weight split here is one `TrafficConfig` accepts, written
the way the rollout controller writes it (stable = 100 - the candidates).
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from app.config import TrafficConfig
from app.serving.buckets import BUCKETS, BucketMap, bucket_counts, bucket_of
from app.serving.traffic import Decision, Route, TrafficTable

ROOT = Path(__file__).resolve().parents[2]

# Any code point, lone surrogates included: a JSON routing-key parameter "\ud800" decodes to one.
ANY_KEY = st.text(alphabet=st.characters(exclude_categories=()))
# Valid version names that sort in different orders relative to each other, since names break
# rounding ties and order the candidates' ranges.
VERSIONS = ("a", "b", "canary", "stable", "v1", "v10", "v2", "z")
# Percent weights: whole buckets (0.01 pp), half buckets (rounding ties), thirds and sevenths
# (repeating fractions), tiny shares, and any float.
WEIGHTS = st.one_of(
    st.integers(0, 10_000).map(lambda n: n / 100),
    st.integers(0, 20_000).map(lambda n: n / 200),
    st.sampled_from([100 / 3, 200 / 3, 100 / 7, 100 / 6, 0.005, 0.015, 99.995]),
    st.floats(0, 0.02),
    st.floats(0, 100),
)
GROWTH = st.one_of(
    st.just(0.0),
    st.integers(1, 1000).map(lambda n: n / 100),
    st.floats(0, 1e-6),
    st.floats(0, 30),
)
ALPHA = 1e-9  # the chance that a correct implementation fails the share test, per example


def split(stable: str, candidates: dict[str, float]) -> dict[str, float]:
    """Weights as the controller writes them: the stable version takes what is left, summed
    as BucketMap.build sums it (fsum: with a plain sum the stable weight can differ in its last
    bit, enough to flip a tie of two half-bucket remainders: 27.665/0.05/72.28 around 0.005)."""
    return {stable: 100.0 - math.fsum(candidates.values()), **candidates}


@st.composite
def rollouts(draw: st.DrawFn, max_candidates: int = 3) -> tuple[str, dict[str, float]]:
    """(stable, candidate weights) with the candidates summing to at most 100."""
    names = draw(st.lists(st.sampled_from(VERSIONS), min_size=1, max_size=max_candidates + 1, unique=True))  # fmt: skip
    candidates: dict[str, float] = {}
    for name in names[1:]:
        candidates[name] = min(draw(WEIGHTS), 100.0 - sum(candidates.values()))
    return names[0], candidates


def table(weights: dict[str, float], stable: str, generation: int = 1) -> TrafficTable:
    config = TrafficConfig(stable=stable, weights=weights)  # what the router would accept
    return TrafficTable.from_config(config, weights, generation=generation)


def owners(bucket_map: BucketMap) -> list[str]:
    """The owner of every bucket: comparing two of these compares every possible key."""
    return [bucket_map.version_for(b) for b in range(BUCKETS)]


def moves(before: BucketMap, after: BucketMap) -> Counter[tuple[str, str]]:
    return Counter((a, b) for a, b in zip(owners(before), owners(after)) if a != b)


def chernoff_range(n: int, p_low: float, p_high: float, alpha: float) -> tuple[int, int]:
    """[lo, hi] holding a Binomial(n, p) count for any p in [p_low, p_high] except with
    probability at most `alpha`, by the Chernoff bound P(X >= k) <= exp(-n KL(k/n || p)) for
    k >= np (and its mirror below np); a larger p only shifts the count up, so the upper end is
    taken at p_high and the lower at p_low."""

    def kl(q: float, p: float) -> float:
        def term(x: float, y: float) -> float:
            if x == 0:
                return 0.0
            return math.inf if y == 0 else x * math.log(x / y)

        return term(q, p) + term(1 - q, 1 - p)

    def rare(k: int, p: float) -> bool:  # P(X >= k), or P(X <= k) below np, <= alpha / 2
        return -n * kl(k / n, p) <= math.log(alpha / 2)

    hi = n
    first, last = math.ceil(n * p_high), n
    if rare(last, p_high):
        while first < last:  # the first rare count above n * p_high
            mid = (first + last) // 2
            first, last = (first, mid) if rare(mid, p_high) else (mid + 1, last)
        hi = first - 1
    lo = 0
    first, last = 0, math.floor(n * p_low)
    if rare(first, p_low):
        while first < last:  # the last rare count below n * p_low
            mid = (first + last + 1) // 2
            first, last = (mid, last) if rare(mid, p_low) else (first, mid - 1)
        lo = first + 1
    return lo, hi


# -- another process, with another hash() salt ----------------------------------------------

WORKER = """
import json, sys
from app.serving.buckets import bucket_of
print(hash("salt probe"), flush=True)
for line in sys.stdin:
    print(bucket_of(json.loads(line)), flush=True)
"""


@pytest.fixture(scope="module")
def bucket_in_other_process() -> Iterator[Callable[[str], int]]:
    """`bucket_of` computed by one long-lived subprocess whose str hashes are salted differently
    from this process's (checked), so a bucket that leaned on `hash()` would come out different."""
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert worker.stdin is not None and worker.stdout is not None
    try:
        assert int(worker.stdout.readline()) != hash("salt probe"), "the salts must differ"

        def ask(key: str) -> int:
            worker.stdin.write(json.dumps(key) + "\n")  # ASCII: lone surrogates as escapes
            worker.stdin.flush()
            return int(worker.stdout.readline())

        yield ask
    finally:
        worker.stdin.close()
        worker.stdout.close()
        worker.wait(timeout=30)


# -- one key, one bucket --------------------------------------------------------------------


@settings(derandomize=True, deadline=None, max_examples=200)
@given(key=ANY_KEY)
@example(key="")
@example(key="\ud800")  # a lone surrogate: what the JSON escape "\\ud800" decodes to
@example(key="\U0010ffff\x00")
@example(key="é" * 500_000)  # 1 MB of UTF-8
def test_any_key_string_has_one_bucket_in_every_process(key, bucket_in_other_process):
    bucket = bucket_of(key)
    assert isinstance(bucket, int) and 0 <= bucket < BUCKETS
    assert bucket_of(key) == bucket
    assert bucket_in_other_process(key) == bucket


@settings(derandomize=True, deadline=None, max_examples=150)
@given(key=ANY_KEY, rollout=rollouts())
def test_a_keyed_request_goes_to_its_buckets_owner_without_a_random_draw(key, rollout):
    stable, candidates = rollout
    weights = split(stable, candidates)
    tab = table(weights, stable)
    everyone = set(weights)
    owner = tab.buckets.version_for(bucket_of(key))
    assert weights[owner] > 0
    rng = random.Random(0)
    state = rng.getstate()
    assert tab.choose(rng, versions=everyone, available=everyone, key=key) == Route(
        owner, Decision.STICKY
    )
    assert rng.getstate() == state  # sticky routing draws nothing: every replica agrees
    if owner != stable:  # its version is down: stable serves it, and it comes back afterwards
        down = everyone - {owner}
        assert tab.choose(rng, versions=everyone, available=down, key=key) == Route(
            stable, Decision.STABLE
        )
        assert tab.choose(rng, versions=everyone, available=everyone, key=key).version == owner


# -- buckets in proportion to the weights ---------------------------------------------------


@settings(derandomize=True, deadline=None, max_examples=200)
@given(rollout=rollouts(), data=st.data())
@example(rollout=("stable", {"canary": 72.28, "a": 27.665, "b": 0.05}), data=None).via(
    "a half-bucket tie that a plain sum of the candidates flipped"
)
def test_bucket_counts_sum_exactly_and_round_each_quota(rollout, data):
    stable, candidates = rollout
    weights = split(stable, candidates)
    counts = bucket_counts(weights)
    assert sum(counts.values()) == BUCKETS
    total = sum(weights.values())
    for version, weight in weights.items():
        assert abs(counts[version] - weight * BUCKETS / total) < 1 + 1e-9, version
        if weight == 0:
            assert counts[version] == 0, version
    items = list(weights.items())
    shuffled = dict(data.draw(st.permutations(items), label="order") if data else items[::-1])
    assert bucket_counts(shuffled) == counts
    bucket_map = BucketMap.build(shuffled, stable)
    assert bucket_map == BucketMap.build(weights, stable)
    lengths = Counter({version: end - start for start, end, version in bucket_map.ranges})
    assert lengths == Counter({v: n for v, n in counts.items() if n})
    assert bucket_map.ranges[0][2] == stable or counts[stable] == 0


def splits_traffic(rollout: tuple[str, dict[str, float]]) -> bool:
    return sum(1 for w in split(*rollout).values() if w > 0) >= 2


@settings(derandomize=True, deadline=None, max_examples=10)
@given(rollout=rollouts().filter(splits_traffic), salt=st.text(max_size=8))
@example(rollout=("v1", {"v2": 50.0}), salt="")
@example(rollout=("v1", {"v2": 10.0}), salt="")
@example(rollout=("v2", {"v1": 33.33, "v3": 33.33}), salt="")
def test_sticky_shares_of_many_keys_match_the_weights(rollout, salt):
    # Each version owns within one bucket of its exact quota of the 10,000 buckets, so a key
    # lands on it with probability p within 1/10,000 of its weight share (treating blake2b as
    # a random function; its modulo bias is ~5e-16). Its count over n keys is then binomial, and
    # the test allows what a correct implementation exceeds with probability < ALPHA.
    n = 30_000
    stable, candidates = rollout
    weights = split(stable, candidates)
    tab = table(weights, stable)
    everyone = set(weights)
    rng = random.Random(0)
    got = Counter(
        tab.choose(rng, versions=everyone, available=everyone, key=f"{salt}user-{i}").version
        for i in range(n)
    )
    total = sum(weights.values())
    for version, weight in weights.items():
        p = weight / total
        lo, hi = chernoff_range(n, max(0.0, p - 1 / BUCKETS), min(1.0, p + 1 / BUCKETS), ALPHA / len(weights))  # fmt: skip
        assert lo <= got[version] <= hi, (version, weight, got[version], (lo, hi))
        if weight == 0:
            assert got[version] == 0


def test_chernoff_range_is_sane():
    assert chernoff_range(1000, 0.0, 0.0, 1e-9) == (0, 0)
    assert chernoff_range(1000, 1.0, 1.0, 1e-9) == (1000, 1000)
    lo, hi = chernoff_range(30_000, 0.5, 0.5, 1e-9)
    # A normal approximation puts 5e-10 per tail at ~6.1 sigma (sigma ~ 87): about +-530.
    assert 15_000 - 700 < lo < 15_000 - 500 and 15_000 + 500 < hi < 15_000 + 700


# -- users move only one way ----------------------------------------------------------------


@settings(derandomize=True, deadline=None, max_examples=150)
@given(
    names=st.lists(st.sampled_from(VERSIONS), min_size=2, max_size=2, unique=True),
    before=WEIGHTS,
    after=WEIGHTS,
)
@example(names=["v1", "v2"], before=0.005, after=0.01)  # a half-bucket tie, then one bucket
@example(names=["v2", "v1"], before=0.005, after=0.01)  # the same tie broken the other way
def test_one_candidate_users_move_only_in_the_direction_of_the_change(names, before, after):
    stable, candidate = names
    old = table(split(stable, {candidate: before}), stable).buckets
    new = table(split(stable, {candidate: after}), stable).buckets
    moved = moves(old, new)
    if after == before:
        assert not moved
    elif after > before:  # a canary step: only stable -> candidate
        assert set(moved) <= {(stable, candidate)}, moved
    else:  # a rollback step: only candidate -> stable
        assert set(moved) <= {(candidate, stable)}, moved


@settings(derandomize=True, deadline=None, max_examples=100)
@given(rollout=rollouts(), data=st.data())
def test_growing_candidates_never_send_a_user_back_to_stable(rollout, data):
    # Keys may move between candidates (a range shifts when one sorted before it grows); the
    # promise is that nobody on any candidate returns to stable while candidates only grow,
    # and, read the other way, that nobody leaves stable while they only shrink.
    stable, candidates = rollout
    grown = {name: w + data.draw(GROWTH, label=f"growth of {name}") for name, w in candidates.items()}  # fmt: skip
    assume(sum(grown.values()) <= 100)
    smaller = table(split(stable, candidates), stable).buckets
    larger = table(split(stable, grown), stable).buckets
    moved = moves(smaller, larger)  # (owner before, owner after) -> buckets
    # Read backwards (larger -> smaller), the same pairs say that nobody leaves stable.
    assert not [pair for pair in moved if pair[1] == stable], moved


@settings(derandomize=True, deadline=None, max_examples=100)
@given(rollout=rollouts(), data=st.data(), generation=st.integers(2, 10**6))
def test_unchanged_weights_move_nobody(rollout, data, generation):
    stable, candidates = rollout
    weights = split(stable, candidates)
    first = table(weights, stable).buckets
    reordered = dict(data.draw(st.permutations(list(weights.items())), label="order"))
    # Another generation, another dict order, and a config that went through a dump and back
    # (as `apply_override` does): the same map, so the same owner for every key.
    config = TrafficConfig.model_validate(TrafficConfig(stable=stable, weights=reordered).model_dump())  # fmt: skip
    again = TrafficTable.from_config(config, weights, generation=generation).buckets
    assert again == first
    # A version listed at weight 0 owns nothing, so listing it moves nobody either.
    unlisted = [v for v in VERSIONS if v not in weights]
    if unlisted:
        assert table({**weights, unlisted[0]: 0.0}, stable).buckets == first


# -- the slack TrafficConfig allows in a total ------------------------------------------------


@settings(derandomize=True, deadline=None, max_examples=50)
@given(
    before=WEIGHTS,
    rise=GROWTH,
    slack=st.floats(-1e-6, 1e-6),
)
@example(before=50.005 + 2e-8, rise=1e-9, slack=9e-7)  # 5001 buckets, then 5000
def test_a_rising_candidate_keeps_its_users_for_any_split_traffic_config_accepts(
    before, rise, slack
):
    after = before + rise
    weights_after = {"v1": 100.0 - after + slack, "v2": after}
    assume(weights_after["v1"] >= 0 and abs(sum(weights_after.values()) - 100) <= 1e-6)
    old = table({"v1": 100.0 - before, "v2": before}, "v1").buckets
    new = table(weights_after, "v1").buckets
    assert set(moves(old, new)) <= {("v1", "v2")}
