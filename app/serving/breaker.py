"""A per-version circuit breaker, one per version in each router replica.

The breaker is the per-request half of DESIGN.md's "two speeds of protection": when a version
keeps failing, a router stops sending it requests (they go to the stable version instead) long
before the controller's gates have gathered enough evidence to roll the whole rollout back.

    CLOSED ──(N failures in a row, or error rate over the window)──> OPEN
    OPEN ──(cooldown_s passed)──> HALF_OPEN          (probes admitted: up to half_open_probes)
    HALF_OPEN ──(a probe succeeds)──> CLOSED         (window cleared: a fresh start)
    HALF_OPEN ──(a probe fails)──> OPEN              (a fresh cooldown from the failure)

Time comes from the `clock` passed in (a monotonic clock in production, a fake one in tests);
nothing here reads the wall clock. Transitions happen lazily, when `allow`, `record` or `state`
look at the clock, so the breaker needs no timer task of its own.

Not thread-safe by design: a router replica owns one event loop, and every call here is
synchronous and short, so no two calls interleave.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from enum import Enum
from typing import Any

from app.config.router import BreakerSettings

__all__ = ["STATE_GAUGE", "BreakerSettings", "BreakerState", "CircuitBreaker"]

# The window is pruned by time; this cap bounds memory even when a version takes a flood of
# requests within one window. Oldest outcomes go first, so the rate is judged over the most
# recent MAX_WINDOW_OUTCOMES outcomes, which is evidence enough for any sane error_rate.
MAX_WINDOW_OUTCOMES = 10_000


class BreakerState(str, Enum):
    """A breaker's state (a log field, and a gauge through `value_numeric`)."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"

    @property
    def value_numeric(self) -> int:
        """0 closed, 1 open, 2 half-open: the value of the breaker-state gauge."""
        return STATE_GAUGE[self]


STATE_GAUGE: dict[BreakerState, int] = {
    BreakerState.CLOSED: 0,
    BreakerState.OPEN: 1,
    BreakerState.HALF_OPEN: 2,
}


