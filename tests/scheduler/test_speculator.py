"""The Speculator inside the engine loop (FakeRunner, no torch model): what it records per step."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from scheduler.batching import ContinuousBatcher
from scheduler.drafter import DraftProposal, DraftRequest
from scheduler.engine import LLMEngine, ServedModel
from scheduler.fake import FakeRunner
from scheduler.plan import StepPlan
from scheduler.request import Request, SamplingParams
from scheduler.speculator import FED_WHILE_PAID_WITHIN, Drafter, Speculator
from scheduler.stats import StepStats
from scheduler.verify_policy import FixedLength
from tests.scheduler.test_policy_never_slower import SimClock

EOS = 999
FAKE_IDS = list(range(100, 140))


class RepeatProposer:
    """Always proposes k copies of one token (deterministic drafts), and logs what it is told."""

    aux_layer_ids: tuple[int, ...] = ()

    def __init__(self, gamma: int) -> None:
        self.max_draft_tokens = gamma
        self.released: list[str] = []

    def propose(self, requests: Sequence[DraftRequest]) -> DraftProposal:
        return DraftProposal([[FAKE_IDS[0]] * r.num_draft_tokens for r in requests])

    def observe(self, req_id: str, start_pos: int, hidden: object) -> None:
        pass

    def release(self, req_id: str) -> None:
        self.released.append(req_id)


def _engine(budget: int, proposer: RepeatProposer) -> tuple[LLMEngine, list[int]]:
    """An engine whose every plan is logged as the number of decoding requests in it, counted
    from the requests' counters when the plan is made (before update() moves them)."""
    batcher = ContinuousBatcher(2, 64, budget)
    decoding_per_step: list[int] = []
    schedule = batcher.schedule

    def logged_schedule() -> StepPlan:
        plan = schedule()
        decoding_per_step.append(
            sum(
                1 for s in plan.scheduled
                if s.num_new_tokens == 1 and s.req.num_computed_tokens + 1 == s.req.num_tokens
            )
        )
        return plan

    batcher.schedule = logged_schedule  # type: ignore[method-assign]
    speculator = Speculator(proposer, FixedLength(proposer.max_draft_tokens))
    model = ServedModel("fake", None, frozenset({EOS}))
    return LLMEngine(FakeRunner(FAKE_IDS, EOS), batcher, model, speculator), decoding_per_step


def test_prefill_chunks_of_one_token_are_not_recorded_as_verifications() -> None:
    """A budget of 2 gives a decoding request 1 token and a prefilling one a 1-token chunk; after
    update() that chunk's request looks like it sampled. Only decoding requests may appear in
    verify_lengths (the bug: every such chunk was counted as a verification of length 0)."""
    proposer = RepeatProposer(gamma=3)
    engine, decoding_per_step = _engine(budget=2, proposer=proposer)
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    engine.add_request(Request("a", [1, 2], greedy))
    engine.add_request(Request("b", list(range(1, 9)), greedy))
    one_token_chunks = verifications = 0
    while engine.has_work:
        plan_steps = len(decoding_per_step)
        stepped = engine.step()
        assert stepped is not None
        _, stats = stepped
        decoding = decoding_per_step[plan_steps]
        one_token_chunks += stats.num_prefill_tokens == 1
        verifications += len(stats.verify_lengths)
        # A decoding request without room left in max_tokens does not draft at all.
        assert len(stats.verify_lengths) <= decoding
        if not stats.num_draft_tokens_proposed:
            assert stats.verify_lengths == []
    assert one_token_chunks >= 3, "the scenario must include 1-token prefill chunks"
    assert verifications >= 5
    assert sorted(proposer.released) == ["a", "b"]


def test_drafts_are_recorded_per_position_and_outputs_stay_exact() -> None:
    """The fake target accepts a draft of FAKE_IDS[0] only at output position 0: the first
    verification accepts one draft, later ones none, and the text is the fake model's."""
    proposer = RepeatProposer(gamma=3)
    engine, _ = _engine(budget=16, proposer=proposer)
    greedy = SamplingParams(max_tokens=10, temperature=0.0)
    engine.add_request(Request("a", [1, 2, 3], greedy))
    out: list[int] = []
    accepted = proposed = 0
    while engine.has_work:
        stepped = engine.step()
        assert stepped is not None
        outputs, stats = stepped
        out += [t for o in outputs for t in o.new_token_ids]
        accepted += stats.num_accepted_tokens
        proposed += stats.num_draft_tokens
        assert sum(stats.count_per_position) == stats.num_draft_tokens
        assert sum(stats.accepted_per_position) == stats.num_accepted_tokens
    assert out == FAKE_IDS[:10]
    assert proposed > 0
    assert accepted == 0  # the anchor is FAKE_IDS[0] itself; drafts repeat it, never the next


