"""What training means for each trainable drafter: the two functions its spec in
drafts/registry.py names.

    <name>_config(target_config, TrainConfig, mask_token_id) -> DraftConfig   (the draft's shape)
    <name>_loss(model, frozen target parts, TrainBatch, TrainConfig, generator)
        -> {"loss": what the optimiser minimises, plus values the trainer logs}

DFlash and DSpark share the block losses over sampled anchors (dspark.md §1.4); EAGLE-3 trains
with the training-time test.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from drafts.common import DraftConfig, FrozenTargetParts, config_from_target
from drafts.dspark import BlockOutput, DSparkModel
from drafts.eagle3 import Eagle3Model
from drafts.train.trainer import TrainBatch, TrainConfig


def eagle3_config(target_config: Any, tc: TrainConfig, mask_token_id: int) -> DraftConfig:
    return _config(target_config, tc, mask_token_id, "eagle3", tc.eagle3_layers)


def dflash_config(target_config: Any, tc: TrainConfig, mask_token_id: int) -> DraftConfig:
    """DFlash as DeepSpec ships it: DSpark's backbone without the Markov and confidence heads."""
    return _config(target_config, tc, mask_token_id, "dflash", tc.dspark_layers)


def dspark_config(target_config: Any, tc: TrainConfig, mask_token_id: int) -> DraftConfig:
    return _config(
        target_config,
        tc,
        mask_token_id,
        "dspark",
        tc.dspark_layers,
        markov_rank=tc.markov_rank,
        confidence_head=True,
    )


def _config(
    target_config: Any,
    tc: TrainConfig,
    mask_token_id: int,
    method: str,
    num_layers: int,
    **heads: Any,
) -> DraftConfig:
    """The target's shape, the run's block size, and the method's own layers and heads."""
    return config_from_target(
        target_config,
        method,
        num_layers=num_layers,
        block_size=tc.block_size,
        mask_token_id=mask_token_id,
        **heads,
    )


def eagle3_loss(
    model: Eagle3Model,
    parts: FrozenTargetParts,
    batch: TrainBatch,
    tc: TrainConfig,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    return ttt_losses(
        model,
        parts,
        batch.input_ids,
        batch.loss_mask,
        batch.feats,
        batch.target_logits,
        tc.eagle3_rows,
        generator=generator,
        vocab=batch.vocab,
    )


def dflash_loss(
    model: DSparkModel,
    parts: FrozenTargetParts,
    batch: TrainBatch,
    tc: TrainConfig,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """DeepSpec's DFlash recipe: cross-entropy only."""
    return _block_loss(model, parts, batch, tc, generator, alphas=(1.0, 0.0, 0.0))


def dspark_loss(
    model: DSparkModel,
    parts: FrozenTargetParts,
    batch: TrainBatch,
    tc: TrainConfig,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    return _block_loss(model, parts, batch, tc, generator, alphas=dspark_alphas(tc, batch.progress))


def dspark_alphas(tc: TrainConfig, progress: float) -> tuple[float, float, float]:
    """(CE, TV, confidence) weights at this point of the run: the paper's mix, or with
    `ce_start_frac` a cross-entropy start that moves linearly to it. CE pulls toward the right
    token with full force from the first step; the TV pull scales with the draft's own
    probability of it, slow while that is small."""
    if tc.ce_start_frac <= 0:
        return tc.alpha_ce, tc.alpha_tv, tc.alpha_conf
    t = min(1.0, progress / tc.ce_start_frac)
    return (1 - t) + t * tc.alpha_ce, t * tc.alpha_tv, tc.alpha_conf


def _block_loss(
    model: DSparkModel,
    parts: FrozenTargetParts,
    batch: TrainBatch,
    tc: TrainConfig,
    generator: torch.Generator | None,
    alphas: tuple[float, float, float],
) -> dict[str, torch.Tensor]:
    anchors, keep = sample_anchors(batch.loss_mask, batch.lengths, tc.num_anchors, generator)
    out = model.train_forward(parts, batch.input_ids, batch.feats, anchors, keep, batch.vocab)
    alpha_ce, alpha_tv, alpha_conf = alphas
    return block_losses(
        out,
        batch.vocab_index(batch.input_ids),
        batch.loss_mask,
        batch.target_logits,
        anchors,
        keep,
        alpha_ce,
        alpha_tv,
        alpha_conf,
        tc.loss_decay,
    )


def sample_anchors(
    loss_mask: torch.Tensor,
    lengths: torch.Tensor,
    num_anchors: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchors p with loss_mask[p] and loss_mask[p+1] (anchor and first label in the answer):
    `num_anchors` random ones per sequence, or every one when num_anchors is 0."""
    b = loss_mask.shape[0]
    valid = loss_mask.bool() & torch.cat(
        [loss_mask[:, 1:].bool(), torch.zeros_like(loss_mask[:, :1]).bool()], 1
    )
    if num_anchors <= 0:
        num_anchors = max(1, int(valid.sum(1).max()))
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
    """CE + L1 (2 x TV) + confidence BCE, each = sum(w * mask * term) / sum(w * mask) (dspark.md §1.4).

    `input_ids` index the logits' vocabulary (a draft vocabulary's positions, -1 for a token
    outside it: such a label gets no CE, while TV and the confidence still see its position
    through the target's distribution, restricted to the draft vocabulary and renormalised)."""
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
    in_vocab = labels >= 0
    ce = -logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * in_vocab
    result = {"ce": (ce * w).sum() / (w * in_vocab).sum().clamp(min=1.0)}
    if alpha_tv > 0 or out.conf_logits is not None:
        # target distribution of label p+k+1 is the target's logit row at p+k (temperature 1):
        # the softmax once per position, then a row per (anchor, slot); a position is the
        # label of up to g pairs, so softmax-then-gather does 1/g of the exponentials
        p_pos = torch.softmax(target_logits.float(), dim=-1)  # [B, S, V]
        t_idx = (lab_pos - 1).clamp(max=s - 1).view(b, n * g, 1).expand(b, n * g, v)
        p_t = p_pos.gather(1, t_idx).view(b, n, g, v)
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
    result["positions"] = m.sum()
    result["acc1"] = (
        (out.logits[:, :, 0].argmax(-1) == labels[:, :, 0]).float() * m[:, :, 0]
    ).sum() / m[:, :, 0].sum().clamp(min=1.0)
    return result


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
    vocab: torch.Tensor | None = None,
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
    positions = 0
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
        positions += sel_b.numel()
        if sel_b.numel():
            logits = parts.logits(model.norm(out[sel_b, sel_t]), vocab).float()
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
    stats["positions"] = torch.tensor(float(positions))
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
