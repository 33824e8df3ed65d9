"""The one backoff nilmd waits with: Redis reconnects (reader, inference, producer) and child
restarts (supervisor) alike.

Equal jitter, as redis-py's `EqualJitterBackoff`: half the exponential delay is fixed and half is
random, so a fleet of boxes that lost the same Redis does not reconnect in lock-step, yet no
retry comes sooner than half its step. Kept here rather than imported from redis-py because the
supervisor must run without redis-py imported (tests/test_layout.py)."""

from __future__ import annotations

import random


class Backoff:
    """base doubling up to `cap` per failure, equal jitter; `failures` counts since the last reset."""

    def __init__(self, base: float = 0.5, cap: float = 30.0, rng=random.random):
        self.base, self.cap, self.rng = base, cap, rng
        self.failures = 0

    def next_delay(self) -> float:
        step = min(self.cap, self.base * 2**self.failures)
        self.failures += 1
        return step / 2 + step / 2 * self.rng()

    def reset(self) -> None:
        self.failures = 0
