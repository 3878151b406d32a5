"""Grammar-constrained decoding: the matcher's life through a step, and the law of sampling.

The distribution test runs the real engine (batcher, speculator, TorchModelRunner, sampling)
around a tiny random Llama over the fake model's byte-level vocabulary, so every string the
grammar allows can be enumerated and its exact probability under the masked target computed
from the model's own logits.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from scheduler.batching import ContinuousBatcher
from scheduler.drafter import DraftProposal, DraftRequest
from scheduler.engine import LLMEngine, ServedModel
from scheduler.fake import build_fake_tokenizer
from scheduler.grammar import GrammarManager, check_structured
from scheduler.request import Request, SamplingParams, StructuredOutput
from scheduler.runner import TorchModelRunner
from scheduler.sampling import unpack_bitmask
from tests.scheduler.doubles import make_speculator

SMALL = StructuredOutput("regex", "[ab][abc]?")  # a, b, aa, ab, ac, ba, bb, bc


@pytest.fixture(scope="module")
def tok():
    return build_fake_tokenizer()


def ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def allowed_ids(manager: GrammarManager, rows: np.ndarray, vocab: int) -> list[set[int]]:
    allowed = unpack_bitmask(torch.from_numpy(rows), vocab)
    return [set(torch.nonzero(row).flatten().tolist()) for row in allowed]


def test_constraints_are_checked_without_a_tokenizer() -> None:
    assert check_structured(StructuredOutput("regex", "[ab]+")) is None
    assert check_structured(StructuredOutput("json_schema", '{"type": "object"}')) is None
    assert "regex" in (check_structured(StructuredOutput("regex", "[a-")) or "")
    assert check_structured(StructuredOutput("json_schema", "{not json")) is not None
    assert check_structured(StructuredOutput("grammar", "start: foo")) is not None  # undefined
    assert check_structured(StructuredOutput("choice", "[]")) is not None
    with pytest.raises(ValueError):
        StructuredOutput("xml", "<a/>")


def test_matcher_cuts_drafts_masks_each_position_and_rolls_back(tok) -> None:
    eos = tok.eos_token_id
    vocab = len(tok)
    manager = GrammarManager(tok, [eos])
    a, b, c, x = (ids(tok, ch)[0] for ch in "abcx")
    manager.add("r", SMALL)
    assert manager.num_valid("r", [a, c, a]) == 2  # "ac" then nothing may follow
    assert manager.num_valid("r", [x, a]) == 0
    rows = manager.step_masks([("r", [a, c])])[0]
    assert rows.shape == (3, manager.num_words)
    first, after_a, after_ac = allowed_ids(manager, rows, vocab)
    assert first == {a, b}
    assert after_a == {a, b, c, eos}
    assert after_ac == {eos}
    # Verification accepted "a" and replaced "c" by "b": the matcher follows "ab".
    manager.commit("r", 1, [a, b])
    assert manager.is_terminated("r")
    assert manager.stats.num_masks == 3 and manager.stats.num_steps == 1


def test_equal_constraints_compile_once_and_requests_do_not_share_state(tok) -> None:
    manager = GrammarManager(tok, [tok.eos_token_id])
    a = ids(tok, "a")[0]
    manager.add("r1", SMALL)
    manager.add("r2", StructuredOutput("regex", "[ab][abc]?"))
    assert len(manager._compiled) == 1
    manager.step_masks([("r1", [])])
    manager.commit("r1", 0, [a])
    assert manager.num_valid("r2", [ids(tok, "c")[0]]) == 0  # r2 is still at the start
    assert manager.num_valid("r1", [ids(tok, "c")[0]]) == 1
    manager.release("r1")
    assert "r1" not in manager and "r2" in manager


# --- the law of sampling under a grammar, with and without drafts ---------------------------


class AlphabetProposer:
    """Drafts over a, b and x (x is never grammatical), two per step: sampled from a fixed q
    with half its mass on x and none on c (so cut drafts are common and the residual
    max(0, p' - q) differs much from p'), or always "c", "a" (a deterministic drafter)."""

    aux_layer_ids: tuple[int, ...] = ()
    max_draft_tokens = 2

    def __init__(self, tok, vocab: int, sampled: bool) -> None:
        self.letters = [ids(tok, ch)[0] for ch in "abcx"]
        self.vocab = vocab
        self.sampled = sampled
        self.gen = torch.Generator().manual_seed(7)

    def propose(self, requests: Sequence[DraftRequest]) -> DraftProposal:
        tokens, probs = [], []
        for r in requests:
            k = min(r.num_draft_tokens, self.max_draft_tokens)
            if not self.sampled:
                tokens.append([self.letters[2], self.letters[0]][:k])  # "c" then "a"
                probs.append(None)
                continue
            q = torch.zeros(k, self.vocab)
            q[:, self.letters] = torch.tensor([0.45, 0.05, 0.0, 0.5])
            tokens.append([int(torch.multinomial(row, 1, generator=self.gen)) for row in q])
            probs.append(q)
        return DraftProposal(tokens, probs)

    def observe(self, req_id: str, start_pos: int, hidden: object) -> None:
        pass

    def release(self, req_id: str) -> None:
        pass


@pytest.fixture(scope="module")
def tiny_model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # peaked next-token distributions, not near-uniform
    return model


def exact_distribution(model, tok, prompt: list[int]) -> dict[str, float]:
    """P(text) under the target masked to SMALL, from the model's logits at every prefix."""
    a, b, c = (ids(tok, ch)[0] for ch in "abc")
    eos = tok.eos_token_id

    def next_probs(prefix: list[int], allowed: list[int]) -> dict[int, float]:
        with torch.no_grad():
            logits = model(torch.tensor([prompt + prefix])).logits[0, -1].double()
        p = torch.softmax(logits[allowed], -1)
        return dict(zip(allowed, p.tolist()))

    out: dict[str, float] = {}
    for t1, p1 in next_probs([], [a, b]).items():
        for t2, p2 in next_probs([t1], [a, b, c, eos]).items():
            text = tok.decode([t1] if t2 == eos else [t1, t2])
            out[text] = out.get(text, 0.0) + p1 * p2
    return out


def sample_texts(model, tok, prompt, drafter: str, n: int) -> Counter[str]:
    vocab = len(tok)
    speculator = None
    if drafter != "none":
        speculator = make_speculator(AlphabetProposer(tok, vocab, sampled=drafter == "sampled"))
    runner = TorchModelRunner(model, 16, 64, seed=11)
    engine = LLMEngine(runner, ContinuousBatcher(16, 64, 64),
                       ServedModel("tiny", tok, frozenset({tok.eos_token_id})), speculator)
    params = SamplingParams(max_tokens=4, temperature=1.0, structured=SMALL)
    texts: Counter[str] = Counter()
    for start in range(0, n, 16):
        for i in range(start, min(n, start + 16)):
            engine.add_request(Request(f"r{i}", prompt, params))
        outputs: dict[str, list[int]] = {}
        while engine.has_work:
            for out in engine.step()[0]:  # type: ignore[index]
                assert out.error is None, out.error
                outputs.setdefault(out.req_id, []).extend(out.new_token_ids)
        texts.update(tok.decode(o, skip_special_tokens=True) for o in outputs.values())
    return texts


@pytest.mark.parametrize("drafter", ["none", "sampled", "fixed"])
def test_constrained_sampling_follows_the_masked_target(tiny_model, tok, drafter) -> None:
    from scipy.stats import chisquare

    prompt = ids(tok, "pick:")
    exact = exact_distribution(tiny_model, tok, prompt)
    assert abs(sum(exact.values()) - 1.0) < 1e-9 and len(exact) == 8
    n = 1600
    seen = sample_texts(tiny_model, tok, prompt, drafter, n)
    assert set(seen) <= set(exact), f"ungrammatical output: {set(seen) - set(exact)}"
    kinds = sorted(exact)
    # Pool outcomes rarer than 5 expected samples so the chi-square approximation holds.
    common = [k for k in kinds if exact[k] * n >= 5]
    rare = [k for k in kinds if k not in common]
    observed = [seen[k] for k in common] + ([sum(seen[k] for k in rare)] if rare else [])
    expected = [exact[k] * n for k in common] + ([sum(exact[k] for k in rare) * n] if rare else [])
    p_value = chisquare(observed, expected).pvalue
    assert p_value > 1e-3, (drafter, json.dumps(dict(seen)), exact)


def test_steps_with_structured_requests_report_their_mask_time(tiny_model, tok) -> None:
    """The bitmask cost is measured per step (StepStats.mask_time_s, exported as a histogram);
    a step without structured requests reports none."""
    runner = TorchModelRunner(tiny_model, 4, 64, seed=3)
    engine = LLMEngine(runner, ContinuousBatcher(4, 64, 64),
                       ServedModel("tiny", tok, frozenset({tok.eos_token_id})), None)
    prompt = ids(tok, "pick:")
    engine.add_request(Request("plain", prompt, SamplingParams(max_tokens=3)))
    plain = [engine.step()[1] for _ in range(2)]  # type: ignore[index]
    assert all(s.mask_time_s == 0.0 for s in plain)
    engine.add_request(Request("json", prompt, SamplingParams(max_tokens=3, structured=SMALL)))
    mixed = engine.step()[1]  # type: ignore[index]
    assert mixed.mask_time_s > 0.0
    assert mixed.mask_time_s < mixed.step_time_s
