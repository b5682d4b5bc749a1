"""app/serving/ratelimit.py with a fake clock."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.serving.ratelimit import RateLimiter
from tests.support.fakes import FakeClock


def test_a_client_gets_its_burst_then_its_rate():
    clock = FakeClock()
    limiter = RateLimiter(rate=100, burst=500, clock=clock)
    assert limiter.take("a", 500) is None
    assert limiter.take("a", 1) == pytest.approx(0.01)  # empty: wait for one token
    assert limiter.take("b", 500) is None  # another client has its own bucket
    clock.advance(1.0)
    assert limiter.take("a", 100) is None and limiter.take("a", 1) > 0
    assert limiter.refused == 2


def test_a_cost_over_the_burst_is_refused_with_the_time_a_full_bucket_takes():
    limiter = RateLimiter(rate=10, burst=50, clock=FakeClock())
    assert limiter.take("a", 10) is None
    assert limiter.take("a", 1000) == pytest.approx(50 / 10)  # never passes: a full bucket's time
    assert limiter.take("a", 41) == pytest.approx(0.1)


def test_memory_is_bounded_by_max_clients():
    limiter = RateLimiter(rate=1, burst=1, clock=FakeClock(), max_clients=100)
    for i in range(10_000):
        limiter.take(f"client-{i}")
    assert len(limiter._buckets) == 100


@settings(derandomize=True, deadline=None, max_examples=200)
@given(st.lists(st.tuples(st.floats(0, 5), st.integers(1, 300)), max_size=60))
def test_never_more_than_burst_plus_rate_times_elapsed(calls):
    """Over any run, what is let through is at most burst + rate x elapsed time."""
    clock = FakeClock()
    limiter = RateLimiter(rate=50, burst=200, clock=clock)
    start, passed = clock.now, 0
    for pause, cost in calls:
        clock.advance(pause)
        wait = limiter.take("a", cost)
        if wait is None:
            passed += cost
        else:
            assert wait > 0
        assert passed <= 200 + 50 * (clock.now - start) + 1e-6
