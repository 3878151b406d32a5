"""Verify-length policies: how many of each request's proposed drafts the target verifies.

Every policy answers one question per step: given, for each speculating request r, the
conditional acceptance probability c[r][j] of each proposed draft (P(draft j accepted | drafts
before j accepted)), return l_r in 0..len(c[r]). The engine verifies drafts 1..l_r of request r;
the rest are dropped before the target forward, so they cost nothing.

Notation (docs/scheduling.md has the long version):
    a[r][j] = c[r][0] * ... * c[r][j]       prefix survival: P(drafts 0..j all accepted)
    B       = num_base_tokens + sum_r l_r   tokens in the target step
    tau     = R + sum_r sum_{j < l_r} a[r][j]  expected tokens emitted (R requests sample this
                                            step, each emits >= 1 token: the bonus/corrected one)
    Theta   = tau * SPS(B)                  expected tokens per second of this step, or, given
                                            the engine's running rate lambda (tokens per second
                                            over recent steps), tau - lambda * T(B): tokens net
                                            of what the step's time would make at that rate

Exactness constraint on every policy here: whether draft j of a request is verified may depend
on anything known before that draft token was drawn (its own confidence c[r][j], earlier
drafts, other requests, the past), never on the token itself or on anything computed from it,
such as c[r][j+1]. Rejection sampling is exact for any verify length that is a stopping time in
that sense; a length that peeks at the token it is about to verify biases the output.

Pure Python: no torch, no I/O.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from itertools import accumulate
from operator import mul
from typing import Protocol

from scheduler.profiler import StepThroughput


class VerifyPolicy(Protocol):
    name: str
    # The policy reads the throughput profile: the engine then also gates drafting on it
    # (scheduler/draft_gate.py), since a policy that weighs cost wants drafting weighed too.
    uses_profile: bool

    def choose(
        self,
        confidences: Sequence[Sequence[float]],
        num_base_tokens: int,
        num_sampling_requests: int | None = None,
        lookahead: bool = False,
        rate: float | None = None,
    ) -> list[int]:
        """Verify length per speculating request, each in 0..len(confidences[r]).

        num_base_tokens: tokens the step processes anyway (prefill chunks + one anchor per
        decoding request, speculating or not). num_sampling_requests: requests that emit a token
        this step (decoding requests plus prefills that finish this step); None means
        len(confidences), right when every sampling request is a speculating one.
        lookahead: every request's verify length may depend on all of its drafts, because none
        of them was sampled (lookups, greedy drafting) or the request decodes greedily, where
        any verify length gives the target's argmax. The exactness constraint above is then
        void, and a policy may look past a drop in Theta.
        rate: tokens per second the engine made over recent steps (`RunningRate`), known
        before this step's drafts; None before there is one. See `step_value`.
        """
        ...


def prefix_survival(confidences: Sequence[float]) -> list[float]:
    """Cumulative products of one request's confidences, each clamped to [0, 1] (NaN -> 0)."""
    clamped = [min(1.0, c) if c > 0 else 0.0 for c in confidences]  # NaN -> 0
    return list(accumulate(clamped, mul))


def predicted_survival(
    confidences: Sequence[Sequence[float]], lengths: Sequence[int]
) -> list[list[float]]:
    """Predicted prefix-survival probability of every verified position: a[r][:l_r]."""
    return [prefix_survival(c[:n]) for c, n in zip(confidences, lengths)]


def survival_by_position(
    confidences: Sequence[Sequence[float]], lengths: Sequence[int]
) -> tuple[list[float], list[int]]:
    """Per position j: (sum of predicted a[r][j], number of requests verifying j) over the
    step; StepStats.predicted_per_position and count_per_position, ready to export."""
    width = max(lengths, default=0)
    predicted = [0.0] * width
    counts = [0] * width
    for surv in predicted_survival(confidences, lengths):
        for j, a in enumerate(surv):
            predicted[j] += a
            counts[j] += 1
    return predicted, counts


def _ranked(survival: Sequence[Sequence[float]]) -> Iterator[tuple[float, int, int]]:
    """(a, r, j) for every entry with a > 0, by a descending, ties: smaller j, then smaller r.

    Lazy k-way merge: each request's list is already in this order (a non-increasing in j), so a
    heap of one head per request yields the global order, and policies that stop early pay only
    for what they look at. The tie-break uses positions only, never token values, which is what
    keeps equal-confidence drafts from leaking their values into the ranking.
    """
    heap = [(-s[0], 0, r) for r, s in enumerate(survival) if s and s[0] > 0]
    heapq.heapify(heap)
    while heap:
        neg_a, j, r = heapq.heappop(heap)
        yield -neg_a, r, j
        s = survival[r]
        if j + 1 < len(s) and s[j + 1] > 0:
            heapq.heappush(heap, (-s[j + 1], j + 1, r))


def _sampling(confidences: Sequence[Sequence[float]], num_sampling: int | None) -> float:
    return float(len(confidences) if num_sampling is None else num_sampling)


