"""DSpark draft: a DFlash-style parallel backbone with target features injected as K/V, the
Markov sequential head (low-rank transition bias) and the confidence head (dspark.md §1).

`markov_rank=0, confidence_head=False` gives the DFlash baseline as DeepSpec ships it
(same backbone, anchor-as-first-slot block layout, trained with CE only); drafts/registry.py
builds both from this class. The training losses live in drafts/train/losses.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from drafts.common import DecoderLayer, DraftConfig, FrozenTargetParts, init_weights


@dataclass
class BlockOutput:
    logits: torch.Tensor  # [..., gamma, V] Markov-corrected (teacher-forced) logits
    conf_logits: torch.Tensor | None  # [..., gamma] confidence logits (before sigmoid)


class DSparkModel(nn.Module):
    def __init__(self, cfg: DraftConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.fc = nn.Linear(len(cfg.aux_layer_ids) * d, d, bias=False)
        self.hidden_norm = nn.RMSNorm(d, eps=cfg.rms_norm_eps)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.RMSNorm(d, eps=cfg.rms_norm_eps)
        r = cfg.markov_rank
        self.markov_w1 = nn.Embedding(cfg.vocab_size, r) if r > 0 else None
        self.markov_w2 = nn.Linear(r, cfg.vocab_size, bias=False) if r > 0 else None
        self.confidence = nn.Linear(d + r, 1) if cfg.confidence_head else None
        init_weights(self)
        if self.markov_w2 is not None:
            nn.init.zeros_(self.markov_w2.weight)  # start as plain DFlash: zero transition bias

    # --- shared pieces -------------------------------------------------------------------
    def context(self, feats: torch.Tensor) -> torch.Tensor:
        """Fused target features H_ctx = RMSNorm(W_c [H(l1); ...; H(lm)])."""
        return self.hidden_norm(self.fc(feats))

    def backbone(
        self,
        x: torch.Tensor,
        pos: torch.Tensor,
        ctx_kv: list[tuple[torch.Tensor, torch.Tensor]],
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """x: block embeddings [B, Q, d]; ctx_kv: per-layer roped context K/V. Returns normed h."""
        h = x
        for layer, kv in zip(self.decoder_layers(), ctx_kv, strict=True):
            h = h + layer.self_attn(layer.input_layernorm(h), pos, kv, mask)
            h = layer.mlp_block(h)
        return self.norm(h)

    def ctx_kv(
        self, ctx: torch.Tensor, pos: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [layer.self_attn.kv(ctx, pos) for layer in self.decoder_layers()]

    def decoder_layers(self) -> list[DecoderLayer]:
        return [cast(DecoderLayer, m) for m in self.layers]

    def markov_bias(self, prev_ids: torch.Tensor) -> torch.Tensor | None:
        if self.markov_w1 is None or self.markov_w2 is None:
            return None
        return self.markov_w2(self.markov_w1(prev_ids))

    def conf_logits(self, h: torch.Tensor, prev_ids: torch.Tensor) -> torch.Tensor | None:
        if self.confidence is None:
            return None
        parts = [h] if self.markov_w1 is None else [h, self.markov_w1(prev_ids)]
        return self.confidence(torch.cat(parts, dim=-1)).squeeze(-1)

    # --- training (teacher-forced, many anchors per sequence) -----------------------------
    def train_forward(
        self,
        parts: FrozenTargetParts,
        input_ids: torch.Tensor,
        feats: torch.Tensor,
        anchors: torch.Tensor,
        keep: torch.Tensor,
    ) -> BlockOutput:
        """input_ids [B,S], feats [B,S,m*d], anchors/keep [B,N] -> logits [B,N,gamma,V]."""
        b, s = input_ids.shape
        n, g = anchors.shape[1], self.cfg.block_size
        dev = input_ids.device
        ctx = self.context(feats)
        ctx_pos = torch.arange(s, device=dev).expand(b, s)
        slot = torch.arange(g, device=dev)
        pos = (anchors[:, :, None] + slot).reshape(b, n * g)
        block_ids = torch.full((b, n, g), self.cfg.mask_token_id, dtype=torch.long, device=dev)
        block_ids[:, :, 0] = input_ids.gather(1, anchors)
        x = parts.embed(block_ids.reshape(b, n * g))
        # query in block j sees context strictly before its anchor and every slot of its own block
        ctx_ok = (torch.arange(s, device=dev)[None, None, :] < anchors[:, :, None]) & keep[
            :, :, None
        ]
        ctx_ok = ctx_ok[:, :, None, :].expand(b, n, g, s).reshape(b, n * g, s)
        blk = torch.arange(n, device=dev).repeat_interleave(g)
        own = (blk[:, None] == blk[None, :]).expand(b, n * g, n * g)
        mask = torch.cat([ctx_ok, own], dim=2)[:, None]
        h = self.backbone(x, pos, self.ctx_kv(ctx, ctx_pos), mask).view(b, n, g, -1)
        logits = parts.logits(h).float()
        prev_idx = (anchors[:, :, None] + slot).clamp(max=s - 1).reshape(b, n * g)
        prev_ids = input_ids.gather(1, prev_idx).view(b, n, g)
        bias = self.markov_bias(prev_ids)
        if bias is not None:
            logits = logits + bias.float()
        return BlockOutput(logits, self.conf_logits(h, prev_ids))
