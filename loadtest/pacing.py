"""Open-loop arrival schedules (no Locust import; see records.py for why).

Locust users are closed-loop: each one waits for its stream before sending again, so a faster
configuration would generate more load at the same user count. For a matched comparison the
*offered* rate must be fixed instead. The pattern (fw-ai/benchmark's FixedQPSPacer): one shared
clock hands out arrival times; each user claims the next slot, sleeps until it and sends. With
a pool of users larger than rate x E2E there is always a free user, so arrivals do not depend on
completions. If the pool runs dry (the server is saturated), requests leave late; the lag is
recorded and the achieved rate falls below the offered one, which the analysis flags.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Protocol


class RateSchedule(Protocol):
    """Offered requests per second as a function of time since the test started."""

    @property
    def duration(self) -> float: ...

    def rate_at(self, t: float) -> float: ...


@dataclass(frozen=True, slots=True)
class ConstantRate:
    rate: float
    duration: float

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.duration <= 0:
            raise ValueError("rate and duration must be > 0")

    def rate_at(self, t: float) -> float:
        return self.rate


@dataclass(frozen=True, slots=True)
class StepRate:
    """`start`, then `start + step`, ... for `steps` stages of `stage_s` seconds each."""

    start: float
    step: float
    stage_s: float
    steps: int

    def __post_init__(self) -> None:
        if self.start <= 0 or self.stage_s <= 0 or self.steps < 1:
            raise ValueError("start and stage_s must be > 0, steps >= 1")
        if self.start + self.step * (self.steps - 1) <= 0:
            raise ValueError("the last stage's rate must be > 0")

    @property
    def duration(self) -> float:
        return self.stage_s * self.steps

    def stage(self, t: float) -> int:
        return min(int(t // self.stage_s), self.steps - 1)

    def rate_at(self, t: float) -> float:
        return self.start + self.step * self.stage(t)

    @property
    def peak(self) -> float:
        return max(self.start, self.start + self.step * (self.steps - 1))


class ArrivalClock:
    """Hands out absolute arrival times (same clock as `t0`) until the schedule ends.

    Constant gaps by default (lower variance than Poisson for the same mean); `poisson=True`
    draws exponential gaps from a seeded generator, so every configuration sees the same
    arrival sequence. Claiming is not thread-safe, but gevent only switches at I/O, and the
    claim does none.
    """

    def __init__(
        self, schedule: RateSchedule, t0: float, *, poisson: bool = False, seed: int = 0
    ) -> None:
        self.schedule = schedule
        self.t0 = t0
        self.poisson = poisson
        self._rng = random.Random(seed)
        self._next = 0.0  # offset of the next arrival from t0
        self.claimed = 0
        # Constant gaps are computed as anchor + n / rate, not summed, so they do not drift.
        self._anchor, self._anchor_rate, self._n = 0.0, 0.0, 0

    def claim(self) -> float | None:
        """The next arrival time, or None once the schedule is over."""
        offset = self._next
        if offset >= self.schedule.duration:
            return None
        rate = self.schedule.rate_at(offset)
        if self.poisson:
            self._next = offset + self._rng.expovariate(rate)
        else:
            if rate != self._anchor_rate:
                self._anchor, self._anchor_rate, self._n = offset, rate, 0
            self._n += 1
            self._next = self._anchor + self._n / rate
        self.claimed += 1
        return self.t0 + offset

    @property
    def exhausted(self) -> bool:
        return self._next >= self.schedule.duration


def pool_size(peak_rate: float, e2e_budget_s: float, minimum: int = 4) -> int:
    """Users needed so that rate x E2E requests can be in flight, with 50% headroom."""
    return max(minimum, math.ceil(1.5 * peak_rate * e2e_budget_s) + 1)
