"""Point summaries, saturation checks, frontier interpolation and matched speedup."""

from __future__ import annotations

import numpy as np
import pytest

from loadtest.analysis import (
    Frontier,
    PointSummary,
    Slo,
    matched_speedup,
    max_goodput_rate,
    non_increasing,
    summarize_point,
)
from loadtest.records import StreamRecord
from loadtest.sweep import config_args, saturated


def synth(
    rate: float, seconds: float, ttft: float, tpot: float, tokens: int, ttft_slope: float = 0.0
) -> list[StreamRecord]:
    """Open-loop records: arrival k at k/rate, first token after ttft (+ slope x arrival),
    then one token per tpot, each in its own chunk."""
    out = []
    for k in range(int(rate * seconds)):
        t0 = k / rate
        first = t0 + ttft + ttft_slope * t0
        chunks = [first + i * tpot for i in range(tokens)]
        out.append(
            StreamRecord(
                "p",
                "chat",
                t_start=t0,
                t_sched=t0,
                t_end=chunks[-1],
                chunk_times=chunks,
                chunk_chars=[2] * tokens,
                output_tokens=tokens,
                saw_done=True,
                spec={"num_drafts": 4, "num_draft_tokens": 8, "num_accepted_tokens": 6},
            )
        )
    return out


def test_steady_point_matches_the_offered_load() -> None:
    recs = synth(rate=2.0, seconds=60, ttft=0.3, tpot=0.05, tokens=21)
    p = summarize_point(
        recs,
        config="c",
        offered_rps=2.0,
        warmup_s=10,
        duration_s=40,
        slo=Slo(ttft_s=0.5, tpot_s=0.1),
    )
    assert not p.saturated, p.reasons
    assert p.n_arrived == 80 and p.n_ok == 80
    assert p.sent_rps == pytest.approx(2.0)
    assert p.achieved_rps == pytest.approx(2.0, abs=0.03)
    assert p.agg_tok_s == pytest.approx(2.0 * 21, rel=0.02)
    assert p.per_user_tok_s == pytest.approx(20.0)
    assert p.ttft_s["p50"] == pytest.approx(0.3) and p.tpot_s["p99"] == pytest.approx(0.05)
    assert p.goodput_rps == pytest.approx(2.0) and p.slo_attainment == 1.0
    assert p.mean_acceptance_length == pytest.approx(2.5) and p.acceptance_rate == 0.75
    assert p.ttft_slope == pytest.approx(0.0, abs=1e-9)


def test_slo_misses_reduce_goodput() -> None:
    recs = synth(rate=2.0, seconds=60, ttft=0.3, tpot=0.2, tokens=5)
    p = summarize_point(
        recs,
        config="c",
        offered_rps=2.0,
        warmup_s=10,
        duration_s=40,
        slo=Slo(ttft_s=0.5, tpot_s=0.1),
    )
    assert p.goodput_rps == 0.0 and p.slo_attainment == 0.0


def test_growing_queue_is_flagged_saturated() -> None:
    # Each request waits 0.5 s longer per second of run (offered = 1.5 x capacity).
    recs = synth(rate=2.0, seconds=60, ttft=0.3, tpot=0.05, tokens=21, ttft_slope=0.5)
    p = summarize_point(recs, config="c", offered_rps=2.0, warmup_s=10, duration_s=40)
    assert p.saturated
    assert any("completed" in r for r in p.reasons)
    assert any("TTFT grew" in r for r in p.reasons)
    assert p.ttft_slope == pytest.approx(0.5)


def test_generator_lag_is_flagged() -> None:
    recs = synth(rate=2.0, seconds=60, ttft=0.3, tpot=0.05, tokens=21)
    for r in recs[::2]:  # half the requests left 30 s late (pool exhausted)
        r.t_start += 30
        r.chunk_times = [t + 30 for t in r.chunk_times]
        r.t_end = (r.t_end or 0) + 30
    p = summarize_point(recs, config="c", offered_rps=2.0, warmup_s=10, duration_s=40)
    assert p.saturated and any("generator" in r for r in p.reasons)
    assert p.lag_p99_s == pytest.approx(30.0)


