"""What one call of a model drafter costs in the engine: `propose` timed while the engine serves
greedy requests one at a time with fixed verification (the drafter is asked every decode step),
features folded in included. The last line printed is one JSON object.

    python benchmarks/draft_call.py --speculative dspark --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
from speculative import PROMPT_SETS, chat_token_ids  # benchmarks/speculative.py, beside this

from scheduler.build import assemble_engine
from scheduler.config import EngineConfig
from scheduler.loader import load_target
from scheduler.request import Request, SamplingParams


def time_propose(engine: Any) -> list[float]:
    """From now on, the seconds of each `propose` call of the engine's model drafter (the one
    that reads target features; else its first drafter), appended to the list returned."""
    drafters = engine.speculator.drafters
    proposer = next((d for d in drafters if d.proposer.aux_layer_ids), drafters[0]).proposer
    propose, times = proposer.propose, []

    def timed(requests):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        out = propose(requests)
        times.append(time.perf_counter() - t)
        return out

    proposer.propose = timed
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--speculative", default="dspark")
    ap.add_argument("--prompts", default="mt_bench", help=", ".join(sorted(PROMPT_SETS)))
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = EngineConfig(speculative=args.speculative, verify_policy="fixed", max_model_len=2048)
    loaded = load_target(config.model, "cpu", config.dtype, None, config.weights)
    engine = assemble_engine(loaded, config)
    assert engine.speculator is not None, "--speculative names no drafter"
    times = time_propose(engine)
    texts = PROMPT_SETS[args.prompts]()[: args.requests]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    for i, ids in enumerate(chat_token_ids(loaded.tokenizer, texts)):
        engine.add_request(Request(f"draft-{i}", ids, params))
        while engine.has_work:
            engine.step()
    ms = 1e3 * statistics.median(times)
    print(f"{args.speculative}: propose {ms:.2f} ms a call (median of {len(times)})", flush=True)
    print(json.dumps({"speculative": args.speculative, "propose_ms": ms, "calls": len(times)}))


if __name__ == "__main__":
    main()
