"""DSpark draft: a DFlash-style parallel backbone with target features injected as K/V, the
Markov sequential head (low-rank transition bias) and the confidence head (dspark.md §1).

`markov_rank=0, confidence_head=False` gives the DFlash baseline as DeepSpec ships it
(same backbone, anchor-as-first-slot block layout); see drafts/dflash.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
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


def sample_anchors(
    loss_mask: torch.Tensor,
    lengths: torch.Tensor,
    num_anchors: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchors p with loss_mask[p] and loss_mask[p+1] (anchor and first label in the answer)."""
    b = loss_mask.shape[0]
    valid = loss_mask.bool() & torch.cat(
        [loss_mask[:, 1:].bool(), torch.zeros_like(loss_mask[:, :1]).bool()], 1
    )
    anchors = torch.zeros((b, num_anchors), dtype=torch.long)
    keep = torch.zeros((b, num_anchors), dtype=torch.bool)
    for i in range(b):
        cand = valid[i].nonzero().squeeze(-1)
        if cand.numel() == 0:
            continue
        pick = cand[torch.randperm(cand.numel(), generator=generator)[:num_anchors]].sort().values
        anchors[i, : pick.numel()] = pick
        keep[i, : pick.numel()] = True
    return anchors.to(loss_mask.device), keep.to(loss_mask.device)


def position_weights(gamma: int, decay: float, device: torch.device) -> torch.Tensor:
    """w_k = exp(-(k-1)/decay), k = 1..gamma (DeepSpec's loss_decay_gamma = 4)."""
    return torch.exp(-torch.arange(gamma, device=device, dtype=torch.float32) / decay)


def block_losses(
    out: BlockOutput,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    target_logits: torch.Tensor,
    anchors: torch.Tensor,
    keep: torch.Tensor,
    alpha_ce: float,
    alpha_tv: float,
    alpha_conf: float,
    decay: float = 4.0,
) -> dict[str, torch.Tensor]:
    """CE + L1 (2 x TV) + confidence BCE, each = sum(w * mask * term) / sum(w * mask) (dspark.md §1.4)."""
    b, n, g, v = out.logits.shape
    s = input_ids.shape[1]
    slot = torch.arange(g, device=input_ids.device)
    lab_pos = anchors[:, :, None] + slot + 1  # [B,N,g]
    inside = lab_pos < s
    lab_idx = lab_pos.clamp(max=s - 1).view(b, n * g)
    labels = input_ids.gather(1, lab_idx).view(b, n, g)
    m = inside & loss_mask.gather(1, lab_idx).view(b, n, g).bool() & keep[:, :, None]
    m = m.long().cumprod(-1).float()  # only a contiguous valid prefix is supervised
    w = position_weights(g, decay, input_ids.device) * m
    denom = w.sum().clamp(min=1.0)
    logp = F.log_softmax(out.logits, dim=-1)
    ce = -logp.gather(-1, labels[..., None]).squeeze(-1)
    result = {"ce": (ce * w).sum() / denom}
    if alpha_tv > 0 or out.conf_logits is not None:
        # target distribution of label p+k+1 is the target's logit row at p+k (temperature 1)
        t_idx = (lab_pos - 1).clamp(max=s - 1).view(b, n * g, 1).expand(b, n * g, v)
        p_t = torch.softmax(target_logits.float().gather(1, t_idx).view(b, n, g, v), dim=-1)
        p_d = logp.exp()
        l1 = (p_d - p_t).abs().sum(-1)
        result["tv"] = (l1 * w).sum() / denom
        if out.conf_logits is not None:
            accept = torch.minimum(p_d, p_t).sum(-1).detach().clamp(0.0, 1.0)
            bce = F.binary_cross_entropy_with_logits(
                out.conf_logits.float(), accept, reduction="none"
            )
            result["conf"] = (bce * w).sum() / denom
            result["accept_rate"] = (accept * w).sum() / denom
    loss = alpha_ce * result["ce"]
    if alpha_tv > 0:
        loss = loss + alpha_tv * result["tv"]
    if out.conf_logits is not None and alpha_conf > 0:
        loss = loss + alpha_conf * result["conf"]
    result["loss"] = loss
    result["tokens"] = m.sum()
    return result


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def load_proposer(target: nn.Module, checkpoint: str | None, num_speculative_tokens: int):  # type: ignore[no-untyped-def]
    """Engine entry point: the DSpark drafter (shipped default when checkpoint is None)."""
    from drafts.checkpoint import load_draft, shipped_path
    from drafts.proposer import make_proposer

    model = load_draft(checkpoint or shipped_path("dspark"))
    return make_proposer(model, target, num_speculative_tokens)
