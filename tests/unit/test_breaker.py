"""The per-version circuit breaker, ticked through every transition with a fake clock."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.serving.breaker import (
    MAX_WINDOW_OUTCOMES,
    STATE_GAUGE,
    BreakerSettings,
    BreakerState,
    CircuitBreaker,
)
from tests.support.fakes import FakeClock

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def make(clock: FakeClock | None = None, **overrides) -> tuple[CircuitBreaker, FakeClock]:
    clock = clock or FakeClock()
    base = dict(
        consecutive_failures=3,
        error_rate=0.5,
        window_s=10.0,
        min_requests=10,
        cooldown_s=5.0,
        half_open_probes=1,
    )
    base.update(overrides)
    return CircuitBreaker(BreakerSettings(**base), clock), clock


def fail(breaker: CircuitBreaker, n: int = 1) -> None:
    for _ in range(n):
        breaker.record(False)


def succeed(breaker: CircuitBreaker, n: int = 1) -> None:
    for _ in range(n):
        breaker.record(True)


def open_breaker(**overrides) -> tuple[CircuitBreaker, FakeClock]:
    breaker, clock = make(**overrides)
    fail(breaker, breaker.settings.consecutive_failures)
    assert breaker.state is OPEN
    return breaker, clock


# -- settings and enum ---------------------------------------------------------------------


def test_defaults():
    s = BreakerSettings()
    assert (s.consecutive_failures, s.error_rate, s.window_s, s.min_requests) == (5, 0.5, 10.0, 20)
    assert (s.cooldown_s, s.half_open_probes, s.enabled) == (5.0, 1, True)


@pytest.mark.parametrize(
    "field, value",
    [
        ("consecutive_failures", 0),
        ("error_rate", 0),
        ("error_rate", 1.01),
        ("window_s", 0),
        ("min_requests", 0),
        ("cooldown_s", 0),
        ("half_open_probes", 0),
        ("typo_field", 1),
    ],
)
def test_settings_reject_bad_values(field, value):
    with pytest.raises(ValidationError, match=field):
        BreakerSettings(**{field: value})


def test_settings_are_frozen():
    with pytest.raises(ValidationError):
        BreakerSettings().cooldown_s = 1.0


def test_state_gauge_values():
    assert STATE_GAUGE == {CLOSED: 0, OPEN: 1, HALF_OPEN: 2}
    assert [s.value_numeric for s in (CLOSED, OPEN, HALF_OPEN)] == [0, 1, 2]
    assert [s.value for s in (CLOSED, OPEN, HALF_OPEN)] == ["closed", "open", "half_open"]


# -- closed -> open --------------------------------------------------------------------------


def test_starts_closed_and_allows():
    breaker, _ = make()
    assert breaker.state is CLOSED
    assert all(breaker.allow() for _ in range(100))


def test_opens_on_consecutive_failures():
    breaker, _ = make(consecutive_failures=3)
    fail(breaker, 2)
    assert breaker.state is CLOSED and breaker.allow()
    fail(breaker)
    assert breaker.state is OPEN
    assert not breaker.allow()
    assert breaker.trips == 1


def test_a_success_resets_the_consecutive_count():
    breaker, _ = make(consecutive_failures=3, min_requests=1000)
    for _ in range(10):
        fail(breaker, 2)
        succeed(breaker)
    assert breaker.state is CLOSED
    assert breaker.snapshot()["consecutive_failures"] == 0


def test_error_rate_waits_for_min_requests():
    # Alternate failure/success: never 3 in a row, always >= 50% failures.
    breaker, _ = make(consecutive_failures=3, error_rate=0.5, min_requests=10)
    for _ in range(4):
        fail(breaker)
        succeed(breaker)
    fail(breaker)  # 9 outcomes, 5 failures: 55%, but under min_requests
    assert breaker.state is CLOSED
    succeed(breaker)  # 10 outcomes, 5 failures: 50% >= error_rate
    assert breaker.state is OPEN


def test_error_rate_below_threshold_stays_closed():
    breaker, _ = make(consecutive_failures=100, error_rate=0.5, min_requests=10)
    for _ in range(20):
        fail(breaker)
        succeed(breaker, 2)  # 33% failures
    assert breaker.state is CLOSED
    snap = breaker.snapshot()
    assert snap["window_requests"] == 60 and snap["window_failures"] == 20


def test_window_expiry_forgets_old_failures():
    breaker, clock = make(consecutive_failures=100, error_rate=0.5, min_requests=10, window_s=10)
    fail(breaker, 9)  # 9 failures: one short of min_requests
    clock.advance(10.0)  # ... and now all outside the window
    succeed(breaker)
    snap = breaker.snapshot()
    assert (snap["window_requests"], snap["window_failures"]) == (1, 0)
    for _ in range(4):
        fail(breaker)
        succeed(breaker)
    succeed(breaker)  # 10 in window, 4 failures (without expiry: 19 with 13, which opens)
    assert breaker.state is CLOSED
    assert breaker.snapshot()["window_requests"] == 10
    fail(breaker)  # 11 outcomes, 5 failures: 45%
    assert breaker.state is CLOSED
    fail(breaker)  # 12 outcomes, 6 failures: 50%
    assert breaker.state is OPEN


def test_window_keeps_outcomes_just_inside():
    breaker, clock = make(consecutive_failures=100, error_rate=0.5, min_requests=10, window_s=10)
    fail(breaker, 9)
    clock.advance(9.9)
    fail(breaker)
    assert breaker.state is OPEN


def test_window_is_capped():
    breaker, _ = make(consecutive_failures=10**9, error_rate=1.0, min_requests=10**9)
    succeed(breaker, MAX_WINDOW_OUTCOMES + 50)
    fail(breaker, 10)
    snap = breaker.snapshot()
    assert snap["window_requests"] == MAX_WINDOW_OUTCOMES
    assert snap["window_failures"] == 10


def test_window_cap_drops_failures_from_the_count():
    breaker, _ = make(consecutive_failures=10**9, error_rate=1.0, min_requests=10**9)
    fail(breaker, 10)
    succeed(breaker, MAX_WINDOW_OUTCOMES)
    assert breaker.snapshot()["window_failures"] == 0


# -- open -> half-open ------------------------------------------------------------------------


def test_stays_open_during_cooldown():
    breaker, clock = open_breaker(cooldown_s=5.0)
    opened_at = clock.now
    for _ in range(4):
        clock.advance(1.2)
        assert breaker.state is OPEN
        assert not breaker.allow()
    assert clock.now - opened_at < 5.0
    snap = breaker.snapshot()
    assert snap["opened_at"] == opened_at
    assert snap["cooldown_left_s"] == pytest.approx(5.0 - 4.8)


def test_state_reports_half_open_after_cooldown_before_allow():
    breaker, clock = open_breaker(cooldown_s=5.0)
    clock.advance(5.0)
    assert breaker.state is HALF_OPEN
    assert breaker.snapshot()["state"] == "half_open"


@pytest.mark.parametrize("probes", [1, 3])
def test_half_open_admits_exactly_half_open_probes(probes):
    breaker, clock = open_breaker(cooldown_s=5.0, half_open_probes=probes)
    clock.advance(5.0)
    admitted = [breaker.allow() for _ in range(probes + 5)]
    assert admitted == [True] * probes + [False] * 5
    assert breaker.state is HALF_OPEN
    assert breaker.snapshot()["probes_in_flight"] == probes


def test_probe_success_closes_and_clears_window():
    breaker, clock = open_breaker(cooldown_s=5.0)
    clock.advance(5.0)
    assert breaker.allow()
    succeed(breaker)
    assert breaker.state is CLOSED
    snap = breaker.snapshot()
    assert snap["window_requests"] == 0 and snap["window_failures"] == 0
    assert snap["consecutive_failures"] == 0 and snap["opened_at"] is None
    assert all(breaker.allow() for _ in range(10))
    fail(breaker, 2)  # the old failures are gone: takes a full run of 3 again
    assert breaker.state is CLOSED
    fail(breaker)
    assert breaker.state is OPEN


def test_probe_failure_reopens_with_fresh_cooldown():
    breaker, clock = open_breaker(cooldown_s=5.0)
    clock.advance(5.0)
    assert breaker.allow()
    clock.advance(2.0)  # the probe takes 2 s, then fails
    fail(breaker)
    assert breaker.state is OPEN
    assert breaker.trips == 2
    reopened_at = clock.now
    assert breaker.snapshot()["opened_at"] == reopened_at
    clock.advance(4.9)
    assert breaker.state is OPEN and not breaker.allow()
    clock.advance(0.1)
    assert breaker.state is HALF_OPEN and breaker.allow()


def test_probe_slot_frees_when_probe_finishes_with_more_probes():
    breaker, clock = open_breaker(cooldown_s=5.0, half_open_probes=2)
    clock.advance(5.0)
    assert breaker.allow() and breaker.allow() and not breaker.allow()
    succeed(breaker)  # first verdict: success closes
    assert breaker.state is CLOSED
    succeed(breaker)  # the other probe reports into a closed breaker: harmless
    assert breaker.state is CLOSED


def test_release_frees_a_probe_slot():
    breaker, clock = open_breaker(cooldown_s=5.0)
    clock.advance(5.0)
    assert breaker.allow()
    assert not breaker.allow()
    breaker.release()  # the probe was cancelled: no verdict
    assert breaker.state is HALF_OPEN
    assert breaker.allow()


def test_lost_probe_does_not_wedge_half_open():
    breaker, clock = open_breaker(cooldown_s=5.0)
    clock.advance(5.0)
    assert breaker.allow()  # this probe never reports
    clock.advance(4.9)
    assert not breaker.allow()
    clock.advance(0.1)
    assert breaker.allow()  # presumed lost after cooldown_s: a new probe goes
    assert not breaker.allow()


# -- stragglers ---------------------------------------------------------------------------------


def test_outcomes_while_open_are_ignored():
    breaker, clock = open_breaker(cooldown_s=5.0)
    opened_at = clock.now
    clock.advance(1.0)
    succeed(breaker, 5)  # admitted before it opened
    assert breaker.state is OPEN
    fail(breaker, 5)
    assert breaker.state is OPEN
    assert breaker.snapshot()["opened_at"] == opened_at  # cooldown not extended
    assert breaker.trips == 1
    clock.advance(4.0)
    assert breaker.state is HALF_OPEN


def test_outcome_after_cooldown_without_probe_is_ignored():
    breaker, clock = open_breaker(cooldown_s=5.0)
    clock.advance(6.0)
    succeed(breaker)  # a straggler, not a probe: must not close
    assert breaker.state is HALF_OPEN
    fail(breaker)  # nor re-open
    assert breaker.state is HALF_OPEN
    assert breaker.allow()


# -- disabled and reconfigure ------------------------------------------------------------------


def test_disabled_never_opens():
    breaker, clock = make(enabled=False, consecutive_failures=1, min_requests=1)
    for _ in range(100):
        assert breaker.allow()
        fail(breaker)
        clock.advance(0.01)
    assert breaker.state is CLOSED
    assert breaker.trips == 0
    assert breaker.snapshot()["state"] == "closed"


def test_reconfigure_keeps_open_state():
    breaker, clock = open_breaker(cooldown_s=5.0)
    breaker.reconfigure(breaker.settings.model_copy(update={"consecutive_failures": 10}))
    assert breaker.state is OPEN and not breaker.allow()
    assert breaker.settings.consecutive_failures == 10


def test_reconfigure_cooldown_measured_from_opening():
    breaker, clock = open_breaker(cooldown_s=5.0)
    clock.advance(3.0)
    breaker.reconfigure(breaker.settings.model_copy(update={"cooldown_s": 2.0}))
    assert breaker.state is HALF_OPEN
    breaker.reconfigure(breaker.settings.model_copy(update={"cooldown_s": 30.0}))
    assert breaker.state is OPEN


def test_reconfigure_keeps_closed_counts():
    breaker, _ = make(consecutive_failures=3, min_requests=1000)
    fail(breaker, 2)
    breaker.reconfigure(breaker.settings.model_copy(update={"min_requests": 500}))
    assert breaker.state is CLOSED
    assert breaker.snapshot()["consecutive_failures"] == 2
    fail(breaker)
    assert breaker.state is OPEN


def test_reconfigure_keeps_half_open_probes():
    breaker, clock = open_breaker(cooldown_s=5.0)
    clock.advance(5.0)
    assert breaker.allow()
    breaker.reconfigure(breaker.settings.model_copy(update={"window_s": 20.0}))
    assert breaker.state is HALF_OPEN and not breaker.allow()
    succeed(breaker)
    assert breaker.state is CLOSED


def test_disabling_resets_and_reenabling_starts_fresh():
    breaker, _ = open_breaker()
    enabled = breaker.settings
    breaker.reconfigure(enabled.model_copy(update={"enabled": False}))
    assert breaker.state is CLOSED and breaker.allow()
    breaker.reconfigure(enabled)
    assert breaker.state is CLOSED and breaker.allow()
    assert breaker.snapshot()["consecutive_failures"] == 0


def test_snapshot_keys():
    breaker, _ = make()
    assert set(breaker.snapshot()) == {
        "state",
        "consecutive_failures",
        "window_requests",
        "window_failures",
        "opened_at",
        "cooldown_left_s",
        "probes_in_flight",
        "trips",
    }
