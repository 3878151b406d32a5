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
import torch.nn.functional as F
from torch import nn

from drafts.common import (
    Attention,
    DecoderLayer,
    DraftConfig,
    FrozenTargetParts,
    apply_rope,
    init_weights,
    rope_cos_sin,
)


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
        fused = self.fc(feats)
        # in the norm's own dtype: fp32 in training (bf16 autocast hands back bf16, which takes
        # rms_norm off its fused kernel), bf16 when the draft serves next to a bf16 target
        return self.hidden_norm(fused.to(self.hidden_norm.weight.dtype))

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

    def markov_bias(
        self, prev_ids: torch.Tensor, vocab: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The low-rank transition bias from the previous token (over `vocab`'s rows if given)."""
        if self.markov_w1 is None or self.markov_w2 is None:
            return None
        if vocab is None:
            return self.markov_w2(self.markov_w1(prev_ids))
        return F.linear(self.markov_w1(prev_ids), self.markov_w2.weight[vocab])

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
        vocab: torch.Tensor | None = None,
    ) -> BlockOutput:
        """input_ids [B,S], feats [B,S,m*d], anchors/keep [B,N] -> logits [B,N,gamma,V].

        Block j's queries see the context strictly before its anchor and every slot of its own
        block (the proposer's view at inference). The blocks never see each other, so attention
        runs as two score tables joined in one softmax (`block_attention`) instead of one dense
        [N*gamma, S + N*gamma] mask: with an anchor at every answer position the dense form
        spends most of its work on zeros. `vocab`: the draft vocabulary (logits over its rows).
        """
        b, s = input_ids.shape
        n, g = anchors.shape[1], self.cfg.block_size
        dev = input_ids.device
        ctx = self.context(feats)
        ctx_pos = torch.arange(s, device=dev).expand(b, s)
        slot = torch.arange(g, device=dev)
        pos = (anchors[:, :, None] + slot).reshape(b, n * g)
        block_ids = torch.full((b, n, g), self.cfg.mask_token_id, dtype=torch.long, device=dev)
        block_ids[:, :, 0] = input_ids.gather(1, anchors)
        ctx_ok = (torch.arange(s, device=dev)[None, None, :] < anchors[:, :, None]) & keep[
            :, :, None
        ]  # [B, N, S]
        h = parts.embed(block_ids.reshape(b, n * g))
        for layer in self.decoder_layers():
            kv = layer.self_attn.kv(ctx, ctx_pos)
            h = h + block_attention(layer.self_attn, layer.input_layernorm(h), pos, kv, ctx_ok, g)
            h = layer.mlp_block(h)
        h = self.norm(h).view(b, n, g, -1)
        logits = parts.logits(h, vocab).float()
        prev_idx = (anchors[:, :, None] + slot).clamp(max=s - 1).reshape(b, n * g)
        prev_ids = input_ids.gather(1, prev_idx).view(b, n, g)
        bias = self.markov_bias(prev_ids, vocab)
        if bias is not None:
            logits = logits + bias.float()
        return BlockOutput(logits, self.conf_logits(h, prev_ids))


def block_attention(
    attn: Attention,
    x: torch.Tensor,
    pos: torch.Tensor,
    ctx_kv: tuple[torch.Tensor, torch.Tensor],
    ctx_ok: torch.Tensor,
    block_size: int,
) -> torch.Tensor:
    """Attention of N blocks of `block_size` queries each: block j attends to the context keys
    ctx_ok[:, j] allows and to its own block (bidirectionally), in one joint softmax.
    x [B, N*g, d], pos [B, N*g], ctx_kv roped [B, kv, S, hd], ctx_ok bool [B, N, S]."""
    b, q_len, _ = x.shape
    g = block_size
    n = q_len // g
    h, n_kv, hd = attn.h, attn.n_kv, attn.hd
    q = attn.q_proj(x).view(b, q_len, h, hd).transpose(1, 2)
    if attn.q_norm is not None:
        q = attn.q_norm(q)
    cos, sin = rope_cos_sin(pos, hd, attn.theta)
    q = apply_rope(q, cos, sin) * hd**-0.5
    k_own, v_own = attn.kv(x, pos)
    rep = h // n_kv
    k_ctx, v_ctx = (t.repeat_interleave(rep, dim=1) for t in ctx_kv)  # [B, H, S, hd]
    k_own, v_own = (t.repeat_interleave(rep, dim=1).view(b, h, n, g, hd) for t in (k_own, v_own))
    q_blocks = q.view(b, h, n, g, hd)
    s_ctx = (q @ k_ctx.transpose(-1, -2)).view(b, h, n, g, -1)  # [B, H, N, g, S]
    s_ctx = s_ctx.masked_fill(~ctx_ok[:, None, :, None, :], float("-inf"))
    s_own = q_blocks @ k_own.transpose(-1, -2)  # [B, H, N, g, g]
    probs = torch.softmax(torch.cat([s_ctx, s_own], dim=-1), dim=-1)
    p_ctx, p_own = probs.split([s_ctx.shape[-1], g], dim=-1)
    out = (p_ctx.reshape(b, h, q_len, -1) @ v_ctx) + (p_own @ v_own).view(b, h, q_len, hd)
    return attn.o_proj(out.transpose(1, 2).reshape(b, q_len, h * hd))
