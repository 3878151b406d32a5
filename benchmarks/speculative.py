"""Speculative decoding benchmark on the embedded model: configurations side by side.

For every (drafter, verify policy) configuration and every concurrency level, keeps that many
streams busy (closed loop) with greedy requests and reports per-user tokens/s (output tokens
over each request's own latency, averaged), aggregate tokens/s, and the mean accepted length
(tokens per verification round, bonus included). The last line printed is one JSON object.

  # issue 19: none, suffix, dspark and the composite on four prompt sets, three runs a point
  python benchmarks/speculative.py --configs none,suffix:dspark,dspark:dspark,suffix+dspark:dspark \\
      --prompts copy,mt_bench,gsm8k,humaneval --concurrency 1,16 --repeats 3
  # n-gram vs none on prompts that repeat their context
  python benchmarks/speculative.py --configs none,ngram:fixed --prompts repeat --concurrency 1,16
  # issue: none vs fixed k=7 vs dspark scheduling
  python benchmarks/speculative.py --configs none,dspark:fixed,dspark:dspark --concurrency 1,4,16,32
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time
from typing import Any

import torch

from loadtest.prompts import data_dir, load_source
from scheduler.build import assemble_engine
from scheduler.config import EngineConfig
from scheduler.loader import LoadedModel, load_target
from scheduler.request import Request, SamplingParams

DATA = data_dir()  # ../shared/data, or $DSPARK_DATA_DIR


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


def copy_prompts() -> list[str]:
    """Answers that copy their context (the load tests' `copy` source): file order, so the set is
    the same on every run."""
    return [p.chat for p in load_source("copy", DATA)]


def mt_bench_prompts() -> list[str]:
    with open(DATA / "mt_bench" / "question.jsonl") as f:
        return [json.loads(line)["turns"][0] for line in f]


def gsm8k_prompts() -> list[str]:
    with open(DATA / "gsm8k" / "test.jsonl") as f:
        return [json.loads(line)["question"] for line in f][:80]


def humaneval_prompts() -> list[str]:
    with gzip.open(DATA / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
        return [f"Complete this function:\n\n{json.loads(line)['prompt']}" for line in f][:80]


def chat_prompts() -> list[str]:
    return [p for pair in zip(mt_bench_prompts(), gsm8k_prompts()) for p in pair]


def chat_token_ids(tok, texts: list[str]) -> list[list[int]]:
    """Each text as one user turn in the model's chat template, as token ids."""
    return [
        tok.encode(tok.apply_chat_template([{"role": "user", "content": t}],
                                           add_generation_prompt=True, tokenize=False),
                   add_special_tokens=False)
        for t in texts
    ]


PROMPT_SETS = {
    "repeat": repeat_prompts,
    "chat": chat_prompts,  # MT-bench and GSM8K interleaved
    "mt_bench": mt_bench_prompts,
    "gsm8k": gsm8k_prompts,
    "humaneval": humaneval_prompts,
    "copy": copy_prompts,
}


def load_with_dense_prompt_copies(**kwargs: Any) -> LoadedModel:
    """`load_target(**kwargs)` as on a CPU without bfloat16 tiles: the int4 layers keep dense
    bf16 copies, which their prompt chunks then multiply (scheduler/quant.py's
    `_prompt_product`), where this CPU would multiply their blocks in the tiles. The A/B of
    scheduler/kernels/q4_prompt.cpp (`ttft.py --chunks dense`, lockstep.py's `dense`)."""
    from unittest import mock

    with mock.patch("scheduler.kernels.prompt_tiles", return_value=False):
        return load_target(**kwargs)


def engine_labels(configs: list[str]) -> list[str]:
    """One label per engine: a configuration's second and later copies get " #2", " #3"."""
    seen: dict[str, int] = {}
    labels = []
    for config in configs:
        seen[config] = seen.get(config, 0) + 1
        labels.append(config if seen[config] == 1 else f"{config} #{seen[config]}")
    return labels


def config_of(label: str) -> str:
    """The configuration an `engine_labels` label runs."""
    return label.split(" #")[0]


def parse_config(spec: str, k: int) -> tuple[str, str, int]:
    """A configuration `drafter[:policy[@k]]` -> (drafter, verify policy, draft length); the
    policy defaults to fixed, the draft length to `k` (the script's --k)."""
    drafter, _, rest = spec.partition(":")
    policy, _, length = rest.partition("@")
    return drafter, policy or "fixed", int(length or k)


def run(
    engine, prompts: list[list[int]], concurrency: int, num_requests: int, max_tokens: int,
    first: int = 0,
) -> dict:
    """Closed loop over prompts[first:first + num_requests] (wrapping around). Distinct prompts
    per run matter: greedy answers to a repeated prompt repeat exactly, which the suffix
    drafter's global index would copy whole."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    started: dict[str, float] = {}
    tokens: dict[str, int] = {}
    latency: dict[str, float] = {}
    drafts = accepted = 0
    kept: dict[str, int] = {}  # per drafter: request-steps whose kept draft was its
    next_i = 0
    t0 = time.perf_counter()
    while len(latency) < num_requests:
        while next_i < num_requests and len(started) - len(latency) < concurrency:
            req_id = f"b{first + next_i}"
            engine.add_request(Request(req_id, prompts[(first + next_i) % len(prompts)], params))
            started[req_id], tokens[req_id] = time.perf_counter(), 0
            next_i += 1
        stepped = engine.step()
        now = time.perf_counter()
        if not stepped:
            continue
        for d in stepped[1].drafters:
            kept[d.name] = kept.get(d.name, 0) + d.num_drafts
        for out in stepped[0]:
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
        "verified_drafts_by_drafter": kept,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="none,ngram:fixed",
                    help="drafter[:policy[@k]] list (@k: this configuration's draft length "
                         "instead of --k); a composite joins drafters with '+'")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--prompts", default="repeat",
                    help=f"comma-separated prompt sets: {', '.join(sorted(PROMPT_SETS))}")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--requests-per-stream", type=int, default=2)
    ap.add_argument("--min-requests", type=int, default=6, help="at least this many per run")
    ap.add_argument("--k", type=int, default=7)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--weights", default="auto", help="auto | gguf | dense (as the server's flag)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs per point, each on the next prompts, configs in rotated order; "
                         "the summary gives the median and the spread")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_target(device="cpu", dtype=args.dtype, weights=args.weights)
    tok = loaded.tokenizer
    sets = {name: chat_token_ids(tok, PROMPT_SETS[name]()) for name in args.prompts.split(",")}
    levels = [int(c) for c in args.concurrency.split(",")]
    specs = args.configs.split(",")
    engines = {}
    for spec in specs:  # all engines first, then runs interleaved: load drifts hit all alike
        drafter, policy, k = parse_config(spec, args.k)
        config = EngineConfig(
            speculative=drafter, verify_policy=policy, num_speculative_tokens=k,
            max_num_seqs=max(levels), max_model_len=1024,
            max_num_batched_tokens=max(512, max(levels) * (k + 1)), dtype=args.dtype,
            weights=args.weights,
        )
        engines[spec] = assemble_engine(loaded, config)
        run(engines[spec], [[1, 2, 3, 4]], 1, 1, 8)  # warm-up, on a prompt of no set
    results = []
    for set_name, prompts in sets.items():
        first = 0
        for c in levels:
            n = max(args.min_requests, c * args.requests_per_stream)
            for rep in range(args.repeats):
                # Rotated order: a config is not always the one that runs right after another
                # (or first on a cold cache), so drifts of the host fall on all configs alike.
                for spec in specs[rep % len(specs):] + specs[: rep % len(specs)]:
                    r = run(engines[spec], prompts, c, n, args.max_tokens, first)
                    r["config"], r["prompts"], r["repeat"] = spec, set_name, rep
                    results.append(r)
                    print(f"{set_name:>9} {spec:>20} c={c:2d}: per-user "
                          f"{r['per_user_tok_s']:6.1f} tok/s  aggregate {r['aggregate_tok_s']:6.1f} "
                          f"tok/s  tau {r['mean_accepted_length']:.2f}  "
                          f"{r['verified_drafts_by_drafter']}", flush=True)
                first += n  # every repeat on new prompts, the same for every config
    summary = summarise(results)
    print_summary(summary, args.repeats)
    print(json.dumps({"prompts": args.prompts, "max_tokens": args.max_tokens, "k": args.k,
                      "repeats": args.repeats, "weights": loaded.weights, "results": results,
                      "summary": summary}))


def summarise(results: list[dict]) -> list[dict]:
    """Per (prompt set, concurrency, config): medians over repeats, and the speedup over `none`
    as the median of per-repeat ratios (each repeat runs every config on the same prompts, and
    prompts differ far more between repeats than configs do within one)."""
    points: dict[tuple[str, int, str], list[dict]] = {}
    for r in results:
        points.setdefault((r["prompts"], r["concurrency"], r["config"]), []).append(r)
    out = []
    for (set_name, c, spec), runs in points.items():
        base = {r["repeat"]: r for r in points.get((set_name, c, "none"), [])}
        point = {
            "prompts": set_name, "concurrency": c, "config": spec, "runs": len(runs),
            "per_user_tok_s": statistics.median(r["per_user_tok_s"] for r in runs),
            "aggregate_tok_s": statistics.median(r["aggregate_tok_s"] for r in runs),
            "mean_accepted_length": statistics.median(r["mean_accepted_length"] for r in runs),
        }
        for kind in ("per_user", "aggregate"):
            ratios = [r[f"{kind}_tok_s"] / base[r["repeat"]][f"{kind}_tok_s"]
                      for r in runs if r["repeat"] in base]
            if ratios:
                point[f"{kind}_speedup_vs_none"] = statistics.median(ratios)
                point[f"{kind}_speedup_range"] = [min(ratios), max(ratios)]
        out.append(point)
    return out


def print_summary(summary: list[dict], repeats: int) -> None:
    print(f"\nmedian of {repeats} run(s) per point; speedups: median [min-max] of per-run ratios")
    for p in summary:
        vs_none = ""
        if "per_user_speedup_vs_none" in p:
            lo, hi = p["per_user_speedup_range"]
            vs_none = f"  per-user {p['per_user_speedup_vs_none']:.2f}x none [{lo:.2f}-{hi:.2f}]"
            lo, hi = p["aggregate_speedup_range"]
            vs_none += f"  aggregate {p['aggregate_speedup_vs_none']:.2f}x [{lo:.2f}-{hi:.2f}]"
        print(f"{p['prompts']:>9} {p['config']:>20} c={p['concurrency']:2d}: per-user "
              f"{p['per_user_tok_s']:6.1f} aggregate {p['aggregate_tok_s']:6.1f} "
              f"tau {p['mean_accepted_length']:.2f}{vs_none}", flush=True)

if __name__ == "__main__":
    main()
