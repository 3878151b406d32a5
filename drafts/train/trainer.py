"""Step 3+4: stream target features and train the trainable drafters (EAGLE-3, DFlash and
DSpark; drafts/registry.py) in lockstep.

One target forward per batch feeds every draft, so they see exactly the same data and the same
number of optimiser steps (equal budget), and nothing is cached on disk: the 5-layer features
and the target logits live only for the step that uses them.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from drafts.checkpoint import build_model, draft_config, save_draft
from drafts.common import target_parts
from drafts.registry import Ref, get, resolve, trainable


@dataclass
class TrainConfig:
    out_dir: Path
    steps: int  # optimiser steps (one batch each), shared by all methods
    batch_size: int = 2
    max_len: int = 384
    lr: float = 8e-4
    warmup_frac: float = 0.04
    time_budget_s: float = 0.0  # >0: the LR schedule and the run also end at this wall time
    num_anchors: int = 48  # DSpark/DFlash blocks per sequence; EAGLE-3 rows per TTT step
    block_size: int = 7
    dspark_layers: int = 2
    eagle3_layers: int = 1
    markov_rank: int = 64
    alpha_ce: float = 0.1
    alpha_tv: float = 0.9
    alpha_conf: float = 1.0
    loss_decay: float = 4.0
    seed: int = 42
    save_every: int = 20
    methods: tuple[str, ...] = field(default_factory=lambda: tuple(trainable()))
    bf16_target: bool = True


@dataclass
class TrainBatch:
    """One batch as every draft's loss sees it (drafts/train/losses.py)."""

    input_ids: torch.Tensor  # [B, S], right-padded
    loss_mask: torch.Tensor  # [B, S], 1 on answer tokens
    lengths: torch.Tensor  # [B]
    feats: torch.Tensor  # [B, S, m*d] the target layers the drafts read
    target_logits: torch.Tensor  # [B, S, V]


def build_drafts(target: Any, tc: TrainConfig, mask_token_id: int) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {}
    for name in tc.methods:
        spec = get(name)
        if not spec.trainable:
            raise ValueError(f"drafter {name!r} is not trainable; these are: {trainable()}")
        cfg = resolve(cast(Ref, spec.draft_config))(target.config, tc, mask_token_id)
        torch.manual_seed(tc.seed)
        out[name] = build_model(cfg)
        # Start from a tenth of the target's final-norm scale: random directions through the frozen
        # LM head at full scale give wildly over-confident logits (CE ~60 nats); at 0.1x the first
        # distributions are near uniform, which a short CPU budget recovers from much faster.
        with torch.no_grad():
            cast(nn.RMSNorm, out[name].norm).weight.copy_(0.1 * target.model.norm.weight)
    return out


def make_sequences(rows: list[dict[str, Any]], max_len: int) -> list[tuple[list[int], int]]:
    """(token ids, answer start) per conversation; the answer tokens carry the loss."""
    seqs = []
    for r in rows:
        ids = (r["prompt_ids"] + r["answer_ids"])[:max_len]
        if len(ids) - len(r["prompt_ids"]) >= 8:
            seqs.append((ids, len(r["prompt_ids"])))
    return seqs


