"""Throughput profile of the target step: steps per second as a function of tokens in the step.

The DSpark policy maximises expected tokens x steps-per-second, so it needs SPS(B) for every step
size B it might choose. We measure a handful of sizes at start-up (`measure_profile`, median of
repeats, made monotone), spread them over a fixed bucket grid (`ThroughputProfile.seed`) and keep
the grid current from real step times (`ThroughputProfile.observe`), so the curve follows the real
device, the context lengths actually served and whatever else shares the machine.

Bucketing (`bucket_sizes`): every size 1..8 (single-stream steps verify 1 + gamma <= 8 tokens and
the cost differences there decide whether speculation pays at all), multiples of 8 up to 128, then
powers of two and their 1.5x midpoints (128, 192, 256, 384, ...) up to max_tokens, plus max_tokens
itself and every size that was seeded. That is ~30 points for max_tokens = 2048: fine-grained
where steps are small, coarse where cost is close to linear, and a sane label cardinality for the
`dspark_throughput_profile_steps_per_second{tokens=...}` gauge.

Online update: each observation is compared with the current curve at its size; the log error
is clipped to +-log 2 (one 10x outlier such as a GC pause moves the curve by at most ema * log 2,
~7 % at ema = 0.1) and added, times ema, to every bucket with weight
0.5 + 0.5 * exp(-|log2(n_bucket / n)| / 2): full weight at the observed size, 0.8 one octave away,
at least 0.5 anywhere. Half of every correction is global because the commonest change (a
co-located job, clocks, a longer context) slows every size, and a curve that moved only where it
was observed would grow fake cliffs next to the sizes being served; the policies read only
ratios SPS(B + m) / SPS(B), which a common shift leaves intact. After the update the curve is
made monotone again around the observation, which is the freshest fact: a slower observation
raises larger sizes that fell below it (running maximum from the left), a faster one lowers
smaller sizes that stayed above it (running minimum from the right). Values between buckets are
interpolated linearly in step time, so the curve is monotone everywhere.

The engine folds observations four at a time (`fold_every`, `_fold`): each size moves by the
mean of its misses with the weight of as many observations, and the monotone pass runs once.

Sizes that are not served: the updates above keep the curve's level current everywhere, but its
shape only where steps are observed. A size the start-up seed priced too high (a slow spell of
the host while it was timed: four engines built one after the other seeded a 7-token step at
9.6 to 15.8 ms) is then never chosen, so never observed, and the engine keeps avoiding it for
its whole life; two engines of one configuration, their profiles apart, served 1.255x and
1.188x in one process. So the profile remembers when each bucket was last observed, the
Speculator now and then verifies a few more drafts than the policy chose to reach the size
unobserved the longest once it has gone unobserved for `stale_after` observations
(`stale_size`, `Speculator._explore`), and an observation at such a size takes `_STALE_EMA` of
its error there instead of `ema`: a price that old is worth less than one new step.

Pure Python: no torch, no I/O.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import Protocol

_LOG_CLIP = math.log(2.0)  # largest log-error one observation may push
_KERNEL_OCTAVES = 2.0  # width of the neighbourhood an observation updates
_GLOBAL_SHARE = 0.5  # part of every correction applied to all sizes alike
_STALE_EMA = 0.5  # what an observation at a size unobserved for `stale_after` steps moves it


class StepThroughput(Protocol):
    """What the verify policies and the draft gate read from a profile: SPS(B)."""

    def steps_per_second(self, num_tokens: int) -> float: ...


def bucket_sizes(max_tokens: int) -> list[int]:
    """The grid of step sizes the profile keeps (see the module docstring)."""
    if max_tokens < 1:
        raise ValueError("max_tokens must be >= 1")
    sizes = set(range(1, min(8, max_tokens) + 1))
    sizes.update(range(8, min(128, max_tokens) + 1, 8))
    p = 128
    while p <= max_tokens:
        sizes.add(p)
        if p * 3 // 2 <= max_tokens:
            sizes.add(p * 3 // 2)
        p *= 2
    sizes.add(max_tokens)
    return sorted(sizes)


def default_profile_sizes(
    max_num_seqs: int, max_draft_tokens: int, max_tokens: int, row_quantum: int = 1
) -> list[int]:
    """Step sizes worth measuring at start-up.

    The sizes a lone stream produces (1 .. 1 + gamma), the sizes a full batch produces
    (max_num_seqs x (1 + k) for k = 0 .. gamma), powers of two for the shape in between, and the
    step budget itself. With a row quantum q > 1 (see ThroughputProfile.seed), every one of
    those sizes that ends a pass of q rows is measured with the size after it too: the first
    row of the next pass, where the cost jumps. Everything is capped at max_tokens.
    """
    if min(max_num_seqs, max_tokens, row_quantum) < 1 or max_draft_tokens < 0:
        raise ValueError(
            "need max_num_seqs >= 1, max_tokens >= 1, row_quantum >= 1, max_draft_tokens >= 0"
        )
    sizes = {1 + k for k in range(max_draft_tokens + 1)}
    sizes.update(max_num_seqs * (1 + k) for k in range(max_draft_tokens + 1))
    p = 1
    while p <= max_tokens:
        sizes.add(p)
        p *= 2
    sizes.add(max_tokens)
    if row_quantum > 1:
        sizes.update([n + 1 for n in sizes if n % row_quantum == 0])
    return sorted(n for n in sizes if 1 <= n <= max_tokens)


def monotone_points(points: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
    """(num_tokens, step_time_s) -> (num_tokens, steps_per_second), SPS non-increasing in tokens.

    Duplicated sizes keep their median; step time becomes its running maximum over sizes.
    """
    by_size: dict[int, list[float]] = {}
    for n, t in points:
        if n < 1 or not t > 0 or not math.isfinite(t):
            raise ValueError(f"bad profile point ({n}, {t})")
        by_size.setdefault(int(n), []).append(float(t))
    out: list[tuple[int, float]] = []
    worst = 0.0
    for n in sorted(by_size):
        worst = max(worst, statistics.median(by_size[n]))
        out.append((n, 1.0 / worst))
    return out


def measure_profile(
    run_step: Callable[[int], float], sizes: Sequence[int], repeats: int = 5
) -> list[tuple[int, float]]:
    """Time `run_step(n)` (a real target step of n tokens, returns seconds) `repeats` times per
    size; return (n, step_time_s) points, the medians made non-decreasing in n: exactly what
    `ThroughputProfile.seed` takes.

    The median absorbs one warm-up outlier per size; callers that compile or capture graphs
    should warm up before calling.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    medians = []
    for n in sorted(set(sizes)):
        times = [run_step(n) for _ in range(repeats)]
        medians.append((n, max(statistics.median(times), 1e-9)))
    return [(n, 1.0 / sps) for n, sps in monotone_points(medians)]


