"""Attention kernels of the eager step (scheduler/model.py) on short and long queries."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from scheduler.model import PackedBatch


class AdditiveMasks:
    """The batch's boolean masks as 0 / -inf in the activation dtype, built once per step."""

    def __init__(self, batch: PackedBatch, dtype: torch.dtype) -> None:
        def additive(mask: torch.Tensor) -> torch.Tensor:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
                ~mask, float("-inf")
            )

        self.small = [additive(g.mask) for g in batch.small]
        self.long = [additive(lq.mask) for lq in batch.long]


class Widened:
    """A cache layer whose slices are read in a wider dtype (a copy of just the slice)."""

    def __init__(self, cache: torch.Tensor, dtype: torch.dtype) -> None:
        self.cache, self.dtype = cache, dtype

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self.cache[index].to(self.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def grouped_query_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Softmax attention by two batched matmuls: q [B, H, M, D], k/v [B, KV, L, D], additive
    mask [B, 1, M, L] -> [B, H, M, D]; same result as SDPA with enable_gqa.

    The H / KV query heads that share a key/value head (heads kv*G .. kv*G+G-1, as in
    transformers' repeat_kv) are stacked into one matrix of G*M rows, so each KV head is read
    once and no repeated copy of the cache is made.
    """
    b, h, m, d = q.shape
    kv, length = k.shape[1], k.shape[2]
    g = h // kv
    scores = torch.matmul(q.reshape(b, kv, g * m, d), k.transpose(-1, -2))
    scores = scores.view(b, kv, g, m, length).mul_(scale).add_(mask.view(b, 1, 1, m, length))
    probs = torch.softmax(scores, dim=-1).view(b, kv, g * m, length)
    return torch.matmul(probs, v).view(b, h, m, d)