def step_value(profile: StepThroughput, rate: float | None) -> Callable[[float, int], float]:
    """What the policies maximise over the step's verified tokens: value(tau, B).

    Without a rate, Theta = tau x SPS(B), this step's own tokens per second (DSpark's
    Algorithm 1). That ratio stops a good draft early: a step whose first drafts look sure
    already makes more tokens per second than the engine averages, and its next draft must
    beat that high mark, not the average. Over many steps the engine makes
    sum(tau) / sum(T), which a step raises by whatever it emits beyond what its time would
    make at the running rate lambda (Dinkelbach's rule for a ratio of sums): value =
    tau - lambda x T(B). One more verified draft then pays when its survival a exceeds
    lambda x (T(B + 1) - T(B)). On context-copying prompts at one stream the ratio cut
    the lookup's drafts to 2 in 82 of 541 steps (docs/scheduling.md).
    """
    sps = profile.steps_per_second
    if rate is None:
        return lambda tau, tokens: tau * sps(tokens)
    return lambda tau, tokens: tau - rate / sps(tokens)


class NoSpeculation:
    """Verify nothing: plain decoding, whatever the drafter proposed."""

    name = "none"
    uses_profile = False

    def choose(
        self,
        confidences: Sequence[Sequence[float]],
        num_base_tokens: int,
        num_sampling_requests: int | None = None,
        lookahead: bool = False,
        rate: float | None = None,
    ) -> list[int]:
        return [0] * len(confidences)


class FixedLength:
    """Verify the first k proposed drafts of every request (the classic fixed-k setting)."""

    name = "fixed"
    uses_profile = False

    def __init__(self, k: int) -> None:
        if k < 0:
            raise ValueError("k must be >= 0")
        self.k = k

    def choose(
        self,
        confidences: Sequence[Sequence[float]],
        num_base_tokens: int,
        num_sampling_requests: int | None = None,
        lookahead: bool = False,
        rate: float | None = None,
    ) -> list[int]:
        return [min(self.k, len(c)) for c in confidences]


def greedy_early_stop(
    survival: Sequence[Sequence[float]],
    num_base_tokens: int,
    num_sampling: float,
    profile: StepThroughput,
    rate: float | None = None,
) -> list[int]:
    """Algorithm 1 of the DSpark paper on prefix-survival lists (see DSparkPolicy)."""
    value = step_value(profile, rate)
    lengths = [0] * len(survival)
    tokens = num_base_tokens
    tau = num_sampling
    best = value(tau, tokens)
    for a, r, j in _ranked(survival):
        tokens += 1
        tau += a
        theta = value(tau, tokens)
        if not theta > best:
            break  # first drop: stop, never look further down the ranking
        best = theta
        lengths[r] = j + 1  # ranking order makes this a prefix extension
    return lengths


class DSparkPolicy:
    """Hardware-aware prefix scheduler (DSpark Algorithm 1), exact by its early stop.

    Rank every (request, position) by prefix survival a[r][j] (descending; ties by position,
    then request), admit entries in that order while Theta = tau * SPS(B) strictly increases,
    and stop at the first entry that does not increase it. Because a[r][j] is non-increasing
    in j, every prefix of the ranking is a prefix per request, and for a fixed number of
    admitted entries it maximises expected tokens; so with a unimodal Theta along the ranking
    (a smooth cost curve) this is the global optimum over all per-request prefix lengths.

    Why stop at the first drop instead of taking the best point of the whole ranking: the
    confidence of draft j+1 is computed after draft j was sampled, so it depends on the value
    of draft j. Whether entry (r, j) is admitted here depends only on the entries ranked
    above it and the Theta values up to it: a[r][j] and earlier positions of r (functions of
    drafts before j) and other requests (independent of r's drafts). A global argmax would
    also look at entries ranked below, including a[r][j+1], which would let draft j's own value
    decide whether draft j is verified; DSpark's Appendix A shows the resulting bias
    (target (0.7, 0.3) emitted as (0.85, 0.15)). tests/scheduler/test_verify_policy.py checks
    both facts by simulation.
    """

    name = "dspark"
    uses_profile = True

    def __init__(self, profile: StepThroughput) -> None:
        self.profile = profile

    def choose(
        self,
        confidences: Sequence[Sequence[float]],
        num_base_tokens: int,
        num_sampling_requests: int | None = None,
        lookahead: bool = False,
        rate: float | None = None,
    ) -> list[int]:
        survival = [prefix_survival(c) for c in confidences]
        sampling = _sampling(confidences, num_sampling_requests)
        if lookahead:  # the best point of the whole ranking: past the stairs of the profile
            budget = global_budget(survival, num_base_tokens, sampling, self.profile, rate)
            return top_k_lengths(survival, budget)
        return greedy_early_stop(survival, num_base_tokens, sampling, self.profile, rate)


def global_budget(
    survival: Sequence[Sequence[float]],
    num_base_tokens: int,
    num_sampling: float,
    profile: StepThroughput,
    rate: float | None = None,
) -> int:
    """Number of draft tokens K maximising Theta over the whole ranking (no early stop).

    Looks past local drops, so it handles jagged cost curves; it is only safe as a budget for
    a later step, never to trim the drafts it was computed from (see DSparkProductionPolicy).
    Ties go to the smaller K.
    """
    value = step_value(profile, rate)
    values = sorted((a for s in survival for a in s if a > 0), reverse=True)
    tau = num_sampling
    best_k, best = 0, value(tau, num_base_tokens)
    for k, a in enumerate(values, start=1):
        tau += a
        theta = value(tau, num_base_tokens + k)
        if theta > best:
            best_k, best = k, theta
    return best_k


