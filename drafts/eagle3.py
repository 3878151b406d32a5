"""EAGLE-3 draft head as DeepSpec ships it (dspark.md §3.1): features of 5 target layers fused by
`fc`, one decoder layer whose attention reads [input_layernorm(emb); hidden_norm(h)], frozen
full-vocabulary LM head, trained with the training-time test (TTT) over `block_size` steps.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from drafts.common import DecoderLayer, DraftConfig, FrozenTargetParts, init_weights


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


def ttt_losses(
    model: Eagle3Model,
    parts: FrozenTargetParts,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    feats: torch.Tensor,
    target_logits: torch.Tensor,
    rows_per_step: int,
    step_decay: float = 0.8,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Training-time test: step 0 row t pairs target features of t with token t+1 (predicting t+2);
    step k replaces the features by the draft's own step k-1 output, shifts tokens by k, and
    attends causally to step-0 keys plus the diagonal keys of steps 1..k (SpecForge layout).
    The LM head is applied to `rows_per_step` sampled valid rows per sample and step (the
    frozen 49k-vocab head dominates CPU cost), soft CE against the target distribution."""
    b, s = input_ids.shape
    dev = input_ids.device
    g = model.cfg.block_size
    hidden = model.fc(feats)
    rows = torch.arange(s, device=dev)
    causal = rows[None, :] <= rows[:, None]  # [S, S]
    diag = torch.eye(s, dtype=torch.bool, device=dev)
    keys: list[torch.Tensor] = []
    vals: list[torch.Tensor] = []
    total = torch.zeros((), device=dev)
    stats: dict[str, torch.Tensor] = {}
    for k in range(g):
        tok_idx = (rows + 1 + k).clamp(max=s - 1)
        emb = parts.embed(input_ids[:, tok_idx])
        pos = (rows + k).expand(b, s)
        x_layer = model.layer0()
        x = torch.cat([x_layer.input_layernorm(emb), model.hidden_norm(hidden)], dim=-1)
        k_new, v_new = x_layer.self_attn.kv(x, pos)
        prefix = (torch.cat(keys, dim=2), torch.cat(vals, dim=2)) if keys else None
        attn_mask = _ttt_mask(causal, diag, len(keys))
        h = hidden + x_layer.self_attn(x, pos, prefix, attn_mask[None, None])
        out = x_layer.mlp_block(h)
        keys.append(k_new)
        vals.append(v_new)
        # label of row t at step k is token t+2+k; its target distribution is logit row t+1+k
        lab = rows + 2 + k
        valid = (lab < s)[None, :] & loss_mask[:, lab.clamp(max=s - 1)].bool()
        sel_b, sel_t = _sample_rows(valid, rows_per_step, generator)
        if sel_b.numel():
            logits = parts.logits(model.norm(out[sel_b, sel_t])).float()
            p_t = torch.softmax(target_logits[sel_b, sel_t + 1 + k].float(), dim=-1)
            logp = F.log_softmax(logits, dim=-1)
            loss_k = -(p_t * logp).sum(-1).mean()
            acc = (logits.argmax(-1) == p_t.argmax(-1)).float().mean()
            w = step_decay**k
            total = total + w * loss_k
            stats[f"acc{k}"] = acc.detach()
            stats[f"ce{k}"] = loss_k.detach()
            # KL = soft CE - target entropy: the part of the loss the draft can still remove
            ent = -(p_t * p_t.clamp_min(1e-12).log()).sum(-1).mean()
            stats[f"kl{k}"] = (loss_k - ent).detach()
        hidden = out
    stats["loss"] = total
    return stats


def _ttt_mask(causal: torch.Tensor, diag: torch.Tensor, num_prev: int) -> torch.Tensor:
    """Mask over [step-0 keys | steps 1..num_prev-1 keys | own keys]: causal, then diagonals
    (for step 0 the own keys are the causal block itself)."""
    if num_prev == 0:
        return causal
    return torch.cat([causal] + [diag] * num_prev, dim=1)


def _sample_rows(
    valid: torch.Tensor, per_sample: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    bs, ts = [], []
    for i in range(valid.shape[0]):
        cand = valid[i].nonzero().squeeze(-1)
        pick = cand[torch.randperm(cand.numel(), generator=generator)[:per_sample].to(cand.device)]
        bs.append(torch.full_like(pick, i))
        ts.append(pick)
    return torch.cat(bs), torch.cat(ts)


def load_proposer(target: nn.Module, checkpoint: str | None, num_speculative_tokens: int):  # type: ignore[no-untyped-def]
    """Engine entry point: the EAGLE-3 drafter (shipped default when checkpoint is None)."""
    from drafts.checkpoint import load_draft, shipped_path
    from drafts.proposer import make_proposer

    model = load_draft(checkpoint or shipped_path("eagle3"))
    return make_proposer(model, target, num_speculative_tokens)
