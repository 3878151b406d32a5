"""Draft vocabulary: the target tokens a drafter may propose.

On a CPU the drafter's largest cost is the target's LM head over the whole vocabulary (49k rows
for SmolLM2), read once per draft position. A target answers with few of those tokens: the
embedded model's training answers use about 7.6k distinct ones. Restricting the drafter's head
(and DSpark's Markov head, which also has a row per token) to them, as EAGLE-3's draft-to-target
map does, reads about 6x fewer bytes per position.

Still lossless. A greedy draft outside the vocabulary is only a guess the target rejects, and a
sampled draft's distribution is returned over the full vocabulary, zero outside it, which the
rejection rule accepts as any other draft distribution.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from scheduler.linear import FrozenLinear, Product, shared_frozen_linear


def frequent_tokens(token_lists: Iterable[Iterable[int]], size: int) -> torch.Tensor:
    """The `size` most frequent tokens of `token_lists` (fewer if fewer occur), sorted."""
    counts = collections.Counter(t for tokens in token_lists for t in tokens)
    return torch.tensor(sorted(t for t, _ in counts.most_common(size)), dtype=torch.long)


def extended_vocab(
    base: torch.Tensor, token_lists: Iterable[Iterable[int]], size: int
) -> torch.Tensor:
    """`base` and the most frequent other tokens of `token_lists`, `size` in all (fewer if fewer
    occur), sorted: a continued draft keeps every row it was trained over and gains the tokens
    its new answers use most (chat answers name many rarer words than math ones)."""
    keep = set(base.tolist())
    counts = collections.Counter(t for tokens in token_lists for t in tokens if t not in keep)
    extra = {t for t, _ in counts.most_common(max(0, size - len(keep)))}
    return torch.tensor(sorted(keep | extra), dtype=torch.long)


class DraftHead:
    """The target's LM head (and DSpark's Markov head) as the proposer multiplies them: over the
    draft's `draft_vocab` buffer when it has one, else over the whole vocabulary. `product`
    makes the draft vocabulary's products (scheduler.linear.Product); over the whole vocabulary
    the target's own head is shared."""

    def __init__(self, model: nn.Module, target: Any, product: Product = FrozenLinear) -> None:
        lm_head = target.get_output_embeddings()
        ids: torch.Tensor | None = getattr(model, "draft_vocab", None)
        self.vocab_size = int(lm_head.weight.shape[0])
        self.ids = None if ids is None else ids.to(lm_head.weight.device)
        self.dtype = lm_head.weight.dtype
        if self.ids is None:
            self.head: Callable[[torch.Tensor], torch.Tensor] = shared_frozen_linear(
                lm_head.weight, lm_head.bias
            )
            # over the whole vocabulary the model's own Markov head is used
            self.markov: Callable[[torch.Tensor], torch.Tensor] | None = None
            return
        bias = None if lm_head.bias is None else lm_head.bias.data[self.ids]
        self.head = product(lm_head.weight.data[self.ids], bias)
        w2 = getattr(model, "markov_w2", None)
        self.markov = None if w2 is None else product(w2.weight.data[self.ids], None)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """[..., hidden] -> float32 logits over the draft vocabulary [..., V_draft]."""
        return self.head(h.to(self.dtype)).float()

    def markov_bias(self, model: nn.Module, prev_ids: torch.Tensor) -> torch.Tensor | None:
        """DSpark's transition bias from the previous token, over the draft vocabulary."""
        if self.markov is None or model.markov_w1 is None:
            return model.markov_bias(prev_ids)  # type: ignore[operator, no-any-return]
        return self.markov(model.markov_w1(prev_ids))  # type: ignore[operator]

    def token_ids(self, index: torch.Tensor) -> torch.Tensor:
        """Positions in the draft vocabulary -> target token ids."""
        return index if self.ids is None else self.ids[index]

    def full(self, probs: torch.Tensor) -> torch.Tensor:
        """A distribution over the draft vocabulary [..., V_draft] -> over the target's [..., V]."""
        if self.ids is None:
            return probs
        out = probs.new_zeros(*probs.shape[:-1], self.vocab_size)
        out[..., self.ids] = probs
        return out
