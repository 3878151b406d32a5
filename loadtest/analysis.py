"""From per-request records to load points, frontiers and the matched-throughput comparison.

Pure Python + numpy; no Locust, no plotting. Method (see loadtest/README.md):

- A point is one offered rate for one configuration. Only requests that *arrived* inside the
  measurement window [warmup, warmup + duration) count for latencies; aggregate tokens/s counts
  tokens *emitted* inside the window, whoever asked for them, so it is right whether or not the
  server keeps up.
- A point is saturated when the load did not really match: the generator sent fewer requests
  than offered, fewer completed than offered, fewer tokens came out than requested, TTFT grew
  through the window (a queue building up: slope above the tolerance), or requests failed. Saturated points are plotted
  hollow and left out of the matched comparison.
- Frontier: per-user tokens/s (1 / median TPOT) against aggregate tokens/s over the unsaturated
  points, fitted by a non-increasing curve (weighted by request count), piecewise-linear. Matched speedup at aggregate throughput X = candidate per-user speed
  at X / baseline per-user speed at X, on the range both frontiers cover.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.records import StreamRecord, record_from_json, token_times


@dataclass(frozen=True, slots=True)
class Slo:
    """Latency target for goodput: a request is good if both hold."""

    ttft_s: float = 2.0
    tpot_s: float = 0.1


@dataclass
class PointSummary:
    config: str
    offered_rps: float
    window_s: float
    n_arrived: int  # requests scheduled inside the window
    n_ok: int
    n_failed: int
    sent_rps: float  # requests actually started inside the window, per second
    achieved_rps: float  # requests completed inside the window, per second
    agg_tok_s: float  # output tokens emitted inside the window, per second
    offered_tok_s: float  # offered_rps x mean output tokens
    per_user_tok_s: float  # 1 / median TPOT
    per_user_tok_s_mean: float
    mean_output_tokens: float
    ttft_s: dict[str, float]  # p50, p90, p99
    tpot_s: dict[str, float]
    e2e_s: dict[str, float]
    itl_s: dict[str, float]
    goodput_rps: float
    slo_attainment: float
    lag_p99_s: float
    ttft_slope: float  # d TTFT / d arrival time: about offered / capacity - 1 when overloaded
    acceptance_rate: float | None
    mean_acceptance_length: float | None
    saturated: bool
    reasons: list[str] = field(default_factory=list)
    server: dict[str, float] = field(default_factory=dict)  # counter deltas over the run
    host_load: float | None = None  # 1-minute load average when the point finished

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PointSummary:
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in known})  # tolerate added fields


def read_records(path: Path) -> tuple[dict[str, Any], list[StreamRecord]]:
    """The `meta` line and the records of a `--records-file`."""
    meta: dict[str, Any] = {}
    recs: list[StreamRecord] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            if "meta" in d:
                meta = d["meta"]
            else:
                recs.append(record_from_json(d))
    return meta, recs


def pct(values: Sequence[float], qs: Iterable[int] = (50, 90, 99)) -> dict[str, float]:
    if not values:
        return {f"p{q}": float("nan") for q in qs}
    arr = np.asarray(values, dtype=float)
    return {f"p{q}": float(np.percentile(arr, q)) for q in qs}


def summarize_point(
    records: Sequence[StreamRecord],
    *,
    config: str,
    offered_rps: float,
    warmup_s: float,
    duration_s: float,
    slo: Slo = Slo(),
    tol: float = 0.1,
) -> PointSummary:
    """Summarize one open-loop run. Record times are seconds since the schedule started."""
    lo, hi = warmup_s, warmup_s + duration_s

    def arrival(r: StreamRecord) -> float:
        return r.t_sched if r.t_sched is not None else r.t_start

    window = [r for r in records if lo <= arrival(r) < hi]
    ok = [r for r in window if r.ok]
    failed = len(window) - len(ok)
    started = sum(1 for r in records if lo <= r.t_start < hi)
    completed = sum(1 for r in records if r.ok and r.t_end is not None and lo <= r.t_end < hi)
    tokens = sum(n for r in records if r.ok for t, n in token_times(r) if lo <= t < hi)
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    tpots = [r.tpot for r in ok if r.tpot]
    e2es = [r.e2e for r in ok if r.e2e is not None]
    itls = [g for r in ok for g in r.itl]
    mean_tokens = float(np.mean([r.n_tokens for r in ok])) if ok else 0.0
    good = [r for r in ok if (r.ttft or 0) <= slo.ttft_s and (r.tpot or 0) <= slo.tpot_s]

    # Queue growth: when arrivals outpace the server (rate lambda, capacity mu) the wait grows
    # linearly, by lambda/mu - 1 seconds per second. The least-squares slope of TTFT against
    # arrival time estimates that overload; a stable server keeps it near 0.
    slope = float("nan")
    if len(ok) >= 4:
        xs = np.array([arrival(r) for r in ok])
        if np.ptp(xs) > 0:
            slope = float(np.polyfit(xs, np.array([r.ttft for r in ok]), 1)[0])

    drafts = sum((r.spec or {}).get("num_drafts", 0.0) for r in ok)
    draft_tokens = sum((r.spec or {}).get("num_draft_tokens", 0.0) for r in ok)
    accepted = sum((r.spec or {}).get("num_accepted_tokens", 0.0) for r in ok)

    expected = offered_rps * duration_s  # arrivals the schedule offered in the window
    # Counts are small in short runs; allow one request of slack on top of the tolerance.
    floor = (1 - tol) * expected - 1
    reasons = []
    if started < floor:
        reasons.append(f"sent {started} of {expected:.0f} offered (generator pool exhausted)")
    if completed < floor:
        reasons.append(f"completed {completed} of {expected:.0f} offered in the window")
    if mean_tokens and tokens < (1 - tol) * offered_rps * mean_tokens * duration_s - mean_tokens:
        reasons.append("tokens emitted below offered tokens")
    if slope > tol and slope * duration_s > 0.25:
        reasons.append(f"TTFT grew {slope:.2f} s per s through the window (queue building up)")
    if failed > max(1, 0.01 * len(window)):
        reasons.append(f"{failed} failed requests")
    if not ok:
        reasons.append("no successful requests")

    median_tpot = float(np.median(tpots)) if tpots else float("nan")
    return PointSummary(
        config=config,
        offered_rps=offered_rps,
        window_s=duration_s,
        n_arrived=len(window),
        n_ok=len(ok),
        n_failed=failed,
        sent_rps=started / duration_s,
        achieved_rps=completed / duration_s,
        agg_tok_s=tokens / duration_s,
        offered_tok_s=offered_rps * mean_tokens,
        per_user_tok_s=1.0 / median_tpot if tpots else 0.0,
        per_user_tok_s_mean=float(np.mean([1.0 / t for t in tpots])) if tpots else 0.0,
        mean_output_tokens=mean_tokens,
        ttft_s=pct(ttfts),
        tpot_s=pct(tpots),
        e2e_s=pct(e2es),
        itl_s=pct(itls),
        goodput_rps=len(good) / duration_s,
        slo_attainment=len(good) / len(window) if window else 0.0,
        lag_p99_s=pct([r.lag for r in window], (99,))["p99"] if window else 0.0,
        ttft_slope=slope,
        acceptance_rate=accepted / draft_tokens if draft_tokens else None,
        mean_acceptance_length=1 + accepted / drafts if drafts else None,
        saturated=bool(reasons),
        reasons=reasons,
    )


# -- frontiers and matched comparison --------------------------------------------------------


def non_increasing(y: Sequence[float], w: Sequence[float]) -> list[float]:
    """Weighted least-squares fit of `y` by a non-increasing sequence (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [value, weight, count]
    for yi, wi in zip(y, w):
        blocks.append([float(yi), float(wi), 1])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            v2, w2, c2 = blocks.pop()
            v1, w1, c1 = blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
    return [v for v, _, c in blocks for _ in range(int(c))]


@dataclass(frozen=True)
class Frontier:
    """Unsaturated (aggregate tok/s, per-user tok/s) points of one configuration, sorted by x.

    `y` is the fitted frontier: per-user speed cannot rise with load in a batching server, so the
    measured speeds (`raw`) are fitted by a non-increasing curve, each point weighted by its
    request count. This keeps a noisy low-load point (few requests, a busy host) from bending
    the comparison, as DeepSeek compare on fitted frontiers rather than raw telemetry.
    """

    x: np.ndarray
    y: np.ndarray
    raw: np.ndarray | None = None

    @classmethod
    def from_points(cls, points: Sequence[PointSummary], fit: bool = True) -> Frontier:
        good = sorted(
            (p.agg_tok_s, p.per_user_tok_s, max(p.n_ok, 1)) for p in points if not p.saturated
        )
        arr = np.asarray(good, dtype=float).reshape(-1, 3)
        x, raw, w = arr[:, 0], arr[:, 1], arr[:, 2]
        y = np.array(non_increasing(raw.tolist(), w.tolist())) if fit else raw
        return cls(x, y, raw)

    @property
    def measured(self) -> np.ndarray:
        return self.y if self.raw is None else self.raw

    def at(self, x: float) -> float | None:
        """Per-user speed at aggregate throughput `x`, linear between points, None outside."""
        if len(self.x) == 0 or x < self.x[0] or x > self.x[-1]:
            return None
        return float(np.interp(x, self.x, self.y))


@dataclass
class Matched:
    """Candidate vs baseline per-user speed at equal aggregate throughput."""

    baseline: str
    candidate: str
    x: list[float]  # aggregate tok/s grid over the common range
    base: list[float]
    cand: list[float]

    @property
    def ratio(self) -> list[float]:
        return [c / b for b, c in zip(self.base, self.cand)]

    def stats(self) -> dict[str, float]:
        r = self.ratio
        return {
            "min": min(r),
            "median": float(np.median(r)),
            "max": max(r),
            "x_lo": self.x[0],
            "x_hi": self.x[-1],
        }


def matched_speedup(
    base: Frontier, cand: Frontier, *, baseline: str, candidate: str, n: int = 25
) -> Matched | None:
    """Speedup on `n` evenly spaced throughputs where both frontiers exist; None if they don't
    overlap (needs at least two unsaturated points each)."""
    if len(base.x) < 2 or len(cand.x) < 2:
        return None
    lo, hi = max(base.x[0], cand.x[0]), min(base.x[-1], cand.x[-1])
    if hi <= lo:
        return None
    xs = np.linspace(lo, hi, n)
    b = [base.at(float(x)) for x in xs]
    c = [cand.at(float(x)) for x in xs]
    return Matched(
        baseline,
        candidate,
        [float(x) for x in xs],
        [float(v) for v in b if v is not None],
        [float(v) for v in c if v is not None],
    )


def max_goodput_rate(points: Sequence[PointSummary], attainment: float = 0.9) -> float:
    """DistServe-style goodput: the highest offered rate whose SLO attainment is >= target
    (0 when none meets it)."""
    ok = [p.offered_rps for p in points if p.slo_attainment >= attainment and not p.saturated]
    return max(ok, default=0.0)
