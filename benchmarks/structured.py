"""The cost of constrained decoding: per-user tok/s with and without a json_schema, with and
without speculation, at several concurrency levels (closed loop, embedded model, in process).

For every (drafter, verify policy) configuration, concurrency level and mode (free text, or
output constrained to SCHEMA) it keeps that many streams busy with greedy requests and
reports per-user tok/s (each request's output tokens over its own latency, averaged),
aggregate tok/s, the mean accepted length, and what the grammar masks cost: mask time per
constrained step and its share of all step time. The last line printed is one JSON object.

  python benchmarks/structured.py --configs none,ngram:dspark --concurrency 1,16
  python benchmarks/structured.py --configs none --concurrency 1 --requests-per-stream 1 \\
      --max-tokens 16        # a smoke run
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from scheduler.build import assemble_engine
from scheduler.config import EngineConfig
from scheduler.loader import load_target
from scheduler.request import Request, SamplingParams, StructuredOutput

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "category": {"type": "string", "enum": ["place", "object", "animal", "event", "idea"]},
        "year": {"type": "integer", "minimum": -3000, "maximum": 2100},
        "facts": {"type": "array", "items": {"type": "string", "maxLength": 80}, "maxItems": 3},
    },
    "required": ["name", "category", "year", "facts"],
    "additionalProperties": False,
}
TOPICS = [
    "the Eiffel Tower", "the printing press", "the blue whale", "the first Olympic games",
    "democracy", "the Great Wall of China", "the telescope", "the honeybee", "the Moon landing",
    "the violin", "the Amazon river", "the steam engine", "the Renaissance", "the internet",
    "the tiger", "the pyramids of Giza",
]


def run(engine, prompts, params: SamplingParams, concurrency: int, num_requests: int) -> dict:
    started: dict[str, float] = {}
    tokens: dict[str, int] = {}
    latency: dict[str, float] = {}
    drafts = accepted = 0
    stats = engine.batcher.grammars.stats  # the engine serves structured requests: never None
    masks_before = (stats.mask_time_s, stats.num_steps)
    step_time = 0.0
    next_i = 0
    t0 = time.perf_counter()
    while len(latency) < num_requests:
        while next_i < num_requests and len(started) - len(latency) < concurrency:
            req_id = f"b{next_i}-{time.perf_counter_ns()}"
            engine.add_request(Request(req_id, prompts[next_i % len(prompts)], params))
            started[req_id], tokens[req_id] = time.perf_counter(), 0
            next_i += 1
        t_step = time.perf_counter()
        stepped = engine.step()
        now = time.perf_counter()
        step_time += now - t_step
        for out in stepped[0] if stepped else []:
            tokens[out.req_id] += len(out.new_token_ids)
            if out.finished:
                latency[out.req_id] = now - started[out.req_id]
                if out.spec is not None:
                    drafts += out.spec.num_drafts
                    accepted += out.spec.num_accepted_tokens
    wall = time.perf_counter() - t0
    per_user = [tokens[r] / latency[r] for r in latency]
    mask_time = stats.mask_time_s - masks_before[0]
    mask_steps = stats.num_steps - masks_before[1]
    return {
        "concurrency": concurrency,
        "requests": num_requests,
        "output_tokens": sum(tokens.values()),
        "per_user_tok_s": sum(per_user) / len(per_user),
        "aggregate_tok_s": sum(tokens.values()) / wall,
        "mean_accepted_length": 1 + accepted / drafts if drafts else 1.0,
        "mask_ms_per_constrained_step": 1e3 * mask_time / mask_steps if mask_steps else 0.0,
        "mask_share_of_step_time": mask_time / step_time if step_time else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="none,ngram:dspark", help="drafter[:policy] list")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--requests-per-stream", type=int, default=2)
    ap.add_argument("--k", type=int, default=7)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--weights", default="auto", help="auto | gguf | dense (as the server's flag)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_target(device="cpu", dtype=args.dtype, weights=args.weights)
    tok = loaded.tokenizer
    prompts = [
        tok.encode(tok.apply_chat_template(
            [{"role": "user", "content": f"Describe {t} as JSON: name, category, year, facts."}],
            add_generation_prompt=True, tokenize=False), add_special_tokens=False)
        for t in TOPICS
    ]
    constraint = StructuredOutput("json_schema", json.dumps(SCHEMA))
    modes = {
        "free": SamplingParams(max_tokens=args.max_tokens, temperature=0.0),
        "json_schema": SamplingParams(max_tokens=args.max_tokens, temperature=0.0,
                                      structured=constraint),
    }
    levels = [int(c) for c in args.concurrency.split(",")]
    results = []
    for spec in args.configs.split(","):
        drafter, _, policy = spec.partition(":")
        config = EngineConfig(
            speculative=drafter, verify_policy=policy or "fixed", num_speculative_tokens=args.k,
            max_num_seqs=max(levels), max_model_len=1024,
            max_num_batched_tokens=max(512, max(levels) * (args.k + 1)), dtype=args.dtype,
            weights=args.weights,
        )
        engine = assemble_engine(loaded, config)
        for params in modes.values():  # warm-up; the first constraint also builds the tokenizer
            run(engine, prompts[:1], SamplingParams(max_tokens=8, temperature=0.0,
                                                    structured=params.structured), 1, 1)
        for c in levels:
            for mode, params in modes.items():
                r = run(engine, prompts, params, c, max(2, c * args.requests_per_stream))
                r.update(config=spec, mode=mode)
                results.append(r)
                print(f"{spec:>14} {mode:>11} c={c:2d}: per-user {r['per_user_tok_s']:6.1f} tok/s"
                      f"  aggregate {r['aggregate_tok_s']:6.1f} tok/s"
                      f"  tau {r['mean_accepted_length']:.2f}"
                      f"  mask {r['mask_ms_per_constrained_step']:.3f} ms/step"
                      f" ({100 * r['mask_share_of_step_time']:.1f} %)", flush=True)
    free = {(r["config"], r["concurrency"]): r for r in results if r["mode"] == "free"}
    for r in results:
        base = free.get((r["config"], r["concurrency"]))
        if r["mode"] == "json_schema" and base is not None:
            r["per_user_ratio_vs_free"] = r["per_user_tok_s"] / base["per_user_tok_s"]
    print(json.dumps({"max_tokens": args.max_tokens, "k": args.k, "schema": SCHEMA,
                      "results": results}))


if __name__ == "__main__":
    main()
