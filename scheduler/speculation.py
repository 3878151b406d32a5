"""Drafting inside a step: propose, pick verify lengths, attach drafts; then record outcomes.

Only requests that are decoding (one new token: the anchor) draft; a request whose prompt
finishes prefilling this step samples its first token plainly, because model-based drafters
need the target's features of the positions before the anchor, which that same step computes.

Torch is not imported here: draft probabilities pass through as opaque tensors.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from operator import mul
from typing import TYPE_CHECKING, Any

from scheduler.plan import ScheduledRequest, StepPlan, StepResult

if TYPE_CHECKING:
    from scheduler.drafter import Proposer
    from scheduler.batching import ContinuousBatcher


@dataclass
class SpeculationStep:
    """What drafting did this step, for stats and for the online acceptance estimator."""

    # (request, estimator features) per request that verifies drafts this step
    drafted: list[tuple[ScheduledRequest, list[float | None]]] = field(default_factory=list)
    num_candidates: int = 0  # requests that could draft this step
    skipped: bool = False  # the draft gate said no: nobody drafted
    num_proposed: int = 0
    draft_time_s: float = 0.0
    # Filled by record_outcomes():
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted: int = 0
    verify_lengths: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    predicted_per_position: list[float] = field(default_factory=list)
    realised_per_position: list[int] = field(default_factory=list)
    count_per_position: list[int] = field(default_factory=list)


def attach_drafts(
    plan: StepPlan,
    batcher: ContinuousBatcher,
    proposer: Proposer,
    policy: Any,
    estimator: Any | None,
    gate: Any | None = None,  # scheduler.draft_gate.DraftGate
) -> SpeculationStep:
    from scheduler.drafter import DraftRequest

    t0 = time.perf_counter()
    step = SpeculationStep()
    candidates = [
        s
        for s in plan.scheduled
        if s.samples and s.num_new_tokens == 1 and s.req.params.speculative
    ]
    limits = [min(proposer.max_draft_tokens, batcher.max_draft_tokens(s)) for s in candidates]
    candidates = [s for s, k in zip(candidates, limits) if k > 0]
    limits = [k for k in limits if k > 0]
    if not candidates:
        return step
    step.num_candidates = len(candidates)
    num_sampling = sum(1 for s in plan.scheduled if s.samples)
    if gate is not None and not gate.should_draft(len(candidates), plan.num_tokens, num_sampling):
        step.skipped = True
        return step
    requests = [
        DraftRequest(s.req.req_id, s.req.all_token_ids, s.req.params, k)
        for s, k in zip(candidates, limits)
    ]
    proposal = proposer.propose(requests)
    features = [_draft_features(proposal, i) for i in range(len(candidates))]
    if proposal.confidences is not None:
        confidences = [list(c) for c in proposal.confidences]
    elif estimator is not None:
        confidences = [estimator.confidences(f) for f in features]
    else:
        confidences = [[1.0] * len(ids) for ids in proposal.token_ids]
    step.num_proposed = sum(len(ids) for ids in proposal.token_ids)
    if policy is not None:
        lengths = policy.choose(confidences, plan.num_tokens, num_sampling)
    else:
        lengths = [len(ids) for ids in proposal.token_ids]
    lengths = _fit_budget(lengths, batcher.max_num_batched_tokens - plan.num_tokens)
    for i, (s, length) in enumerate(zip(candidates, lengths)):
        length = min(length, len(proposal.token_ids[i]))
        if length == 0:
            continue
        s.draft_ids = list(proposal.token_ids[i][:length])
        probs = proposal.probs[i] if proposal.probs is not None else None
        s.draft_probs = probs[:length] if probs is not None else None
        s.predicted_survival = list(accumulate(confidences[i][:length], mul))
        step.drafted.append((s, features[i][:length]))
    step.draft_time_s = time.perf_counter() - t0
    return step


def _draft_features(proposal: Any, i: int) -> list[float | None]:
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


def record_outcomes(
    plan: StepPlan, result: StepResult, step: SpeculationStep, estimator: Any | None
) -> None:
    index = {id(s): r for s, r in zip(plan.scheduled, result.results)}
    for s, q in step.drafted:
        r = index[id(s)]
        k, accepted = len(s.draft_ids), r.num_accepted_drafts
        step.num_drafts += 1
        step.num_draft_tokens += k
        step.num_accepted += accepted
        step.verify_lengths.append(k)
        for j in range(k):
            _grow(step, j + 1)
            step.count_per_position[j] += 1
            step.predicted_per_position[j] += s.predicted_survival[j]
            if j < accepted:
                step.accepted_per_position[j] += 1
                step.realised_per_position[j] += 1
        if estimator is not None and r.error is None:
            estimator.observe(q, k, accepted)
    # Requests that could have drafted but were given length 0 count as verify length 0.
    drafted_ids = {id(s) for s, _ in step.drafted}
    step.verify_lengths.extend(
        0 for s in plan.scheduled
        if s.samples and s.num_new_tokens == 1 and s.req.params.speculative
        and id(s) not in drafted_ids and step.num_proposed
    )


def _grow(step: SpeculationStep, n: int) -> None:
    for lst, zero in (
        (step.accepted_per_position, 0),
        (step.predicted_per_position, 0.0),
        (step.realised_per_position, 0),
        (step.count_per_position, 0),
    ):
        while len(lst) < n:
            lst.append(zero)  # type: ignore[arg-type]
