"""Speculative decoding benchmark on the embedded model: configurations side by side.

For every (drafter, verify policy) configuration and every concurrency level, keeps that many
streams busy (closed loop) with greedy requests and reports per-user tokens/s (output tokens
over each request's own latency, averaged), aggregate tokens/s, and the mean accepted length
(tokens per verification round, bonus included). The last line printed is one JSON object.

  # issue: n-gram vs none on prompts that repeat their context
  python benchmarks/speculative.py --configs none,ngram:fixed --prompts repeat --concurrency 1,16
  # issue: none vs fixed k=7 vs dspark scheduling
  python benchmarks/speculative.py --configs none,dspark:fixed,dspark:dspark --concurrency 1,4,16,32
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time
from pathlib import Path

import torch

from scheduler.build import assemble_engine
from scheduler.config import EngineConfig
from scheduler.loader import load_target
from scheduler.request import Request, SamplingParams

DATA = Path(os.environ.get("DSPARK_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def repeat_prompts() -> list[str]:
    """Prompts whose answers copy their context: code editing and rewriting/summarising."""
    with gzip.open(DATA / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
        code = [json.loads(line)["prompt"] for line in f][:12]
    with open(DATA / "alpaca" / "alpaca_5000.json") as f:
        texts = [r["input"] for r in json.load(f) if len(r.get("input", "")) > 300][:12]
    out = []
    for c, t in zip(code, texts):
        out.append(f"Add type hints to this code and return the whole code:\n\n{c}")
        out.append(f"Repeat the following text, correcting any spelling mistakes:\n\n{t}")
    return out


def chat_prompts() -> list[str]:
    with open(DATA / "mt_bench" / "question.jsonl") as f:
        mt = [json.loads(line)["turns"][0] for line in f]
    with open(DATA / "gsm8k" / "test.jsonl") as f:
        gsm = [json.loads(line)["question"] for line in f][:40]
    return [p for pair in zip(mt, gsm) for p in pair]


def run(engine, prompts: list[list[int]], concurrency: int, num_requests: int, max_tokens: int) -> dict:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    started: dict[str, float] = {}
    tokens: dict[str, int] = {}
    latency: dict[str, float] = {}
    drafts = accepted = 0
    next_i = 0
    t0 = time.perf_counter()
    while len(latency) < num_requests:
        while next_i < num_requests and len(started) - len(latency) < concurrency:
            req_id = f"b{next_i}"
            engine.add_request(Request(req_id, prompts[next_i % len(prompts)], params))
            started[req_id], tokens[req_id] = time.perf_counter(), 0
            next_i += 1
        stepped = engine.step()
        now = time.perf_counter()
        for out in stepped[0] if stepped else []:
            tokens[out.req_id] += len(out.new_token_ids)
            if out.finished:
                latency[out.req_id] = now - started[out.req_id]
                if out.spec is not None:
                    drafts += out.spec.num_drafts
                    accepted += out.spec.num_accepted_tokens
    wall = time.perf_counter() - t0
    per_user = [tokens[r] / latency[r] for r in latency]
    return {
        "concurrency": concurrency,
        "requests": num_requests,
        "output_tokens": sum(tokens.values()),
        "per_user_tok_s": sum(per_user) / len(per_user),
        "aggregate_tok_s": sum(tokens.values()) / wall,
        "mean_accepted_length": 1 + accepted / drafts if drafts else 1.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="none,ngram:fixed", help="drafter[:policy] list")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--prompts", choices=["repeat", "chat"], default="repeat")
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
    texts = repeat_prompts() if args.prompts == "repeat" else chat_prompts()
    prompts = [
        tok.encode(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                           tokenize=False), add_special_tokens=False)
        for t in texts
    ]
    levels = [int(c) for c in args.concurrency.split(",")]
    results = []
    for spec in args.configs.split(","):
        drafter, _, policy = spec.partition(":")
        config = EngineConfig(
            speculative=drafter, verify_policy=policy or "fixed", num_speculative_tokens=args.k,
            max_num_seqs=max(levels), max_model_len=1024, max_num_batched_tokens=max(512, max(levels) * (args.k + 1)),
            dtype=args.dtype, weights=args.weights,
        )
        engine = assemble_engine(loaded, config)
        run(engine, prompts[:1], 1, 1, 8)  # warm-up
        for c in levels:
            r = run(engine, prompts, c, max(2, c * args.requests_per_stream), args.max_tokens)
            r["config"] = spec
            results.append(r)
            print(f"{spec:>16} c={c:2d}: per-user {r['per_user_tok_s']:6.1f} tok/s  aggregate "
                  f"{r['aggregate_tok_s']:6.1f} tok/s  tau {r['mean_accepted_length']:.2f}", flush=True)
    base = {r["concurrency"]: r for r in results if r["config"] == "none"}
    for r in results:
        if r["concurrency"] in base:
            b = base[r["concurrency"]]
            r["per_user_speedup_vs_none"] = r["per_user_tok_s"] / b["per_user_tok_s"]
            r["aggregate_speedup_vs_none"] = r["aggregate_tok_s"] / b["aggregate_tok_s"]
    print(json.dumps({"prompts": args.prompts, "max_tokens": args.max_tokens, "k": args.k,
                      "weights": loaded.weights, "results": results}))


if __name__ == "__main__":
    main()
