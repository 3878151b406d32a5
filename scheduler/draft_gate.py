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
means of acc (accepted drafts), ver (verified drafts) and d (drafting seconds). It drafts when
`drafted > plain`. The means are what drafted steps did under the verify policy, which weighs
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
the default 2 %. The lookups (suffix, n-gram: microseconds against a step of milliseconds) get
no gate at all (scheduler/build.py `gate_for`): with nothing to weigh but the verification,
which the policy prices per draft, one running mean over all requests only hid copying
requests' drafts whenever chat requests' drafts had been failing. (The first version
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
        probe_share: float = 0.02,
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

    def should_draft(self, num_candidates: int, num_base_tokens: int, num_sampling: int) -> bool:
        if num_candidates == 0:
            return False
        if self.means is None or num_sampling < 1:
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
            return self._draft()
        loss = t_drafted / t_plain * (1.0 - drafted / plain)  # in plain steps' time
        self.probe_wait = min(math.ceil(loss / self.probe_share) - 1, self.max_probe_every)
        if self.skipped_in_a_row >= self.probe_wait:
            return self._draft()
        self.skipped_in_a_row += 1
        self.num_skipped += 1
        return False

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
