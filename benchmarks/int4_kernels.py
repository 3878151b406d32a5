"""The compiled step of the embedded model as served, through each Q4 products kernel:
torch's int4 kernel with a dense head (`--int4-kernel aten`) against
scheduler/kernels/q4_linear.cpp (`native`, what `auto` serves on a CPU with VNNI), by rows per
step (one request's decode and verifications, and batches of decodes). On a CPU with the tile
unit (AMX) the native kernel is also timed with its tile path off (`native-vector`): from 16
rows a call takes its integer sums from tile products. The variants alternate round by round,
median of the rounds. The last line printed is one JSON object.

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
# (requests, new tokens): one request's decode and verifications, batches of decodes and of
# verifications under load
SHAPES = [(1, 1), (1, 2), (1, 4), (1, 8), (1, 16), (4, 1), (12, 1), (16, 1), (16, 2), (32, 1), (4, 8)]
NEVER = 1 << 30  # a row count no call reaches: the tile path off


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
    tile_rows = torch.ops.dspark_kernels.amx_min_rows(NEVER)  # -1: no tile path here
    torch.ops.dspark_kernels.amx_min_rows(tile_rows)
    # (name, model, the tile path's threshold while it runs)
    variants = [("aten", models["aten"], tile_rows), ("native", models["native"], tile_rows)]
    if tile_rows > 0:
        variants.append(("native-vector", models["native"], NEVER))
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
            times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
            for _, model, _ in variants:
                model.forward(batch)  # warm
            for _ in range(args.rounds):
                for name, model, threshold in variants:
                    torch.ops.dspark_kernels.amx_min_rows(threshold)
                    t = time.perf_counter()
                    model.forward(batch)
                    times[name].append(time.perf_counter() - t)
            torch.ops.dspark_kernels.amx_min_rows(tile_rows)
            ms = {name: statistics.median(v) * 1e3 for name, v in times.items()}
            rows.append({"requests": requests, "new_tokens": new, **ms})
            line = (
                f"{requests:2d} x {new:2d} rows: aten {ms['aten']:6.2f} ms, native "
                f"{ms['native']:6.2f} ms ({ms['aten'] / ms['native']:.2f}x)"
            )
            if "native-vector" in ms:
                line += (
                    f", native without tiles {ms['native-vector']:6.2f} ms "
                    f"(tiles {ms['native-vector'] / ms['native']:.2f}x)"
                )
            print(line, flush=True)
    print(
        json.dumps(
            {
                "threads": torch.get_num_threads(),
                "context": CONTEXT,
                "tile_rows": tile_rows,
                "products_ms": products,
                "steps": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