class CircuitBreaker:
    """One version's breaker in one router replica.

    Closed, it admits everything and watches outcomes with two rules: `consecutive_failures`
    in a row (catches a version that is hard down, quickly, even at low traffic) and a failure
    fraction of at least `error_rate` over the last `window_s` seconds (catches a version that
    fails often but not always); the rate rule waits for `min_requests` outcomes, so two
    failures out of three requests do not open it.

    Open, it refuses until `cooldown_s` has passed since it opened; then it is half-open and
    admits up to `half_open_probes` requests at once. The first probe verdict decides: success
    closes the breaker with an empty window, failure opens it again with a fresh cooldown.

    Outcomes are not tied to the `allow` call that admitted them (the router calls `allow`, then
    `record` when the request ends). So:

    * an outcome that arrives while the breaker is open, from a request admitted before it
      opened, is ignored: it neither closes the breaker nor extends the cooldown;
    * while half-open, an outcome counts as a probe verdict only while a probe is in flight;
    * a probe whose outcome never comes (the caller forgot, or the task was cancelled) must not
      wedge the breaker half-open forever: call `release()` for a request that ended without a
      verdict, and as a backstop, once `cooldown_s` passes since the last probe was admitted
      without any verdict, the probe slots are presumed lost and a new round is admitted.
    """

    def __init__(self, settings: BreakerSettings, clock: Callable[[], float]) -> None:
        self._settings = settings
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._consecutive = 0
        self._window: deque[tuple[float, bool]] = deque()  # (time, failed), oldest first
        self._window_failures = 0
        self._opened_at: float | None = None
        self._probes_in_flight = 0
        self._last_probe_at: float | None = None
        self._trips = 0  # times the breaker opened (closed -> open, or half-open -> open)

    @property
    def settings(self) -> BreakerSettings:
        return self._settings

    @property
    def state(self) -> BreakerState:
        """The state now; HALF_OPEN as soon as the cooldown has passed, before any probe."""
        if not self._settings.enabled:
            return BreakerState.CLOSED
        if self._state is BreakerState.OPEN and self._cooldown_over(self._clock()):
            return BreakerState.HALF_OPEN
        return self._state

    @property
    def trips(self) -> int:
        """How many times this breaker has opened (a counter for metrics)."""
        return self._trips

    def allow(self) -> bool:
        """May a request go to this version now? A True in half-open takes a probe slot."""
        if not self._settings.enabled:
            return True
        now = self._clock()
        self._advance(now)
        if self._state is BreakerState.CLOSED:
            return True
        if self._state is BreakerState.OPEN:
            return False
        # HALF_OPEN
        if (
            self._probes_in_flight >= self._settings.half_open_probes
            and self._last_probe_at is not None
            and now - self._last_probe_at >= self._settings.cooldown_s
        ):
            self._probes_in_flight = 0  # the probes' verdicts are lost; try again
        if self._probes_in_flight < self._settings.half_open_probes:
            self._probes_in_flight += 1
            self._last_probe_at = now
            return True
        return False

    def record(self, success: bool) -> None:
        """The outcome of a request that `allow` admitted."""
        if not self._settings.enabled:
            return
        now = self._clock()
        self._advance(now)
        if self._state is BreakerState.OPEN:
            return  # admitted before the breaker opened; the breaker already knows
        if self._state is BreakerState.HALF_OPEN:
            if self._probes_in_flight == 0:
                return  # not a probe: a straggler from before the breaker opened
            self._probes_in_flight -= 1
            if success:
                self._close()
            else:
                self._open(now)
            return
        self._record_closed(now, success)

    def release(self) -> None:
        """A request `allow` admitted ended without a verdict (cancelled, client went away).

        Frees its probe slot when half-open; does nothing otherwise.
        """
        if self._state is BreakerState.HALF_OPEN and self._probes_in_flight > 0:
            self._probes_in_flight -= 1

    def reconfigure(self, settings: BreakerSettings) -> None:
        """Apply new settings in place, keeping the state.

        An open breaker's cooldown is measured with the new `cooldown_s` from when it opened;
        the thresholds apply from the next outcome on (a lower threshold does not open the
        breaker by itself). Disabling resets it to closed with an empty window, so enabling it
        again starts afresh rather than from evidence that is stale by then.
        """
        self._settings = settings
        if not settings.enabled:
            self._close()

    def snapshot(self) -> dict[str, Any]:
        """A plain dict for status pages and logs."""
        now = self._clock()
        if self._settings.enabled:
            self._prune(now)
        state = self.state
        cooldown_left_s = 0.0
        if state is BreakerState.OPEN and self._opened_at is not None:
            cooldown_left_s = max(0.0, self._opened_at + self._settings.cooldown_s - now)
        return {
            "state": state.value,
            "consecutive_failures": self._consecutive,
            "window_requests": len(self._window),
            "window_failures": self._window_failures,
            "opened_at": self._opened_at,
            "cooldown_left_s": cooldown_left_s,
            "probes_in_flight": self._probes_in_flight,
            "trips": self._trips,
        }

    # -- internals ---------------------------------------------------------------------------

    def _cooldown_over(self, now: float) -> bool:
        return self._opened_at is not None and now - self._opened_at >= self._settings.cooldown_s

    def _advance(self, now: float) -> None:
        """Make the time-driven transition (open -> half-open) real."""
        if self._state is BreakerState.OPEN and self._cooldown_over(now):
            self._state = BreakerState.HALF_OPEN
            self._probes_in_flight = 0
            self._last_probe_at = None

    def _record_closed(self, now: float, success: bool) -> None:
        failed = not success
        self._consecutive = self._consecutive + 1 if failed else 0
        if len(self._window) >= MAX_WINDOW_OUTCOMES:
            self._drop_oldest()
        self._window.append((now, failed))
        self._window_failures += failed
        self._prune(now)
        settings = self._settings
        if self._consecutive >= settings.consecutive_failures:
            self._open(now)
        elif (
            len(self._window) >= settings.min_requests
            and self._window_failures / len(self._window) >= settings.error_rate
        ):
            self._open(now)

    def _prune(self, now: float) -> None:
        horizon = now - self._settings.window_s
        while self._window and self._window[0][0] <= horizon:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        _, failed = self._window.popleft()
        self._window_failures -= failed

    def _open(self, now: float) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = now
        self._probes_in_flight = 0
        self._last_probe_at = None
        self._trips += 1

    def _close(self) -> None:
        self._state = BreakerState.CLOSED
        self._opened_at = None
        self._probes_in_flight = 0
        self._last_probe_at = None
        self._consecutive = 0
        self._window.clear()
        self._window_failures = 0
