"""The prefix cache against none, engines with and without it alternated per prompt in one process
(so the host's drift falls on both): the first token on single-turn sets, the per-user speed of
`none` and a drafter on one set, and the first token of a conversation's second turn (MT-bench's
second questions after the model's own answers to the first). The last line printed is one
JSON object.

    python benchmarks/prefix_cache.py --threads 2
    python benchmarks/prefix_cache.py --first-token mt_bench,copy --ratio copy --drafter suffix:dspark
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from paired import serve_one  # benchmarks/paired.py, beside this
from speculative import PROMPT_SETS, chat_token_ids, parse_config

from loadtest.prompts import data_dir
from scheduler.build import assemble_engine
from scheduler.config import EngineConfig
from scheduler.loader import load_target
from scheduler.request import SamplingParams

CACHE = (0, EngineConfig.prefix_cache_tokens)  # off, the default


def mean_ms(values: list[float]) -> float:
    return 1000 * statistics.mean(values)


def per_user(runs: list[dict]) -> float:
    return statistics.mean(len(r["tokens"]) / r["latency"] for r in runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--first-token", default="mt_bench,copy", help="sets for the first token")
    ap.add_argument("--ratio", default="copy", help="the set for per-user speed against none")
    ap.add_argument("--drafter", default="suffix:dspark", help="drafter[:policy[@k]]")
    ap.add_argument("--requests", type=int, default=32, help="prompts per single-turn set")
    ap.add_argument("--ratio-requests", type=int, default=48)
    ap.add_argument("--conversations", type=int, default=24, help="MT-bench questions, 2 turns")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_target(device="cpu", dtype="auto", weights="auto")
    tok = loaded.tokenizer
    drafter, policy, k = parse_config(args.drafter, 7)

    def fresh(specs: tuple[str, ...]) -> dict[tuple[str, int], object]:
        """Engines with empty caches, one per (drafter, cache size): each part of the run
        starts cold, so no part reads what an earlier one stored."""
        engines = {}
        for spec in specs:
            for tokens in CACHE:
                config = EngineConfig(speculative=spec, verify_policy=policy,
                                      num_speculative_tokens=k, max_model_len=1024,
                                      prefix_cache_tokens=tokens)
                engines[spec, tokens] = assemble_engine(loaded, config)
                serve_one(engines[spec, tokens], "warm-up", [1, 2, 3, 4], SamplingParams(max_tokens=8))
        return engines

    report: dict = {"weights": loaded.weights, "drafter": args.drafter}
    engines = fresh(("none",))

    one_token = SamplingParams(max_tokens=1, temperature=0.0)
    for name in filter(None, args.first_token.split(",")):
        prompts = chat_token_ids(tok, PROMPT_SETS[name]()[: args.requests])
        ttft: dict[int, list[float]] = {t: [] for t in CACHE}
        for i, p in enumerate(prompts):
            for t in CACHE if i % 2 else CACHE[::-1]:
                ttft[t].append(serve_one(engines["none", t], f"ft-{name}-{t}-{i}", p, one_token)["ttft"])
        report[f"first_token_ms_{name}"] = {t: mean_ms(v) for t, v in ttft.items()}
        print(f"{name}: first token {mean_ms(ttft[0]):.1f} ms without the cache, "
              f"{mean_ms(ttft[CACHE[1]]):.1f} ms with it", flush=True)

    greedy = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    prompts = chat_token_ids(tok, PROMPT_SETS[args.ratio]()[: args.ratio_requests])
    engines = fresh(("none", drafter))
    keys = list(engines)
    runs: dict = {key: [] for key in keys}
    for i, p in enumerate(prompts):
        for key in keys[i % 4 :] + keys[: i % 4]:
            runs[key].append(serve_one(engines[key], f"ratio-{key}-{i}", p, greedy))
    for t in CACHE:
        base, drafted = runs["none", t], runs[drafter, t]
        same = sum(a["tokens"] == b["tokens"] for a, b in zip(base, drafted))
        point = {"none_tok_s": per_user(base), "speedup": per_user(drafted) / per_user(base),
                 "same_outputs": same}
        report[f"ratio_{args.ratio}_cache_{t}"] = point
        print(f"{args.ratio}, cache {t}: none {point['none_tok_s']:.1f} tok/s per user, "
              f"{args.drafter} {point['speedup']:.3f}x, same outputs {same}/{len(base)}", flush=True)

    def ids(messages: list[dict]) -> list[int]:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tok.encode(text, add_special_tokens=False)

    with open(data_dir() / "mt_bench" / "question.jsonl") as f:
        turns = [json.loads(line)["turns"] for line in f][: args.conversations]
    second: dict[int, list[float]] = {t: [] for t in CACHE}
    engines = fresh(("none",))
    for i, (q1, q2) in enumerate(turns):
        for t in CACHE if i % 2 else CACHE[::-1]:
            engine, first = engines["none", t], [{"role": "user", "content": q1}]
            answer = serve_one(engine, f"turn1-{t}-{i}", ids(first), greedy)["tokens"]
            text = tok.decode(answer, skip_special_tokens=True)
            messages = [*first, {"role": "assistant", "content": text}, {"role": "user", "content": q2}]
            second[t].append(serve_one(engine, f"turn2-{t}-{i}", ids(messages), greedy)["ttft"])
    report["turn2_first_token_ms"] = {t: mean_ms(v) for t, v in second.items()}
    print(f"MT-bench turn 2: first token {mean_ms(second[0]):.1f} ms without the cache, "
          f"{mean_ms(second[CACHE[1]]):.1f} ms with it", flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