def point(x: float, y: float, saturated: bool = False, rate: float = 1.0) -> PointSummary:
    nan = {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    return PointSummary(
        "c",
        rate,
        10,
        10,
        10,
        0,
        rate,
        rate,
        x,
        x,
        y,
        y,
        10,
        nan,
        nan,
        nan,
        nan,
        rate,
        1.0,
        0.0,
        1.0,
        None,
        None,
        saturated,
    )


def test_frontier_interpolates_linearly_and_refuses_extrapolation() -> None:
    f = Frontier.from_points(
        [point(300, 10), point(100, 30), point(200, 20), point(400, 5, saturated=True)]
    )
    assert list(f.x) == [100, 200, 300]
    assert f.at(150) == pytest.approx(25.0)
    assert f.at(100) == 30 and f.at(300) == 10
    assert f.at(99) is None and f.at(350) is None


def test_non_increasing_fit() -> None:
    assert non_increasing([10, 12, 8, 9, 5], [1] * 5) == pytest.approx([11, 11, 8.5, 8.5, 5])
    assert non_increasing([10, 12], [3, 1]) == pytest.approx([10.5, 10.5])
    assert non_increasing([3, 2, 1], [1, 1, 1]) == [3, 2, 1]  # already monotone: unchanged


def test_frontier_fit_smooths_a_noisy_point_but_keeps_the_measurement() -> None:
    pts = [point(100, 20), point(200, 24), point(300, 10)]
    pts[0].n_ok = 5  # the low-load point has few requests, so the bump is averaged towards it
    pts[1].n_ok = 15
    f = Frontier.from_points(pts)
    assert list(f.measured) == [20, 24, 10]
    assert list(f.y) == pytest.approx([23, 23, 10])
    assert list(Frontier.from_points(pts, fit=False).y) == [20, 24, 10]


def test_matched_speedup_on_synthetic_frontiers() -> None:
    # Baseline: per-user = 60 - x/10 sampled at 5 points; candidate: exactly 1.8x that line,
    # sampled at different throughputs and reaching further. On the common range the
    # interpolated ratio must be 1.8 wherever both are linear between samples.
    bx = np.array([50, 150, 250, 350, 450])
    cx = np.array([60, 160, 300, 420, 600])
    base = Frontier(bx.astype(float), 60 - bx / 10)
    cand = Frontier(cx.astype(float), 1.8 * (60 - cx / 10))
    m = matched_speedup(base, cand, baseline="none", candidate="dspark", n=11)
    assert m is not None
    assert m.x[0] == 60 and m.x[-1] == 450  # common range only
    assert m.ratio == pytest.approx([1.8] * 11)
    assert m.stats()["min"] == pytest.approx(1.8)


def test_matched_speedup_varies_along_the_range() -> None:
    base = Frontier(np.array([0.0, 100.0]), np.array([50.0, 25.0]))
    cand = Frontier(np.array([0.0, 100.0]), np.array([100.0, 25.0]))
    m = matched_speedup(base, cand, baseline="b", candidate="c", n=3)
    assert m is not None and m.ratio == pytest.approx([2.0, 62.5 / 37.5, 1.0])


def test_no_overlap_or_too_few_points() -> None:
    a = Frontier(np.array([1.0, 2.0]), np.array([5.0, 4.0]))
    assert (
        matched_speedup(
            a, Frontier(np.array([3.0, 4.0]), np.array([5.0, 4.0])), baseline="a", candidate="b"
        )
        is None
    )
    assert (
        matched_speedup(a, Frontier(np.array([1.5]), np.array([5.0])), baseline="a", candidate="b")
        is None
    )


def test_max_goodput_rate() -> None:
    pts = [point(1, 1, rate=1.0), point(2, 1, rate=2.0), point(3, 1, rate=3.0, saturated=True)]
    pts[1].slo_attainment = 0.95
    pts[0].slo_attainment = 0.99
    assert max_goodput_rate(pts) == 2.0
    pts[1].slo_attainment = 0.5
    assert max_goodput_rate(pts) == 1.0


def test_config_presets() -> None:
    assert config_args("none") == ("none", ["--speculative", "none", "--verify-policy", "none"])
    assert config_args("fixed4", drafter="dflash") == (
        "fixed4",
        ["--speculative", "dflash", "--verify-policy", "fixed", "--num-speculative-tokens", "4"],
    )
    assert config_args("dspark", k=7)[1][-2:] == ["--num-speculative-tokens", "7"]
    assert config_args("eagle3-dspark")[1][:4] == [
        "--speculative",
        "eagle3",
        "--verify-policy",
        "dspark",
    ]
    assert config_args("ngram-fixed3")[1][-1] == "3"
    # a bare drafter name verifies every draft, whatever the server's default policy is
    assert config_args("ngram") == ("ngram", ["--speculative", "ngram", "--verify-policy", "fixed"])
    assert config_args("mine=--speculative ngram --x 1") == (
        "mine",
        ["--speculative", "ngram", "--x", "1"],
    )
    with pytest.raises(ValueError):
        config_args("turbo")


def test_probe_stops_after_two_flat_doublings() -> None:
    assert not saturated([17.0, 38.0, 56.0])
    assert not saturated([17.0, 38.0, 37.0])  # one flat stage may be noise
    assert saturated([17.0, 38.0, 37.0, 40.0])  # 40 < 1.1 x 38: still flat
    assert not saturated([17.0, 38.0, 37.0, 56.0])  # it grew again
    assert saturated([80.0, 149.0, 258.0, 388.0, 400.0, 399.0])
