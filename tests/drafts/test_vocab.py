"""Draft vocabulary: the drafter proposes only its vocabulary's tokens and stays lossless."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from drafts.checkpoint import load_draft, save_draft, set_draft_vocab
from drafts.offline import speculative_generate, target_generate
from drafts.proposer import make_proposer
from drafts.vocab import extended_vocab, frequent_tokens
from scheduler.drafter import DraftRequest
from scheduler.request import SamplingParams

PROMPT = [1, 5, 9, 17, 33, 12, 7, 40]


def _proposer_with_context(model, target):  # type: ignore[no-untyped-def]
    prop = make_proposer(model, target, 7)
    out = target(input_ids=torch.tensor([PROMPT]), output_hidden_states=True)
    prop.observe("r", 0, torch.cat([out.hidden_states[i + 1][0] for i in (0, 1, 2)], -1)[:-1])
    return prop


def test_frequent_tokens_are_the_most_common_sorted() -> None:
    assert frequent_tokens([[5, 5, 9, 1], [9, 5, 7]], 2).tolist() == [5, 9]
    assert frequent_tokens([[3, 3]], 10).tolist() == [3]


def test_an_extended_vocabulary_keeps_the_base_and_adds_the_most_frequent_others() -> None:
    base = torch.tensor([2, 9])
    answers = [[5, 5, 5, 9, 9, 9, 9, 7, 7, 4], [4, 5]]  # others: 5 (x4), 4 (x2), 7 (x2)
    assert extended_vocab(base, answers, 3).tolist() == [2, 5, 9]
    assert extended_vocab(base, answers, 10).tolist() == [2, 4, 5, 7, 9]  # fewer occur
    assert extended_vocab(base, answers, 2).tolist() == [2, 9]  # never smaller than the base


@pytest.mark.parametrize("method", ["dspark", "eagle3"])
def test_drafts_stay_in_the_vocabulary_and_match_the_full_head_there(
    tiny_target, make_draft, method
) -> None:  # type: ignore[no-untyped-def]
    full_model = make_draft(tiny_target, method)
    greedy = SamplingParams(temperature=0)
    full = _proposer_with_context(full_model, tiny_target).propose(
        [DraftRequest("r", tuple(PROMPT), greedy, 7)]
    )
    # A vocabulary holding the full head's greedy drafts plus every third other token: the
    # restricted argmax must pick the same drafts, Markov chain included.
    vocab = torch.tensor(sorted(set(full.token_ids[0]) | set(range(0, 96, 3))))
    restricted_model = make_draft(tiny_target, method)
    set_draft_vocab(restricted_model, vocab)
    restricted = _proposer_with_context(restricted_model, tiny_target)
    assert (
        restricted.propose([DraftRequest("r", tuple(PROMPT), greedy, 7)]).token_ids
        == full.token_ids
    )

    # Sampling: the first position's distribution is the full one restricted and renormalised,
    # zero outside the vocabulary, and every drawn token is in it.
    sampled = SamplingParams(temperature=0.8, seed=3)
    p_full = _proposer_with_context(full_model, tiny_target).propose(
        [DraftRequest("r", tuple(PROMPT), sampled, 7)]
    )
    p_vocab = _proposer_with_context(restricted_model, tiny_target).propose(
        [DraftRequest("r", tuple(PROMPT), sampled, 7)]
    )
    assert p_full.probs is not None and p_vocab.probs is not None
    q_full, q_vocab = p_full.probs[0], p_vocab.probs[0]
    assert q_vocab is not None and q_full is not None
    outside = torch.ones(96, dtype=torch.bool)
    outside[vocab] = False
    assert float(q_vocab[:, outside].abs().sum()) == 0.0
    torch.testing.assert_close(q_vocab.sum(-1), torch.ones(7))
    expected = q_full[0].masked_fill(outside, 0.0)
    torch.testing.assert_close(q_vocab[0], expected / expected.sum(), atol=1e-5, rtol=1e-4)
    assert set(p_vocab.token_ids[0]) <= set(vocab.tolist())


@pytest.mark.parametrize("method", ["dspark", "eagle3"])
def test_a_small_vocabulary_is_still_lossless(tiny_target, make_draft, method) -> None:  # type: ignore[no-untyped-def]
    model = make_draft(tiny_target, method)
    set_draft_vocab(model, torch.arange(0, 96, 4))  # most target tokens cannot be drafted
    prop = make_proposer(model, tiny_target, 7)
    ref = target_generate(tiny_target, PROMPT, 20, {2})
    res = speculative_generate(
        tiny_target, prop, PROMPT, SamplingParams(max_tokens=20, temperature=0), 7, {2}
    )
    assert res.output_ids == ref


def test_the_vocabulary_round_trips_through_a_checkpoint_exactly(
    tmp_path: Path, wide_vocab_target, make_draft
) -> None:  # type: ignore[no-untyped-def]
    model = make_draft(wide_vocab_target, "eagle3")
    ids = torch.tensor([3, 257, 4099, 49_999])
    set_draft_vocab(model, ids)
    save_draft(model, tmp_path / "d")  # weights in bf16; the ids must stay integers
    loaded = load_draft(tmp_path / "d")
    assert loaded.cfg.draft_vocab_size == 4
    assert torch.equal(loaded.draft_vocab, ids)
    with pytest.raises(ValueError, match="vocabulary"):
        set_draft_vocab(model, torch.tensor([0, 50_000]))  # past the target's vocabulary
