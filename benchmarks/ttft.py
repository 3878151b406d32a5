"""Time to the first token by prompt length, the engine alone, one request at a time.

Each prompt is a context-copying prompt of the set, repeated and cut to the length, so the
text is real; the request asks for one token, so the figure is the prompt's prefill plus the
first sample. The last line printed is one JSON object.

    python benchmarks/ttft.py --threads 2 --lengths 32,128,256,1000 --repeats 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from speculative import PROMPT_SETS, chat_token_ids  # benchmarks/speculative.py, beside this

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
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = EngineConfig(speculative="none", max_model_len=2048, weights=args.weights)
    loaded = load_target(config.model, "cpu", config.dtype, None, config.weights)
    engine = assemble_engine(loaded, config)
    texts = chat_token_ids(loaded.tokenizer, PROMPT_SETS["copy"]()[: args.repeats])
    params = SamplingParams(max_tokens=1, temperature=0.0)
    result = {}
    for n in (int(v) for v in args.lengths.split(",")):
        times = []
        for i, ids in enumerate(texts):
            prompt = (ids * (n // len(ids) + 1))[:n]
            engine.add_request(Request(f"ttft-{n}-{i}", prompt, params))
            t = time.perf_counter()
            while engine.has_work:
                engine.step()
            times.append(time.perf_counter() - t)
        result[n] = 1e3 * statistics.median(times)
        print(f"{n:5d} prompt tokens: time to first token {result[n]:7.1f} ms "
              f"(median of {len(times)})", flush=True)
    print(json.dumps({"weights": loaded.weights, "ttft_ms": result}))


if __name__ == "__main__":
    main()
