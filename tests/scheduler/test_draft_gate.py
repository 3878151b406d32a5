"""The draft gate: draft only when the recent outcome says drafting pays (pure, no torch)."""

from __future__ import annotations

from scheduler.draft_gate import DraftGate


class LinearCost:
    """Step time = fixed + per_token * tokens (seconds)."""

    def __init__(self, fixed: float, per_token: float) -> None:
        self.fixed, self.per_token = fixed, per_token

    def steps_per_second(self, num_tokens: int) -> float:
        return 1.0 / (self.fixed + self.per_token * num_tokens)


IDLE = LinearCost(0.012, 0.0002)  # a verified token costs almost nothing


def test_drafts_until_it_has_seen_an_outcome() -> None:
    gate = DraftGate(IDLE)
    assert gate.should_draft(4, 4, 4)
    assert not gate.should_draft(0, 4, 4)  # nobody could draft


def test_a_drafter_that_is_rarely_accepted_stops_drafting_but_keeps_probing() -> None:
    gate = DraftGate(IDLE, probe_share=0.02)
    gate.record(num_candidates=1, draft_time_s=0.005, num_verified=7, num_accepted=0)
    decisions = [gate.should_draft(1, 1, 1) for _ in range(100)]
    # A drafted step took 18.6 ms (5 ms drafting, 13.6 ms verifying 7) for the one token of a
    # 12.2 ms plain step: it loses 6.4 ms, 52 % of a plain step, so probes come every 27th
    # step, which costs 52 % / 27 = 1.9 % of the time.
    probes = [i for i, d in enumerate(decisions) if d]
    assert probes == [26, 53, 80]
    assert gate.num_skipped == 100 - len(probes)
    loss = (0.0186 - 0.0122) / 0.0122
    assert loss / (probes[1] - probes[0]) <= 0.02


def test_a_drafter_that_costs_nothing_to_ask_is_asked_every_step() -> None:
    """The n-gram failure: a lookup that found nothing in its first steps was skipped for 16,
    32, ... 256 steps, though asking costs microseconds and a match pays several tokens."""
    gate = DraftGate(IDLE)
    for _ in range(20):  # no match: nothing proposed, nothing verified
        gate.record(num_candidates=1, draft_time_s=0.00003, num_verified=0, num_accepted=0)
    assert all(gate.should_draft(1, 1, 1) for _ in range(50))
    assert gate.num_skipped == 0


def test_a_cheap_drafter_verified_in_vain_is_probed_by_what_verifying_costs() -> None:
    """Asking costs 30 us either way; what differs is what the policy did with the drafts. A
    drafter of random tokens, verified and rejected every time (the policy's confidences were
    wrong for it), makes each drafted step verify 7 tokens for nothing: 10 % of a step."""
    verified, declined = DraftGate(IDLE), DraftGate(IDLE)
    for _ in range(20):
        verified.record(num_candidates=1, draft_time_s=0.00003, num_verified=7, num_accepted=0)
        declined.record(num_candidates=1, draft_time_s=0.00003, num_verified=0, num_accepted=0)
    probes = [i for i in range(60) if verified.should_draft(1, 1, 1)]
    assert probes == [11, 23, 35, 47, 59]  # 10.5 % / 12 steps, within the default 1 %
    assert all(declined.should_draft(1, 1, 1) for _ in range(60))  # loses only its 30 us


def test_the_wait_between_probes_is_capped() -> None:
    gate = DraftGate(IDLE, max_probe_every=8)
    gate.record(num_candidates=1, draft_time_s=1.0, num_verified=7, num_accepted=0)
    decisions = [gate.should_draft(1, 1, 1) for _ in range(27)]
    assert [i for i, d in enumerate(decisions) if d] == [8, 17, 26]


def test_a_verdict_to_draft_comes_back_when_the_drafter_turns_good() -> None:
    gate = DraftGate(IDLE)
    gate.record(num_candidates=1, draft_time_s=0.005, num_verified=7, num_accepted=0)
    assert not gate.should_draft(1, 1, 1)
    for _ in range(10):  # the drafter turns good: drafting pays again
        gate.record(num_candidates=1, draft_time_s=0.001, num_verified=7, num_accepted=6)
    assert all(gate.should_draft(1, 1, 1) for _ in range(10))


def test_a_good_drafter_drafts_when_idle() -> None:
    gate = DraftGate(IDLE)
    gate.record(num_candidates=1, draft_time_s=0.003, num_verified=7, num_accepted=4)
    assert all(gate.should_draft(1, 1, 1) for _ in range(30))
    assert gate.num_skipped == 0


def test_the_same_drafter_pays_for_one_request_and_not_for_sixteen() -> None:
    """1.2 accepted of 7 verified for 3 ms of drafting per request: worth it while the device
    is nearly idle, a loss when every verified token slows a big batch."""
    rising = LinearCost(0.012, 0.0004)
    for n, expected in ((1, True), (16, False)):
        gate = DraftGate(rising)
        gate.record(
            num_candidates=n,
            draft_time_s=n * 0.003,
            num_verified=n * 7,
            num_accepted=round(n * 1.2),
        )
        assert gate.should_draft(n, n, n) is expected


def test_draft_time_alone_can_make_drafting_a_loss() -> None:
    """Verification is free here, so only the drafting time decides."""
    free = LinearCost(0.012, 0.0)
    cheap, dear = DraftGate(free), DraftGate(free)
    cheap.record(1, 0.001, 7, 1)  # +1 token for +1 ms: pays
    dear.record(1, 0.030, 7, 1)  # +1 token for +30 ms on a 12 ms step: does not
    assert cheap.should_draft(1, 1, 1)
    assert not dear.should_draft(1, 1, 1)


def test_running_means_follow_new_outcomes() -> None:
    gate = DraftGate(IDLE, ema=0.5)
    gate.record(2, 0.004, 14, 0)
    assert gate.means is not None and gate.means.accepted == 0.0
    gate.record(2, 0.004, 14, 8)
    assert gate.means.accepted == 2.0 and gate.means.verified == 7.0 and gate.means.draft_s == 0.002


def test_it_counts_the_verdicts_since_drafting_last_paid_probes_included() -> None:
    """What `Speculator._admit` reads to decide whether a new request feeds the model drafter:
    whether one of the last verdicts said drafting pays, not only the verdict of the moment."""
    gate = DraftGate(IDLE, probe_share=0.02)
    assert gate.should_draft(1, 1, 1) and gate.paid_within(1)  # no outcome yet: drafts to learn
    gate.record(num_candidates=1, draft_time_s=0.005, num_verified=7, num_accepted=0)
    decisions = [gate.should_draft(1, 1, 1) for _ in range(30)]
    assert decisions.count(True) == 1  # the probe at the 27th step is no paying verdict
    assert gate.verdicts_since_paid == 30
    assert gate.paid_within(31) and not gate.paid_within(30)
    gate.record(num_candidates=1, draft_time_s=0.0001, num_verified=7, num_accepted=7)
    assert gate.should_draft(1, 1, 1) and gate.paid_within(1)
