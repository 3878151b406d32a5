"""Greedy speculative decoding with each shipped drafter reproduces the target's greedy output
exactly on the real model (offline batch-1 loop; the engine-level test lives with the engine)."""

from __future__ import annotations

import pytest

from drafts.offline import speculative_generate, target_generate
from drafts.registry import build_proposer, get
from scheduler.request import SamplingParams


@pytest.mark.slow
@pytest.mark.parametrize("method", ["eagle3", "dflash", "dspark"])
def test_shipped_drafter_is_lossless_greedy(method: str, target, chat_prompts) -> None:  # type: ignore[no-untyped-def]
    shipped = get(method).shipped_checkpoint
    assert shipped is not None and (shipped / "model.safetensors").exists(), "checkpoint missing"
    model = target.hf_model
    proposer = build_proposer(method, model, None, 7)
    eos = {int(target.tokenizer.eos_token_id)}
    accepted = 0
    for i, prompt in enumerate(chat_prompts):
        ref = target_generate(model, prompt, 24, eos)
        res = speculative_generate(
            model,
            proposer,
            prompt,
            SamplingParams(max_tokens=24, temperature=0),
            7,
            eos,
            req_id=f"r{i}",
        )
        assert res.output_ids == ref, (method, i)
        accepted += sum(r.accepted for r in res.rounds)
    assert accepted > 0  # the trained draft is actually used, not just rejected
