"""Where one configuration's time goes, step by step, on one prompt set served one request at a
time: prefill against decode, the tokens each decode step yields, how many steps verify no
draft, and the target's step time by the number of rows it verified. The last line printed is
one JSON object.

    python benchmarks/step_accounting.py --speculative suffix+dspark --prompts copy --threads 2
    python benchmarks/step_accounting.py --speculative none --prompts copy --threads 2
"""

from __future__ import annotations

import argparse
import collections
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
    ap.add_argument("--speculative", default="auto")
    ap.add_argument("--verify-policy", default="dspark")
    ap.add_argument("--prompts", default="copy", help=", ".join(sorted(PROMPT_SETS)))
    ap.add_argument("--first", type=int, default=8, help="first prompt of the set")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = EngineConfig(device="cpu", speculative=args.speculative,
                          verify_policy=args.verify_policy, max_model_len=2048)
    loaded = load_target(config.model, "cpu", config.dtype, None, config.weights)
    engine = assemble_engine(loaded, config)
    texts = PROMPT_SETS[args.prompts]()[args.first : args.first + args.requests]
    prompts = chat_token_ids(loaded.tokenizer, texts)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    steps = tokens = no_draft = 0
    prefill_s = decode_s = draft_s = 0.0
    by_rows: dict[int, list[float]] = collections.defaultdict(list)
    latency, ttft = [], []
    for i, ids in enumerate(prompts):
        engine.add_request(Request(f"acct-{i}", ids, params))
        t0, first = time.perf_counter(), 0.0
        while engine.has_work:
            stepped = engine.step()
            if not stepped:
                continue
            outs, stats = stepped
            if not first and any(o.new_token_ids for o in outs):
                first = time.perf_counter()
            if stats.num_prefill_tokens:
                prefill_s += stats.step_time_s
                continue
            steps += 1
            decode_s += stats.step_time_s
            draft_s += stats.draft_time_s
            tokens += 1 + stats.num_accepted_tokens
            no_draft += stats.num_draft_tokens == 0
            by_rows[1 + stats.num_draft_tokens].append(stats.forward_time_s)
        latency.append(time.perf_counter() - t0)
        ttft.append(first - t0)
    result = {
        "speculative": args.speculative, "prompts": args.prompts, "requests": len(prompts),
        "mean_prompt_tokens": statistics.mean(len(p) for p in prompts),
        "decode_tok_s": tokens / decode_s, "tokens_per_step": tokens / steps,
        "steps_without_draft": no_draft / steps, "draft_ms_per_step": 1e3 * draft_s / steps,
        "prefill_share_of_latency": sum(ttft) / sum(latency),
        "mean_latency_s": statistics.mean(latency), "mean_ttft_s": statistics.mean(ttft),
        "forward_ms_by_rows": {n: {"steps": len(v), "median_ms": 1e3 * statistics.median(v)}
                               for n, v in sorted(by_rows.items())},
    }
    print(f"{args.speculative} on {args.prompts}: decode {result['decode_tok_s']:.1f} tok/s, "
          f"{result['tokens_per_step']:.2f} tokens a step, {100 * result['steps_without_draft']:.0f} % "
          f"of steps without a draft, time to first token {100 * result['prefill_share_of_latency']:.0f} % "
          f"of latency", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
