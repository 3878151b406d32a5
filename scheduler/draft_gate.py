"""Whether to draft at all this step: drafting is not free, and a weak drafter can lose.

The verify-length policies decide how many drafts to verify once the drafts exist; by then the
drafting time is spent. On a GPU that time is small next to the target step, but on a CPU one
draft forward can cost a large share of a decode step (docs/benchmarks.md), and with a
drafter that is rarely accepted, drafting every step makes every user slower. The gate asks,
before drafting, whether the last steps say it pays:

    plain   = R / T(B)                                   tokens per second without drafts
    drafted = (R + n * acc) / (T(B + n * ver) + n * d)   tokens per second with them

R: requests that emit a token this step, B: tokens the step processes anyway, n: requests that
would draft, T: the throughput profile's step time, and per drafting request the running
means of acc (accepted drafts), ver (verified drafts) and d (drafting seconds: the proposer's,
and its share of the step's bookkeeping, which at 16 streams on the CPU is as large as what
verifying there wins; `Speculator._charge_gates`). It drafts when `drafted > plain`. The
means are what drafted steps did under the verify policy, which weighs
verification: where it declines a drafter's drafts (its estimator has learned that they fail)
or the drafter found nothing to propose, ver and acc fall to 0 and drafting loses only its own
time; where it verifies drafts that fail (its confidences are wrong for this drafter: no
estimator, or one that has not learned yet), a drafted step pays for that verification too.

Otherwise it skips, but not for ever: the means only move on steps that draft, so a gate that
never drafts never learns that the text turned copyable or the load fell. It drafts anyway (a
probe) once it has skipped `wait` steps in a row, where the wait is what makes probes cost
about `probe_share` of the engine's time: a probe is a drafted step of t_drafted seconds that
makes what a plain step would make in t_drafted x drafted / plain, so it loses

    loss = t_drafted / t_plain x (1 - drafted / plain)      plain steps' time, and
    wait = ceil(loss / probe_share) - 1                      (at most max_probe_every)

(The wait once used 1 - drafted / plain alone, a throughput ratio, as the loss: a probe that
doubled a step, a DSpark draft for 16 requests on the CPU, then cost twice its budget.)

A drafter whose drafts are verified and rejected probes as rarely as that verification makes
necessary; a model drafter that loses a third of a step under load probes every ~16 steps at
the default 1 %. The lookups (suffix, n-gram: tens of microseconds a request) get no such
gate (scheduler/build.py `gate_for`): one running mean over all requests hid copying
requests' drafts whenever chat requests' drafts had been failing. They get a `LookupGate`
instead, one verdict per request, which weighs only the asking. (The first version
waited 16 steps and doubled the wait after every probe that left the verdict at "skip", up to
256, for every drafter alike. An n-gram drafter that found no match in its first decode steps
then drafted in 10 of 313 steps of a context-copying answer: 1.1x over no drafting where
verifying every draft gave 1.96x; docs/scheduling.md has the measurement. The next version
took `drafted` as the larger of the above and R / (T(B) + n * d), as if the policy verified
none of the drafts. That term is below `plain` whenever d > 0, so it never turned a verdict;
it only shrank the loss that spaces the probes to the drafting time alone, and a drafter of
random tokens, all verified and all rejected, was probed every step: never skipped.)

Lossless: the decision depends only on earlier steps, never on drafts of this one.

Pure Python: no torch, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scheduler.profiler import StepThroughput


@dataclass
class PerRequest:
    """Running means per drafting request and step."""

    accepted: float
    verified: float
    draft_s: float


class DraftGate:
    def __init__(
        self,
        profile: StepThroughput,
        probe_share: float = 0.01,
        ema: float = 0.2,
        max_probe_every: int = 256,
    ) -> None:
        if not 0 < probe_share <= 1 or max_probe_every < 0:
            raise ValueError("need 0 < probe_share <= 1 and max_probe_every >= 0")
        self.profile = profile
        self.probe_share = probe_share
        self.max_probe_every = max_probe_every
        self.ema = ema
        self.means: PerRequest | None = None
        self.skipped_in_a_row = 0
        self.num_skipped = 0  # steps that did not draft, since start
        self.probe_wait = 0  # skipped steps before the next probe, from the last verdict
        # Verdicts since the last that drafting pays (probes are not such verdicts); 0 before
        # the first outcome, when the gate drafts to learn. What `paid_within` reads.
        self.verdicts_since_paid = 0

    def should_draft(self, num_candidates: int, num_base_tokens: int, num_sampling: int) -> bool:
        if num_candidates == 0:
            return False
        if self.means is None or num_sampling < 1:
            self.verdicts_since_paid = 0
            return self._draft()
        m, n = self.means, num_candidates
        t_plain = 1.0 / self.profile.steps_per_second(num_base_tokens)
        plain = num_sampling / t_plain
        verify_tokens = num_base_tokens + round(n * m.verified)
        t_verified = 1.0 / self.profile.steps_per_second(verify_tokens)
        # What drafted steps did: the drafting time and the verification the policy chose.
        t_drafted = t_verified + n * m.draft_s
        drafted = (num_sampling + n * m.accepted) / t_drafted
        if drafted > plain:
            self.verdicts_since_paid = 0
            return self._draft()
        self.verdicts_since_paid += 1
        loss = t_drafted / t_plain * (1.0 - drafted / plain)  # in plain steps' time
        self.probe_wait = min(math.ceil(loss / self.probe_share) - 1, self.max_probe_every)
        if self.skipped_in_a_row >= self.probe_wait:
            return self._draft()
        self.skipped_in_a_row += 1
        self.num_skipped += 1
        return False

    def paid_within(self, verdicts: int) -> bool:
        """Whether one of the last `verdicts` verdicts said drafting pays (or none came yet):
        what `Speculator._admit` reads for a request's whole life, where one verdict is about
        one step (speculator.FED_WHILE_PAID_WITHIN)."""
        return self.verdicts_since_paid < verdicts

    def record(
        self, num_candidates: int, draft_time_s: float, num_verified: int, num_accepted: int
    ) -> None:
        """Outcome of a step that drafted for `num_candidates` requests."""
        if num_candidates < 1:
            return
        n = num_candidates
        now = PerRequest(num_accepted / n, num_verified / n, draft_time_s / n)
        if self.means is None:
            self.means = now
            return
        a, m = self.ema, self.means
        self.means = PerRequest(
            m.accepted + a * (now.accepted - m.accepted),
            m.verified + a * (now.verified - m.verified),
            m.draft_s + a * (now.draft_s - m.draft_s),
        )

    def _draft(self) -> bool:
        self.skipped_in_a_row = 0
        return True


@dataclass
class _AskValue:
    """Running mean of what one ask of a lookup brought a request, in tokens."""

    value: float
    skipped_in_a_row: int = 0


class LookupGate:
    """Per request: whether asking a lookup drafter (suffix, n-gram) may pay this step.

    A lookup gets no `DraftGate`: one verdict for every request hid the requests that copy
    whenever the others' drafts failed (the module docstring). But asking is not free either:
    a Python walk over the index, ~80 us a request on GSM8K at 16 streams, 4 % of a step for
    16 requests, and under load the drafts it finds there are worth about what verifying them
    costs. So each request gets its own verdict. An ask that led to v verified drafts of which
    a were accepted was worth

        max(0, a - c x v)      tokens, c = lambda x (T(B + 1) - T(B))

    what one more verified token costs (the verify policy's token cost; lambda: the engine's
    tokens per second). It is clipped at 0 because drafts verified and rejected are the
    estimator's error, which it corrects from those outcomes so that the policy stops
    verifying them; the gate prices only the asking. With V the running mean of that worth
    and d the running mean of one ask's time (over all requests; with its share of the
    step's bookkeeping, `Speculator._charge_gates`):

        gain = V - lambda x d

    Ask when gain > 0. A request whose asks lose is probed again after

        wait = ceil(n_off x (-gain) / (probe_share x R)) - 1   skipped steps

    (n_off: requests whose asks lose this step, R: tokens a step emits), so the probes of all
    of them together cost about `probe_share` of what the engine makes.

    A request's mean starts from the mean over every ask of every request and moves slowly
    (`ema` per ask): a copy comes in runs, and the lookup must still be asked when the next
    run starts after a preamble or between two copied passages. A skipped ask there loses a
    whole draft; an ask that fails loses a hundredth of a token at one stream. (A first version
    read realised a - c x v unclipped, and each request from its first ask at 0.3 per ask: on
    the context-copying set at one stream it skipped a request for 20 steps after a few
    rejected drafts, 1.41x against 1.51x without a gate.)

    Lossless: a verdict reads outcomes of earlier steps only.
    """

    def __init__(
        self, probe_share: float = 0.005, ema: float = 0.1, prior_ema: float = 0.02
    ) -> None:
        if not 0 < probe_share <= 1 or not 0 < ema <= 1 or not 0 < prior_ema <= 1:
            raise ValueError("need 0 < probe_share <= 1 and emas in (0, 1]")
        self.probe_share = probe_share
        self.ema, self.prior_ema = ema, prior_ema
        self.ask_s: float | None = None  # running mean of one request's ask, seconds
        self.num_skipped = 0  # request-steps not asked, since start
        self.prior: float | None = None  # V over every ask of every request
        self._token_cost = 0.0  # c of the step that asked, for record()
        self._means: dict[str, _AskValue] = {}

    def asks(
        self, req_ids: list[str], token_cost: float, rate: float, tokens_per_step: float
    ) -> list[bool]:
        """Whether to ask for each request this step. token_cost: c above; rate: lambda in
        tokens per second; tokens_per_step: R."""
        self._token_cost = token_cost
        if self.prior is None:
            return [True] * len(req_ids)
        ask_cost = rate * (self.ask_s or 0.0)
        means = [self._means.setdefault(r, _AskValue(self.prior)) for r in req_ids]
        gains = [m.value - ask_cost for m in means]
        n_off = sum(g <= 0 for g in gains)
        budget = self.probe_share * max(tokens_per_step, 1.0)
        verdicts = []
        for m, gain in zip(means, gains):
            ask = gain > 0 or m.skipped_in_a_row >= math.ceil(n_off * -gain / budget) - 1
            m.skipped_in_a_row = 0 if ask else m.skipped_in_a_row + 1
            self.num_skipped += not ask
            verdicts.append(ask)
        return verdicts

    def record(
        self, outcomes: list[tuple[str, int, int]], ask_time_s: float, num_asks: int
    ) -> None:
        """One step's asks: their time, how many there were, and (request, drafts verified,
        drafts accepted) for each ask that says what asking that request is worth."""
        if num_asks < 1:
            return
        per_ask = ask_time_s / num_asks
        self.ask_s = per_ask if self.ask_s is None else self.ask_s + self.ema * (per_ask - self.ask_s)
        for r, verified, accepted in outcomes:
            worth = max(0.0, accepted - self._token_cost * verified)
            self.prior = worth if self.prior is None else (
                self.prior + self.prior_ema * (worth - self.prior))
            m = self._means.get(r)
            if m is None:
                self._means[r] = _AskValue(worth)
            else:
                m.value += self.ema * (worth - m.value)

    def forget(self, req_id: str) -> None:
        self._means.pop(req_id, None)