class ScriptedProposer:
    """Proposes fixed drafts with fixed confidences; `sampled` marks them as drawn from a q."""

    aux_layer_ids: tuple[int, ...] = ()
    max_draft_tokens = 4

    def __init__(self, confidences: list[float], sampled: bool) -> None:
        self.confidences, self.sampled = confidences, sampled

    def propose(self, requests: Sequence[DraftRequest]) -> DraftProposal:
        n = len(requests)
        k = len(self.confidences)
        return DraftProposal(
            [[FAKE_IDS[1]] * k for _ in requests],
            probs=[[[1.0]] * k for _ in requests] if self.sampled else None,
            confidences=[list(self.confidences) for _ in range(n)],
            features=[[None] * k for _ in range(n)],
        )

    def observe(self, req_id: str, start_pos: int, hidden: object) -> None:
        pass

    def release(self, req_id: str) -> None:
        pass


def _kept(lookup: list[float], model: list[float], model_sampled: bool) -> str | None:
    from scheduler.acceptance import OnlineAcceptanceEstimator

    speculator = Speculator(
        [
            Drafter("lookup", ScriptedProposer(lookup, sampled=False), OnlineAcceptanceEstimator()),
            Drafter("model", ScriptedProposer(model, model_sampled), OnlineAcceptanceEstimator()),
        ],
        FixedLength(4),
    )
    batcher = ContinuousBatcher(2, 64, 64)
    batcher.add(Request("a", [1, 2, 3], SamplingParams(max_tokens=10)))
    plan = batcher.schedule()
    batcher.update(plan, FakeRunner(FAKE_IDS, EOS).execute(plan))  # prefill: now decoding
    step = speculator.attach(batcher.schedule(), batcher)
    kept = [d.name for d in step.per_drafter if d.num_chosen]
    return kept[0] if kept else None


def test_composite_keeps_the_better_draft_and_never_reads_a_sampled_drafts_later_confidences():
    # Deterministic drafts are read in full: the model's long confident draft wins.
    assert _kept([0.6, 0.5], [0.7, 0.95, 0.95, 0.95], model_sampled=False) == "model"
    assert _kept([0.6, 0.5], [0.7, 0.05, 0.05, 0.05], model_sampled=False) == "lookup"
    # Sampled drafts: confidences after the first depend on the drafted tokens, so the choice
    # sees only the first one and the drafter's past rates (the prior here): the same either way.
    high = _kept([0.6, 0.5], [0.7, 0.95, 0.95, 0.95], model_sampled=True)
    low = _kept([0.6, 0.5], [0.7, 0.05, 0.05, 0.05], model_sampled=True)
    assert high == low


class RecordingPolicy(FixedLength):
    """Verifies everything, and logs the base token count and the rate each step was priced
    with. `uses_profile`: whether the Speculator treats it as reading the profile (and so
    hands it the running rate)."""

    def __init__(self, k: int, uses_profile: bool = False) -> None:
        super().__init__(k)
        self.uses_profile = uses_profile
        self.bases: list[int] = []
        self.rates: list[float | None] = []

    def choose(
        self, confidences, num_base_tokens, num_sampling_requests=None, lookahead=False, rate=None
    ):
        self.bases.append(num_base_tokens)
        self.rates.append(rate)
        return super().choose(confidences, num_base_tokens, num_sampling_requests, lookahead)


def test_drafts_are_priced_against_the_tokens_of_their_own_pass() -> None:
    """Where long queries run a forward of their own (the compiled CPU step's eager prompt
    chunks), a decode's drafts share products only with the short queries: the policy prices
    them against those. Without the split, against the whole step."""
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    bases = {}
    for own_pass_above in (None, 16):
        policy = RecordingPolicy(3)
        speculator = Speculator(RepeatProposer(3), policy, own_pass_above=own_pass_above)
        engine = LLMEngine(
            FakeRunner(FAKE_IDS, EOS), ContinuousBatcher(2, 128, 64),
            ServedModel("fake", None, frozenset({EOS})), speculator,
        )
        engine.add_request(Request("decoding", [1, 2, 3], greedy))
        engine.step()  # its prefill: it decodes from the next step on
        engine.add_request(Request("long", list(range(1, 41)), greedy))  # a 40-token chunk
        engine.step()
        bases[own_pass_above] = policy.bases[0]
    assert bases == {None: 41, 16: 1}  # the anchor beside the 40-token chunk, or it alone


