"""The compiled step of the embedded model as served, through each Q4 products kernel:
torch's int4 kernel with a dense head (`--int4-kernel aten`) against
scheduler/kernels/q4_linear.cpp (`native`, what `auto` serves on a CPU with VNNI), by rows per step (one request's decode and verifications, and batches of decodes);
the two alternate round by round, median of the rounds. The last line printed is one JSON
object.

    python benchmarks/int4_kernels.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from engine import products_time  # benchmarks/engine.py, beside this script

from scheduler.build import step_options
from scheduler.config import EngineConfig
from scheduler.loader import load_target
from scheduler.model import TargetModel, build_packed_batch

CONTEXT = 128
# (requests, new tokens): one request's decode and verifications, batches of decodes
SHAPES = [(1, 1), (1, 2), (1, 4), (1, 8), (1, 16), (4, 1), (16, 1), (4, 8)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=21)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {}
    slots = max(requests for requests, _ in SHAPES)
    for kernel in ("aten", "native"):
        config = EngineConfig(device="cpu", weights="gguf", int4_kernel=kernel)
        loaded = load_target(config.model, "cpu", config.dtype, None, "gguf", kernel)
        models[kernel] = TargetModel(
            loaded.hf_model, slots, 512, step_options(config, loaded.hf_model)
        )
    rows = []
    with torch.inference_mode():
        products = {k: products_time(m, args.rounds) * 1e3 for k, m in models.items()}
        print(
            f"weight products alone, one row: aten {products['aten']:.2f} ms, "
            f"native {products['native']:.2f} ms",
            flush=True,
        )
        for requests, new in SHAPES:
            queries = [(slot, CONTEXT, [11] * new) for slot in range(requests)]
            batch = build_packed_batch(queries, list(range(requests * new)), torch.device("cpu"))
            times: dict[str, list[float]] = {k: [] for k in models}
            for m in models.values():
                m.forward(batch)  # warm
            for _ in range(args.rounds):
                for k, m in models.items():
                    t = time.perf_counter()
                    m.forward(batch)
                    times[k].append(time.perf_counter() - t)
            ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            rows.append({"requests": requests, "new_tokens": new, **ms})
            print(
                f"{requests:2d} x {new:2d} rows: aten {ms['aten']:6.2f} ms, native "
                f"{ms['native']:6.2f} ms ({ms['aten'] / ms['native']:.2f}x)",
                flush=True,
            )
    print(
        json.dumps(
            {
                "threads": torch.get_num_threads(),
                "context": CONTEXT,
                "products_ms": products,
                "steps": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
