"""A/B of the short-query attention paths on the embedded model, in one process.

For each step shape (slots x query tokens, mixes of verify lengths) it times whole target
forwards three ways, interleaved and best of several rounds: SDPA over one padded group (the
old path), grouped matmuls over one padded group, and the engine as it is (grouped matmuls,
groups of similar query length). The last line printed is one JSON object.

    python benchmarks/attention.py --threads 2
"""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
from typing import Any

import torch
from engine import median_time  # benchmarks/engine.py, beside this script

import scheduler.model as model_module
from scheduler.loader import load_target
from scheduler.model import TargetModel, build_packed_batch

# (name, query tokens per slot, context)
SHAPES: list[tuple[str, list[int], int]] = [
    ("1 x 8", [8], 256),
    ("4 x 2", [2] * 4, 256),
    ("16 x 2", [2] * 16, 256),
    ("32 x 2", [2] * 32, 256),
    ("16 x 8", [8] * 16, 128),
    ("32 x 8", [8] * 32, 128),
    ("15 x 1 + 1 x 8", [1] * 15 + [8], 256),
    ("12 x 1 + 4 x 3", [1] * 12 + [3] * 4, 256),
    ("24 x 1 + 8 x 5", [1] * 24 + [5] * 8, 256),
]


@contextmanager
def variant(name: str) -> Any:
    """Patch the module-level switches for one variant, restoring them afterwards."""
    saved = model_module.MATMUL_ATTENTION_MIN_ROWS, model_module._group_by_query_length
    if name in ("sdpa, one group", "matmul, one group"):
        model_module._group_by_query_length = lambda spans: [spans]
    if name == "sdpa, one group":
        model_module.MATMUL_ATTENTION_MIN_ROWS = 10**9
    try:
        yield
    finally:
        model_module.MATMUL_ATTENTION_MIN_ROWS, model_module._group_by_query_length = saved


VARIANTS = ("sdpa, one group", "matmul, one group", "engine")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best is kept")
    ap.add_argument("--repeats", type=int, default=7, help="forwards per timing (median)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    target = load_target(device="cpu", dtype="auto")
    model = TargetModel(target.hf_model, num_slots=32, max_model_len=1024)
    results = []
    with torch.inference_mode():
        for name, lengths, context in SHAPES:
            queries = [(slot, context, [11] * n) for slot, n in enumerate(lengths)]
            rows = list(range(sum(lengths)))
            best = {v: float("inf") for v in VARIANTS}
            for _ in range(args.rounds):
                for v in VARIANTS:
                    with variant(v):
                        batch = build_packed_batch(queries, rows, model.device)
                        t = median_time(lambda b=batch: model.forward(b), args.repeats)
                    best[v] = min(best[v], t)
            ms = {v: 1e3 * t for v, t in best.items()}
            results.append({"shape": name, "context": context, **ms})
            print(
                f"{name:>16} (context {context}): "
                + "   ".join(f"{v} {t:.1f} ms" for v, t in ms.items())
                + f"   ({ms['sdpa, one group'] / ms['engine']:.2f}x)",
                flush=True,
            )
    print(json.dumps({"dtype": str(model.dtype), "threads": args.threads, "results": results}))


if __name__ == "__main__":
    main()
