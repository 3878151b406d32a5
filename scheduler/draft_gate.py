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
`drafted > plain`, and in any case after `probe_every` skipped steps, so the means follow a
change in load or in the text being written. Each probe that leaves the verdict at "skip"
doubles that wait (up to `max_probe_every`), and a verdict of "draft" resets it: a probe
costs a drafted step that is expected to lose, and with a drafter that keeps losing under
load that cost should shrink rather than stay fixed (docs/benchmarks.md has the measurement).

Lossless: the decision depends only on earlier steps, never on drafts of this one.

Pure Python: no torch, no I/O.
"""

from __future__ import annotations

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
        probe_every: int = 16,
        ema: float = 0.2,
        max_probe_every: int = 256,
    ) -> None:
        self.profile = profile
        self.probe_every = probe_every
        self.max_probe_every = max(max_probe_every, probe_every)
        self.probe_interval = probe_every  # skipped steps before the next probe
        self.ema = ema
        self.means: PerRequest | None = None
        self.skipped_in_a_row = 0
        self.num_skipped = 0  # steps that did not draft, since start

    def should_draft(self, num_candidates: int, num_base_tokens: int, num_sampling: int) -> bool:
        if num_candidates == 0:
            return False
        if self.means is None or num_sampling < 1:
            return self._draft()
        m, n = self.means, num_candidates
        plain = num_sampling * self.profile.steps_per_second(num_base_tokens)
        verify_tokens = num_base_tokens + round(n * m.verified)
        t_drafted = 1.0 / self.profile.steps_per_second(verify_tokens) + n * m.draft_s
        if (num_sampling + n * m.accepted) / t_drafted > plain:
            self.probe_interval = self.probe_every
            return self._draft()
        if self.skipped_in_a_row >= self.probe_interval:
            self.probe_interval = min(2 * self.probe_interval, self.max_probe_every)
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
