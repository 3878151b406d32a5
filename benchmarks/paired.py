"""Configurations compared request by request: one process, one engine per configuration, the
prompts served one at a time, each prompt on every configuration in rotated order.

`speculative.py` runs each configuration on 8 prompts a repeat; at one stream the prompts then
differ between repeats far more than the configurations do (one run's per-user speedups on the
copy set ranged 1.15-1.77x). Here every configuration serves the same prompts back to back, so
drift of the host and the choice of prompts fall on all of them alike. Reported against the
first configuration: the per-user speedup (mean over requests of output tokens / latency, as
`speculative.py` reports it), the same per block of 8 prompts (the spread a run of 8 shows), the
end-to-end speedup (total latency), the decode speedup (steps after the first token), and
whether the outputs equal the first configuration's (greedy: they must). The last line printed
is one JSON object.

A configuration listed twice runs as two engines ("suffix:dspark #2"): the spread between them is
the noise a gap between configurations must clear. Two engines of one configuration served 1.255x
and 1.188x on GSM8K in one process: each learns its own throughput profile, and the profiles can
settle on different verify lengths for the whole run (docs/benchmarks.md).

    python benchmarks/paired.py --configs none,suffix+dspark:dspark,suffix:dspark,suffix:fixed \\
        --prompts copy --requests 48 --threads 2
    python benchmarks/paired.py --configs none,suffix:dspark,suffix:dspark@15 --prompts copy
    python benchmarks/paired.py --configs none,suffix+dspark:dspark,suffix:dspark,suffix:dspark \\
        --prompts gsm8k --requests 32
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
    config_of,
    engine_labels,
    parse_config,
)

from scheduler.build import assemble_engine
from scheduler.config import EngineConfig
from scheduler.loader import load_target
from scheduler.request import Request, SamplingParams


def serve_one(engine, req_id: str, prompt: list[int], params: SamplingParams) -> dict:
    engine.add_request(Request(req_id, prompt, params))
    t0 = time.perf_counter()
    tokens: list[int] = []
    first = decode = 0.0
    accepted = rounds = 0
    while engine.has_work:
        stepped = engine.step()
        if not stepped:
            continue
        outputs, stats = stepped
        accepted += stats.num_accepted_tokens
        rounds += stats.num_drafts
        for out in outputs:
            tokens += out.new_token_ids
        if tokens and not first:
            first = time.perf_counter() - t0
        if not stats.num_prefill_tokens:
            decode += stats.step_time_s
    return {
        "tokens": tokens,
        "latency": time.perf_counter() - t0,
        "ttft": first,
        "decode": decode,
        "accepted": accepted,  # drafts accepted, over
        "rounds": rounds,  # the drafting rounds verified
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="none,suffix+dspark:dspark",
                    help="drafter[:policy[@k]] list, as speculative.py's; the first is the "
                         "baseline")
    ap.add_argument("--prompts", default="copy", help=", ".join(sorted(PROMPT_SETS)))
    ap.add_argument("--first", type=int, default=0, help="first prompt of the set")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--k", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--weights", default="auto", help="auto | gguf | dense (EngineConfig.weights)")
    ap.add_argument("--prefix-cache-tokens", type=int, default=EngineConfig.prefix_cache_tokens,
                    help="every configuration's prefix cache (0: off)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_target(device="cpu", dtype="auto", weights=args.weights)
    print(f"target weights: {loaded.weights}", flush=True)
    specs = engine_labels(args.configs.split(","))
    engines = {}
    for spec in specs:  # speculative.py's engine settings, so the two agree
        drafter, policy, k = parse_config(config_of(spec), args.k)
        config = EngineConfig(speculative=drafter, verify_policy=policy, num_speculative_tokens=k,
                              max_num_seqs=16, max_model_len=1024, max_num_batched_tokens=512,
                              dtype="auto", weights=args.weights,
                              prefix_cache_tokens=args.prefix_cache_tokens)
        engines[spec] = assemble_engine(loaded, config)
        serve_one(engines[spec], "warm-up", [1, 2, 3, 4], SamplingParams(max_tokens=8))
    texts = PROMPT_SETS[args.prompts]()[args.first : args.first + args.requests]
    prompts = chat_token_ids(loaded.tokenizer, texts)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    runs: dict[str, list[dict]] = {spec: [] for spec in specs}
    for i, prompt in enumerate(prompts):
        shift = i % len(specs)
        for spec in specs[shift:] + specs[:shift]:
            runs[spec].append(serve_one(engines[spec], f"{spec}-{i}", prompt, params))

    def per_user(rs: list[dict]) -> float:
        return statistics.mean(len(r["tokens"]) / r["latency"] for r in rs)

    base = runs[specs[0]]
    report = []
    for spec in specs:
        rs = runs[spec]
        blocks = [per_user(rs[i : i + 8]) / per_user(base[i : i + 8])
                  for i in range(0, len(rs), 8)]
        point = {
            "config": spec,
            "per_user_speedup": per_user(rs) / per_user(base),
            "per_user_speedup_by_8": blocks,
            "e2e_speedup": sum(r["latency"] for r in base) / sum(r["latency"] for r in rs),
            "decode_speedup": sum(r["decode"] for r in base) / sum(r["decode"] for r in rs),
            "ttft_share": sum(r["ttft"] for r in rs) / sum(r["latency"] for r in rs),
            "same_outputs": sum(r["tokens"] == b["tokens"] for r, b in zip(rs, base)),
        }
        report.append(point)
        print(f"{spec:>24}: per-user {point['per_user_speedup']:.3f}x (by 8: "
              f"{' '.join(f'{b:.2f}' for b in blocks)}), end to end {point['e2e_speedup']:.3f}x, "
              f"decode {point['decode_speedup']:.3f}x, first token {100 * point['ttft_share']:.0f} % "
              f"of latency, same outputs {point['same_outputs']}/{len(rs)}", flush=True)
    print(json.dumps({"prompts": args.prompts, "first": args.first, "requests": len(prompts),
                      "weights": loaded.weights, "prefix_cache_tokens": args.prefix_cache_tokens,
                      "max_tokens": args.max_tokens, "results": report}))


if __name__ == "__main__":
    main()
