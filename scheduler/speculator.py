"""Speculation in one object: the drafters, the verify policy, the acceptance estimators, the
draft gates and the throughput profile, owned by the engine as a `Speculator`.

One engine step, from speculation's side:

    attach(plan)    requests scheduled for the first time are told whether the runner feeds
                    their target features to the model drafter (`_admit`); decoding requests
                    get candidate drafts from each configured drafter, in the configured order
                    (cheap lookups first): a drafter with a gate drafts, in one batched call,
                    only for the requests where no earlier candidate is already worth what it
                    usually brings, and only when its gate says drafting them may pay; each
                    candidate gets per-position confidences (the drafter's own, or its online
                    estimator's); per request the candidate worth the most expected tokens at
                    the step's marginal token cost is kept (verify_policy's
                    `choose_candidates`), and the policy picks each kept draft's verify length
                    from its confidences and the profile (now and then a few more, to price a
                    step size the profile has not seen for a while: `_explore`); a structured
                    request's draft is then cut at the first token its grammar rejects (after
                    the policy: the policy's choice must not depend on the drafted tokens'
                    values, see docs/scheduling.md)
    (the engine runs the target forward and update())
    record(...)     acceptance per position for stats; each drafter's gate learns what its
                    drafting did, and its estimator the outcomes of its drafts (a deterministic
                    draft's from the tokens the step emitted, whether it was kept or not); the
                    profile learns the step time; the proposers get the target features of the
                    positions committed this step

Only requests that are decoding (one new token: the anchor) draft; a request whose prompt
finishes prefilling this step samples its first token plainly, because model-based drafters
need the target's features of the positions before the anchor, which that same step computes.

Torch is not imported here: draft probabilities and features pass through as opaque tensors.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from operator import mul
from typing import TYPE_CHECKING, Any

from scheduler.drafter import DraftProposal, DraftRequest, Proposer
from scheduler.plan import ScheduledRequest, StepPlan, StepResult
from scheduler.profiler import RunningRate
from scheduler.stats import DrafterStepStats
from scheduler.verify_policy import choose_candidates

if TYPE_CHECKING:
    from scheduler.acceptance import OnlineAcceptanceEstimator
    from scheduler.batching import ContinuousBatcher
    from scheduler.draft_gate import DraftGate, LookupGate
    from scheduler.profiler import ThroughputProfile
    from scheduler.verify_policy import VerifyPolicy


# A request is admitted feeding the model drafter while one of its gate's last this many
# verdicts said drafting pays (`Speculator._admit`). A verdict is about one step and a request
# lives for hundreds: where the verdict flips between drafting and probing, a request admitted
# at a "skip" would lose the drafter for its life. At 16 streams on the CPU it says skip for
# hundreds of steps in a row.
FED_WHILE_PAID_WITHIN = 64


@dataclass
class Drafter:
    """One configured drafter and what learns about it."""

    name: str
    proposer: Proposer
    estimator: OnlineAcceptanceEstimator | None = None  # its drafts' outcomes, per position
    gate: DraftGate | None = None  # whether drafting may pay this step
    lookup_gate: LookupGate | None = None  # a lookup's: whether asking may pay, per request


@dataclass
class Candidate:
    """One drafter's draft for one request this step."""

    drafter: int  # index into Speculator.drafters
    token_ids: list[int]
    probs: Any  # [k, vocab] tensor the drafts were sampled from, or None (deterministic)
    confidences: list[float]  # P(draft j accepted | drafts before j accepted)
    features: list[Hashable]  # what the drafter's estimator conditions on
    # Prefix survival the choice between drafters may read: everything for deterministic drafts;
    # for sampled ones only what is known before the first draft is drawn (see choose_candidates).
    selection_survival: list[float] = field(default_factory=list)


