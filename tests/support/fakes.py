"""Test doubles shared by the unit tests."""

from __future__ import annotations


class FakeClock:
    """A clock the test moves by hand: pass the instance where code takes `clock()`.

    `tick_s` is the default step of `advance()` (a reconcile tick, for the rollout tests)."""

    def __init__(self, now: float = 1000.0, tick_s: float | None = None) -> None:
        self.now = now
        self.tick_s = tick_s

    def advance(self, seconds: float | None = None) -> None:
        if seconds is None:
            if self.tick_s is None:
                raise TypeError("advance() needs seconds: this clock has no tick_s")
            seconds = self.tick_s
        self.now += seconds

    def __call__(self) -> float:
        return self.now
