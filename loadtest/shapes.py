"""Locust load shapes: closed-loop users, constant-rate and step-rate open loop, step users.

One shape class, chosen by `--load-shape`, because Locust picks up every shape class it finds in
the locustfile and would otherwise need a class picker. The open-loop shapes own the shared
`ArrivalClock`; the users in traffic.py claim slots from it. They keep a fixed pool of users
alive while arrivals last, then let in-flight streams drain (up to `--drain-timeout`) before
stopping, so the last requests are measured instead of cut off.

The open-loop shapes need the users and the clock in one process: run them without
`--processes`/workers (one process easily drives a CPU-hosted model).
"""

from __future__ import annotations

import math
import time
from typing import Any

from locust import LoadTestShape

from loadtest.pacing import ArrivalClock, ConstantRate, RateSchedule, StepRate, pool_size

SHAPES = ("users", "constant-rate", "step-rate", "step-users")
OPEN_LOOP = ("constant-rate", "step-rate")


def build_schedule(opts: Any) -> RateSchedule:
    """The arrival-rate schedule the parsed options ask for (open-loop shapes only)."""
    duration = opts.load_duration or math.inf
    if opts.load_shape == "constant-rate":
        return ConstantRate(opts.request_rate, duration)
    if opts.load_shape == "step-rate":
        return StepRate(opts.request_rate, opts.step_rate, opts.step_seconds, opts.steps)
    raise ValueError(f"{opts.load_shape!r} is not an open-loop shape")


class TrafficShape(LoadTestShape):
    """Dispatches on `--load-shape`; see the module docstring."""

    # `users` mode answers -u/-r like a plain Locust run, and -t ends every shape's run.
    use_common_options = True

    def __init__(self) -> None:
        super().__init__()
        self.clock: ArrivalClock | None = None
        self.in_flight = 0  # claimed arrivals not yet finished, maintained by the users
        self.pool = 0
        self.t0 = time.perf_counter()

    def _opts(self) -> Any:
        return self.runner.environment.parsed_options if self.runner else None

    def reset_time(self) -> None:
        # Called by Locust when the shape starts: (re)build the clock from the current options,
        # which the web UI may have edited since the last run.
        super().reset_time()
        self.t0 = self.start_time
        self.in_flight = 0
        opts = self._opts()
        self.clock = None
        if opts is not None and opts.load_shape in OPEN_LOOP:
            schedule = build_schedule(opts)
            peak = schedule.peak if isinstance(schedule, StepRate) else opts.request_rate
            self.pool = opts.max_users or pool_size(peak, opts.e2e_budget)
            self.clock = ArrivalClock(
                schedule, self.t0, poisson=opts.arrival == "poisson", seed=opts.prompt_seed
            )

    def tick(self) -> tuple[int, float] | None:
        opts = self._opts()
        if opts is None:
            return None
        t = self.get_run_time()
        # Locust waits for a shape to finish before it would start its own -t timer, so the
        # shape ends the run itself; an open loop's drain counts inside this limit.
        if opts.run_time and t >= opts.run_time:
            return None
        shape = opts.load_shape
        if shape == "users":
            if opts.load_duration and t >= opts.load_duration:
                return None
            return (opts.num_users or 1, opts.spawn_rate or 1.0)
        if shape == "step-users":
            if t >= opts.step_seconds * opts.steps:
                return None
            stage = int(t // opts.step_seconds)
            return ((stage + 1) * opts.step_users, float(max(opts.step_users, 1)))
        if self.clock is None:  # a shape was chosen after start; rebuild
            self.reset_time()
        assert self.clock is not None
        if self.clock.exhausted:
            drained = self.in_flight == 0
            past_drain = t >= self.clock.schedule.duration + opts.drain_timeout
            if drained or past_drain:
                return None
        # Spawn the whole pool at once: late users would make the first arrivals late.
        return (self.pool, float(min(max(self.pool, 1), 100)))
