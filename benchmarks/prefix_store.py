"""The prefix store's copies on the embedded model's shapes: saving a request's blocks from its KV
slot (and, where a drafter reads them, its target features) and loading them into another slot,
by blocks per call, median of the rounds. At 16 streams about one request in five finishes in
a step and stores its blocks (docs/benchmarks.md, "At 16 streams: what the gates' probes cost,
and the prefix store's copies"). To compare with another version of scheduler/prefix_store.py,
run this script on each. The last line printed is one JSON object.

    python benchmarks/prefix_store.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from scheduler.build import step_options
from scheduler.config import EngineConfig
from scheduler.loader import load_target
from scheduler.model import TargetModel
from scheduler.prefix_cache import PREFIX_BLOCK_SIZE
from scheduler.prefix_store import PrefixStore

DSPARK_FEATURES = 5  # the shipped DSpark draft reads five layers' hidden states


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--blocks", default="4,14,40", help="blocks per call")
    ap.add_argument("--rounds", type=int, default=31)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = EngineConfig(device="cpu", weights="gguf")
    loaded = load_target(config.model, "cpu", config.dtype, None, "gguf", config.int4_kernel)
    model = TargetModel(loaded.hf_model, 16, 2048, step_options(config, loaded.hf_model))
    model.k_cache.normal_()
    model.v_cache.normal_()
    rng = random.Random(0)
    rows = []
    with torch.inference_mode():
        for features in (0, DSPARK_FEATURES * model.hidden_size):
            store = PrefixStore(model, 512, PREFIX_BLOCK_SIZE, features)
            for t in [store.k, store.v] + (
                [store.features.blocks, store.features.slots] if store.features else []
            ):
                t.zero_()  # touch every page first: the copies, not first-touch faults
            for n in (int(b) for b in args.blocks.split(",")):
                save, load = [], []
                for _ in range(args.rounds):
                    ids = rng.sample(range(512), n)
                    t0 = time.perf_counter()
                    store.save(3, [(i, PREFIX_BLOCK_SIZE * j) for j, i in enumerate(ids)])
                    t1 = time.perf_counter()
                    store.load(5, ids)
                    save.append(t1 - t0)
                    load.append(time.perf_counter() - t1)
                row = {
                    "features": features, "blocks": n,
                    "save_ms": 1e3 * statistics.median(save),
                    "load_ms": 1e3 * statistics.median(load),
                }
                rows.append(row)
                print(
                    f"features {features:5d}, {n:3d} blocks: save {row['save_ms']:.2f} ms, "
                    f"load {row['load_ms']:.2f} ms",
                    flush=True,
                )
    print(json.dumps({"threads": torch.get_num_threads(), "block_size": PREFIX_BLOCK_SIZE,
                      "results": rows}))


if __name__ == "__main__":
    main()
