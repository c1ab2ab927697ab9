"""One backoff for every retry loop of the controller, agent and webhook: exponential from `base`,
doubling, capped, optionally with equal jitter (never sooner than half the step), reset on success.
"""

from __future__ import annotations

import random


def delay(attempt: int, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number `attempt` (1 = the first retry). With `rng`, equal
    jitter: uniformly in [step/2, step], so a fleet that failed together does not retry together."""
    step = min(cap, base * 2.0 ** max(0, attempt - 1))
    if rng is None:
        return step
    return step / 2 + rng.uniform(0, step / 2)


class Backoff:
    """The retry state of one loop: `next()` after a failure, `reset()` after a success."""

    def __init__(self, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None) -> None:
        self.base, self.cap, self.rng = base, cap, rng
        self.failures = 0

    def next(self) -> float:
        self.failures += 1
        return delay(self.failures, self.base, self.cap, self.rng)

    def reset(self) -> None:
        self.failures = 0
