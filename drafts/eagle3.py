"""EAGLE-3 draft head as DeepSpec ships it (dspark.md §3.1): features of 5 target layers fused by
`fc`, one decoder layer whose attention reads [input_layernorm(emb); hidden_norm(h)], frozen
full-vocabulary LM head, trained with the training-time test (TTT) over `block_size` steps
(drafts/train/losses.py).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from drafts.common import DecoderLayer, DraftConfig, init_weights


class Eagle3Model(nn.Module):
    def __init__(self, cfg: DraftConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.fc = nn.Linear(len(cfg.aux_layer_ids) * d, d, bias=False)
        self.hidden_norm = nn.RMSNorm(d, eps=cfg.rms_norm_eps)
        self.layers = nn.ModuleList(DecoderLayer(cfg, attn_in=2 * d) for _ in range(cfg.num_layers))
        self.norm = nn.RMSNorm(d, eps=cfg.rms_norm_eps)
        init_weights(self)

    def layer0(self) -> DecoderLayer:
        return cast(DecoderLayer, self.layers[0])

    def step(
        self,
        emb: torch.Tensor,
        hidden: torch.Tensor,
        pos: torch.Tensor,
        prefix_kv: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One draft-layer pass. Returns the output hidden (pre final norm) and this input's K/V."""
        layer = self.layer0()
        x = torch.cat([layer.input_layernorm(emb), self.hidden_norm(hidden)], dim=-1)
        own_kv = layer.self_attn.kv(x, pos)
        h = hidden + layer.self_attn(x, pos, prefix_kv, mask)
        return layer.mlp_block(h), own_kv