def collate(
    batch: list[tuple[list[int], int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in batch)
    ids_t = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (ids, start) in enumerate(batch):
        ids_t[i, : len(ids)] = torch.tensor(ids)
        mask[i, start : len(ids)] = 1
    return ids_t, mask, torch.tensor([len(ids) for ids, _ in batch])


@torch.no_grad()
def target_features(
    target: nn.Module, ids: torch.Tensor, layer_ids: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs of the chosen decoder layers (HF hidden_states[i+1]) and the target logits.
    Right padding: causal attention keeps padding out of every real position."""
    out = target(input_ids=ids, output_hidden_states=True, use_cache=False)
    feats = torch.cat([out.hidden_states[i + 1] for i in layer_ids], dim=-1)
    return feats.float(), out.logits.float()


def lr_factor(progress: float, warmup: float) -> float:
    if progress < warmup:
        return max(progress / warmup, 0.02)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


def train(
    target: Any,
    rows: list[dict[str, Any]] | Callable[[], list[dict[str, Any]]],
    tc: TrainConfig,
    mask_token_id: int,
    pad_id: int,
    progress: Any = None,
) -> dict[str, Any]:
    """Resumable lockstep training; state in tc.out_dir/state.pt, metrics in metrics.jsonl.

    `rows` may be a callable returning the answers generated so far: training then starts while
    generation is still running and takes in new conversations, in file order, as they appear
    (after the last one it wraps around)."""
    tc.out_dir.mkdir(parents=True, exist_ok=True)
    target.requires_grad_(False)
    # Features, target logits and the frozen LM head run in bf16 (as DeepSpec's bf16 cache);
    # the drafts and their optimiser state stay fp32.
    fast = copy.deepcopy(target).to(torch.bfloat16) if tc.bf16_target else target
    parts = target_parts(fast, act_dtype=torch.float32)
    models = build_drafts(target, tc, mask_token_id)
    losses = {name: resolve(cast(Ref, get(name).loss)) for name in models}
    opts = {
        n: torch.optim.AdamW(
            [p for p in m.parameters() if p.requires_grad],
            lr=tc.lr,
            weight_decay=0.0,
            betas=(0.9, 0.95),
        )
        for n, m in models.items()
    }
    load_rows = rows if callable(rows) else (lambda: rows)
    seqs = make_sequences(load_rows(), tc.max_len)
    state_path = tc.out_dir / "state.pt"
    step, elapsed, cpu, tokens = 0, 0.0, 0.0, 0
    if state_path.exists():
        st = torch.load(state_path, weights_only=False)
        for n in models:
            models[n].load_state_dict(st["models"][n])
            opts[n].load_state_dict(st["opts"][n])
        step, elapsed, cpu, tokens = st["step"], st["elapsed"], st["cpu"], st["tokens"]
    layer_ids = draft_config(next(iter(models.values()))).aux_layer_ids
    gen = torch.Generator().manual_seed(tc.seed + step)
    bar = progress(total=tc.steps, initial=step) if progress else None
    metrics_f = (tc.out_dir / "metrics.jsonl").open("a", encoding="utf-8")
    t_wall, t_cpu = time.time() - elapsed, time.process_time() - cpu
    while step < tc.steps:
        frac = step / tc.steps
        if tc.time_budget_s > 0:
            frac = max(frac, (time.time() - t_wall) / tc.time_budget_s)
            if frac >= 1.0:
                break
        if (step + 1) * tc.batch_size > len(seqs):
            seqs = make_sequences(load_rows(), tc.max_len)
        i0 = (step * tc.batch_size) % len(seqs)
        chosen = [seqs[(i0 + j) % len(seqs)] for j in range(tc.batch_size)]
        ids, mask, lengths = collate(chosen, pad_id)
        feats, logits = target_features(fast, ids, layer_ids)
        batch = TrainBatch(ids, mask, lengths, feats, logits)
        rec: dict[str, Any] = {"step": step, "lr_factor": round(lr_factor(frac, tc.warmup_frac), 4)}
        for name, model in models.items():
            for group in opts[name].param_groups:
                group["lr"] = tc.lr * lr_factor(frac, tc.warmup_frac)
            res = losses[name](model, parts, batch, tc, gen)
            opts[name].zero_grad(set_to_none=True)
            res["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opts[name].step()
            rec[name] = {k: round(float(v.detach()), 4) for k, v in res.items()}
        tokens += int(mask.sum())
        step += 1
        elapsed, cpu = time.time() - t_wall, time.process_time() - t_cpu
        rec.update(tokens=tokens, elapsed_s=round(elapsed, 1), cpu_s=round(cpu, 1))
        metrics_f.write(json.dumps(rec) + "\n")
        metrics_f.flush()
        if bar is not None:
            bar.update(1)
            bar.set_postfix({n: rec[n]["loss"] for n in models})
        if step % tc.save_every == 0 or step == tc.steps:
            _save_state(state_path, models, opts, step, elapsed, cpu, tokens)
    _save_state(state_path, models, opts, step, elapsed, cpu, tokens)
    summary = {
        "steps": step,
        "train_tokens": tokens,
        "wall_s": round(elapsed, 1),
        "cpu_s": round(cpu, 1),
        "sequences": step * tc.batch_size,
    }
    for name, model in models.items():
        save_draft(model, tc.out_dir / name, extra={"training": summary})
    (tc.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _save_state(
    path: Path,
    models: dict[str, nn.Module],
    opts: Mapping[str, torch.optim.Optimizer],
    step: int,
    elapsed: float,
    cpu: float,
    tokens: int,
) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "models": {n: m.state_dict() for n, m in models.items()},
            "opts": {n: o.state_dict() for n, o in opts.items()},
            "step": step,
            "elapsed": elapsed,
            "cpu": cpu,
            "tokens": tokens,
        },
        tmp,
    )
    tmp.replace(path)


def cache_size_report(num_tokens: int, hidden: int, num_layers: int) -> str:
    """What a DeepSpec-style disk cache (bf16 features of m layers + final hidden) would need."""
    per_tok = (num_layers + 1) * hidden * 2
    return (
        f"DeepSpec-style target cache for this run: {num_tokens} tokens x {(num_layers + 1)} x {hidden} x 2 B "
        f"= {num_tokens * per_tok / 2**30:.2f} GiB (streaming instead: 0 B on disk)"
    )
