"""The compiled step's two attention paths on the embedded model as served: the C++ kernel
(scheduler/kernels/row_attention.cpp) against inductor's loops, batch 1, by context and new
tokens per step (a decode, a verification); for each shape both paths in turn, median of
several repeats. The last line printed is one JSON object.

    python benchmarks/compiled_attention.py --threads 2
"""

from __future__ import annotations

import argparse
import json

import torch
from engine import median_time  # benchmarks/engine.py, beside this script

from scheduler import kernels
from scheduler.build import step_options
from scheduler.config import EngineConfig
from scheduler.loader import load_target
from scheduler.model import StepOptions, TargetModel, build_packed_batch

CONTEXTS = [128, 512, 1024, 2000]
NEW_TOKENS = [1, 4, 8]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=21)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = EngineConfig(device="cpu")
    loaded = load_target(config.model, "cpu", config.dtype, None, config.weights)
    served = step_options(config, loaded.hf_model)  # what the server would run
    if not served.compile or not served.native_attention:
        raise SystemExit(
            f"the served step is not compiled with native attention here "
            f"({kernels.build_error() or served})"
        )
    max_len = max(CONTEXTS) + max(NEW_TOKENS)
    looped = StepOptions(compile=True, kv_dtype=served.kv_dtype)
    models = {
        "native": TargetModel(loaded.hf_model, 1, max_len, served),
        "inductor": TargetModel(loaded.hf_model, 1, max_len, looped),
    }
    rows = []
    with torch.inference_mode():
        for ctx in CONTEXTS:
            for q in NEW_TOKENS:
                batch = build_packed_batch(
                    [(0, ctx, [11] * q)], list(range(q)), torch.device("cpu")
                )
                ms = {
                    name: median_time(lambda m=m, b=batch: m.forward(b), args.repeats) * 1e3
                    for name, m in models.items()
                }
                rows.append({"context": ctx, "new_tokens": q, **ms})
                print(
                    f"context {ctx:5d}, {q} new tokens: native {ms['native']:6.2f} ms, "
                    f"inductor {ms['inductor']:6.2f} ms ({ms['inductor'] / ms['native']:.2f}x)",
                    flush=True,
                )
    print(json.dumps({"threads": torch.get_num_threads(), "steps": rows}))


if __name__ == "__main__":
    main()
