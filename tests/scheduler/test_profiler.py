"""Throughput profile: start-up measurement, monotone curve, online tracking of the device."""

from __future__ import annotations

import math
import random
from itertools import pairwise

import pytest

from scheduler.profiler import (
    RunningRate,
    ThroughputProfile,
    bucket_sizes,
    default_profile_sizes,
    measure_profile,
    monotone_points,
)


def linear_cost(n: int) -> float:
    """A device whose step costs 10 ms plus 0.2 ms per token."""
    return 0.010 + 0.0002 * n


def assert_non_increasing(profile: ThroughputProfile, upto: int) -> None:
    sps = [profile.steps_per_second(n) for n in range(1, upto + 1)]
    assert all(b <= a for a, b in pairwise(sps)), "SPS must not increase with tokens"


def test_bucket_grid_is_fine_where_small_and_ends_at_budget() -> None:
    sizes = bucket_sizes(2048)
    assert sizes[:8] == list(range(1, 9))
    assert {16, 64, 120, 128, 192, 256, 384, 1536, 2048} <= set(sizes)
    assert 200 not in sizes and sizes == sorted(set(sizes)) and sizes[-1] == 2048
    assert bucket_sizes(100)[-1] == 100 and max(bucket_sizes(5)) == 5


def test_default_profile_sizes_cover_single_stream_and_full_batch() -> None:
    sizes = default_profile_sizes(max_num_seqs=16, max_draft_tokens=7, max_tokens=512)
    assert set(range(1, 9)) <= set(sizes)  # one stream verifying 0..7 drafts
    assert {16 * (1 + k) for k in range(8)} <= set(sizes)  # full batch, every verify length
    assert 512 in sizes and max(sizes) == 512 and sizes == sorted(set(sizes))
    capped = default_profile_sizes(max_num_seqs=64, max_draft_tokens=7, max_tokens=100)
    assert max(capped) == 100 and 128 not in capped


