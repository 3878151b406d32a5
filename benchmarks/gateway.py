"""Gateway overhead: per-token time through HTTP (SSE) versus the engine alone. Prints JSON.

    python benchmarks/gateway.py                          # embedded model, concurrency 1 and 16
    python benchmarks/gateway.py --model fake --max-tokens 128

Both sides decode the same prompts greedily with ignore_eos, so every request yields exactly
--max-tokens tokens. Engine alone: an EngineThread in this process, token times taken in its
on_step callback. Through HTTP: `python -m server` with the same engine flags in a subprocess,
an httpx streaming client here; token times are chunk arrival times. Per-token time is the
decode-phase mean (last - first token) / (tokens - 1) per request, averaged over requests;
the end-to-end figure divides request latency by its tokens.

Rounds alternate engine-alone and HTTP (A/B/A/B...) and the figures are medians over rounds,
with the overhead taken as the median of per-round paired differences, so a noisy shared
machine shifts both sides alike instead of biasing one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time
from typing import Any

import httpx
from gateway_load import spawn_server

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.", "List three prime numbers.",
    "Describe a cat to someone who has never seen one.", "What is 12 times 7?",
    "Name a famous painter and one of their works.", "Give me a tip for learning to cook.",
]


def prompts(n: int) -> list[str]:
    return [QUESTIONS[i % len(QUESTIONS)] + f" (#{i})" for i in range(n)]


def summarize(records: list[tuple[float, float, float, int]]) -> dict[str, float]:
    """records: (t_submit, t_first, t_last, tokens) per request."""
    tpot = [(last - first) / (n - 1) for _, first, last, n in records if n > 1]
    e2e = [(last - t0) / n for t0, _, last, n in records if n]
    ttft = [first - t0 for t0, first, _, _ in records]
    return {
        "per_token_ms": round(1000 * statistics.mean(tpot), 3),
        "e2e_per_token_ms": round(1000 * statistics.mean(e2e), 3),
        "ttft_ms": round(1000 * statistics.mean(ttft), 2),
        "tokens_per_request": statistics.mean(n for *_, n in records),
    }


def _engine_round(engine: Any, tag: str, concurrency: int, params: Any) -> list[list[Any]]:
    """One batch of `concurrency` requests; per request [t_submit, t_first, t_last, tokens, done]."""
    from scheduler.engine import EngineThread
    from scheduler.request import Request

    tok = engine.tokenizer
    state: dict[str, list[Any]] = {}
    done = threading.Event()

    def on_step(outputs: list[Any], stats: Any) -> None:
        now = time.perf_counter()
        for o in outputs:
            rec = state[o.req_id]
            if o.new_token_ids:
                rec[1] = rec[1] or now
                rec[2], rec[3] = now, o.num_output_tokens
            if o.finished:
                rec[4] = True
        if all(rec[4] for rec in state.values()):
            done.set()

    thread = EngineThread(engine, on_step)
    thread.start()
    for i, text in enumerate(prompts(concurrency)):
        msgs = [{"role": "user", "content": text}]
        ids = tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
                         add_special_tokens=False)
        state[f"{tag}-{i}"] = [time.perf_counter(), None, None, 0, False]
        thread.add_request(Request(f"{tag}-{i}", ids, params, arrival_s=time.monotonic()))
    done.wait(600)
    thread.shutdown(5)
    return list(state.values())


def engine_round(engine: Any, concurrency: int, max_tokens: int, tag: str) -> dict[str, float]:
    from scheduler.request import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    got = _engine_round(engine, tag, concurrency, params)
    return summarize([(t0, first, last, n) for t0, first, last, n, _ in got])


async def http_round(base: str, concurrency: int, max_tokens: int) -> dict[str, float]:
    async def one(client: httpx.AsyncClient, text: str) -> tuple[float, float, float, int]:
        body = {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        first = last = 0.0
        tokens = 0
        async with client.stream("POST", base + "/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
        return t0, first, last, tokens

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        got = await asyncio.gather(*(one(client, t) for t in prompts(concurrency)))
    return summarize(list(got))


def median_of(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(r[k] for r in rounds), 3) for k in rounds[0]}


def compare(engine: Any, base: str, concurrency: int, max_tokens: int, rounds: int) -> dict[str, Any]:
    engine_round(engine, concurrency, max_tokens, f"warm{concurrency}")
    asyncio.run(http_round(base, concurrency, max_tokens))
    a, b = [], []
    for r in range(rounds):
        a.append(engine_round(engine, concurrency, max_tokens, f"c{concurrency}r{r}"))
        b.append(asyncio.run(http_round(base, concurrency, max_tokens)))
    diffs = [y["per_token_ms"] - x["per_token_ms"] for x, y in zip(a, b, strict=True)]
    ratios = [y["per_token_ms"] / x["per_token_ms"] - 1 for x, y in zip(a, b, strict=True)]
    return {
        "engine": median_of(a),
        "http": median_of(b),
        "overhead_per_token_ms": round(statistics.median(diffs), 3),
        "overhead_pct": round(100 * statistics.median(ratios), 1),
        "overhead_per_token_ms_rounds": [round(d, 3) for d in diffs],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the embedded model")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads on both sides (0: torch's default)")
    args = ap.parse_args()

    import torch

    from scheduler.build import build_engine
    from scheduler.config import EngineConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    max_seqs = max(args.concurrency)
    flags = {"device": args.device, "dtype": args.dtype, "max_num_seqs": max_seqs,
             "max_model_len": 1024, "max_num_batched_tokens": 512}
    if args.model:
        flags["model"] = args.model
    engine = build_engine(EngineConfig(**flags))
    server_args = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    server_args += ["--max-queue", str(max_seqs)]
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else None
    server = spawn_server(server_args, env=env)
    result: dict[str, Any] = {"model": engine.model_name, "max_tokens": args.max_tokens,
                              "rounds": args.rounds, "torch_threads": torch.get_num_threads()}
    try:
        for c in args.concurrency:
            result[f"concurrency_{c}"] = compare(engine, server.url, c, args.max_tokens, args.rounds)
    finally:
        server.stop()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