def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear y(x); constant below xs[0], last segment's (non-negative) slope above."""
    if x <= xs[0] or len(xs) == 1:
        return ys[0] if x <= xs[0] else ys[-1]
    i = bisect.bisect_left(xs, x)
    if i == len(xs):
        slope = max(0.0, (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]))
        return ys[-1] + slope * (x - xs[-1])
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


class ThroughputProfile:
    """SPS(num_tokens) of the target step, seeded at start-up and tracked online.

    Before any seed or observation the curve is flat at 1 step/s: every step size costs the
    same, so a throughput-maximising policy verifies every draft it is offered.
    """

    def __init__(
        self, max_tokens: int, ema: float = 0.1, stale_after: int = 256, fold_every: int = 1
    ) -> None:
        """fold_every: observations folded into the curve together (`observe`)."""
        if not 0 < ema <= 1 or stale_after < 1 or fold_every < 1:
            raise ValueError("need 0 < ema <= 1, stale_after >= 1 and fold_every >= 1")
        self.max_tokens = max_tokens
        self.ema = ema
        self.stale_after = stale_after
        self.fold_every = fold_every
        self.num_observations = 0
        self._pending: list[tuple[int, float]] = []  # (num_tokens, step_time_s) not yet folded
        self._set_grid(bucket_sizes(max_tokens))
        self._log_t: list[float] | None = None  # log step time per bucket, non-decreasing
        self._view_t: list[float] = [1.0] * len(self._sizes)  # exp(_log_t), what lookups read

    def _set_grid(self, sizes: list[int]) -> None:
        self._sizes = sizes
        self._log2_sizes = [math.log2(n) for n in sizes]
        self._weights: dict[int, list[float]] = {}  # per observed size, see `_weights_at`
        # Per bucket, num_observations when it was last observed. A seeded price counts as
        # stale from the start: it is the median of three steps timed back to back, and one
        # served step at that size is worth more.
        self._seen_at = [self.num_observations - self.stale_after - 1] * len(sizes)

    def _weights_at(self, num_tokens: int) -> list[float]:
        """How much of an observation at num_tokens each bucket takes (module docstring). A
        function of the size alone, so computed once per size: `observe` runs every step."""
        weights = self._weights.get(num_tokens)
        if weights is None:
            where, local = math.log2(num_tokens), 1.0 - _GLOBAL_SHARE
            weights = [
                _GLOBAL_SHARE + local * math.exp(-abs(ls - where) / _KERNEL_OCTAVES)
                for ls in self._log2_sizes
            ]
            self._weights[num_tokens] = weights
        return weights

    @property
    def is_seeded(self) -> bool:
        return self._log_t is not None

    def seed(self, points: Sequence[tuple[int, float]], row_quantum: int = 1) -> None:
        """Replace the curve with start-up measurements: (num_tokens, step_time_s) pairs.

        row_quantum q: the weight kernel works on q rows at a time (torch's CPU int4 kernel
        dequantises the weights once per 4 rows), so the step time climbs in stairs: row
        q*m + 1 starts a pass that costs as much as a few rows inside it. A smooth curve
        through the measured 16 and 32 charged the 17th row 4 % of a step where it costs
        14 % (embedded model, 16 streams), and the policy verified drafts that lost
        throughput. With q > 1 the grid holds both sides of every stair up to the largest
        measured pass start: sizes q*m (pass ends) interpolated from the measured pass ends,
        sizes q*m + 1 from the measured pass starts, and lookups linear within a pass.
        """
        if not points:
            raise ValueError("seed needs at least one point")
        if row_quantum < 1:
            raise ValueError("row_quantum must be >= 1")
        self._pending.clear()  # misses against the curve being replaced
        sps = monotone_points(points)
        measured = {n: 1.0 / s for n, s in sps}
        grid = set(bucket_sizes(self.max_tokens)) | set(measured)
        starts = [n for n in measured if n % row_quantum == 1 % row_quantum]  # q = 1: all
        ends = [n for n in measured if n % row_quantum == 0] or sorted(measured)
        if row_quantum > 1 and len(starts) > 1:
            stairs = range(row_quantum, max(starts), row_quantum)
            grid |= {n + d for n in stairs for d in (0, 1)}

        def interpolated(n: int) -> float:
            if n in measured:
                return measured[n]
            family = starts if len(starts) > 1 and n % row_quantum == 1 else ends
            return _interp(family, [measured[m] for m in family], n)

        self._set_grid(sorted(grid))
        times = [interpolated(n) for n in self._sizes]
        for i in range(1, len(times)):  # the two families interleaved: keep it non-decreasing
            times[i] = max(times[i], times[i - 1])
        self._log_t = [math.log(t) for t in times]
        self._rebuild()

    def observe(self, num_tokens: int, step_time_s: float) -> None:
        """Take in one real step. Steps with no tokens or a non-positive time are ignored.

        Every `fold_every` observations their misses against the curve (which has not moved
        since the last fold) move it together (`_fold`): each size by the mean of its misses,
        with the weight of as many observations. A fold touches every bucket (~70 with the tile
        path's stairs), and with the caches cold after a forward it took 0.12-0.15 ms of
        every step (1.3 % of a step at one stream): folding four at a time pays it once in
        four. Lookups read the curve of the last fold, at most fold_every - 1 steps old."""
        if num_tokens < 1 or not step_time_s > 0 or not math.isfinite(step_time_s):
            return
        self.num_observations += 1
        if self._log_t is None:
            self.seed([(num_tokens, step_time_s)])
            return
        self._pending.append((num_tokens, step_time_s))
        if len(self._pending) >= self.fold_every:
            self._fold()

    def _fold(self) -> None:
        """Move the curve by the pending misses: per observed size, the mean miss times
        1 - (1 - ema)^count at full weight (`_weights_at` elsewhere), or `_STALE_EMA` at a
        size unobserved for `stale_after` observations; then monotone again around the
        observations (module docstring). One pending observation: exactly the single update."""
        assert self._log_t is not None
        by_size: dict[int, list[float]] = {}
        for n, step_time_s in self._pending:
            miss = math.log(step_time_s / _interp(self._sizes, self._view_t, n))
            by_size.setdefault(n, []).append(max(-_LOG_CLIP, min(_LOG_CLIP, miss)))
        self._pending.clear()
        log_t = list(self._log_t)
        net = 0.0
        for n, misses in by_size.items():
            miss = sum(misses) / len(misses)
            rate = 1.0 - (1.0 - self.ema) ** len(misses)
            weights = self._weights_at(n)
            log_t = [v + rate * miss * w for v, w in zip(log_t, weights)]
            for i in self._buckets_at(n):
                if self._is_stale(i):
                    log_t[i] += (_STALE_EMA - rate * weights[i]) * miss
                self._seen_at[i] = self.num_observations
            net += miss * len(misses)
        if net > 0:  # slower: nothing larger may now be faster than the observed size
            log_t = list(accumulate(log_t, max))
        else:  # faster: nothing smaller may stay slower than the observed size
            log_t = list(accumulate(reversed(log_t), min))[::-1]
        self._log_t = log_t
        self._rebuild()

    def _is_stale(self, bucket: int) -> bool:
        return self.num_observations - self._seen_at[bucket] > self.stale_after

    def _buckets_at(self, num_tokens: int) -> list[int]:
        """The buckets a step of num_tokens prices: its own, or the two it lies between."""
        i = bisect.bisect_left(self._sizes, num_tokens)
        if i < len(self._sizes) and self._sizes[i] == num_tokens:
            return [i]
        return [j for j in (i - 1, i) if 0 <= j < len(self._sizes)]

    def stale_size(self, above: int, up_to: int) -> int | None:
        """Of the bucket sizes in (above, up_to] unobserved for more than `stale_after`
        observations (since the seed, if they never were), the one unobserved the longest
        (the smallest of those); None if there is none."""
        lo = bisect.bisect_right(self._sizes, above)
        hi = bisect.bisect_right(self._sizes, up_to)
        oldest = min(range(lo, hi), key=self._seen_at.__getitem__, default=None)
        if oldest is None or not self._is_stale(oldest):
            return None
        return self._sizes[oldest]

    def _rebuild(self) -> None:
        assert self._log_t is not None
        self._view_t = list(map(math.exp, self._log_t))

    def step_time(self, num_tokens: int) -> float:
        """Predicted seconds for one step of `num_tokens` tokens (non-decreasing in tokens)."""
        return _interp(self._sizes, self._view_t, max(1, num_tokens))

    def steps_per_second(self, num_tokens: int) -> float:
        return 1.0 / self.step_time(num_tokens)

    def table(self) -> list[tuple[int, float]]:
        """(num_tokens, steps_per_second) at every bucket, for /metrics."""
        return [(n, 1.0 / t) for n, t in zip(self._sizes, self._view_t)]