def stairs_cost(n: int) -> float:
    """A kernel that dequantises the weights once per 4 rows (torch's CPU int4 kernel): each
    pass of 4 rows costs 5.5 ms, each row 0.3 ms more."""
    return 0.0145 + 0.0055 * -(-n // 4) + 0.0003 * n


def test_default_profile_sizes_measure_both_sides_of_each_stair() -> None:
    sizes = set(default_profile_sizes(16, 7, 512, row_quantum=4))
    assert {16, 17, 32, 33, 128, 129, 256, 257, 9} <= sizes  # every pass end, and the next row
    assert set(default_profile_sizes(16, 7, 512)) < sizes


def test_a_profile_seeded_with_the_row_quantum_keeps_the_stairs() -> None:
    """Measured only where the engine measures, the profile predicts every step size of a
    stairs-shaped device within 2 % up to the largest measured pass; without the quantum it
    smooths the 17th row's jump to under a third."""
    sizes = default_profile_sizes(16, 7, 512, row_quantum=4)
    stairs = ThroughputProfile(512)
    stairs.seed([(n, stairs_cost(n)) for n in sizes], row_quantum=4)
    for n in range(1, 130):
        assert stairs.step_time(n) == pytest.approx(stairs_cost(n), rel=0.02), n
    jump = stairs_cost(17) / stairs_cost(16) - 1
    assert stairs.step_time(17) / stairs.step_time(16) - 1 == pytest.approx(jump, rel=0.02)
    smooth = ThroughputProfile(512)
    smooth.seed([(n, stairs_cost(n)) for n in default_profile_sizes(16, 7, 512)])
    assert smooth.step_time(17) / smooth.step_time(16) - 1 < jump / 3
    assert_non_increasing(stairs, 512)


def test_measure_profile_takes_median_of_repeats_and_makes_it_monotone() -> None:
    calls: list[int] = []
    rng = random.Random(0)

    def run_step(n: int) -> float:
        calls.append(n)
        # First call per size is a 50x warm-up outlier; size 32 is measured faster than 16.
        slow = 50.0 if calls.count(n) == 1 else 1.0
        base = linear_cost(8) if n == 32 else linear_cost(n)
        return base * slow * rng.uniform(0.99, 1.01)

    points = measure_profile(run_step, [16, 1, 32, 16], repeats=5)
    assert sorted(set(calls)) == [1, 16, 32] and len(calls) == 15
    sizes = [n for n, _ in points]
    times = [t for _, t in points]
    assert sizes == [1, 16, 32]
    assert times[0] == pytest.approx(linear_cost(1), rel=0.02)  # outlier ignored
    assert times[2] >= times[1]  # the fast 32 was clamped to 16's time
    # The points seed a profile directly (step times in, steps per second out).
    profile = ThroughputProfile(64)
    profile.seed(points)
    assert profile.steps_per_second(16) == pytest.approx(1 / linear_cost(16), rel=0.02)
    with pytest.raises(ValueError):
        measure_profile(run_step, [1], repeats=0)


def test_monotone_points_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        monotone_points([(4, 0.0)])
    with pytest.raises(ValueError):
        monotone_points([(0, 0.1)])


def test_seeded_curve_interpolates_and_is_monotone() -> None:
    profile = ThroughputProfile(max_tokens=512)
    profile.seed([(n, linear_cost(n)) for n in (1, 8, 64, 256)])
    # Linear in step time between measured sizes, so a linear device is reproduced exactly.
    for n in (1, 5, 8, 40, 100, 256, 300, 512):
        assert profile.step_time(n) == pytest.approx(linear_cost(n), rel=1e-9)
    assert_non_increasing(profile, 600)
    table = profile.table()
    assert [n for n, _ in table] == sorted({*bucket_sizes(512), 1, 8, 64, 256})
    assert all(s == pytest.approx(1 / linear_cost(n)) for n, s in table)


def test_unseeded_profile_is_flat_until_the_first_observation() -> None:
    profile = ThroughputProfile(max_tokens=64)
    assert not profile.is_seeded
    assert profile.steps_per_second(1) == profile.steps_per_second(64) == 1.0
    profile.observe(8, 0.02)
    assert profile.is_seeded and profile.steps_per_second(8) == pytest.approx(50.0)


def test_observe_tracks_a_slower_device_and_stays_monotone() -> None:
    profile = ThroughputProfile(max_tokens=512, ema=0.1)
    profile.seed([(n, linear_cost(n)) for n in (1, 8, 32, 64, 128, 256, 512)])
    before = {n: profile.steps_per_second(n) for n in (1, 32, 40, 64, 512)}
    rng = random.Random(1)
    for _ in range(200):  # co-located load: the device is now 2x slower at the sizes served
        n = rng.choice([32, 40, 48, 64])
        profile.observe(n, 2 * linear_cost(n) * rng.uniform(0.95, 1.05))
        assert_non_increasing(profile, 520)
    assert profile.num_observations == 200
    for n in (32, 40, 64):
        assert profile.steps_per_second(n) == pytest.approx(before[n] / 2, rel=0.05)
    # Far-away sizes move less than the observed ones, but in the same direction.
    assert before[1] / 2 < profile.steps_per_second(1) < before[1]
    assert profile.steps_per_second(512) < before[512]


def test_observe_is_robust_to_an_outlier_and_ignores_invalid_steps() -> None:
    profile = ThroughputProfile(max_tokens=256, ema=0.1)
    profile.seed([(n, linear_cost(n)) for n in (1, 16, 256)])
    # The seed's price is stale: the first step served at 16 tokens takes half its error, but
    # the error is clipped at 2x.
    profile.observe(16, 100 * linear_cost(16))  # a GC pause
    assert profile.steps_per_second(16) == pytest.approx(1 / linear_cost(16) / 2**0.5)
    profile.observe(16, linear_cost(16))
    before = profile.steps_per_second(16)
    profile.observe(16, 100 * linear_cost(16))  # a fresh price moves by ema x log 2 at most
    assert profile.steps_per_second(16) > 0.93 * before
    profile.observe(0, 1.0)
    profile.observe(16, 0.0)
    profile.observe(16, float("nan"))
    assert profile.num_observations == 3


def test_observe_tracks_a_faster_device() -> None:
    profile = ThroughputProfile(max_tokens=128, ema=0.2)
    profile.seed([(n, linear_cost(n)) for n in (1, 8, 128)])
    for _ in range(100):
        profile.observe(8, 0.5 * linear_cost(8))
    assert profile.steps_per_second(8) == pytest.approx(2 / linear_cost(8), rel=0.02)
    assert_non_increasing(profile, 130)


def test_constructor_validates() -> None:
    with pytest.raises(ValueError):
        ThroughputProfile(max_tokens=0)
    with pytest.raises(ValueError):
        ThroughputProfile(max_tokens=8, ema=0.0)


def test_running_rate_is_a_ratio_of_forgotten_sums() -> None:
    rate = RunningRate(decay=0.5, min_seconds=0.1)
    assert rate.value is None
    rate.observe(1, 0.05)
    assert rate.value is None  # under min_seconds of steps seen
    rate.observe(3, 0.05)  # (0.5 x 1 + 3) / (0.5 x 0.05 + 0.05)
    assert rate.value == pytest.approx(3.5 / 0.075)
    rate.observe(5, 0.0)  # no time: ignored
    rate.observe(5, float("nan"))
    assert rate.value == pytest.approx(3.5 / 0.075)
    for _ in range(60):  # the old steps fade: the rate follows the new one
        rate.observe(2, 0.1)
    assert rate.value == pytest.approx(20.0)


def test_a_price_unobserved_for_long_is_stale_until_a_step_at_its_size() -> None:
    profile = ThroughputProfile(max_tokens=64, stale_after=10)
    profile.seed([(n, linear_cost(n)) for n in (1, 8, 64)])
    # Seeded prices are stale from the start; the one unobserved the longest comes first,
    # the smallest of equals.
    assert profile.stale_size(1, 8) == 2
    assert profile.stale_size(1, 1) is None
    profile.observe(2, linear_cost(2))
    profile.observe(5, linear_cost(5))
    assert profile.stale_size(1, 8) == 3
    assert profile.stale_size(4, 5) is None  # 5 was just observed
    for _ in range(10):
        profile.observe(3, linear_cost(3))
    assert profile.stale_size(2, 8) == 4
    assert profile.stale_size(1, 2) == 2  # 11 observations since 2 was: stale again,
    assert profile.stale_size(4, 5) is None  # and 5 is not yet (10)
    # A step between two buckets refreshes both: 44 lies between 40 and 48.
    profile.observe(44, linear_cost(44))
    assert profile.stale_size(39, 48) is None
    assert profile.stale_size(31, 48) == 32


def test_a_step_at_a_stale_size_moves_its_price_half_way() -> None:
    stale, fresh = ThroughputProfile(64, stale_after=5), ThroughputProfile(64, stale_after=5)
    for profile in (stale, fresh):
        profile.seed([(n, linear_cost(n)) for n in (1, 8, 64)])
    fresh.observe(4, linear_cost(4))
    for profile in (stale, fresh):
        profile.observe(4, 0.6 * linear_cost(4))  # the seed had caught a slow spell
    assert stale.step_time(4) == pytest.approx(linear_cost(4) * 0.6**0.5)
    assert fresh.step_time(4) == pytest.approx(linear_cost(4) * 0.6**0.1)
    assert_non_increasing(stale, 70)


def test_observations_folded_together_move_the_curve_as_their_mean_would() -> None:
    """Four steps folded at once (what the engine does): the curve holds until the fourth, then
    moves as one observation of their mean miss with the weight of four."""
    points = [(n, 0.010 + 0.001 * n) for n in (1, 2, 4, 8, 16, 32)]
    folded = ThroughputProfile(64, ema=0.1, fold_every=4)
    single = ThroughputProfile(64, ema=1 - 0.9**4)
    for p in (folded, single):
        p.seed(points)
    before = folded.table()
    for t in (0.030, 0.034, 0.032):
        folded.observe(8, t)
        assert folded.table() == before  # not folded yet
    folded.observe(8, 0.036)
    mean_miss = sum(math.log(t / 0.018) for t in (0.030, 0.034, 0.032, 0.036)) / 4
    single.observe(8, 0.018 * math.exp(mean_miss))
    assert [n for n, _ in folded.table()] == [n for n, _ in single.table()]
    assert [v for _, v in folded.table()] == pytest.approx([v for _, v in single.table()], rel=1e-9)
    assert folded.step_time(8) > 0.018  # slower steps raised it


def test_a_folded_profile_follows_a_device_that_slowed_down() -> None:
    profile = ThroughputProfile(64, fold_every=4)
    profile.seed([(n, 0.010 + 0.001 * n) for n in (1, 2, 4, 8, 16, 32)])
    for i in range(200):
        n = (1, 8, 16)[i % 3]
        profile.observe(n, 2 * (0.010 + 0.001 * n))
    for n in (1, 8, 16):
        assert profile.step_time(n) == pytest.approx(2 * (0.010 + 0.001 * n), rel=0.05)
