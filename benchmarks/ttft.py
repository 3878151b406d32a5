"""Time to the first token by prompt length, the engine alone, one request at a time.

Each prompt is a context-copying prompt of the set, repeated and cut to the length, so the
text is real; the request asks for one token, so the figure is the prompt's prefill plus the
first sample. The prefix cache is off: the prompts of one length share their starts with the
others. `--chunks graph,eager` runs prompt chunks through the compiled prompt graph and through
the eager path (as before that graph) in two engines of one process, alternated request by
request; `dense` is the prompt graph on a second copy of the model whose int4 layers multiply
prompt chunks through dense bf16 copies, as they do on a CPU without bfloat16 tiles (where
they have them, `graph` multiplies the int4 blocks in the tiles, scheduler/kernels/q4_prompt.cpp).
The last line printed is one JSON object.

    python benchmarks/ttft.py --threads 2 --lengths 32,128,256,1000 --repeats 7
    python benchmarks/ttft.py --threads 2 --chunks graph,eager --repeats 15
    python benchmarks/ttft.py --threads 2 --chunks graph,dense --repeats 15
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from speculative import (  # benchmarks/speculative.py, beside this
    PROMPT_SETS,
    chat_token_ids,
    load_with_dense_prompt_copies,
)

from scheduler.build import assemble_engine
from scheduler.config import EngineConfig
from scheduler.loader import load_target
from scheduler.request import Request, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="32,128,256,1000", help="prompt tokens, comma-separated")
    ap.add_argument("--repeats", type=int, default=7, help="requests per length (median)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--weights", default="auto")
    ap.add_argument(
        "--chunks",
        default="graph",
        help="graph, eager, dense, or several comma-separated: how prompt chunks run",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = EngineConfig(
        speculative="none", max_model_len=2048, weights=args.weights, prefix_cache_tokens=0
    )
    loaded = load_target(config.model, "cpu", config.dtype, None, config.weights)
    engines = {}
    for kind in args.chunks.split(","):
        if kind == "dense":  # a second model, loaded as if the CPU had no bf16 tiles
            dense = load_with_dense_prompt_copies(
                model=config.model, device="cpu", dtype=config.dtype, weights=config.weights
            )
            engines[kind] = assemble_engine(dense, config)
            continue
        engine = engines[kind] = assemble_engine(loaded, config)
        compiled = engine.runner.model.compiled
        if kind == "eager" and compiled is not None:
            compiled.prompt_graph = None
        elif kind == "graph" and (compiled is None or compiled.prompt_graph is None):
            raise SystemExit("no prompt graph here: it needs the compiled step and C++ attention")
    texts = chat_token_ids(loaded.tokenizer, PROMPT_SETS["copy"]()[: args.repeats])
    params = SamplingParams(max_tokens=1, temperature=0.0)
    result: dict[str, dict[int, float]] = {kind: {} for kind in engines}
    for n in (int(v) for v in args.lengths.split(",")):
        times: dict[str, list[float]] = {kind: [] for kind in engines}
        for i, ids in enumerate(texts):
            prompt = (ids * (n // len(ids) + 1))[:n]
            kinds = list(engines) if i % 2 == 0 else list(engines)[::-1]
            for kind in kinds:
                engine = engines[kind]
                engine.add_request(Request(f"ttft-{kind}-{n}-{i}", prompt, params))
                t = time.perf_counter()
                while engine.has_work:
                    engine.step()
                times[kind].append(time.perf_counter() - t)
        line = []
        for kind, values in times.items():
            result[kind][n] = 1e3 * statistics.median(values)
            line.append(f"{kind} {result[kind][n]:7.1f} ms")
        print(
            f"{n:5d} prompt tokens: time to first token {', '.join(line)} "
            f"(median of {args.repeats})",
            flush=True,
        )
    print(json.dumps({"weights": loaded.weights, "ttft_ms": result}))


if __name__ == "__main__":
    main()