class RunningRate:
    """Tokens per second the engine made over its recent decode steps: the lambda of the verify
    policies' step value (verify_policy.step_value).

    A ratio of forgotten sums, sum(tokens) / sum(seconds), each multiplied by `decay` per step,
    so a step counts by its length in time (a long step moves the rate more than a short one)
    and the memory is ~1 / (1 - decay) steps. Only steps whose every request decodes are folded
    in: a prompt chunk's time is work the engine owes whatever it verifies, not time a draft
    could have been made in. None until `min_seconds` of such steps were seen.
    """

    def __init__(self, decay: float = 0.98, min_seconds: float = 0.05) -> None:
        if not 0 < decay <= 1 or min_seconds < 0:
            raise ValueError("need 0 < decay <= 1 and min_seconds >= 0")
        self.decay = decay
        self.min_seconds = min_seconds
        self._tokens = 0.0
        self._seconds = 0.0
        self._seen = 0.0  # unforgotten seconds, for the warm-up threshold

    def observe(self, num_tokens: int, step_time_s: float) -> None:
        if num_tokens < 0 or not step_time_s > 0 or not math.isfinite(step_time_s):
            return
        self._tokens = self.decay * self._tokens + num_tokens
        self._seconds = self.decay * self._seconds + step_time_s
        self._seen += step_time_s

    @property
    def value(self) -> float | None:
        if self._seen < self.min_seconds or self._seconds <= 0:
            return None
        return self._tokens / self._seconds
