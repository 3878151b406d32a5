"""Sampling and lossless verification of draft tokens.

Every distribution the target samples from is built by `target_probs`: penalties on the raw
logits, then `process_logits`. The drafters (drafts.proposer) apply the same `process_logits` to
their own logits and the offline evaluation (drafts.offline) verifies with `verify_draft`, so
serving, drafting and evaluation filter with one law and the rejection test compares like with
like.

Verification of drafts d_1..d_k after an anchor, with target distributions p_0..p_k (p_j is the
distribution of the token that follows position j of the query):

    greedy      accept d_j while d_j == argmax p_{j-1}; the first mismatch is replaced by that
                argmax; if all k match, the *bonus* token is argmax p_k.
    sampling    accept d_j with probability min(1, p_{j-1}(d_j) / q_j(d_j)); on the first
                rejection the *recovered* token is drawn from norm(max(0, p_{j-1} - q_j)); if
                all k are accepted the bonus token is drawn from p_k. (Leviathan et al. 2023,
                Chen et al. 2023: the emitted tokens are distributed exactly as p.)

A deterministic drafter's q_j is one-hot on d_j. Each request draws from its own
torch.Generator, so a seeded request produces the same tokens alone or in a busy batch.

Constrained requests (a grammar, or min_tokens) pass `allowed` [k+1, vocab]: each row's
disallowed tokens get -inf on the raw logits before anything else, the order of vLLM v1 (the
grammar bitmask is applied to the logits before the sampler's processors). Every position then
samples from the masked target distribution p'. A draft the grammar rejects never reaches
verification (the speculator cuts it); if it was sampled from q_j, `draft_probs` carries q_j as
an extra row, and the token at that position is drawn from norm(max(0, p'_j - q_j)), which is
what verifying it would have given (p'_j(d_j) = 0: rejected for certain). For one-hot q_j that
residual is p'_j itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from scheduler.request import SamplingParams, TokenLogprob
from scheduler.verification import verify_greedy

# Reported instead of -inf for a token the mask forbids (JSON has no infinity); vLLM's value.
MIN_LOGPROB = -9999.0
_BIT_SHIFTS = torch.arange(32, dtype=torch.int32)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 bitmask [rows, words] (bit t % 32 of word t // 32: token t allowed) -> bool
    [rows, vocab_size]; tokens beyond the bitmask (padding rows of the embedding) are refused."""
    bits = (bitmask.unsqueeze(-1) >> _BIT_SHIFTS.to(bitmask.device)) & 1
    allowed = bits.reshape(bitmask.shape[0], -1).bool()
    if allowed.shape[1] >= vocab_size:
        return allowed[:, :vocab_size]
    pad = allowed.new_zeros(bitmask.shape[0], vocab_size - allowed.shape[1])
    return torch.cat([allowed, pad], dim=1)


def refuse_stop_tokens(
    allowed: torch.Tensor, params: SamplingParams, num_output_tokens: int, stop_ids: Sequence[int]
) -> torch.Tensor:
    """min_tokens: row j samples output number num_output_tokens + j; before min_tokens it may
    not be a stop token. A row the grammar leaves nothing else in keeps its stop tokens (the
    grammar wins: the request ends there rather than sampling from nothing)."""
    rows = min(allowed.shape[0], max(0, params.min_tokens - num_output_tokens))
    if rows == 0 or not stop_ids:
        return allowed
    allowed = allowed.clone()
    ids = torch.tensor(sorted(stop_ids), device=allowed.device)
    kept = allowed[:rows].clone()
    allowed[:rows, ids] = False
    empty = ~allowed[:rows].any(dim=-1)
    allowed[:rows][empty] = kept[empty]
    return allowed


