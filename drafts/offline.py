"""Batch-1 speculative decoding with the HF target, DeepSpec-evaluator style (dspark.md §1.6, §4.3).

Runs any scheduler.drafter.Proposer without the serving engine: prefill, then rounds of
propose -> one target forward over [anchor, drafts] -> lossless rejection sampling -> commit.
Sampling and verification are the server's own (scheduler.sampling.verify_draft), so the
evaluation scores drafts against the distribution the server samples from.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from scheduler.drafter import DraftRequest
from scheduler.request import SamplingParams
from scheduler.sampling import verify_draft


@dataclass
class RoundLog:
    proposed: int
    accepted: int
    tau: int  # tokens this round contributed (accepted drafts + bonus; up to EOS if EOS accepted)
    conf_logits: list[float] | None = None


@dataclass
class GenResult:
    output_ids: list[int]
    rounds: list[RoundLog] = field(default_factory=list)


def _aux(hidden_states: Any, layer_ids: tuple[int, ...]) -> torch.Tensor:
    return torch.cat([hidden_states[i + 1][0] for i in layer_ids], dim=-1)


@torch.no_grad()
def speculative_generate(
    target: Any,
    proposer: Any,
    prompt_ids: list[int],
    params: SamplingParams,
    gamma: int,
    eos_ids: set[int],
    req_id: str = "offline",
    generator: torch.Generator | None = None,
) -> GenResult:
    """Generate up to params.max_tokens tokens; lossless for any proposer (greedy: exact match)."""
    dev = target.get_input_embeddings().weight.device
    if generator is None:  # seeded from the global RNG, so torch.manual_seed still reproduces a run
        generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
    cache = DynamicCache()
    out = target(
        input_ids=torch.tensor([prompt_ids], device=dev),
        cache=cache,
        use_cache=True,
        output_hidden_states=True,
    )
    proposer.observe(req_id, 0, _aux(out.hidden_states, proposer.aux_layer_ids))
    counts: Counter[int] = Counter()  # output tokens so far, for the penalties

    def verify(
        logits: torch.Tensor, drafts: list[int], q: torch.Tensor | None
    ) -> tuple[int, list[int]]:
        # The draws happen where the generator lives (a CPU generator may meet GPU logits).
        here = generator.device
        q = q.to(here) if q is not None else None
        return verify_draft(logits.to(here), params, prompt_ids, counts, drafts, q, generator)

    _, (first,) = verify(out.logits[0, -1:], [], None)
    tokens = list(prompt_ids) + [first]
    counts[first] += 1
    result = GenResult([first])
    try:
        while len(result.output_ids) < params.max_tokens and first not in eos_ids:
            prop = proposer.propose([DraftRequest(req_id, tuple(tokens), params, gamma)])
            drafts = list(prop.token_ids[0])
            q = prop.probs[0] if prop.probs is not None else None
            base = len(tokens) - 1  # anchor position; the cache holds positions < base
            inp = torch.tensor([[tokens[-1]] + drafts], device=dev)
            out = target(input_ids=inp, cache=cache, use_cache=True, output_hidden_states=True)
            accepted, new = verify(out.logits[0], drafts, q)
            _crop_cache(cache, base + accepted + 1)
            proposer.observe(
                req_id, base, _aux(out.hidden_states, proposer.aux_layer_ids)[: accepted + 1]
            )
            hit_eos = [i for i, t in enumerate(new) if t in eos_ids]
            if hit_eos:
                new = new[: hit_eos[0] + 1]
            tau = len(new) if hit_eos and hit_eos[0] < accepted else accepted + 1
            conf = getattr(proposer, "last_conf_logits", {}).get(req_id)
            result.rounds.append(RoundLog(len(drafts), accepted, tau, conf))
            tokens += new
            counts.update(new)
            result.output_ids += new
            if hit_eos:
                break
    finally:
        proposer.release(req_id)
    result.output_ids = result.output_ids[: params.max_tokens]
    return result


def _crop_cache(cache: DynamicCache, keep: int) -> None:
    extra = cache.get_seq_length() - keep
    if extra > 0:
        cache.crop(-extra)  # transformers 5: a negative value removes that many tokens


@torch.no_grad()
def target_generate(
    target: Any, prompt_ids: list[int], max_tokens: int, eos_ids: set[int]
) -> list[int]:
    """Plain greedy decoding, one token per forward (the reference for the lossless test)."""
    dev = target.get_input_embeddings().weight.device
    cache = DynamicCache()
    out = target(input_ids=torch.tensor([prompt_ids], device=dev), cache=cache, use_cache=True)
    res: list[int] = []
    while True:
        tok = int(out.logits[0, -1].argmax())
        res.append(tok)
        if tok in eos_ids or len(res) >= max_tokens:
            return res
        out = target(input_ids=torch.tensor([[tok]], device=dev), cache=cache, use_cache=True)
