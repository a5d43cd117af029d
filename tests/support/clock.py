"""A clock a test moves by hand (limits, bans and breakers take a clock callable)."""

from __future__ import annotations


class FakeClock:
    def __init__(self, now: float = 1_699_999_980.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
