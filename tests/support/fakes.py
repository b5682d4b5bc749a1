"""Test doubles shared by the unit tests."""

from __future__ import annotations


class FakeClock:
    """A clock the test moves by hand: pass the instance where code takes `clock()`, and its
    `monotonic` where code takes a monotonic clock.

    `advance()` moves both (time passes); `jump()` moves only the wall clock, as NTP stepping
    it or an operator setting it does. `tick_s` is the default step of `advance()` (a
    reconcile tick, for the rollout tests). The monotonic clock starts at another origin than
    the wall clock, as a real one does, so code that mixes the two shows it."""

    def __init__(self, now: float = 1000.0, tick_s: float | None = None) -> None:
        self.now = now
        self.tick_s = tick_s
        self.mono = 50.0

    def advance(self, seconds: float | None = None) -> None:
        if seconds is None:
            if self.tick_s is None:
                raise TypeError("advance() needs seconds: this clock has no tick_s")
            seconds = self.tick_s
        self.now += seconds
        self.mono += seconds

    def jump(self, seconds: float) -> None:
        """Step the wall clock by `seconds` (negative: back) while no time passes."""
        self.now += seconds

    def monotonic(self) -> float:
        return self.mono

    def __call__(self) -> float:
        return self.now