def mask_logits(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """Disallowed tokens -> -inf (a new tensor; the caller's logits stay raw)."""
    if allowed is None:
        return logits
    return logits.float().masked_fill(~allowed.to(logits.device), float("-inf"))


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Logits [n, vocab] -> the probabilities [n, vocab] (float32) that `params` sample from.

    The order is vLLM v1's sampler (`Sampler.sample`): temperature; then min-p, judged on the
    probabilities of the tempered logits (its argmax-invariant MinPLogitsProcessor); then
    top-k; then top-p over what is left (`apply_top_k_top_p`). The order matters: top-p after
    min-p measures mass within what min-p kept, so it can keep fewer tokens than top-p first.
    For temperature 0 (greedy) returns the one-hot of the argmax.
    """
    logits = logits.float()
    if params.is_greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        floor = params.min_p * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked before it already cover top_p (the first stays).
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits.softmax(-1)


def apply_penalties(
    logits: torch.Tensor,
    params: SamplingParams,
    prompt_ids: Sequence[int],
    output_counts: Mapping[int, int],
    draft_ids: Sequence[int] = (),
) -> torch.Tensor:
    """Penalties for rows [k+1, vocab]: row j also counts drafts d_1..d_j as already emitted."""
    logits = logits.float().clone()
    counts = dict(output_counts)
    for row in range(logits.shape[0]):
        if row > 0:
            token = draft_ids[row - 1]
            counts[token] = counts.get(token, 0) + 1
        if params.repetition_penalty != 1.0:  # prompt and output tokens, on the raw logit
            seen = torch.tensor(sorted(set(prompt_ids) | counts.keys()), device=logits.device)
            vals = logits[row, seen]
            rp = params.repetition_penalty
            logits[row, seen] = torch.where(vals > 0, vals / rp, vals * rp)
        if counts:  # frequency and presence: output tokens only
            ids = torch.tensor(list(counts.keys()), dtype=torch.long, device=logits.device)
            n = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
            logits[row, ids] -= params.frequency_penalty * n + params.presence_penalty
    return logits


def target_probs(
    logits: torch.Tensor,
    params: SamplingParams,
    prompt_ids: Sequence[int],
    output_counts: Mapping[int, int],
    draft_ids: Sequence[int] = (),
) -> torch.Tensor:
    if params.has_penalties:
        logits = apply_penalties(logits, params, prompt_ids, output_counts, draft_ids)
    return process_logits(logits, params)


def rejection_sample(
    probs: torch.Tensor,
    draft_ids: Sequence[int],
    draft_probs: torch.Tensor | None,
    generator: torch.Generator,
) -> tuple[int, list[int]]:
    """probs: target [k+1, vocab]; draft_probs: [k, vocab], [k+1, vocab] when the draft was cut
    after k tokens (row k: q of the cut draft), or None (one-hot drafts)."""
    k = len(draft_ids)
    for j, d in enumerate(draft_ids):
        p = probs[j]
        q_d = 1.0 if draft_probs is None else float(draft_probs[j, d])
        u = float(torch.rand((), generator=generator, device=probs.device))
        if q_d > 0 and u * q_d < float(p[d]):
            continue
        # Rejected at j: resample from the residual max(0, p - q).
        if draft_probs is None:
            residual = p.clone()
            residual[d] = 0.0
        else:
            residual = (p - draft_probs[j]).clamp_min(0.0)
        return j, [*draft_ids[:j], _sample_residual(residual, p, generator)]
    if draft_probs is not None and draft_probs.shape[0] > k:  # the cut draft counts as rejected
        residual = (probs[k] - draft_probs[k]).clamp_min(0.0)
        return k, [*draft_ids, _sample_residual(residual, probs[k], generator)]
    bonus = int(sample_rows(probs[k], generator))
    return k, [*draft_ids, bonus]


def _sample_residual(residual: torch.Tensor, p: torch.Tensor, generator: torch.Generator) -> int:
    if float(residual.sum()) <= 1e-12:  # p == q up to rounding: the residual is p itself
        residual = p
    return int(sample_rows(residual, generator))


def sample_rows(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of `probs` [..., V] (non-negative weights, each row's sum positive,
    not necessarily 1) -> [...] token ids.

    The inverse of each row's cumulative sum (float64) at one uniform draw per row: token i
    for u in [c_{i-1}, c_i), so a token of weight 0 is never drawn. The law of
    torch.multinomial, which on CPU took 1.29 ms for one draw from 49,152 tokens against
    95 us here (2 threads), ~15 % of a decode step at temperature 1."""
    cdf = probs.cumsum(-1, dtype=torch.float64)
    total = cdf[..., -1:].contiguous()  # searchsorted copies a strided one, and says so
    u = torch.rand(total.shape, generator=generator, dtype=torch.float64, device=probs.device)
    drawn = torch.searchsorted(cdf, u * total, right=True)
    # u * total can round up to the total: the last token of positive weight, not past it.
    last = torch.searchsorted(cdf, total)
    return torch.minimum(drawn, last).squeeze(-1)


def argmax_ids(rows: torch.Tensor) -> list[int]:
    """Each row's argmax as a token id: the first maximum, NaN counting as the maximum, as
    torch's. On CPU through NumPy's argmax, which is ~8x faster there: torch's read a
    49,152-token row in 43 us and a verification's 8 rows in 306 us (2 threads), NumPy's in
    5 and 27 us."""
    if rows.device.type == "cpu" and rows.dtype in (torch.float32, torch.float64):
        return rows.numpy().argmax(-1).tolist()
    return rows.argmax(-1).tolist()


def verify_draft(
    logits: torch.Tensor,
    params: SamplingParams,
    prompt_ids: Sequence[int],
    output_counts: Mapping[int, int],
    draft_ids: Sequence[int],
    draft_probs: torch.Tensor | None,
    generator: torch.Generator | None,  # the request's own; only sampling draws from it
    allowed: torch.Tensor | None = None,  # [k+1, vocab] bool: the grammar / min_tokens mask
) -> tuple[int, list[int]]:
    """Target logits [k+1, vocab] at the anchor and each draft -> (accepted, emitted tokens).

    Greedy requests keep the drafts that match the argmax (of the masked, penalised logits);
    sampling requests go through `rejection_sample`. With no drafts this is plain sampling of
    the next token.
    """
    logits = mask_logits(logits, allowed)
    if params.is_greedy and not params.has_penalties:  # the argmax of the logits suffices
        return verify_greedy(argmax_ids(logits), draft_ids)
    probs = target_probs(logits, params, prompt_ids, output_counts, draft_ids)
    if params.is_greedy:
        return verify_greedy(argmax_ids(probs), draft_ids)
    if generator is None:
        raise ValueError("a sampling request needs its generator")
    if draft_probs is not None:
        draft_probs = draft_probs.to(probs.device)
    return rejection_sample(probs, draft_ids, draft_probs, generator)


def top_logprobs(
    logits: torch.Tensor, token_ids: Sequence[int], num_top: int
) -> list[TokenLogprob]:
    """Model log-probabilities of the emitted tokens before penalties and temperature (after a
    grammar mask, as vLLM reports them; a forbidden token shows MIN_LOGPROB)."""
    logp = torch.log_softmax(logits.float(), dim=-1).clamp_min(MIN_LOGPROB)
    out = []
    for row, token in enumerate(token_ids):
        top: list[tuple[int, float]] = []
        if num_top > 0:
            vals, ids = torch.topk(logp[row], num_top)
            top = list(zip(ids.tolist(), vals.tolist()))
        out.append(TokenLogprob(token, float(logp[row, token]), top))
    return out
