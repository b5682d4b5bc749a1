"""Test doubles shared by the unit tests."""

from __future__ import annotations


class FakeClock:
    """A clock the test moves by hand: pass the instance where code takes `clock()`."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def __call__(self) -> float:
        return self.now