def test_the_running_rate_counts_decode_steps_only() -> None:
    """The policy's lambda is tokens per second over steps where every request decodes: a
    prompt chunk's step (work owed whatever is verified) leaves it as it was."""
    greedy = SamplingParams(max_tokens=30, temperature=0.0)
    policy = RecordingPolicy(3, uses_profile=True)
    ticks = iter(range(100_000))
    speculator = Speculator(RepeatProposer(3), policy)
    engine = LLMEngine(
        FakeRunner(FAKE_IDS, EOS), ContinuousBatcher(2, 128, 64),
        ServedModel("fake", None, frozenset({EOS})), speculator,
        clock=lambda: 0.01 * next(ticks),  # 10 ms per reading
    )
    engine.add_request(Request("a", [1, 2, 3], greedy))
    engine.step()  # the prefill: not a decode step
    assert speculator.rate.value is None
    tokens = seconds = 0.0
    while engine.has_work:
        stepped = engine.step()
        assert stepped is not None
        outputs, stats = stepped
        tokens = 0.98 * tokens + sum(len(o.new_token_ids) for o in outputs)
        seconds = 0.98 * seconds + stats.step_time_s
    assert policy.rates[0] is None  # the first decode step had no rate yet
    assert policy.rates[-1] is not None
    assert speculator.rate.value == pytest.approx(tokens / seconds)


def _serve_greedily(speculator: Speculator) -> list[StepStats]:
    """One greedy request of 12 tokens through an engine on FakeRunner; each step's stats."""
    engine = LLMEngine(
        FakeRunner(FAKE_IDS, EOS), ContinuousBatcher(2, 128, 64),
        ServedModel("fake", None, frozenset({EOS})), speculator,
    )
    engine.add_request(Request("a", [1, 2, 3], SamplingParams(max_tokens=12, temperature=0.0)))
    steps = []
    while engine.has_work:
        stepped = engine.step()
        assert stepped is not None
        steps.append(stepped[1])
    return steps


class OracleProposer(RepeatProposer):
    """Proposes exactly what FakeRunner will emit: every draft is right."""

    def propose(self, requests: Sequence[DraftRequest]) -> DraftProposal:
        drafts = []
        for r in requests:
            n = len(r.token_ids) - (r.num_prompt_tokens or 0)  # outputs so far
            drafts.append(FAKE_IDS[n : n + r.num_draft_tokens])
        return DraftProposal(drafts)


def test_the_first_draft_left_out_still_teaches_the_estimator() -> None:
    """A deterministic draft the policy does not verify is tested by the token the step emits
    in its place: position 2 of drafts verified 2 at a time, and position 0 of drafts never
    verified, are learned (here: always right)."""
    from scheduler.acceptance import OnlineAcceptanceEstimator

    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    seen = {}
    for k in (2, 0):
        estimator = OnlineAcceptanceEstimator()
        speculator = Speculator(OracleProposer(4), FixedLength(k), estimator=estimator)
        engine = LLMEngine(
            FakeRunner(FAKE_IDS, EOS), ContinuousBatcher(2, 128, 64),
            ServedModel("fake", None, frozenset({EOS})), speculator,
        )
        engine.add_request(Request("a", [1, 2, 3], greedy))
        while engine.has_work:
            engine.step()
        seen[k] = {c.position: (c.count, c.mean_realised) for c in estimator.calibration()}
    assert set(seen[2]) == {0, 1, 2} and seen[2][2][0] > 0 and seen[2][2][1] == 1.0
    # 11 decode steps; the last, one token from the limit, drafts nothing
    assert set(seen[0]) == {0} and seen[0][0] == (10, 1.0)