@dataclass
class SpeculationStep:
    """What drafting did this step, for stats and for the online acceptance estimators."""

    # (request, drafter index, estimator features) per request that verifies drafts this step
    drafted: list[tuple[ScheduledRequest, int, list[Hashable]]] = field(default_factory=list)
    # Every deterministic candidate of this step, kept or not: (request, drafter index, its
    # features, its drafts). Each teaches its drafter's estimator from the tokens the step
    # emitted (`Speculator._learn_from_emitted`), not only from what was verified: against a
    # deterministic draft d the target accepts with probability p(d), and the token it emits
    # at that position is drawn from that same p (lossless verification, whichever drafter's
    # draft was verified), so "emitted == d" is an outcome of the same law. A lookup whose
    # estimate fell too low to be verified, or whose request kept another drafter's draft,
    # would otherwise never see its cells tested again (docs/scheduling.md). It is read after
    # the step, so no choice of this step depends on it.
    deterministic: list[tuple[ScheduledRequest, int, list[Hashable], list[int]]] = field(
        default_factory=list
    )
    num_candidates: int = 0  # decoding requests that could draft this step
    # Per drafter index: the requests it was asked for, each with whether it proposed a draft.
    asked: dict[int, list[tuple[ScheduledRequest, bool]]] = field(default_factory=dict)
    skipped: bool = False  # the draft gates said no: nobody drafted
    explored: bool = False  # verified past the policy's choice to price a stale step size
    num_admitted: int = 0  # requests scheduled for the first time (`Speculator._admit`)
    num_admitted_feeding_drafter: int = 0  # of those, whose features the model drafter gets
    num_proposed: int = 0
    draft_time_s: float = 0.0
    # Of draft_time_s, what the proposers did not spend: candidates, confidences, the choice
    # between drafters and of verify lengths. The gates are charged it (`_charge_gates`).
    bookkeeping_s: float = 0.0
    per_drafter: list[DrafterStepStats] = field(default_factory=list)
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
        proposer: Proposer | Sequence[Drafter],
        policy: VerifyPolicy,
        estimator: OnlineAcceptanceEstimator | None = None,
        profile: ThroughputProfile | None = None,  # kept current from real step times
        gate: DraftGate | None = None,
        clock: Callable[[], float] = time.perf_counter,
        own_pass_above: int | None = None,
        explore_every: int = 64,
        feed_drafter_every: int = 8,
    ) -> None:
        """One proposer (with its estimator and gate), or several Drafters: a composite.

        explore_every: steps between two that verify past the policy's choice to price a step
        size the profile has not observed for a while (`_explore`); 0: never.

        feed_drafter_every: while the model drafter does not pay, one request in this many
        still feeds it its target features, so that its gate goes on probing (`_admit`); 1:
        every request does.

        own_pass_above: queries longer than this many tokens run through a forward of their
        own (the compiled CPU step runs prompt chunks as a pass of their own), so the drafts
        share their weight products only with the step's other tokens, and verifying them is
        priced against those (see `_tokens_beside_drafts`). None: every token shares one pass.
        """
        if isinstance(proposer, Sequence):
            self.drafters = list(proposer)
        else:
            self.drafters = [Drafter("draft", proposer, estimator, gate)]
        if not self.drafters:
            raise ValueError("a Speculator needs at least one drafter")
        # The model drafters: those that read the target's features (`_admit`).
        self._feature_readers = [d for d in self.drafters if d.proposer.aux_layer_ids]
        needs_features = {tuple(d.proposer.aux_layer_ids) for d in self._feature_readers}
        if len(needs_features) > 1:
            raise ValueError("drafters that read different target layers cannot be combined")
        self._aux_layer_ids = needs_features.pop() if needs_features else ()
        self.policy = policy
        self.profile = profile
        # Tokens per second over recent decode steps: what a verified draft must beat.
        self.rate = RunningRate()
        self.clock = clock
        self.own_pass_above = own_pass_above
        if explore_every < 0:
            raise ValueError("explore_every must be >= 0")
        self.explore_every = explore_every
        self._steps_since_explore = 0
        if feed_drafter_every < 1:
            raise ValueError("feed_drafter_every must be >= 1")
        self.feed_drafter_every = feed_drafter_every
        self._admitted_not_feeding = 0

    @property
    def aux_layer_ids(self) -> tuple[int, ...]:
        """Target layers whose outputs the proposers read (the runner returns them)."""
        return self._aux_layer_ids

    @property
    def max_draft_tokens(self) -> int:
        return max(d.proposer.max_draft_tokens for d in self.drafters)

    def profile_table(self) -> list[tuple[int, float]]:
        return self.profile.table() if self.profile is not None else []

    def memory(self) -> dict[str, int]:
        """Index sizes of drafters that keep one (the suffix drafter), for /metrics."""
        out: dict[str, int] = {}
        for d in self.drafters:
            report = getattr(d.proposer, "memory", None)
            if report is not None:
                out.update({f"{d.name}_{k}": v for k, v in report().items()})
        return out

    # -- before the forward ---------------------------------------------------------------
    def attach(self, plan: StepPlan, batcher: ContinuousBatcher) -> SpeculationStep:
        """Draft for the plan's decoding requests and attach each one's verified prefix."""
        t0 = self.clock()
        step = SpeculationStep(per_drafter=[DrafterStepStats(d.name) for d in self.drafters])
        self._admit(plan, step)
        requests, limits = [], []
        for s in plan.scheduled:
            if not (s.is_decoding and s.req.params.speculative):
                continue
            k = min(self.max_draft_tokens, batcher.max_draft_tokens(s))
            if k > 0:
                requests.append(s)
                limits.append(k)
        if not requests:
            return step
        step.num_candidates = len(requests)
        self._steps_since_explore += 1
        num_sampling = sum(1 for s in plan.scheduled if s.samples)
        base = self._tokens_beside_drafts(plan)
        rate = self.rate.value if self.policy.uses_profile else None
        token_cost = self._token_cost(base, num_sampling, rate)
        prices = (token_cost, self._rate_now(base, num_sampling, rate))
        per_request: list[list[Candidate]] = [[] for _ in requests]
        for di, d in enumerate(self.drafters):
            self._draft_with(di, d, requests, limits, per_request, base, num_sampling, step, prices)
        if not any(st.num_asked for st in step.per_drafter):
            step.skipped = any(st.skipped or st.num_gated for st in step.per_drafter)
            return step
        picks = choose_candidates(
            [[c.selection_survival for c in cands] for cands in per_request], token_cost
        )
        chosen = [None if k is None else cands[k] for cands, k in zip(per_request, picks)]
        offered = [c for c in chosen if c is not None]
        confidences = [c.confidences for c in offered]
        # Where no kept draft was sampled or every request decodes greedily, a verify length
        # may read the whole draft (verify_policy.VerifyPolicy.choose).
        lookahead = all(
            c.probs is None or s.req.params.is_greedy
            for s, c in zip(requests, chosen) if c is not None
        )
        lengths = iter(self.policy.choose(confidences, base, num_sampling, lookahead, rate=rate))
        lengths_all = [next(lengths) if c is not None else 0 for c in chosen]
        lengths_all = self._explore(chosen, lengths_all, base, step)
        lengths_all = _fit_budget(lengths_all, batcher.max_num_batched_tokens - plan.num_tokens)
        for s, c, length in zip(requests, chosen, lengths_all):
            if c is None:
                continue
            step.per_drafter[c.drafter].num_chosen += 1
            length = min(length, len(c.token_ids))
            ids = c.token_ids[:length]
            valid = batcher.num_valid_drafts(s.req, ids)
            if valid < length and c.probs is not None:
                # Cut at the first draft the grammar rejects. Whether that happens depends on
                # the sampled token, so the token sampled in its place must come from the
                # residual against its q, exactly as if the target had rejected it:
                # draft_probs keeps that one extra row (scheduler/sampling.py).
                s.draft_probs = c.probs[: valid + 1]
            elif valid:
                s.draft_probs = c.probs[:valid] if c.probs is not None else None
            if valid == 0:
                continue
            s.draft_ids = ids[:valid]
            s.predicted_survival = list(accumulate(c.confidences[:valid], mul))
            step.drafted.append((s, c.drafter, c.features[:valid]))
        # Requests that could have drafted but were given length 0 count as verify length 0.
        if step.num_proposed:
            step.verify_lengths.extend(0 for s in requests if not s.draft_ids)
        step.draft_time_s = self.clock() - t0
        step.bookkeeping_s = step.draft_time_s - sum(st.draft_time_s for st in step.per_drafter)
        return step

    def _draft_with(
        self,
        di: int,
        d: Drafter,
        requests: list[ScheduledRequest],
        limits: list[int],
        per_request: list[list[Candidate]],
        num_base_tokens: int,
        num_sampling: int,
        step: SpeculationStep,
        prices: tuple[float, float],
    ) -> None:
        """Candidates from drafter d for the requests it may pay for (one propose call).
        prices: (token cost, the engine's tokens per second), what `LookupGate.asks` reads."""
        stats = step.per_drafter[di]
        asked = list(range(len(requests)))
        if d.proposer.aux_layer_ids:  # a model drafter drafts where it is fed (`_admit`)
            asked = [i for i in asked if requests[i].req.feeds_drafter]
            if not asked:
                return
        if d.lookup_gate is not None:
            req_ids = [requests[i].req.req_id for i in asked]
            verdicts = d.lookup_gate.asks(req_ids, *prices, float(num_sampling))
            stats.num_gated = verdicts.count(False)
            asked = [i for i, ask in zip(asked, verdicts) if ask]
            if not asked:
                return
        if d.gate is not None:
            usual = d.gate.means.accepted if d.gate.means is not None else float("inf")
            # Where an earlier (cheaper) candidate already expects what d usually brings, d
            # would only add its drafting time.
            asked = [
                i for i in asked
                if max((sum(c.selection_survival) for c in per_request[i]), default=-1) < usual
            ]
            if not asked:
                return
            if not d.gate.should_draft(len(asked), num_base_tokens, num_sampling):
                stats.skipped = True
                return
        t0 = self.clock()
        proposal = d.proposer.propose(
            [
                DraftRequest(
                    requests[i].req.req_id, requests[i].req.all_token_ids,
                    requests[i].req.params, limits[i], requests[i].req.num_prompt_tokens,
                )
                for i in asked
            ]
        )
        stats.draft_time_s = self.clock() - t0
        stats.num_asked = len(asked)
        step.asked[di] = [(requests[i], bool(proposal.token_ids[n])) for n, i in enumerate(asked)]
        for n, i in enumerate(asked):
            ids = list(proposal.token_ids[n][: limits[i]])
            if not ids:
                continue
            c = self._candidate(di, d, proposal, n, ids)
            per_request[i].append(c)
            if c.probs is None:  # learns from the emitted tokens, kept or not
                step.deterministic.append((requests[i], di, c.features, c.token_ids))
            stats.num_proposed += len(ids)
            step.num_proposed += len(ids)

    def _candidate(
        self, di: int, d: Drafter, proposal: DraftProposal, n: int, ids: list[int]
    ) -> Candidate:
        k = len(ids)
        probs = proposal.probs[n] if proposal.probs is not None else None
        features = _draft_features(proposal, n, k)
        if proposal.confidences is not None:  # the drafter's own (DSpark's calibrated head)
            confidences = [float(c) for c in proposal.confidences[n][:k]]
        elif d.estimator is not None:
            confidences = d.estimator.confidences(features)
        else:
            confidences = [1.0] * k
        if probs is None:  # deterministic: the drafts are functions of the context
            selection = list(accumulate((min(1.0, max(0.0, c)) for c in confidences), mul))
        else:
            # Sampled: confidence j >= 1 reads drafts before j; the choice between drafters
            # may not, or a draft's own value would decide whether it is verified. Position 0's
            # confidence (known before any draft is drawn), then the drafter's usual rates.
            rates = d.estimator.position_rates(k) if d.estimator is not None else [1.0] * k
            selection = list(accumulate([min(1.0, max(0.0, confidences[0])), *rates[1:]], mul))
        return Candidate(di, ids, probs, confidences, features, selection)

    def _admit(self, plan: StepPlan, step: SpeculationStep) -> None:
        """Whether the runner feeds the model drafter the target features of each request
        scheduled for the first time (Request.feeds_drafter): where one of the drafter's gate's
        last `FED_WHILE_PAID_WITHIN` verdicts said drafting pays (`DraftGate.paid_within`),
        and otherwise one request in `feed_drafter_every`.

        A model drafter drafts from the features of every position of a request, so they are
        handed to it from the request's first step on or never, and that is a cost on every
        token: the hand-over, and each draft (a probe too) first folds every position since
        the last into the draft's own cache. At 16 streams on the CPU the composite lost
        ~1.5 ms of a 34 ms step to that and its probes (docs/benchmarks.md), though its gate
        drafted there only to probe. (The runner still stores every request's features with
        its blocks: a block serves later requests, which may draft.) The load a request is
        admitted at is the one it mostly runs at; where it falls, the requests that feed the
        drafter let the gate's probes see it, and the next requests feed it too. The verdict
        reads the gate's past verdicts and a count of admissions, never a draft: lossless like
        the gate's."""
        new = [s.req for s in plan.scheduled if s.req.feeds_drafter is None]
        if not new:
            return
        if not self._feature_readers:  # lookups only: nobody reads features
            for req in new:
                req.feeds_drafter = False
            return
        pays = any(
            d.gate is None or d.gate.paid_within(FED_WHILE_PAID_WITHIN)
            for d in self._feature_readers
        )
        for req in new:
            feeds = req.params.speculative
            if feeds and not pays:
                self._admitted_not_feeding += 1
                feeds = self._admitted_not_feeding % self.feed_drafter_every == 0
            req.feeds_drafter = feeds
            step.num_admitted += 1
            step.num_admitted_feeding_drafter += feeds

    def _explore(
        self, chosen: list[Candidate | None], lengths: list[int], num_base_tokens: int,
        step: SpeculationStep,
    ) -> list[int]:
        """At the first step with drafts on offer after `explore_every` steps, verify up to
        gamma more drafts than the policy chose, to reach the step size above the chosen one
        that the profile has not observed for the longest while (ThroughputProfile.stale_size).

        The policy only ever chooses sizes the profile prices well, so a size it prices too
        high is never observed and never corrected; an engine whose start-up seed caught a
        slow spell kept avoiding the sizes it overpriced. Verifying more drafts is lossless,
        and the extra tokens are spread over the requests by how many drafts each has left,
        never by their values or confidences, so a sampled draft's value still decides
        nothing (docs/scheduling.md). At most gamma tokens once in `explore_every` steps: at
        one stream on the CPU at most ~0.7 of a step in 64, at 16 streams ~0.2 of a step."""
        if (
            self.profile is None or not self.policy.uses_profile or not self.explore_every
            or self._steps_since_explore < self.explore_every
        ):
            return lengths
        room = [len(c.token_ids) - n if c is not None else 0 for c, n in zip(chosen, lengths)]
        size = num_base_tokens + sum(lengths)
        stale = self.profile.stale_size(size, size + min(sum(room), self.max_draft_tokens))
        if stale is None:
            return lengths
        self._steps_since_explore = 0
        step.explored = True
        lengths = list(lengths)
        for _ in range(stale - size):
            most = max(range(len(room)), key=room.__getitem__)
            lengths[most] += 1
            room[most] -= 1
        return lengths

    def _tokens_beside_drafts(self, plan: StepPlan) -> int:
        """Tokens of the step that go through the drafts' forward pass: all of them, or, where
        long queries run a pass of their own, the short ones. A prompt chunk of 200 tokens
        beside 16 decodes made the 17th row look like 0.5 % more work, where it costs the
        decode pass 14 % (the int4 kernel's stairs, scheduler/profiler.py); pricing drafts
        against the decodes alone leaves out the chunk's time, which errs toward verifying
        less."""
        if self.own_pass_above is None:
            return plan.num_tokens
        short = (s.num_query_tokens for s in plan.scheduled)
        return sum(n for n in short if n <= self.own_pass_above)

    def _rate_now(self, num_base_tokens: int, num_sampling: int, rate: float | None) -> float:
        """Tokens per second the engine makes: the running rate, or before there is one the
        plain step's, R / T(B); 0 without a profile (time is then not priced)."""
        if self.profile is None or not self.policy.uses_profile:
            return 0.0
        return rate if rate is not None else num_sampling / self.profile.step_time(num_base_tokens)

    def _token_cost(self, num_base_tokens: int, num_sampling: int, rate: float | None) -> float:
        """What one more verified token costs, in emitted tokens: the running rate times its
        time, lambda x (T(B+1) - T(B)) (verify_policy.step_value); before there is a rate,
        at the plain step's rate, R x (T(B+1)/T(B) - 1)."""
        if self.profile is None or not self.policy.uses_profile:
            return 0.0
        t = self.profile.step_time
        extra = t(num_base_tokens + 1) - t(num_base_tokens)
        return self._rate_now(num_base_tokens, num_sampling, rate) * extra

    # -- after update() -------------------------------------------------------------------
    def record(
        self, plan: StepPlan, result: StepResult, step: SpeculationStep, step_time_s: float
    ) -> None:
        """Learn from this step: outcomes per draft position, gates, profile, proposer features."""
        t0 = self.clock()
        self._record_outcomes(plan, result, step)
        lookup_outcomes = self._lookup_outcomes(plan, result, step)
        self._charge_gates(step, lookup_outcomes, step.bookkeeping_s + (self.clock() - t0))
        if self.profile is not None and self._tokens_beside_drafts(plan) == plan.num_tokens:
            # The step without drafting: when verify lengths are chosen the drafting time is
            # already spent, so what one more verified token costs is the rest of the step
            # (the draft gates account for drafting separately). Real steps keep the curve
            # current with co-located load and context growth. A step whose prompt chunks
            # ran a pass of their own is two passes, not a point of the curve: skipped.
            self.profile.observe(plan.num_tokens, step_time_s - step.draft_time_s)
        if all(s.is_decoding for s in plan.scheduled):
            self.rate.observe(sum(len(r.token_ids) for r in result.results), step_time_s)
        self._feed_proposers(plan, result)

    def release(self, req_id: str) -> None:
        for d in self.drafters:
            d.proposer.release(req_id)
            if d.lookup_gate is not None:
                d.lookup_gate.forget(req_id)

    def _charge_gates(
        self, step: SpeculationStep, lookup_outcomes: dict[int, list[tuple[str, int, int]]],
        bookkeeping_s: float,
    ) -> None:
        """Each gate learns what its drafter's asks cost this step and what they brought.

        A step that asks costs more than its proposers' time: building the candidates and
        their confidences, the choice between drafters and of verify lengths, learning the
        outcomes. At 16 streams on the CPU that is 1-1.5 % of a step, about what verifying
        there wins (docs/benchmarks.md), so gates that weighed the proposers alone drafted
        where the step lost. It is split between the drafters by their asks. (The proposers'
        features and the profile are fed on every step, asked or not: not charged.)"""
        num_asks = sum(st.num_asked for st in step.per_drafter)
        for di, (d, st) in enumerate(zip(self.drafters, step.per_drafter)):
            if not st.num_asked:
                continue
            cost_s = st.draft_time_s + bookkeeping_s * st.num_asked / num_asks
            if d.gate is not None:
                d.gate.record(st.num_asked, cost_s, st.num_draft_tokens, st.num_accepted)
            if d.lookup_gate is not None:
                d.lookup_gate.record(lookup_outcomes.get(di, []), cost_s, st.num_asked)

    def _lookup_outcomes(
        self, plan: StepPlan, result: StepResult, step: SpeculationStep
    ) -> dict[int, list[tuple[str, int, int]]]:
        """Per lookup drafter, what its draft brought each request it asked: the drafts
        verified and accepted where the request kept it, nothing where it proposed none or the
        policy verified none. Where the request kept another drafter's draft over its
        proposal, the ask teaches nothing: its worth beside that draft is not known, and
        counting it as nothing let a composite's model drafter, which wins choices at 16
        streams by its first position alone, switch the lookup off on copy prompts."""
        if not step.asked:
            return {}
        kept = {id(s): di for s, di, _ in step.drafted}
        accepted = {id(s): r.num_accepted_drafts for s, r in zip(plan.scheduled, result.results)}
        found = {}
        for di, d in enumerate(self.drafters):
            if d.lookup_gate is None or di not in step.asked:
                continue
            outcomes = []
            for s, proposed in step.asked[di]:
                by = kept.get(id(s))
                if by == di:
                    outcomes.append((s.req.req_id, len(s.draft_ids), accepted[id(s)]))
                elif by is None or not proposed:
                    outcomes.append((s.req.req_id, 0, 0))
            found[di] = outcomes
        return found

    def _record_outcomes(self, plan: StepPlan, result: StepResult, step: SpeculationStep) -> None:
        if not (step.drafted or step.deterministic):
            return  # nothing verified or proposed (at saturation, most steps)
        outcome = {id(s): r for s, r in zip(plan.scheduled, result.results)}
        for s, di, features in step.drafted:
            r = outcome[id(s)]
            k, accepted = len(s.draft_ids), r.num_accepted_drafts
            step.num_drafts += 1
            step.num_draft_tokens += k
            step.num_accepted += accepted
            per = step.per_drafter[di]
            per.num_drafts += 1
            per.num_draft_tokens += k
            per.num_accepted += accepted
            step.verify_lengths.append(k)
            _grow(step, k)
            for j in range(k):
                step.count_per_position[j] += 1
                step.predicted_per_position[j] += s.predicted_survival[j]
                if j < accepted:
                    step.accepted_per_position[j] += 1
                    step.realised_per_position[j] += 1
            estimator = self.drafters[di].estimator
            if s.draft_probs is not None and estimator is not None and r.error is None:
                estimator.observe(features, k, accepted)  # sampled drafts: what was verified
        for s, di, features, drafts in step.deterministic:
            estimator, r = self.drafters[di].estimator, outcome[id(s)]
            if estimator is not None and r.error is None:
                _learn_from_emitted(estimator, features, drafts, r.token_ids)

    def _feed_proposers(self, plan: StepPlan, result: StepResult) -> None:
        """Hand the proposers the target features of the positions committed this step."""
        if result.aux_hidden is None:
            return
        for s, hidden in zip(plan.scheduled, result.aux_hidden):
            if hidden is not None and hidden.shape[0] and not s.req.is_finished:
                for d in self._feature_readers:
                    d.proposer.observe(s.req.req_id, s.first_feature_pos, hidden)


def _learn_from_emitted(
    estimator: OnlineAcceptanceEstimator,
    features: list[Hashable],
    drafts: list[int],
    emitted: Sequence[int],
) -> None:
    """A deterministic draft's outcome read off the emitted tokens: drafts before the first
    one that differs were accepted, that one rejected, the rest untested (SpeculationStep)."""
    n = min(len(drafts), len(emitted))
    matched = next((j for j in range(n) if drafts[j] != emitted[j]), n)
    tested = matched + (matched < n)
    estimator.observe(features[:tested], tested, matched)


def _draft_features(proposal: DraftProposal, i: int, k: int) -> list[Hashable]:
    """Per draft of request i, what the online estimator conditions on: the drafter's own
    features if it gives some, else the top probability of the draft distribution at that
    position (None for deterministic drafts).

    Not q_j(d_j), the probability of the sampled token itself: a verify length that depends
    on the value of d_j would bias the output (see docs/scheduling.md).
    """
    if proposal.features is not None:
        return list(proposal.features[i][:k])
    probs = proposal.probs[i] if proposal.probs is not None else None
    if probs is None:
        return [None] * k
    return [float(v) for v in probs[:k].max(dim=-1).values]


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