def top_k_lengths(survival: Sequence[Sequence[float]], budget: int) -> list[int]:
    """Admit the first `budget` entries of the ranking; per-request prefixes by construction."""
    lengths = [0] * len(survival)
    if budget <= 0:
        return lengths
    for n, (_, r, j) in enumerate(_ranked(survival), start=1):
        lengths[r] = j + 1
        if n == budget:
            break
    return lengths


class DSparkProductionPolicy:
    """DSpark's serving variant: stale global budget, fresh top-K.

    Each call computes K = global_budget(...) from its own confidences but uses it only `lag`
    calls later; the current call admits the top-K entries of the ranking by fresh prefix
    survival. Exact because (1) K depends on drafts of earlier steps only (a causal barrier)
    and (2) whether entry (r, j) is among the top K depends only on the entries ranked above
    it, which do not involve draft j's value (a[r][j+1] <= a[r][j] ranks below it).
    Until `lag` budgets exist (the first calls) it falls back to DSparkPolicy.

    K counts draft tokens. When the request set changes between the call that computed K and
    the call that spends it, K is used as is (capped by the drafts on offer): a burst of new
    requests gets a budget sized for the old batch for `lag` steps, never an unsafe one.
    """

    name = "dspark-production"
    uses_profile = True

    def __init__(self, profile: StepThroughput, lag: int = 1) -> None:
        if lag < 1:
            raise ValueError("lag must be >= 1: a budget from the current drafts is not exact")
        self.profile = profile
        self.lag = lag
        self._budgets: deque[int] = deque()

    def choose(
        self,
        confidences: Sequence[Sequence[float]],
        num_base_tokens: int,
        num_sampling_requests: int | None = None,
        lookahead: bool = False,
        rate: float | None = None,
    ) -> list[int]:
        survival = [prefix_survival(c) for c in confidences]
        sampling = _sampling(confidences, num_sampling_requests)
        budget = global_budget(survival, num_base_tokens, sampling, self.profile, rate)
        if lookahead:  # no exactness to keep: this step's own budget
            lengths = top_k_lengths(survival, budget)
        elif len(self._budgets) < self.lag:
            lengths = greedy_early_stop(survival, num_base_tokens, sampling, self.profile, rate)
        else:
            lengths = top_k_lengths(survival, self._budgets.popleft())
        self._budgets.append(budget)
        while len(self._budgets) > self.lag:  # lookahead steps spent none
            self._budgets.popleft()
        return lengths


def choose_candidates(
    survivals: Sequence[Sequence[Sequence[float]]], token_cost: float
) -> list[int | None]:
    """Several drafters: per request, the index of the candidate draft worth the most expected
    tokens net of their verify cost (None when there is none):

        value = max over l of  sum_{j < l} (a_j - token_cost)

    survivals[r][i]: candidate i's prefix survival a (what the choice may read: see below);
    token_cost: what one more verified token costs in emitted tokens, R x (T(B+1)/T(B) - 1).
    Ties go to the earlier candidate (the drafter listed first, the cheap one). The policy then
    picks the kept draft's verify length from its own confidences: this rule ranks drafters,
    it never trims drafts.

    Exactness: a sampled draft's confidence at j >= 1 reads the drafts before j, so the caller
    passes, for such a candidate, only what was known before its first draft was drawn
    (confidence 0, then the drafter's past rates per position); a deterministic draft is a
    function of the context and may be read in full. The kept candidate then never depends on
    the value of a sampled draft token.
    """
    picks: list[int | None] = []
    for candidates in survivals:
        best, best_value = None, float("-inf")
        for i, survival in enumerate(candidates):
            value = candidate_value(survival, token_cost)
            if value > best_value:
                best, best_value = i, value
        picks.append(best)
    return picks


def candidate_value(survival: Sequence[float], token_cost: float) -> float:
    """Expected tokens a draft is worth net of its verify cost, at its best length:
    max over l of sum_{j < l} (a_j - token_cost)."""
    return max([0.0, *accumulate(a - token_cost for a in survival)])


_REGISTRY: dict[str, Callable[[int, StepThroughput], VerifyPolicy]] = {
    "none": lambda k, profile: NoSpeculation(),
    "fixed": lambda k, profile: FixedLength(k),
    "dspark": lambda k, profile: DSparkPolicy(profile),
    "dspark-production": lambda k, profile: DSparkProductionPolicy(profile),
}

POLICY_NAMES = tuple(_REGISTRY)


def build_policy(name: str, k: int, profile: StepThroughput) -> VerifyPolicy:
    """The policy called `name`; k is the fixed policy's length (ignored by the others)."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown verify policy {name!r}; choose from {POLICY_NAMES}") from None
    return factory(k, profile)