def test_a_lookup_whose_draft_was_not_kept_still_learns_from_the_emitted_tokens() -> None:
    """In a composite where another drafter's confident draft is kept every step, the lookup's
    drafts are never verified, yet its estimator learns them from the tokens each step emits
    (here: always right, as far as the emitted tokens reach), so its cells do not stay at the
    prior while another drafter wins."""
    from scheduler.acceptance import OnlineAcceptanceEstimator

    lookup = OnlineAcceptanceEstimator()
    speculator = Speculator(
        [
            Drafter("lookup", OracleProposer(4), lookup),
            Drafter("model", ScriptedProposer([0.99] * 4, sampled=False), None),
        ],
        FixedLength(4),
    )
    chosen = {"lookup": 0, "model": 0}
    for stats in _serve_greedily(speculator):
        for d in stats.drafters:
            chosen[d.name] += d.num_chosen
    assert chosen["lookup"] == 0 and chosen["model"] > 0
    # The model's drafts repeat FAKE_IDS[1]: right once, at the first decode step, which then
    # emits two tokens; every other step emits one. The lookup is tested as far as they reach.
    learned = {c.position: (c.count, c.mean_realised) for c in lookup.calibration()}
    assert learned == {0: (9, 1.0), 1: (1, 1.0)}  # the last step, at the limit, drafts nothing


class SilentProposer(RepeatProposer):
    """A lookup that never finds a match."""

    def propose(self, requests: Sequence[DraftRequest]) -> DraftProposal:
        return DraftProposal([[] for _ in requests])


@pytest.mark.parametrize("lookup_proposer", [OracleProposer, SilentProposer])
def test_a_lookup_gate_counts_an_ask_whose_draft_lost_the_choice_as_unknown(lookup_proposer):
    """An ask whose draft another drafter's beat says nothing of what asking is worth: counted
    as nothing, the model drafter that wins at 16 streams by its first position alone switched
    the lookup off on copy prompts. An ask that found nothing is worth nothing."""
    from scheduler.acceptance import OnlineAcceptanceEstimator
    from scheduler.draft_gate import LookupGate

    gate = LookupGate()
    speculator = Speculator(
        [
            Drafter("lookup", lookup_proposer(4), OnlineAcceptanceEstimator(), lookup_gate=gate),
            Drafter("model", ScriptedProposer([0.99] * 4, sampled=False), None),
        ],
        FixedLength(4),
    )
    _serve_greedily(speculator)
    assert gate.ask_s is not None  # every ask's time is learned
    if lookup_proposer is OracleProposer:
        assert gate.prior is None  # its drafts always lost to the model's
    else:
        assert gate.prior == 0.0


class TimedProposer(RepeatProposer):
    """Drafting costs `propose_s` (simulated)."""

    def __init__(self, gamma: int, clock: SimClock, propose_s: float) -> None:
        super().__init__(gamma)
        self.clock, self.propose_s = clock, propose_s

    def propose(self, requests: Sequence[DraftRequest]) -> DraftProposal:
        self.clock.t += self.propose_s
        return super().propose(requests)


class SlowPolicy(FixedLength):
    """Choosing verify lengths costs `choose_s` (simulated): the step's bookkeeping."""

    def __init__(self, k: int, clock: SimClock, choose_s: float) -> None:
        super().__init__(k)
        self.clock, self.choose_s = clock, choose_s

    def choose(self, confidences, num_base_tokens, num_sampling_requests=None, lookahead=False,
               rate=None):
        self.clock.t += self.choose_s
        return super().choose(confidences, num_base_tokens, num_sampling_requests, lookahead)


def test_the_gates_are_charged_the_steps_bookkeeping_split_by_their_asks() -> None:
    """What a gate weighs per ask is its proposer's time plus its share of the step's
    bookkeeping (here the policy's choice of verify lengths), split by asks between the
    drafters. Weighing the proposers alone, the gates drafted at 16 streams where the
    step's bookkeeping ate what verifying won."""
    from scheduler.draft_gate import DraftGate, LookupGate
    from scheduler.profiler import ThroughputProfile

    clock = SimClock()
    profile = ThroughputProfile(64)
    profile.seed([(1, 0.01), (64, 0.05)])
    lookup = Drafter("lookup", TimedProposer(3, clock, 0.0005), lookup_gate=LookupGate())
    model = Drafter("model", TimedProposer(3, clock, 0.001), gate=DraftGate(profile))
    speculator = Speculator(
        [lookup, model], SlowPolicy(3, clock, choose_s=0.002), profile=profile, clock=clock.now
    )
    engine = LLMEngine(
        FakeRunner(FAKE_IDS, EOS), ContinuousBatcher(2, 128, 64),
        ServedModel("fake", None, frozenset({EOS})), speculator, clock=clock.now,
    )
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    engine.add_request(Request("a", [1, 2, 3], greedy))
    engine.add_request(Request("b", [4, 5, 6], greedy))
    engine.step()  # the prefills: nobody drafts
    assert model.gate.means is None and lookup.lookup_gate.ask_s is None
    engine.step()  # both drafters asked for both requests: 2 ms of bookkeeping, 1 ms each
    assert model.gate.means is not None
    assert model.gate.means.draft_s == pytest.approx((0.001 + 0.001) / 2)
    assert lookup.lookup_gate.ask_s == pytest.approx((0.0005 + 0.001) / 2)


