"""The lookup gate: per request, ask a lookup drafter only while what its asks bring beats what
asking costs (pure, no torch)."""

from __future__ import annotations

import math

import pytest

from scheduler.draft_gate import LookupGate

# 16 streams on the embedded model: ~660 tokens a second; one more verified token costs 0.69 of
# an emitted one; one ask 80 us, 0.053 tokens.
RATE, TOKEN_COST, ASK_S = 660.0, 0.69, 80e-6


def test_asks_every_request_before_any_outcome() -> None:
    gate = LookupGate()
    assert gate.asks(["a", "b"], TOKEN_COST, RATE, 16.0) == [True, True]
    assert gate.num_skipped == 0


def test_asks_that_bring_nothing_are_skipped_and_probed_within_the_budget() -> None:
    gate = LookupGate(probe_share=0.005)
    ids = [f"r{i}" for i in range(16)]
    for _ in range(50):  # no draft was worth verifying
        gate.record([(r, 0, 0) for r in ids], 16 * ASK_S, 16)
    asked = [gate.asks(ids, TOKEN_COST, RATE, 16.0) for _ in range(60)]
    # Each skipped request loses 0.053 tokens a probe: 16 of them every w steps stay within
    # 0.5 % of the 16 tokens a step makes when w = ceil(16 x 0.053 / 0.08) = 11.
    wait = math.ceil(16 * RATE * ASK_S / (0.005 * 16))
    probes = [i for i, verdicts in enumerate(asked) if verdicts[0]]
    assert probes == list(range(wait - 1, 60, wait))
    assert all(verdicts == [verdicts[0]] * 16 for verdicts in asked)
    assert gate.num_skipped == 16 * (60 - len(probes))


def test_the_verdict_is_per_request() -> None:
    """A request that copies keeps its lookup while the chat beside it loses its own."""
    gate = LookupGate()
    for _ in range(50):
        gate.record([("copy", 5, 4), ("chat", 0, 0)], 2 * ASK_S, 2)
    assert gate.asks(["copy", "chat"], TOKEN_COST, RATE, 2.0) == [True, False]


def test_drafts_verified_and_rejected_do_not_turn_the_verdict() -> None:
    """Rejected drafts are the estimator's error, which it corrects; the gate prices only the
    asking. At one stream the asks of a copying request must survive a run of rejections."""
    gate = LookupGate()
    for _ in range(10):
        gate.record([("r", 6, 5)], 50e-6, 1)
    for _ in range(10):
        gate.record([("r", 7, 0)], 50e-6, 1)
    assert gate.asks(["r"], token_cost=0.13, rate=180.0, tokens_per_step=1.0) == [True]


def test_a_new_request_starts_from_what_asks_have_brought_so_far() -> None:
    gate = LookupGate()
    for _ in range(200):
        gate.record([("old", 0, 0)], ASK_S, 1)
    assert gate.asks(["new"], TOKEN_COST, RATE, 1.0) == [False]
    paying = LookupGate()
    for _ in range(200):
        paying.record([("old", 3, 3)], ASK_S, 1)
    assert paying.asks(["new"], TOKEN_COST, RATE, 1.0) == [True]


def test_free_asks_are_never_skipped() -> None:
    gate = LookupGate()
    for _ in range(50):
        gate.record([("r", 0, 0)], 0.0, 1)
    assert all(gate.asks(["r"], TOKEN_COST, RATE, 16.0) == [True] for _ in range(20))


def test_forget_drops_a_finished_request() -> None:
    gate = LookupGate()
    gate.record([("r", 3, 3)], ASK_S, 1)
    gate.forget("r")
    gate.forget("never seen")
    assert "r" not in gate._means


@pytest.mark.parametrize("kwargs", [{"probe_share": 0.0}, {"ema": 0.0}, {"prior_ema": 1.5}])
def test_rejects_bad_settings(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        LookupGate(**kwargs)
