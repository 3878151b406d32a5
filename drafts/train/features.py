"""Step 3: the target features the drafts learn from, streamed or cached on disk.

Per token the drafts read the outputs of `aux_layer_ids` (the features their `fc` fuses) and
the target's next-token distribution (the TV loss and the confidence head's acceptance labels).
The distribution is kept as the target's final hidden state: its logits over the draft vocabulary
are one small product away, and a hidden state is 576 numbers against 8,192 logits.

The first epoch runs the target (bf16) and, with a cache directory, appends each sequence's
features to `feats.bin` (bf16) as it goes; later epochs read them back instead of running the
target again. The cache lives under the run directory, never in git; it is keyed by the answer
row's index, so a rebuilt answer file (same indices) reuses it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


class TargetFeatures:
    def __init__(
        self,
        target: nn.Module,
        layer_ids: Sequence[int],
        vocab: torch.Tensor | None,
        cache_dir: Path | None = None,
    ) -> None:
        self.target = target  # the frozen target, already in its training dtype (bf16)
        self.layer_ids = list(layer_ids)
        head = target.get_output_embeddings()  # type: ignore[operator]
        weight = head.weight if vocab is None else head.weight[vocab]
        self.head = weight.detach()
        hidden_size: int = target.config.hidden_size  # type: ignore[union-attr,assignment]
        self.width = (len(self.layer_ids) + 1) * hidden_size
        self.cache = _Cache(cache_dir, self.width) if cache_dir is not None else None
        self.computed_tokens = 0  # tokens that went through the target (not read from the cache)

    @torch.no_grad()
    def __call__(
        self, keys: Sequence[int], input_ids: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """features [B, S, m*d] (float32) and target logits over the vocabulary [B, S, V]."""
        b, s = input_ids.shape
        cached = self.cache is not None and all(k in self.cache for k in keys)
        if cached:
            assert self.cache is not None
            packed = torch.zeros(b, s, self.width, dtype=torch.bfloat16)
            for i, k in enumerate(keys):
                row = self.cache.read(k)
                packed[i, : row.shape[0]] = row[:s]
            packed = packed.to(self.head.device)
        else:
            packed = self._run_target(input_ids)
            self.computed_tokens += int(lengths.sum())
            if self.cache is not None:
                for i, k in enumerate(keys):
                    if k not in self.cache:
                        self.cache.write(k, packed[i, : int(lengths[i])].cpu())
        d = self.head.shape[1]
        feats, final = packed[..., :-d], packed[..., -d:]
        logits = final.to(self.head.dtype) @ self.head.T
        return feats.float(), logits.float()

    def _run_target(self, input_ids: torch.Tensor) -> torch.Tensor:
        # the base model (no LM head over the full vocabulary); right padding is harmless under
        # causal attention. hidden_states[i + 1] is decoder layer i's output; last_hidden_state
        # is after the final norm, what the LM head multiplies.
        out = self.target.model(input_ids=input_ids, output_hidden_states=True, use_cache=False)  # type: ignore[operator]
        parts = [out.hidden_states[i + 1] for i in self.layer_ids] + [out.last_hidden_state]
        return torch.cat(parts, dim=-1).to(torch.bfloat16)

    def size_report(self) -> str:
        if self.cache is None:
            return "target features streamed (0 B on disk)"
        gib = self.cache.bytes / 2**30
        return f"target feature cache: {len(self.cache)} sequences, {gib:.2f} GiB (bf16)"


class _Cache:
    """Append-only bf16 rows in one file plus a JSONL index {key, offset, length} (in rows)."""

    def __init__(self, root: Path, width: int) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.width = width
        self.data_path = root / "feats.bin"
        self.index_path = root / "index.jsonl"
        self.index: dict[int, tuple[int, int]] = {}
        rows_on_disk = (
            self.data_path.stat().st_size // (2 * width) if self.data_path.exists() else 0
        )
        if self.index_path.exists():
            for line in self.index_path.read_text(encoding="utf-8").splitlines():
                rec: dict[str, Any] = json.loads(line)
                # an entry whose rows never reached the disk (killed mid-write) is dropped
                if rec["offset"] + rec["length"] <= rows_on_disk:
                    self.index[int(rec["key"])] = (int(rec["offset"]), int(rec["length"]))
        self.rows = max((o + n for o, n in self.index.values()), default=0)
        self._map: np.ndarray | None = None  # the file's rows, memory-mapped

    def __contains__(self, key: int) -> bool:
        return key in self.index

    def __len__(self) -> int:
        return len(self.index)

    @property
    def bytes(self) -> int:
        return self.rows * self.width * 2

    def read(self, key: int) -> torch.Tensor:
        offset, length = self.index[key]
        if self._map is None or self._map.shape[0] < offset + length:
            self._map = np.memmap(self.data_path, dtype=np.int16, mode="r").reshape(-1, self.width)
        rows = np.array(self._map[offset : offset + length])
        return torch.from_numpy(rows).view(torch.bfloat16)

    def write(self, key: int, rows: torch.Tensor) -> None:
        raw = rows.contiguous().view(torch.int16).numpy()
        with self.data_path.open("r+b" if self.data_path.exists() else "wb") as f:
            f.seek(self.rows * self.width * 2)  # past any half-written tail of a killed run
            f.write(raw.tobytes())
        with self.index_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "offset": self.rows, "length": rows.shape[0]}) + "\n")
        self.index[key] = (self.rows, rows.shape[0])
        self.rows += rows.shape[0]