def test_exploring_verifies_past_the_policy_to_price_the_stalest_size() -> None:
    """Every `explore_every` steps the Speculator verifies up to gamma drafts more than the
    policy chose, to reach the step size the profile has not observed for the longest while;
    the extra drafts go to the requests with the most drafts left, not by their values."""
    from scheduler.profiler import ThroughputProfile
    from scheduler.verify_policy import build_policy
    from tests.scheduler.test_policy_never_slower import CostedRunner

    # Two anchors a step; each more token costs three of those steps: the policy verifies
    # nothing.
    cost = lambda n: 0.01 * 4 ** max(0, n - 2)

    def run(explore_every: int) -> tuple[list[StepStats], ThroughputProfile]:
        clock, profile = SimClock(), ThroughputProfile(64)
        profile.seed([(n, cost(n)) for n in (1, 2, 3, 8, 64)])
        speculator = Speculator(
            RepeatProposer(3), build_policy("dspark", 3, profile), profile=profile,
            clock=clock.now, explore_every=explore_every,
        )
        engine = LLMEngine(
            CostedRunner(FAKE_IDS, clock, cost), ContinuousBatcher(2, 128, 64),
            ServedModel("fake", None, frozenset({EOS})), speculator, clock=clock.now,
        )
        greedy = SamplingParams(max_tokens=12, temperature=0.0)
        engine.add_request(Request("a", [1, 2, 3], greedy))
        engine.add_request(Request("b", [4, 5, 6], greedy))
        return _stats_until_done(engine), profile

    stats, _ = run(explore_every=0)
    assert not any(s.num_draft_tokens or s.profile_explored for s in stats)
    stats, profile = run(explore_every=3)
    decoding = [s for s in stats if not s.num_prefill_tokens]
    explored = [i for i, s in enumerate(decoding) if s.profile_explored]
    assert explored[:3] == [2, 5, 8]  # the third decoding step, then every third
    # Two anchors a step; the stale sizes above 2 in the order never observed: 3, 4, 5.
    lengths = [sorted(decoding[i].verify_lengths) for i in explored[:3]]
    assert lengths == [[0, 1], [1, 1], [1, 2]]
    assert all(s.num_draft_tokens == 0 for s in decoding[:2])  # the policy's own choice
    assert profile.stale_size(2, 5) is None


def test_exploring_reads_how_many_drafts_there_are_never_their_values() -> None:
    """Lossless sampling: the verify length of a sampled draft may not depend on the drafted
    tokens. What exploring adds depends on the drafts' counts and the policy's lengths only:
    two steps whose candidates differ in every token and confidence explore alike."""
    from scheduler.profiler import ThroughputProfile
    from scheduler.speculator import Candidate, SpeculationStep
    from scheduler.verify_policy import build_policy

    def explored(tokens: list[int], confidences: list[float]) -> list[int]:
        profile = ThroughputProfile(64)
        profile.seed([(1, 0.01), (64, 0.2)])  # every price stale
        speculator = Speculator(
            RepeatProposer(7), build_policy("dspark", 7, profile), profile=profile,
            explore_every=1,
        )
        speculator._steps_since_explore = 1
        chosen = [
            Candidate(0, tokens[:5], "probs", confidences[:5], [None] * 5),
            None,
            Candidate(0, tokens[:7], "probs", confidences[:7], [None] * 7),
        ]
        step = SpeculationStep()
        lengths = speculator._explore(chosen, [1, 0, 1], 3, step)
        assert step.explored
        return lengths

    first = explored(list(range(7)), [0.9] * 7)
    assert first == explored(list(range(50, 57)), [0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.4])
    # 3 anchors + 2 drafts: size 5. Every price is stale, so the smallest size above, 6; its
    # token goes to the draft with the most left.
    assert first == [1, 0, 2]



class AskLog(RepeatProposer):
    """Logs whom it is asked for; `aux_layer_ids` (0,) makes it a model drafter's double, one
    that reads the target's features. found=False: it finds nothing to propose."""

    def __init__(self, gamma: int, aux_layer_ids: tuple[int, ...] = (), found: bool = True):
        super().__init__(gamma)
        self.aux_layer_ids, self.found = aux_layer_ids, found
        self.asked: set[str] = set()

    def propose(self, requests: Sequence[DraftRequest]) -> DraftProposal:
        self.asked.update(r.req_id for r in requests)
        if not self.found:
            return DraftProposal([[] for _ in requests])
        return super().propose(requests)


