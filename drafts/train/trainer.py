"""Step 4: train drafts on the target's features, one method per run by default.

`python -m drafts.train --methods dspark` gives DSpark the whole CPU budget. Several methods in
one run still train in lockstep on the same batches (one target pass feeds all), which is how
the equal-budget comparison table is made.

The recipe spends the budget on supervision (issue "DSpark drafts that pay on this CPU"):
batches of 8 sequences grouped by length and shuffled across sources every epoch, an anchor at
every answer position (or `num_anchors` sampled ones), losses over the draft vocabulary with
the target's distribution restricted to it and renormalised, warm-up then cosine decay, gradient
clipping, bf16 autocast for the draft's matmuls, and the target's features cached on disk after
the first epoch (drafts/train/features.py).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from drafts.checkpoint import build_model, draft_config, save_draft, set_draft_vocab
from drafts.common import target_parts
from drafts.registry import Ref, get, resolve, trainable
from drafts.train.features import TargetFeatures


@dataclass
class TrainConfig:
    out_dir: Path
    steps: int  # optimiser steps (one batch each), shared by all methods
    batch_size: int = 8
    max_len: int = 512
    lr: float = 1e-3
    warmup_frac: float = 0.03
    time_budget_s: float = 0.0  # >0: the LR schedule and the run also end at this wall time
    num_anchors: int = 0  # DSpark/DFlash blocks per sequence (0: every answer position)
    eagle3_rows: int = 64  # EAGLE-3 loss rows per sequence and TTT step
    block_size: int = 7
    dspark_layers: int = 2
    eagle3_layers: int = 1
    markov_rank: int = 64
    alpha_ce: float = 0.1
    alpha_tv: float = 0.9
    alpha_conf: float = 1.0
    # >0: start on cross-entropy alone and move linearly to the (alpha_ce, alpha_tv) mix over
    # this fraction of the run (0: the paper's mix from the first step)
    ce_start_frac: float = 0.0
    loss_decay: float = 4.0
    seed: int = 42
    save_every: int = 50
    # every this many CPU-seconds a copy of each draft is kept under snapshots/ (the training
    # curve: held-out tau against CPU-hours); 0: none
    snapshot_every_cpu_s: float = 1800.0
    methods: tuple[str, ...] = field(default_factory=lambda: tuple(trainable()))
    # "random", "target" (draft layers start as the target's last layers) or "checkpoint"
    # (seeded from a trained draft with --init-from, whose weights replace the start)
    init: str = "random"
    autocast: bool = True  # bf16 autocast for the draft's matmuls (fp32 weights and optimiser)
    feature_cache: Path | None = None  # None: stream the target's features every epoch
    device: str = "cpu"  # where the drafts train (the target must already be there)


@dataclass
class TrainBatch:
    """One batch as every draft's loss sees it (drafts/train/losses.py)."""

    input_ids: torch.Tensor  # [B, S], right-padded
    loss_mask: torch.Tensor  # [B, S], 1 on answer tokens
    lengths: torch.Tensor  # [B]
    feats: torch.Tensor  # [B, S, m*d] the target layers the drafts read
    target_logits: torch.Tensor  # [B, S, V] over `vocab` (V = the draft vocabulary's size)
    vocab: torch.Tensor | None = None  # draft vocabulary (sorted target ids); None: all
    progress: float = 0.0  # fraction of the run done (loss schedules)

    def vocab_index(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Target token ids -> positions in the draft vocabulary (-1: not in it)."""
        if self.vocab is None:
            return token_ids
        pos = torch.searchsorted(self.vocab, token_ids).clamp(max=self.vocab.numel() - 1)
        return torch.where(self.vocab[pos] == token_ids, pos, torch.full_like(pos, -1))


def build_drafts(
    target: Any, tc: TrainConfig, mask_token_id: int, vocab: torch.Tensor | None = None
) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {}
    for name in tc.methods:
        spec = get(name)
        if not spec.trainable:
            raise ValueError(f"drafter {name!r} is not trainable; these are: {trainable()}")
        cfg = resolve(cast(Ref, spec.draft_config))(target.config, tc, mask_token_id)
        torch.manual_seed(tc.seed)
        model = build_model(cfg)
        if vocab is not None:
            set_draft_vocab(model, vocab)
        if tc.init == "target":
            init_from_target(model, target)
        else:
            # A tenth of the target's final-norm scale: random directions through the frozen LM
            # head at full scale give wildly over-confident logits (CE ~60 nats); at 0.1x the
            # first distributions are near uniform, which a short CPU budget recovers from faster.
            with torch.no_grad():
                cast(nn.RMSNorm, model.norm).weight.copy_(0.1 * target.model.norm.weight)
        out[name] = model
    return out


@torch.no_grad()
def init_from_target(model: nn.Module, target: Any) -> None:
    """Start the draft's decoder layers as the target's last layers (same shapes), `fc` as a
    pass-through of the last feature layer, and the norms as the target's: the draft's first
    context keys/values are then those the target's next layer reads."""
    layers = list(model.layers)  # type: ignore[arg-type]
    source = list(target.model.layers)[-len(layers) :]
    for mine, theirs in zip(layers, source, strict=True):
        mine_state = mine.state_dict()
        for key, value in theirs.state_dict().items():
            if key in mine_state and mine_state[key].shape == value.shape:
                mine_state[key].copy_(value.float())
    d = int(target.config.hidden_size)
    fc = cast(nn.Linear, model.fc)
    fc.weight.zero_()
    fc.weight[:, -d:] = torch.eye(d)
    cast(nn.RMSNorm, model.hidden_norm).weight.copy_(source[0].input_layernorm.weight.float())
    cast(nn.RMSNorm, model.norm).weight.copy_(target.model.norm.weight.float())


def make_sequences(rows: list[dict[str, Any]], max_len: int) -> list[tuple[int, list[int], int]]:
    """(row index, token ids, answer start) per conversation; the answer tokens carry the loss."""
    seqs = []
    for i, r in enumerate(rows):
        ids = (r["prompt_ids"] + r["answer_ids"])[:max_len]
        if len(ids) - len(r["prompt_ids"]) >= 8:
            seqs.append((int(r.get("index", i)), ids, len(r["prompt_ids"])))
    return seqs


def epoch_batches(
    seqs: list[tuple[int, list[int], int]], batch_size: int, seed: int, epoch: int
) -> list[list[int]]:
    """One epoch's batches (indices into seqs): shuffled across sources, then grouped by length
    inside windows of 16 batches so that little padding is multiplied, then the batches
    shuffled again (HF's length-grouped sampler does the same)."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(seqs)))
    rng.shuffle(order)
    window = 16 * batch_size
    batches: list[list[int]] = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window], key=lambda i: len(seqs[i][1]))
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return [b for b in batches if len(b) == batch_size] or batches


def collate(
    batch: list[tuple[int, list[int], int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(ids) for _, ids, _ in batch)
    ids_t = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (_, ids, start) in enumerate(batch):
        ids_t[i, : len(ids)] = torch.tensor(ids)
        mask[i, start : len(ids)] = 1
    return ids_t, mask, torch.tensor([len(ids) for _, ids, _ in batch])


def lr_factor(progress: float, warmup: float) -> float:
    if progress < warmup:
        return max(progress / warmup, 0.02)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


def _batches_from(
    load_rows: Callable[[], list[dict[str, Any]]], tc: TrainConfig, epoch: int, start: int
) -> Iterator[tuple[int, int, list[tuple[int, list[int], int]]]]:
    """(epoch, index in epoch, batch) from (epoch, start) on; each epoch re-reads the answers,
    so a run that trains while answers are still being generated takes in the new ones."""
    while True:
        seqs = make_sequences(load_rows(), tc.max_len)
        plan = epoch_batches(seqs, tc.batch_size, tc.seed, epoch)
        for i in range(start, len(plan)):
            yield epoch, i, [seqs[j] for j in plan[i]]
        epoch, start = epoch + 1, 0


def train(
    target: Any,
    rows: list[dict[str, Any]] | Callable[[], list[dict[str, Any]]],
    tc: TrainConfig,
    mask_token_id: int,
    pad_id: int,
    vocab: torch.Tensor | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """Resumable training; state in tc.out_dir/state.pt, one JSON line per step in metrics.jsonl.

    `vocab`: the draft vocabulary (sorted target token ids) the drafts propose from and the
    losses are computed over; stored with each draft. `rows` may be a callable returning the
    answers generated so far (read again at every epoch)."""
    tc.out_dir.mkdir(parents=True, exist_ok=True)
    target.requires_grad_(False)
    # The target runs in bf16 (features, frozen embedding and LM head; DeepSpec caches bf16
    # features too); the drafts and their optimiser state stay fp32.
    fast = target if target.dtype == torch.bfloat16 else _bf16_copy(target)
    parts = target_parts(fast, act_dtype=torch.float32)
    dev = torch.device(tc.device)
    models = {n: m.to(dev) for n, m in build_drafts(target, tc, mask_token_id, vocab).items()}
    vocab = None if vocab is None else vocab.to(dev)
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
    state_path = tc.out_dir / "state.pt"
    step, epoch, in_epoch, elapsed, cpu, positions = 0, 0, 0, 0.0, 0.0, 0
    if state_path.exists():
        st = torch.load(state_path, weights_only=False, map_location=dev)
        for n, model in models.items():
            model.load_state_dict(st["models"][n])
            if n in st["opts"]:  # absent when the run was seeded from a checkpoint
                opts[n].load_state_dict(st["opts"][n])
        step, elapsed, cpu = st["step"], st["elapsed"], st["cpu"]
        epoch, in_epoch = st.get("epoch", 0), st.get("in_epoch", 0)
        positions = st.get("positions", st.get("tokens", 0))
    layer_ids = draft_config(next(iter(models.values()))).aux_layer_ids
    features = TargetFeatures(fast, layer_ids, vocab, tc.feature_cache)
    gen = torch.Generator().manual_seed(tc.seed + step)
    bar = progress(total=tc.steps, initial=step) if progress else None
    metrics_f = (tc.out_dir / "metrics.jsonl").open("a", encoding="utf-8")
    t_wall, t_cpu = time.time() - elapsed, time.process_time() - cpu
    load_rows = rows if callable(rows) else (lambda: rows)
    batches = _batches_from(load_rows, tc, epoch, in_epoch)
    while step < tc.steps:
        frac = step / tc.steps
        if tc.time_budget_s > 0:
            frac = max(frac, (time.time() - t_wall) / tc.time_budget_s)
            if frac >= 1.0:
                break
        epoch, i_batch, chosen = next(batches)
        ids, mask, lengths = (t.to(dev) for t in collate(chosen, pad_id))
        feats, logits = features([k for k, _, _ in chosen], ids, lengths)
        batch = TrainBatch(ids, mask, lengths, feats, logits, vocab, frac)
        lr = tc.lr * lr_factor(frac, tc.warmup_frac)
        rec: dict[str, Any] = {"step": step, "epoch": epoch, "lr": round(lr, 7)}
        for name, model in models.items():
            for group in opts[name].param_groups:
                group["lr"] = lr
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=tc.autocast):
                res = losses[name](model, parts, batch, tc, gen)
            opts[name].zero_grad(set_to_none=True)
            res["loss"].backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opts[name].step()
            rec[name] = {k: round(float(v.detach()), 4) for k, v in res.items()}
            rec[name]["grad_norm"] = round(float(grad_norm), 3)
        positions += int(max(float(r.get("positions", 0)) for r in _records(rec, models)))
        step, in_epoch = step + 1, i_batch + 1
        elapsed, cpu = time.time() - t_wall, time.process_time() - t_cpu
        rec.update(positions=positions, elapsed_s=round(elapsed, 1), cpu_s=round(cpu, 1))
        if dev.type == "cuda":
            rec["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
        metrics_f.write(json.dumps(rec) + "\n")
        metrics_f.flush()
        if bar is not None:
            bar.update(1)
            bar.set_postfix({n: rec[n]["loss"] for n in models})
        if step % tc.save_every == 0 or step == tc.steps:
            _save_state(state_path, models, opts, step, epoch, in_epoch, elapsed, cpu, positions)
            for name, model in models.items():
                save_draft(model, tc.out_dir / name)
        if tc.snapshot_every_cpu_s > 0 and cpu >= tc.snapshot_every_cpu_s * (
            1 + len(_snapshots(tc.out_dir))
        ):
            folder = tc.out_dir / "snapshots" / f"{cpu / 3600:05.2f}h"
            for name, model in models.items():
                save_draft(model, folder / name)
            info = {"step": step, "cpu_s": round(cpu, 1), "positions": positions, "epoch": epoch}
            (folder / "snapshot.json").write_text(json.dumps(info) + "\n")
    _save_state(state_path, models, opts, step, epoch, in_epoch, elapsed, cpu, positions)
    summary = {
        "steps": step,
        "epochs": round(epoch + in_epoch / max(1, _epoch_len(load_rows, tc)), 3),
        "supervised_positions": positions,
        "wall_s": round(elapsed, 1),
        "cpu_s": round(cpu, 1),
        "sequences": step * tc.batch_size,
        "features": features.size_report(),
        "recipe": _recipe(tc),
    }
    for name, model in models.items():
        save_draft(model, tc.out_dir / name, extra={"training": summary})
    (tc.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _snapshots(out_dir: Path) -> list[Path]:
    """Snapshot folders, named by the CPU-hours of training they hold ("0.50h")."""
    root = out_dir / "snapshots"
    return sorted(root.iterdir()) if root.exists() else []


def _records(rec: dict[str, Any], models: Mapping[str, nn.Module]) -> list[dict[str, Any]]:
    return [rec[n] for n in models]


def _epoch_len(load_rows: Callable[[], list[dict[str, Any]]], tc: TrainConfig) -> int:
    return len(make_sequences(load_rows(), tc.max_len)) // tc.batch_size


def _recipe(tc: TrainConfig) -> dict[str, Any]:
    keep = (
        "batch_size", "max_len", "lr", "warmup_frac", "num_anchors", "eagle3_rows", "block_size",
        "dspark_layers", "markov_rank", "alpha_ce", "alpha_tv", "alpha_conf", "ce_start_frac",
        "init", "autocast", "device",
    )  # fmt: skip
    return {k: getattr(tc, k) for k in keep}


def _bf16_copy(target: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(target).to(torch.bfloat16)


def _save_state(
    path: Path,
    models: dict[str, nn.Module],
    opts: Mapping[str, torch.optim.Optimizer],
    step: int,
    epoch: int,
    in_epoch: int,
    elapsed: float,
    cpu: float,
    positions: int,
) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "models": {n: m.state_dict() for n, m in models.items()},
            "opts": {n: o.state_dict() for n, o in opts.items()},
            "step": step,
            "epoch": epoch,
            "in_epoch": in_epoch,
            "elapsed": elapsed,
            "cpu": cpu,
            "positions": positions,
        },
        tmp,
    )
    tmp.replace(path)
