"""Automatic prefix caching, the tensors: each stored block's keys and values for every layer,
and the target features of its positions when a drafter reads them (a request that skips its
prompt's start must still hand its drafter the features of every position).

The KV cache keeps one contiguous row per request (scheduler/model.py), so a hit is a copy of
the matched blocks into the request's row, not a shared page: ~23 KB a token in bfloat16 for the
embedded model, microseconds against the ~0.8 ms a prompt token costs to compute on CPU. The
index of which block holds what is scheduler/prefix_cache.py.

Features are kept the way the KV cache is: one row per slot (`FeatureRows.slots`), written at
every step's (slot, position) pairs whether a row's draft was accepted or not (a rejected
position is written again before anything reads it), so a block is stored from its slot's row
like its keys.
One indexed write a step, where keeping each request's committed rows apart took a slice and a
copy per request a step and a concatenation at its end (at 16 streams on the CPU, what a DSpark
engine's runner spends beside the forward came from 0.21 to 0.13 ms a step above `none`'s;
docs/benchmarks.md). The row costs max_model_len x features per slot: 180 MiB for the embedded
model's 16 slots of 2,048 tokens, a quarter of its KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scheduler.model import PackedBatch, TargetModel


@dataclass
class FeatureRows:
    """The target features a drafter reads: each stored block's, and each slot's, written every
    step like its KV row."""

    blocks: torch.Tensor  # [blocks, block_size, feature_dim]
    slots: torch.Tensor  # [slots, max_model_len, feature_dim]


class PrefixStore:
    def __init__(self, model: TargetModel, num_blocks: int, block_size: int, feature_dim: int) -> None:
        self.model = model
        self.block_size = block_size
        L, KV, D = model.num_layers, model.num_kv_heads, model.head_dim
        shape = (L, num_blocks, KV, block_size, D)
        self.k = torch.empty(shape, dtype=model.kv_dtype, device=model.device)
        self.v = torch.empty(shape, dtype=model.kv_dtype, device=model.device)
        self.features: FeatureRows | None = None  # only where a drafter reads features
        if feature_dim:
            num_slots, max_model_len = model.k_cache.shape[1], model.k_cache.shape[3]
            self.features = FeatureRows(
                blocks=torch.empty(
                    num_blocks, block_size, feature_dim, dtype=model.dtype, device=model.device
                ),
                slots=torch.empty(
                    num_slots, max_model_len, feature_dim, dtype=model.dtype, device=model.device
                ),
            )

    @property
    def nbytes(self) -> int:
        """Its tensors' bytes (the slots' feature rows included), for the start-up log."""
        tensors = [self.k, self.v]
        if self.features is not None:
            tensors += [self.features.blocks, self.features.slots]
        return sum(t.numel() * t.element_size() for t in tensors)

    def write_features(self, batch: PackedBatch, features: torch.Tensor) -> None:
        """Keep the step's features [rows, feature_dim] at each row's (slot, position)."""
        if self.features is not None:
            self.features.slots[batch.slot_ids, batch.positions] = features

    def load(self, slot: int, block_ids: list[int]) -> torch.Tensor | None:
        """Copy the blocks into positions 0.. of the slot's KV row (and feature row); returns
        their features, if stored. A copy a block (`save` says why)."""
        size = self.block_size
        for j, block_id in enumerate(block_ids):
            for block, row in self._block_and_row(slot, block_id, slice(j * size, (j + 1) * size)):
                row.copy_(block)
        if self.features is None:
            return None
        return self.features.slots[slot, : len(block_ids) * size].clone()

    def save(self, slot: int, blocks: list[tuple[int, int]]) -> None:
        """Store the slot's KV (and features) of each (block id, first position) as that block.

        A block's keys are one 1 KB run per layer and head in the slot's row, so each block is
        one strided slice copy a tensor. One gather of all the blocks' rows and an indexed write
        (torch's advanced indexing, through a temporary) took about twice as long: 1.10 against
        0.60 ms to save 14 blocks with DSpark's features, 0.84 against 0.53 ms to load them
        (`python benchmarks/prefix_store.py`; docs/benchmarks.md, "At 16 streams: what the
        gates' probes cost, and the prefix store's copies")."""
        for block_id, pos in blocks:
            for block, row in self._block_and_row(slot, block_id, slice(pos, pos + self.block_size)):
                block.copy_(row)

    def _block_and_row(
        self, slot: int, block_id: int, span: slice
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per stored tensor, block `block_id` beside the slot's row at the positions `span`
        (views: `save` copies the second into the first, `load` the first into the second)."""
        pairs = [
            (self.k[:, block_id], self.model.k_cache[:, slot, :, span]),
            (self.v[:, block_id], self.model.v_cache[:, slot, :, span]),
        ]
        if self.features is not None:
            pairs.append((self.features.blocks[block_id], self.features.slots[slot, span]))
        return pairs