def _serve_all(drafters: list[Drafter], requests: list[Request]) -> list[StepStats]:
    """Serve the requests at once (6 slots, simulated clock); every step's stats."""
    from scheduler.profiler import ThroughputProfile

    clock = SimClock()
    profile = ThroughputProfile(64)
    profile.seed([(1, 0.01), (64, 0.05)])
    speculator = Speculator(
        drafters, FixedLength(3), profile=profile, clock=clock.now, feed_drafter_every=3
    )
    engine = LLMEngine(
        FakeRunner(FAKE_IDS, EOS), ContinuousBatcher(6, 128, 64),
        ServedModel("fake", None, frozenset({EOS})), speculator, clock=clock.now,
    )
    for r in requests:
        engine.add_request(r)
    return _stats_until_done(engine)


def _stats_until_done(engine: LLMEngine) -> list[StepStats]:
    """Step the engine until it has no work; the stats of every step that ran."""
    stats = []
    while engine.has_work:
        stepped = engine.step()
        if stepped:
            stats.append(stepped[1])
    return stats


def test_requests_admitted_while_the_model_drafter_does_not_pay_do_not_feed_it() -> None:
    """A model drafter drafts from the features of every position of a request, so whether the
    runner feeds it a request's is decided when the request is first scheduled: yes where one
    of the drafter's gate's recent verdicts said drafting pays, otherwise for one request in
    `feed_drafter_every` (3 here; so the gate can go on probing), never for a request that
    opted out of drafting. The model drafter is asked only for the requests that feed it, a
    lookup for all."""
    from scheduler.draft_gate import DraftGate
    from scheduler.profiler import ThroughputProfile

    def served(gate: DraftGate | None) -> tuple[dict[str, bool | None], AskLog, AskLog, list]:
        greedy = SamplingParams(max_tokens=6, temperature=0.0)
        opted_out = SamplingParams(max_tokens=6, temperature=0.0, speculative=False)
        reqs = [Request(f"r{i}", [1, 2, 3], greedy) for i in range(5)]
        reqs.append(Request("opted-out", [1, 2, 3], opted_out))
        lookup, model = AskLog(3, found=False), AskLog(3, aux_layer_ids=(0,))
        stats = _serve_all([Drafter("lookup", lookup), Drafter("model", model, gate=gate)], reqs)
        return {r.req_id: r.feeds_drafter for r in reqs}, model, lookup, stats

    profile = ThroughputProfile(64)
    profile.seed([(1, 0.01), (64, 0.05)])
    losing = DraftGate(profile, probe_share=1.0)  # probes every step: asked wherever it may be
    losing.record(num_candidates=1, draft_time_s=0.05, num_verified=3, num_accepted=0)
    for _ in range(FED_WHILE_PAID_WITHIN):  # a verdict of "skip" (or a probe) each time
        losing.should_draft(1, 1, 1)
    assert not losing.paid_within(FED_WHILE_PAID_WITHIN)
    feeds, model, lookup, stats = served(losing)
    # Of the requests admitted while drafting does not pay, the 3rd feeds the drafter.
    assert feeds == {"r0": False, "r1": False, "r2": True, "r3": False, "r4": False,
                     "opted-out": False}
    assert model.asked == {"r2"}
    assert lookup.asked == {f"r{i}" for i in range(5)}
    assert (sum(s.num_admitted for s in stats), sum(s.num_admitted_feeding_drafter for s in stats)) \
        == (6, 1)

    # Before any outcome the gate pays; so does a drafter without a gate: every request feeds
    # the drafter, but the one that opted out.
    for gate in (DraftGate(profile), None):
        feeds, model, _, _ = served(gate)
        assert feeds == {**{f"r{i}": True for i in range(5)}, "opted-out": False}
        assert model.asked == {f"r{i}" for i in range(5)}


def test_without_a_model_drafter_no_request_feeds_one() -> None:
    req = Request("a", [1, 2, 3], SamplingParams(max_tokens=4, temperature=0.0))
    stats = _serve_all([Drafter("lookup", AskLog(3))], [req])
    assert req.feeds_drafter is False
    assert sum(s.num_admitted for s in stats) == 0
