"""The DSpark draft's weights as served beside the native kernels (Q8_0 through the int8 kernel,
`drafts.proposer.draft_product`) against the same draft in dense bf16: one process, one engine
each, every prompt served on both in turn, one request at a time, greedy. Per prompt set: tau
(1 + accepted / drafting rounds), the per-user speed, the median `propose` call and whether the
outputs are identical (they must be: both are verified by the same target). The last line
printed is one JSON object.

    python benchmarks/draft_weights.py --prompts mt_bench,gsm8k,humaneval --requests 24 --threads 2
    python benchmarks/draft_weights.py --speculative suffix+dspark --policy dspark --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

import torch
from draft_call import time_propose  # the benchmarks beside this
from paired import serve_one
from speculative import PROMPT_SETS, chat_token_ids

import drafts.proposer
from scheduler.build import assemble_engine
from scheduler.config import EngineConfig
from scheduler.linear import FrozenLinear
from scheduler.loader import load_target
from scheduler.request import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", default="mt_bench,gsm8k,humaneval")
    ap.add_argument("--requests", type=int, default=24, help="prompts per set")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--speculative", default="dspark", help="dspark, or a composite (suffix+dspark)")
    ap.add_argument("--policy", default="fixed", help="verify policy (fixed: every draft, gamma 7)")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = EngineConfig(
        speculative=args.speculative, verify_policy=args.policy, max_model_len=2048
    )
    loaded = load_target(config.model, "cpu", config.dtype, None, config.weights)
    served_product = drafts.proposer.draft_product(loaded.hf_model)
    engines, times = {}, {}
    for label, product in (("served", served_product), ("dense", FrozenLinear)):
        drafts.proposer.draft_product = lambda target, product=product: product  # type: ignore[misc]
        engines[label] = assemble_engine(loaded, config)
        times[label] = time_propose(engines[label])
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    report = []
    for name in args.prompts.split(","):
        prompts = chat_token_ids(loaded.tokenizer, PROMPT_SETS[name]()[: args.requests])
        runs: dict[str, list[dict]] = {label: [] for label in engines}
        for label in engines:
            times[label].clear()
        for i, prompt in enumerate(prompts):
            order = list(engines) if i % 2 == 0 else list(reversed(engines))
            for label in order:
                runs[label].append(serve_one(engines[label], f"{name}-{i}", prompt, params))
        point: dict[str, Any] = {"prompts": name, "requests": len(prompts)}
        for label, rs in runs.items():
            point[label] = {
                "tau": 1 + sum(r["accepted"] for r in rs) / max(1, sum(r["rounds"] for r in rs)),
                "per_user_tok_s": statistics.mean(len(r["tokens"]) / r["latency"] for r in rs),
                "propose_ms": 1e3 * statistics.median(times[label]) if times[label] else None,
                "propose_calls": len(times[label]),
            }
        point["identical_outputs"] = sum(
            a["tokens"] == b["tokens"] for a, b in zip(runs["served"], runs["dense"], strict=True)
        )
        report.append(point)
        s, d = point["served"], point["dense"]
        print(
            f"{name}: tau {s['tau']:.3f} served / {d['tau']:.3f} dense; per user "
            f"{s['per_user_tok_s']:.1f} / {d['per_user_tok_s']:.1f} tok/s "
            f"({s['per_user_tok_s'] / d['per_user_tok_s']:.3f}x); propose {s['propose_ms']} / "
            f"{d['propose_ms']} ms over {s['propose_calls']} / {d['propose_calls']} calls; "
            f"identical outputs {point['identical_outputs']} of {len(prompts)}",
            flush=True,
        )
    print(
        json.dumps(
            {
                "speculative": args.speculative,
                "policy": args.policy,
                "served_product": served_product.__name__,
                "results": report,
            }
        )
    )


if __name__ == "__main__":
    main()
