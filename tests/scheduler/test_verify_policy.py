"""Verify-length policies on synthetic confidences and synthetic cost curves."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Sequence

import pytest

from scheduler.verify_policy import (
    POLICY_NAMES,
    DSparkPolicy,
    DSparkProductionPolicy,
    FixedLength,
    NoSpeculation,
    build_policy,
    global_budget,
    predicted_survival,
    prefix_survival,
    survival_by_position,
    top_k_lengths,
)


class Curve:
    """SPS from a function of the step size."""

    def __init__(self, sps: Callable[[int], float]) -> None:
        self.sps = sps

    def steps_per_second(self, num_tokens: int) -> float:
        return self.sps(num_tokens)


def table(points: dict[int, float]) -> Curve:
    return Curve(lambda n: points[n])


def linear_device(fixed_ms: float, per_token_ms: float) -> Curve:
    return Curve(lambda n: 1000.0 / (fixed_ms + per_token_ms * n))


def theta(
    conf: Sequence[Sequence[float]], lengths: Sequence[int], base: int, curve: Curve
) -> float:
    tau = len(conf) + sum(sum(s) for s in predicted_survival(conf, lengths))
    return tau * curve.steps_per_second(base + sum(lengths))


def admitted_and_rest(
    conf: Sequence[Sequence[float]], lengths: Sequence[int]
) -> tuple[list[float], list[float]]:
    """Survival values of the admitted entries, and of the positive ones left out."""
    surv = [prefix_survival(c) for c in conf]
    admitted = [a for s, n in zip(surv, lengths) for a in s[:n]]
    rest = [a for s, n in zip(surv, lengths) for a in s[n:] if a > 0]
    return admitted, rest


def test_none_and_fixed() -> None:
    conf = [[0.9] * 7, [0.5, 0.5], []]
    assert NoSpeculation().choose(conf, 3) == [0, 0, 0]
    assert FixedLength(3).choose(conf, 3) == [3, 2, 0]
    assert FixedLength(0).choose(conf, 3) == [0, 0, 0]
    with pytest.raises(ValueError):
        FixedLength(-1)


def test_flat_curve_verifies_every_draft_that_can_survive() -> None:
    conf = [[0.9] * 7, [0.3, 0.2, 0.1], [0.8, 0.0, 0.9], [], [0.05]]
    assert DSparkPolicy(Curve(lambda n: 5.0)).choose(conf, 5) == [7, 3, 1, 0, 1]


def test_steep_curve_verifies_nothing() -> None:
    # Step time proportional to tokens: a draft pays only if it survives with probability > 1.
    conf = [[0.99] * 7 for _ in range(4)]
    assert DSparkPolicy(Curve(lambda n: 1.0 / n)).choose(conf, 4) == [0, 0, 0, 0]


def test_verify_length_shrinks_with_load() -> None:
    device = linear_device(fixed_ms=10.0, per_token_ms=1.0)
    policy = DSparkPolicy(device)
    assert policy.choose([[0.8] * 7], 1) == [6]  # alone: long prefix
    assert policy.choose([[0.8] * 7] * 32, 32) == [1] * 32  # crowded: one draft each
    # Non-speculating decode requests share the step: fewer drafts pay for the one that drafts.
    assert policy.choose([[0.8] * 7], 32, num_sampling_requests=32) == [1]
    assert policy.choose([[0.8] * 7], 64, num_sampling_requests=64) == [0]


def test_appendix_a_counterexample_early_stop_halts_at_theta1() -> None:
    curve = table({1: 1.0, 2: 0.5, 3: 0.45})
    conf_a = [[0.8, 0.9]]  # x1 = A: the global optimum would verify both drafts
    conf_b = [[0.8, 0.0]]  # x1 = B: the global optimum verifies nothing
    assert DSparkPolicy(curve).choose(conf_a, 1) == [0]
    assert DSparkPolicy(curve).choose(conf_b, 1) == [0]
    assert theta(conf_a, [1], 1, curve) == pytest.approx(0.9)
    assert theta(conf_a, [2], 1, curve) == pytest.approx(1.134)
    surv_a = [prefix_survival(c) for c in conf_a]
    surv_b = [prefix_survival(c) for c in conf_b]
    assert global_budget(surv_a, 1, 1, curve) == 2
    assert global_budget(surv_b, 1, 1, curve) == 0


def random_case(rng: random.Random) -> tuple[list[list[float]], Curve]:
    conf = [
        [rng.random() ** 0.5 for _ in range(rng.randint(0, 3))] for _ in range(rng.randint(1, 3))
    ]
    if rng.random() < 0.5:  # smooth: fixed cost plus a convex per-token term
        c0, c1, c2 = rng.uniform(1, 20), rng.uniform(0.1, 3), rng.uniform(0, 0.2)
        return conf, Curve(lambda n: 1.0 / (c0 + c1 * n + c2 * n * n))
    tile, c0, jump = rng.randint(2, 4), rng.uniform(1, 5), rng.uniform(1, 10)  # staircase
    return conf, Curve(lambda n: 1.0 / (c0 + jump * math.ceil(n / tile)))


def test_admitted_set_is_a_top_of_the_ranking_and_optimal_when_unimodal() -> None:
    rng = random.Random(2024)
    unimodal = suboptimal = 0
    for _ in range(400):
        conf, curve = random_case(rng)
        base = len(conf)
        lengths = DSparkPolicy(curve).choose(conf, base)
        assert all(0 <= n <= len(c) for n, c in zip(lengths, conf))
        admitted, rest = admitted_and_rest(conf, lengths)
        assert not admitted or not rest or min(admitted) >= max(rest)
        # Theta along the whole ranking (what a search without early stop would see).
        path = [theta(conf, [0] * len(conf), base, curve)]
        for k in range(1, len(admitted) + len(rest) + 1):
            path.append(
                theta(conf, top_k_lengths([prefix_survival(c) for c in conf], k), base, curve)
            )
        chosen = theta(conf, lengths, base, curve)
        assert chosen == pytest.approx(path[len(admitted)])
        brute = max(
            theta(conf, list(ls), base, curve)
            for ls in itertools.product(*(range(len(c) + 1) for c in conf))
        )
        assert chosen <= brute + 1e-12
        if max(path) == path[len(admitted)]:  # greedy stopped at the path's best point
            unimodal += 1
            assert chosen == pytest.approx(brute, rel=1e-12)
        else:
            suboptimal += 1
    assert unimodal > 200 and suboptimal > 0  # both regimes were exercised


def test_clamps_out_of_range_confidences() -> None:
    assert prefix_survival([1.5, float("nan"), 0.5]) == [1.0, 0.0, 0.0]
    assert prefix_survival([-0.2, 0.9]) == [0.0, 0.0]
    assert DSparkPolicy(Curve(lambda n: 1.0)).choose([[1.5, 0.5], [float("nan")]], 2) == [2, 0]


def test_predicted_survival_and_per_position_sums() -> None:
    conf = [[0.5, 0.5, 0.5], [0.9, 0.1], [0.7]]
    assert predicted_survival(conf, [2, 1, 0]) == [[0.5, 0.25], [0.9], []]
    predicted, counts = survival_by_position(conf, [2, 1, 0])
    assert predicted == pytest.approx([1.4, 0.25]) and counts == [2, 1]
    assert survival_by_position(conf, [0, 0, 0]) == ([], [])


def test_production_uses_a_stale_budget_and_fresh_ranking() -> None:
    curve = linear_device(fixed_ms=10.0, per_token_ms=1.0)
    rng = random.Random(7)
    calls = [
        [
            [rng.uniform(0.3, 1.0) for _ in range(rng.randint(0, 7))]
            for _ in range(rng.randint(1, 12))
        ]
        for _ in range(30)
    ]
    for lag in (1, 2):
        policy = DSparkProductionPolicy(curve, lag=lag)
        budgets = []
        for t, conf in enumerate(calls):
            surv = [prefix_survival(c) for c in conf]
            budgets.append(global_budget(surv, len(conf), len(conf), curve))
            lengths = policy.choose(conf, len(conf))
            if t < lag:  # cold start: the exact greedy
                assert lengths == DSparkPolicy(curve).choose(conf, len(conf))
                continue
            available = sum(1 for s in surv for a in s if a > 0)
            assert sum(lengths) == min(budgets[t - lag], available)
            admitted, rest = admitted_and_rest(conf, lengths)
            assert not admitted or not rest or min(admitted) >= max(rest)
    with pytest.raises(ValueError):
        DSparkProductionPolicy(curve, lag=0)


def test_production_looks_past_a_cost_cliff_that_stops_the_greedy() -> None:
    staircase = Curve(lambda n: 1.0 if n == 1 else 0.5)  # one-token steps are special
    conf = [[0.95] * 7]
    assert DSparkPolicy(staircase).choose(conf, 1) == [0]  # Theta1 = 0.975 < Theta0 = 1
    production = DSparkProductionPolicy(staircase, lag=1)
    assert production.choose(conf, 1) == [0]  # cold start
    assert production.choose(conf, 1) == [7]  # budget from the previous call's global search


def test_with_lookahead_dspark_climbs_the_int4_stairs() -> None:
    """One stream on the int4 step (stairs of 4 rows, benchmarks/engine.py's batch-1 shape):
    the fifth row starts a pass and Theta drops there, so the early stop ends at 3 drafts;
    a deterministic or greedy step may look past the drop to the best point, 7."""
    stairs = Curve(lambda n: 1000.0 / (10.9 + 5.0 * ((n - 1) // 4) + 0.9 * (n - 1)))
    conf = [[0.95] * 7]
    assert DSparkPolicy(stairs).choose(conf, 1) == [3]
    assert DSparkPolicy(stairs).choose(conf, 1, lookahead=True) == [7]
    assert theta(conf, [7], 1, stairs) > theta(conf, [3], 1, stairs)
    production = DSparkProductionPolicy(stairs, lag=1)
    assert [production.choose(conf, 1, lookahead=True) for _ in range(3)] == [[7]] * 3
    assert len(production._budgets) == 1  # lookahead steps do not pile up stale budgets


def test_build_policy_registry() -> None:
    curve = Curve(lambda n: 1.0)
    assert POLICY_NAMES == ("none", "fixed", "dspark", "dspark-production")
    for name in POLICY_NAMES:
        assert build_policy(name, 3, curve).name == name
    assert build_policy("fixed", 3, curve).choose([[0.1] * 5], 1) == [3]
    with pytest.raises(ValueError, match="unknown verify policy"):
        build_policy("eagle", 3, curve)


# --- Exactness with the scheduler in the loop -------------------------------------------------
# Two-token vocabulary {0: A, 1: B}. The target's first token is (0.7, 0.3) and its second token
# depends on the first; the draft proposes both tokens uniformly. As in the paper's Appendix A,
# the confidence of draft 2 depends on the sampled draft 1 (0.9 after A, 0 after B), and the
# confidence of draft 1 varies from step to step independently of the drafts (the context).
# Each trial runs one verification step with the policy choosing the verify length, then plain
# decoding if fewer than two tokens came out; the emitted pair must follow the target exactly.

P1 = (0.7, 0.3)
P2 = ((0.6, 0.4), (0.2, 0.8))  # target's second token given the first
Q = (0.5, 0.5)  # draft, both positions
TRIALS = 20_000
# Chi-square critical values at a 1e-3 false-alarm rate (a correct policy fails one seed in 1000).
CHI2_CRIT = {1: 10.828, 3: 16.266}


def sample(rng: random.Random, p: Sequence[float]) -> int:
    return 0 if rng.random() < p[0] else 1


def verify_token(rng: random.Random, draft: int, p: Sequence[float]) -> tuple[int, bool]:
    """Standard rejection sampling of one draft token drawn from Q against target p."""
    if rng.random() < min(1.0, p[draft] / Q[draft]):
        return draft, True
    residual = [max(0.0, pv - qv) for pv, qv in zip(p, Q)]
    return sample(rng, [r / sum(residual) for r in residual]), False


def simulate(
    choose: Callable[[list[list[float]]], int], c1_values: Sequence[float], seed: int
) -> tuple[list[list[int]], list[int]]:
    """Counts of emitted (first, second) token pairs, and how often each verify length ran."""
    rng = random.Random(seed)
    counts = [[0, 0], [0, 0]]
    lengths = [0, 0, 0]
    for _ in range(TRIALS):
        c1 = rng.choice(c1_values)
        x1, x2 = sample(rng, Q), sample(rng, Q)
        length = choose([[c1, 0.9 if x1 == 0 else 0.0]])
        lengths[length] += 1
        if length == 0:
            t1, accepted = sample(rng, P1), False
        else:
            t1, accepted = verify_token(rng, x1, P1)
        if accepted and length == 2:
            t2, _ = verify_token(rng, x2, P2[t1])
        else:  # bonus token, or the next plain step
            t2 = sample(rng, P2[t1])
        counts[t1][t2] += 1
    return counts, lengths


def chi2(observed: Sequence[int], probs: Sequence[float]) -> float:
    n = sum(observed)
    return sum((o - n * p) ** 2 / (n * p) for o, p in zip(observed, probs))


def joint_chi2(counts: list[list[int]]) -> float:
    cells = [counts[a][b] for a in (0, 1) for b in (0, 1)]
    return chi2(cells, [P1[a] * P2[a][b] for a in (0, 1) for b in (0, 1)])


def first_token_share(counts: list[list[int]]) -> float:
    return sum(counts[0]) / TRIALS


def greedy(curve: Curve) -> Callable[[list[list[float]]], int]:
    policy = DSparkPolicy(curve)
    return lambda conf: policy.choose(conf, 1)[0]


def global_argmax(curve: Curve) -> Callable[[list[list[float]]], int]:
    """Search the whole ranking on the current drafts' confidences: no early stop."""

    def choose(conf: list[list[float]]) -> int:
        surv = [prefix_survival(c) for c in conf]
        return top_k_lengths(surv, global_budget(surv, 1, 1, curve))[0]

    return choose


def test_appendix_a_global_argmax_is_biased_and_early_stop_is_not() -> None:
    curve = table({1: 1.0, 2: 0.5, 3: 0.45})
    counts, lengths = simulate(global_argmax(curve), [0.8], seed=1)
    assert first_token_share(counts) == pytest.approx(0.85, abs=0.01)  # the paper's (0.85, 0.15)
    assert chi2([sum(counts[0]), sum(counts[1])], P1) > 100 * CHI2_CRIT[1]
    counts, lengths = simulate(greedy(curve), [0.8], seed=1)
    assert lengths == [TRIALS, 0, 0]  # halts at Theta1 < Theta0, before seeing c2
    assert joint_chi2(counts) < CHI2_CRIT[3]


def test_early_stop_is_exact_while_verifying_and_global_argmax_is_not() -> None:
    curve = table({1: 1.0, 2: 0.6, 3: 0.55})  # c1 = 0.8 pays for draft 1, c1 = 0.5 does not
    counts, lengths = simulate(greedy(curve), [0.8, 0.5], seed=2)
    assert min(lengths) > TRIALS // 5  # every verify length occurs often
    assert joint_chi2(counts) < CHI2_CRIT[3]
    counts, lengths = simulate(global_argmax(curve), [0.8, 0.5], seed=2)
    assert joint_chi2(counts) > 10 * CHI2_CRIT[3]
    assert first_token_share(counts) == pytest.approx(0.775, abs=0.01)  # (0.85 + 0.7) / 2


def test_early_stop_against_a_running_rate_is_exact() -> None:
    # T(1) = 1 s, T(2) = 1.5 s, T(3) = 1.6 s; at lambda = 1 token/s draft 1 pays when its
    # survival beats 0.5: c1 = 0.8 is verified, c1 = 0.3 is not.
    curve = table({1: 1.0, 2: 1 / 1.5, 3: 1 / 1.6})
    policy = DSparkPolicy(curve)
    choose = lambda conf: policy.choose(conf, 1, rate=1.0)[0]
    counts, lengths = simulate(choose, [0.8, 0.3], seed=4)
    assert min(lengths) > TRIALS // 10
    assert joint_chi2(counts) < CHI2_CRIT[3]


def test_production_variant_with_a_stale_budget_is_exact() -> None:
    curve = table({1: 1.0, 2: 0.6, 3: 0.55})
    policy = DSparkProductionPolicy(curve, lag=1)
    counts, lengths = simulate(lambda conf: policy.choose(conf, 1)[0], [0.8, 0.5], seed=3)
    assert min(lengths) > TRIALS // 10
    assert joint_chi2(counts) < CHI2_CRIT[3]


def test_a_running_rate_verifies_a_sure_draft_further_than_the_steps_own_ratio() -> None:
    """Theta = tau x SPS(B) makes a sure first draft raise the bar for the next one; against the
    engine's running rate each draft pays for its own time (verify_policy.step_value)."""
    curve = linear_device(fixed_ms=10.0, per_token_ms=2.0)  # T(B) = 10 + 2B ms
    conf = [[0.95, 0.95, 0.6, 0.6, 0.6, 0.6, 0.6]]  # survival .95 .90 .54 .32 .19 .12 .07
    # The step's own ratio: after 3 drafts it makes 3.39 tokens in 18 ms, so draft 4 must
    # bring 0.38 tokens for its 2 ms; 0.32 does not.
    assert DSparkPolicy(curve).choose(conf, 1) == [3]
    # Against a running rate lambda, a draft pays above survival lambda x 2 ms: 0.17 at the
    # plain step's 83 tokens/s, 0.3 at 150 tokens/s, 0.6 at 300 (the engine already does
    # better than these drafts would).
    assert DSparkPolicy(curve).choose(conf, 1, rate=1 / 0.012) == [5]
    assert DSparkPolicy(curve).choose(conf, 1, rate=150.0) == [4]
    assert DSparkPolicy(curve).choose(conf, 1, rate=300.0) == [2]
    production = DSparkProductionPolicy(curve)
    assert production.choose(conf, 1, lookahead=True, rate=150.0) == [4]


def test_choose_candidates_keeps_the_draft_worth_most_net_of_its_cost() -> None:
    from scheduler.verify_policy import choose_candidates

    long_weak = [0.5, 0.4, 0.3, 0.2, 0.1]  # 1.5 expected tokens, most of them cheap ones
    short_strong = [0.9, 0.8]  # 1.7
    # Free tokens: the larger sum wins; dear tokens (0.3 each): only entries above 0.3 count.
    assert choose_candidates([[long_weak, short_strong]], 0.0) == [1]
    assert choose_candidates([[[0.5, 0.4, 0.4, 0.4], [0.9, 0.2]]], 0.0) == [0]
    assert choose_candidates([[[0.5, 0.4, 0.4, 0.4], [0.9, 0.2]]], 0.3) == [1]
    assert choose_candidates([[[0.6], [0.6]], [], [[], [0.1]]], 0.0) == [0, None, 1]  # ties: first
