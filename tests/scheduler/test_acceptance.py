"""Online acceptance estimator: convergence, censoring, forgetting, calibration, exactness."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import pytest

from scheduler.acceptance import OnlineAcceptanceEstimator
from scheduler.verify_policy import DSparkPolicy

GAMMA = 7


def true_rate(position: int, feature: float | None) -> float:
    """Synthetic conditional acceptance: rises with the draft's confidence, falls with depth."""
    if feature is None:
        return 0.5
    return 0.3 + 0.65 * feature - 0.03 * position


def verify(rng: random.Random, features: Sequence[float | None], num_verified: int) -> int:
    """Bernoulli verification: number of leading drafts accepted out of num_verified."""
    for j in range(num_verified):
        if rng.random() >= true_rate(j, features[j]):
            return j
    return num_verified


def test_cold_start_returns_the_prior() -> None:
    est = OnlineAcceptanceEstimator(prior_mean=0.6)
    assert est.confidences([0.05, None, 0.99, 0.5]) == pytest.approx([0.6] * 4)
    assert est.confidences([]) == [] and est.calibration() == []


def test_converges_to_true_rates_under_random_verify_lengths() -> None:
    rng = random.Random(11)
    est = OnlineAcceptanceEstimator(num_bins=10, decay=1.0)
    tested: dict[tuple[int, int], int] = {}
    for _ in range(30_000):
        features: list[float | None] = [rng.random() for _ in range(GAMMA)]
        num_verified = rng.randint(0, GAMMA)  # the scheduler's choice, independent of outcomes
        accepted = verify(rng, features, num_verified)
        est.observe(features, num_verified, accepted)
        for j in range(min(accepted + 1, num_verified)):
            key = (j, min(int(features[j] * 10), 9))  # type: ignore[operator]
            tested[key] = tested.get(key, 0) + 1
    checked = 0
    for (j, b), n in tested.items():
        if n < 300:
            continue
        centre = (b + 0.5) / 10  # the rate is linear in the feature: bin mean = rate at centre
        features = [centre] * GAMMA
        assert est.confidences(features)[j] == pytest.approx(true_rate(j, centre), abs=0.05)
        checked += 1
    assert checked >= 35  # most of the 7 x 10 cells had enough data to check
    for row in est.calibration():
        # Estimates handed out were calibrated on average, within 0.02 or three standard
        # errors of the realised rate where few verifications reached the position.
        r = row.mean_realised
        assert row.abs_error < max(0.02, 3 * math.sqrt(r * (1 - r) / row.count)), row


def test_censored_positions_teach_nothing() -> None:
    fresh = OnlineAcceptanceEstimator().confidences([0.9] * 5)
    est = OnlineAcceptanceEstimator()
    est.observe([0.9] * 5, num_verified=2, num_accepted=2)  # positions 2.. were never verified
    est.observe([0.9] * 5, num_verified=4, num_accepted=1)  # 1 rejected; 2, 3 not tested
    after = est.confidences([0.9] * 5)
    # The same outcomes told without the censored positions teach exactly the same.
    told = OnlineAcceptanceEstimator()
    told.observe([0.9] * 2, num_verified=2, num_accepted=2)
    told.observe([0.9] * 2, num_verified=2, num_accepted=1)
    assert after == pytest.approx(told.confidences([0.9] * 5))
    # Untested positions carry on at the last tested position's rate.
    assert after[0] > fresh[0] and after[2:] == pytest.approx([est.position_rates(2)[1]] * 3)
    assert [(r.position, r.count) for r in est.calibration()] == [(0, 2), (1, 2)]
    assert est.calibration()[1].mean_realised == pytest.approx(0.5)
    est.observe([0.9] * 5, num_verified=0, num_accepted=0)  # nothing verified: no-op
    assert est.confidences([0.9] * 5) == pytest.approx(after)


def test_counting_censored_positions_as_rejections_would_be_biased() -> None:
    """The convergence test's guard: short verify lengths must not drag deep positions down."""
    rng = random.Random(5)
    est = OnlineAcceptanceEstimator(decay=1.0)
    for _ in range(5000):
        features = [0.8] * GAMMA
        num_verified = rng.choice([1, GAMMA])  # half the steps verify a single draft
        est.observe(features, num_verified, verify(rng, features, num_verified))
    assert est.confidences([0.8] * GAMMA)[3] == pytest.approx(true_rate(3, 0.8), abs=0.04)


