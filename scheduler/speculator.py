"""Speculation in one object: the drafter, the verify policy, the acceptance estimator, the draft
gate and the throughput profile, owned by the engine as a `Speculator`.

One engine step, from speculation's side:

    attach(plan)    the gate decides whether drafting may pay; decoding requests get drafts from
                    the proposer; the policy picks each one's verify length from the drafts'
                    confidences (the drafter's own, or the online estimator's) and the profile;
                    a structured request's draft is then cut at the first token its grammar
                    rejects (after the policy: the policy's choice must not depend on the
                    drafted tokens' values, see docs/scheduling.md)
    (the engine runs the target forward and update())
    record(...)     acceptance per position for stats, the estimator and the gate learn the
                    outcomes, the profile learns the step time, the proposer gets the target
                    features of the positions committed this step

Only requests that are decoding (one new token: the anchor) draft; a request whose prompt
finishes prefilling this step samples its first token plainly, because model-based drafters
need the target's features of the positions before the anchor, which that same step computes.

Torch is not imported here: draft probabilities and features pass through as opaque tensors.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from operator import mul
from typing import TYPE_CHECKING

from scheduler.drafter import DraftProposal, DraftRequest, Proposer
from scheduler.plan import ScheduledRequest, StepPlan, StepResult

if TYPE_CHECKING:
    from scheduler.acceptance import OnlineAcceptanceEstimator
    from scheduler.batching import ContinuousBatcher
    from scheduler.draft_gate import DraftGate
    from scheduler.profiler import ThroughputProfile
    from scheduler.verify_policy import VerifyPolicy


@dataclass
class SpeculationStep:
    """What drafting did this step, for stats and for the online acceptance estimator."""

    # (request, estimator features) per request that verifies drafts this step
    drafted: list[tuple[ScheduledRequest, list[float | None]]] = field(default_factory=list)
    num_candidates: int = 0  # decoding requests that could draft this step
    skipped: bool = False  # the draft gate said no: nobody drafted
    num_proposed: int = 0
    draft_time_s: float = 0.0
    # Filled by Speculator.record():
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted: int = 0
    verify_lengths: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    predicted_per_position: list[float] = field(default_factory=list)
    realised_per_position: list[int] = field(default_factory=list)
    count_per_position: list[int] = field(default_factory=list)


class Speculator:
    def __init__(
        self,
        proposer: Proposer,
        policy: VerifyPolicy,
        estimator: OnlineAcceptanceEstimator | None = None,
        profile: ThroughputProfile | None = None,  # kept current from real step times
        gate: DraftGate | None = None,
    ) -> None:
        self.proposer = proposer
        self.policy = policy
        self.estimator = estimator
        self.profile = profile
        self.gate = gate

    @property
    def aux_layer_ids(self) -> tuple[int, ...]:
        """Target layers whose outputs the proposer reads (the runner returns them)."""
        return tuple(self.proposer.aux_layer_ids)

    @property
    def max_draft_tokens(self) -> int:
        return self.proposer.max_draft_tokens

    def profile_table(self) -> list[tuple[int, float]]:
        return self.profile.table() if self.profile is not None else []

    # -- before the forward ---------------------------------------------------------------
    def attach(self, plan: StepPlan, batcher: ContinuousBatcher) -> SpeculationStep:
        """Draft for the plan's decoding requests and attach each one's verified prefix."""
        t0 = time.perf_counter()
        step = SpeculationStep()
        candidates, limits = [], []
        for s in plan.scheduled:
            if not (s.is_decoding and s.req.params.speculative):
                continue
            k = min(self.max_draft_tokens, batcher.max_draft_tokens(s))
            if k > 0:
                candidates.append(s)
                limits.append(k)
        if not candidates:
            return step
        step.num_candidates = len(candidates)
        num_sampling = sum(1 for s in plan.scheduled if s.samples)
        if self.gate is not None and not self.gate.should_draft(
            len(candidates), plan.num_tokens, num_sampling
        ):
            step.skipped = True
            return step
        proposal = self.proposer.propose(
            [
                DraftRequest(s.req.req_id, s.req.all_token_ids, s.req.params, k)
                for s, k in zip(candidates, limits)
            ]
        )
        features = [_draft_features(proposal, i) for i in range(len(candidates))]
        confidences = self._confidences(proposal, features)
        step.num_proposed = sum(len(ids) for ids in proposal.token_ids)
        lengths = self.policy.choose(confidences, plan.num_tokens, num_sampling)
        lengths = _fit_budget(lengths, batcher.max_num_batched_tokens - plan.num_tokens)
        for i, (s, length) in enumerate(zip(candidates, lengths)):
            length = min(length, len(proposal.token_ids[i]))
            ids = list(proposal.token_ids[i][:length])
            probs = proposal.probs[i] if proposal.probs is not None else None
            valid = batcher.num_valid_drafts(s.req, ids)
            if valid < length and probs is not None:
                # Cut at the first draft the grammar rejects. Whether that happens depends on
                # the sampled token, so the token sampled in its place must come from the
                # residual against its q, exactly as if the target had rejected it:
                # draft_probs keeps that one extra row (scheduler/sampling.py).
                s.draft_probs = probs[: valid + 1]
            elif valid:
                s.draft_probs = probs[:valid] if probs is not None else None
            if valid == 0:
                continue
            s.draft_ids = ids[:valid]
            s.predicted_survival = list(accumulate(confidences[i][:valid], mul))
            step.drafted.append((s, features[i][:valid]))
        # Requests that could have drafted but were given length 0 count as verify length 0.
        if step.num_proposed:
            step.verify_lengths.extend(0 for s in candidates if not s.draft_ids)
        step.draft_time_s = time.perf_counter() - t0
        return step

    def _confidences(
        self, proposal: DraftProposal, features: list[list[float | None]]
    ) -> list[list[float]]:
        """Per request and draft position, P(accepted | earlier drafts accepted)."""
        if proposal.confidences is not None:  # the drafter's own (DSpark's calibrated head)
            return [list(c) for c in proposal.confidences]
        if self.estimator is not None:
            return [self.estimator.confidences(f) for f in features]
        return [[1.0] * len(ids) for ids in proposal.token_ids]

    # -- after update() -------------------------------------------------------------------
    def record(
        self, plan: StepPlan, result: StepResult, step: SpeculationStep, step_time_s: float
    ) -> None:
        """Learn from this step: outcomes per draft position, gate, profile, proposer features."""
        self._record_outcomes(plan, result, step)
        if self.gate is not None and step.num_candidates and not step.skipped:
            self.gate.record(
                step.num_candidates, step.draft_time_s, step.num_draft_tokens, step.num_accepted
            )
        if self.profile is not None:
            # The step without drafting: when verify lengths are chosen the drafting time is
            # already spent, so what one more verified token costs is the rest of the step
            # (the draft gate accounts for drafting separately). Real steps keep the curve
            # current with co-located load and context growth.
            self.profile.observe(plan.num_tokens, step_time_s - step.draft_time_s)
        self._feed_proposer(plan, result)

    def release(self, req_id: str) -> None:
        self.proposer.release(req_id)

    def _record_outcomes(self, plan: StepPlan, result: StepResult, step: SpeculationStep) -> None:
        outcome = {id(s): r for s, r in zip(plan.scheduled, result.results)}
        for s, features in step.drafted:
            r = outcome[id(s)]
            k, accepted = len(s.draft_ids), r.num_accepted_drafts
            step.num_drafts += 1
            step.num_draft_tokens += k
            step.num_accepted += accepted
            step.verify_lengths.append(k)
            _grow(step, k)
            for j in range(k):
                step.count_per_position[j] += 1
                step.predicted_per_position[j] += s.predicted_survival[j]
                if j < accepted:
                    step.accepted_per_position[j] += 1
                    step.realised_per_position[j] += 1
            if self.estimator is not None and r.error is None:
                self.estimator.observe(features, k, accepted)

    def _feed_proposer(self, plan: StepPlan, result: StepResult) -> None:
        """Hand the proposer the target features of the positions committed this step."""
        if result.aux_hidden is None:
            return
        for s, hidden in zip(plan.scheduled, result.aux_hidden):
            if hidden is not None and hidden.shape[0] and not s.req.is_finished:
                self.proposer.observe(s.req.req_id, s.start_pos, hidden)


def _draft_features(proposal: DraftProposal, i: int) -> list[float | None]:
    """Per draft of request i, what the online estimator conditions on: the top probability
    of the draft distribution at that position (None for deterministic drafts).

    Not q_j(d_j), the probability of the sampled token itself: a verify length that depends
    on the value of d_j would bias the output (see docs/scheduling.md).
    """
    ids = proposal.token_ids[i]
    probs = proposal.probs[i] if proposal.probs is not None else None
    if probs is None:
        return [None] * len(ids)
    return [float(v) for v in probs[: len(ids)].max(dim=-1).values]


def _fit_budget(lengths: Sequence[int], budget: int) -> list[int]:
    """Trim verify lengths so their sum fits the step's remaining token budget.

    Takes one token at a time from the longest (later positions are the least likely to
    survive), which keeps every request's draft a prefix.
    """
    lengths = list(lengths)
    excess = sum(lengths) - max(budget, 0)
    while excess > 0:
        longest = max(range(len(lengths)), key=lambda i: lengths[i])
        lengths[longest] -= 1
        excess -= 1
    return lengths


def _grow(step: SpeculationStep, n: int) -> None:
    """Extend the per-position lists to at least n positions."""
    for per_position in (
        step.accepted_per_position,
        step.predicted_per_position,
        step.realised_per_position,
        step.count_per_position,
    ):
        per_position.extend([0] * (n - len(per_position)))  # type: ignore[list-item]
