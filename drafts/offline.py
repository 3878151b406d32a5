"""Batch-1 speculative decoding with the HF target, DeepSpec-evaluator style (dspark.md §1.6, §4.3).

Runs any scheduler.drafter.Proposer without the serving engine: prefill, then rounds of
propose -> one target forward over [anchor, drafts] -> lossless rejection sampling -> commit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from scheduler.drafter import DraftRequest
from drafts.common import filtered_probs, sample_from
from scheduler.request import SamplingParams


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


def _target_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    return filtered_probs(logits, p.temperature, p.top_k, p.top_p, p.min_p)


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
    greedy = params.temperature <= 0
    cache = DynamicCache()
    out = target(
        input_ids=torch.tensor([prompt_ids], device=dev),
        cache=cache,
        use_cache=True,
        output_hidden_states=True,
    )
    proposer.observe(req_id, 0, _aux(out.hidden_states, proposer.aux_layer_ids))
    last = out.logits[0, -1].float()
    first = (
        int(last.argmax())
        if greedy
        else int(sample_from(_target_probs(last[None], params), generator))
    )
    tokens = list(prompt_ids) + [first]
    result = GenResult([first])
    try:
        while len(result.output_ids) < params.max_tokens and first not in eos_ids:
            prop = proposer.propose([DraftRequest(req_id, tuple(tokens), params, gamma)])
            drafts = list(prop.token_ids[0])
            q = prop.probs[0] if prop.probs is not None else None
            base = len(tokens) - 1  # anchor position; the cache holds positions < base
            inp = torch.tensor([[tokens[-1]] + drafts], device=dev)
            out = target(input_ids=inp, cache=cache, use_cache=True, output_hidden_states=True)
            logits = out.logits[0].float()
            accepted, nxt = _verify(logits, drafts, q, params, greedy, generator)
            new = drafts[:accepted] + [nxt]
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


def _verify(
    logits: torch.Tensor,
    drafts: list[int],
    q: torch.Tensor | None,
    params: SamplingParams,
    greedy: bool,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """Standard speculative sampling: accept d_i w.p. min(1, p(d_i)/q(d_i)); residual on reject."""
    if greedy:
        best = logits.argmax(-1).tolist()
        a = 0
        while a < len(drafts) and drafts[a] == best[a]:
            a += 1
        return a, int(best[a])
    p_all = _target_probs(logits, params)
    for i, d in enumerate(drafts):
        p = p_all[i]
        qi = (
            q[i]
            if q is not None
            else torch.nn.functional.one_hot(torch.tensor(d), p.numel()).float()
        )
        ratio = float(p[d]) / max(float(qi[d]), 1e-8)
        u = float(torch.rand((), generator=generator))
        if u >= min(1.0, ratio):
            resid = (p - qi.to(p.device)).clamp(min=0)
            resid = resid / resid.sum() if float(resid.sum()) > 1e-8 else p
            return i, int(sample_from(resid[None], generator))
    return len(drafts), int(sample_from(p_all[len(drafts)][None], generator))


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