def test_deterministic_drafts_and_deep_positions_have_their_own_cells() -> None:
    est = OnlineAcceptanceEstimator(max_positions=3, decay=1.0)
    rng = random.Random(3)
    for _ in range(3000):
        features: list[float | None] = [None, 0.95, 0.95, 0.95, 0.95]
        est.observe(features, 5, verify(rng, features, 5))
    conf = est.confidences([None, 0.95, 0.95, 0.95, 0.95])
    assert conf[0] == pytest.approx(0.5, abs=0.04)
    assert conf[1] == pytest.approx(true_rate(1, 0.95), abs=0.04)
    assert conf[2] == conf[3] == conf[4]  # positions past max_positions share the last cell
    assert est.confidences([float("nan"), -1.0, 2.0])[0] == est.confidences([0.0])[0]


def test_forgetting_follows_a_change_in_traffic() -> None:
    rng = random.Random(9)
    forgetful = OnlineAcceptanceEstimator(decay=0.999)
    stubborn = OnlineAcceptanceEstimator(decay=1.0)
    for rate, steps in ((0.9, 10_000), (0.3, 5_000)):
        for _ in range(steps):
            accepted = 1 if rng.random() < rate else 0
            forgetful.observe([0.5], 1, accepted)
            stubborn.observe([0.5], 1, accepted)
    assert forgetful.confidences([0.5])[0] == pytest.approx(0.3, abs=0.05)
    assert stubborn.confidences([0.5])[0] > 0.6


def test_forgetting_scale_is_renormalised() -> None:
    est = OnlineAcceptanceEstimator(decay=0.5)  # weight doubles per call: rescales often
    for _ in range(500):
        est.observe([0.5, 0.5], 2, 2)
    conf = est.confidences([0.5, 0.5])
    assert all(math.isfinite(c) and 0.6 < c < 1.0 for c in conf)
    assert est._weight <= 1e12


def test_validation() -> None:
    est = OnlineAcceptanceEstimator()
    with pytest.raises(ValueError):
        est.observe([0.5, 0.5], num_verified=3, num_accepted=0)
    with pytest.raises(ValueError):
        est.observe([0.5, 0.5], num_verified=1, num_accepted=2)
    with pytest.raises(ValueError):
        OnlineAcceptanceEstimator(prior_mean=1.0)
    with pytest.raises(ValueError):
        OnlineAcceptanceEstimator(decay=0.0)


# --- Exactness with the estimator and scheduler in the loop --------------------------------
# A sampling drafter proposes A with 0.9 and B with 0.1 against a uniform target. The trained
# estimator knows confident drafts get accepted; the question is which feature it is fed.

Q = (0.9, 0.1)
P = (0.5, 0.5)
TRIALS = 20_000
CHI2_CRIT_DF1 = 10.828  # 1e-3 false-alarm rate


def emitted_share_of_a(feature_of: str, seed: int) -> tuple[float, float, int]:
    rng = random.Random(seed)
    est = OnlineAcceptanceEstimator(decay=1.0)
    for _ in range(2000):  # history: confident drafts are accepted, unconfident ones are not
        f = rng.random()
        est.observe([f], 1, 1 if rng.random() < f else 0)
    policy = DSparkPolicy(_Table({1: 1.0, 2: 0.6}))  # verify iff confidence > 2/3
    a_count = verified = 0
    for _ in range(TRIALS):
        x = 0 if rng.random() < Q[0] else 1
        feature = Q[x] if feature_of == "token" else max(Q)
        if policy.choose([est.confidences([feature])], 1)[0] == 1:
            verified += 1
            if rng.random() < min(1.0, P[x] / Q[x]):
                t = x
            else:  # residual max(P - Q, 0) is all on B
                t = 1
        else:
            t = 0 if rng.random() < P[0] else 1
        a_count += t == 0
    share = a_count / TRIALS
    stat = TRIALS * ((share - P[0]) ** 2 / P[0] + (share - P[0]) ** 2 / P[1])
    return share, stat, verified


class _Table:
    def __init__(self, points: dict[int, float]) -> None:
        self.points = points

    def steps_per_second(self, num_tokens: int) -> float:
        return self.points[num_tokens]


def test_feature_of_the_drafted_token_biases_output_and_the_top_probability_does_not() -> None:
    share, stat, verified = emitted_share_of_a("top", seed=21)
    assert verified == TRIALS and stat < CHI2_CRIT_DF1
    share, stat, verified = emitted_share_of_a("token", seed=21)
    assert 0.85 * TRIALS < verified < 0.95 * TRIALS  # verified only when A was drafted
    assert share == pytest.approx(0.55, abs=0.01) and stat > 10 * CHI2_CRIT_DF1
