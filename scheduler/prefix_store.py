"""Automatic prefix caching, the tensors: each stored block's keys and values for every layer,
and the target features of its positions when a drafter reads them (a request that skips its
prompt's start must still hand its drafter the features of every position).

The KV cache keeps one contiguous row per request (scheduler/model.py), so a hit is a copy of
the matched blocks into the request's row, not a shared page: ~23 KB a token in bfloat16 for the
embedded model, microseconds against the ~0.8 ms a prompt token costs to compute on CPU. The
index of which block holds what is scheduler/prefix_cache.py.
"""

from __future__ import annotations

import torch

from scheduler.model import TargetModel


class PrefixStore:
    def __init__(self, model: TargetModel, num_blocks: int, block_size: int, feature_dim: int) -> None:
        self.model = model
        self.block_size = block_size
        L, KV, D = model.num_layers, model.num_kv_heads, model.head_dim
        shape = (L, num_blocks, KV, block_size, D)
        self.k = torch.empty(shape, dtype=model.kv_dtype, device=model.device)
        self.v = torch.empty(shape, dtype=model.kv_dtype, device=model.device)
        self.features = (
            torch.empty(num_blocks, block_size, feature_dim, dtype=model.dtype, device=model.device)
            if feature_dim
            else None
        )

    @property
    def nbytes(self) -> int:
        tensors = [self.k, self.v] + ([self.features] if self.features is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def load(self, slot: int, block_ids: list[int]) -> torch.Tensor | None:
        """Copy the blocks into positions 0.. of the slot's KV row; their features, if stored."""
        n = len(block_ids) * self.block_size
        idx = torch.tensor(block_ids, device=self.k.device)
        for stored, cache in ((self.k, self.model.k_cache), (self.v, self.model.v_cache)):
            blocks = stored[:, idx]  # [layers, blocks, kv_heads, block, head_dim]
            cache[:, slot, :, :n] = blocks.transpose(1, 2).flatten(2, 3)
        if self.features is None:
            return None
        return self.features[idx].flatten(0, 1)

    def save(self, slot: int, block_id: int, pos: int, features: torch.Tensor | None) -> None:
        """Store the slot's KV of positions pos..pos+block_size-1 (and their features) as a block."""
        rows = slice(pos, pos + self.block_size)
        self.k[:, block_id] = self.model.k_cache[:, slot, :, rows]
        self.v[:, block_id] = self.model.v_cache[:, slot, :, rows]
        if self.features is not None and features is not None:
            self.features[block_id] = features
