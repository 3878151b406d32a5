"""Supervised positions per CPU-second of the draft-training recipe's options, on real answers.

    python benchmarks/draft_training.py --answers runs/dspark/data/answers.jsonl --steps 6

Each configuration trains a fresh DSpark draft for a few steps on the same batches and reports
what a step costs: the target's features streamed (a target forward per batch) or read from a
filled disk cache, bf16 autocast on or off, an anchor at every answer position or 64 sampled.
A position is one (anchor, draft slot) pair that gets a loss. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from drafts.registry import get, resolve
from drafts.train import data
from drafts.train.features import TargetFeatures
from drafts.train.trainer import (
    TrainBatch,
    TrainConfig,
    build_drafts,
    collate,
    epoch_batches,
    make_sequences,
)
from drafts.vocab import frequent_tokens


def measure(
    target: Any,
    rows: list[dict[str, Any]],
    tc: TrainConfig,
    features: TargetFeatures,
    vocab: torch.Tensor,
    steps: int,
) -> dict[str, float]:
    from drafts.common import target_parts

    model = build_drafts(target, tc, mask_token_id=16, vocab=vocab)["dspark"]
    loss_fn = resolve(get("dspark").loss)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr)
    parts = target_parts(features.target, act_dtype=torch.float32)
    seqs = make_sequences(rows, tc.max_len)
    plan = epoch_batches(seqs, tc.batch_size, seed=0, epoch=0)[: steps + 1]
    positions, cpu, wall = 0.0, 0.0, 0.0
    for i, idx in enumerate(plan):
        chosen = [seqs[j] for j in idx]
        c0, w0 = time.process_time(), time.perf_counter()
        ids, mask, lengths = collate(chosen, pad_id=2)
        feats, logits = features([k for k, _, _ in chosen], ids, lengths)
        batch = TrainBatch(ids, mask, lengths, feats, logits, vocab, 0.5)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=tc.autocast):
            res = loss_fn(model, parts, batch, tc, torch.Generator().manual_seed(i))
        opt.zero_grad()
        res["loss"].backward()
        opt.step()
        if i == 0:
            continue  # warm-up step
        cpu += time.process_time() - c0
        wall += time.perf_counter() - w0
        positions += float(res["positions"])
    return {
        "positions_per_cpu_s": round(positions / cpu, 1),
        "positions_per_wall_s": round(positions / wall, 1),
        "s_per_step": round(wall / steps, 2),
        "positions_per_step": round(positions / steps),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--answers", type=Path, default=Path("runs/dspark/data/answers.jsonl"))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    from scheduler.loader import DEFAULT_MODEL, load_target

    target = load_target(DEFAULT_MODEL, dtype="bfloat16").hf_model.requires_grad_(False)
    rows = data.read_jsonl(args.answers)[: 64 * args.batch_size]
    vocab = frequent_tokens((r["answer_ids"] for r in rows), 8192)
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "rows": len(rows)}
    with tempfile.TemporaryDirectory() as tmp:
        base = TrainConfig(out_dir=Path(tmp), steps=1, batch_size=args.batch_size)
        base.methods = ("dspark",)
        cached = TargetFeatures(target, _layer_ids(target, base), vocab, Path(tmp) / "cache")
        configs = {
            "stream, all anchors, autocast": (base, None),
            "stream, 64 anchors, autocast": (_with(base, num_anchors=64), None),
            "stream, all anchors, fp32": (_with(base, autocast=False), None),
            "fill cache, all anchors, autocast": (base, cached),
            "read cache, all anchors, autocast": (base, cached),
        }
        for name, (tc, feats) in configs.items():
            feats = feats or TargetFeatures(target, _layer_ids(target, tc), vocab)
            out[name] = measure(target, rows, tc, feats, vocab, args.steps)
            print(name, out[name], flush=True)
        out["cache_bytes_per_token"] = cached.width * 2
    print(json.dumps(out, indent=2))


def _layer_ids(target: Any, tc: TrainConfig) -> list[int]:
    cfg = resolve(get("dspark").draft_config)(target.config, tc, 16)
    return list(cfg.aux_layer_ids)


def _with(tc: TrainConfig, **changes: Any) -> TrainConfig:
    import dataclasses

    return dataclasses.replace(tc, **changes)


if __name__ == "__main__":
    main()
