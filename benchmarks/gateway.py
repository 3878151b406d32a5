"""What a user gets of the engine's speed: engine alone versus served over HTTP. Prints JSON.

    python benchmarks/gateway.py                               # 1, 8 and 32 streams, 128 tokens
    python benchmarks/gateway.py --server-args="--no-engine-process"   # the engine on a thread
    python benchmarks/gateway.py --model fake --max-tokens 16 --rounds 1 --concurrency 1 2

Both sides decode the same chat prompts greedily with ignore_eos, so every request yields
exactly --max-tokens tokens, and both give torch --threads threads (0: torch's default).
Engine alone: the engine loop on this process's main thread, token times taken in its
on_step callback.
Served: `python -m server` with the same engine flags in a subprocess (the engine in its own
process unless --server-args says otherwise), an httpx streaming client here; token times are
chunk arrival times, so the client's own parsing is part of the served figure, as for a user.

Per concurrency and side: per-user decode tok/s (each request's (tokens - 1) / (last - first
token), averaged over requests), aggregate tok/s (all tokens / the round's wall time from the
first submission to the last token), and TTFT p50/p99 over every request of every round.
`served_vs_engine` gives the served/engine ratios of the per-user and aggregate rates (the
targets: >= 0.95 per user at 1 stream, >= 0.9 aggregate at the most streams).

Rounds alternate engine-alone and served (A/B/A/B...) and the rates are medians over rounds,
the ratios medians of per-round ratios, so a noisy shared machine shifts both sides alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
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

Record = tuple[float, float, float, int]  # (t_submit, t_first_token, t_last_token, tokens)


def prompts(n: int) -> list[str]:
    return [QUESTIONS[i % len(QUESTIONS)] + f" (#{i})" for i in range(n)]


def summarize(records: list[Record]) -> dict[str, Any]:
    rates = [(n - 1) / (last - first) for _, first, last, n in records if n > 1 and last > first]
    wall = max(last for _, _, last, _ in records) - min(t0 for t0, *_ in records)
    return {
        "per_user_tok_s": round(statistics.mean(rates), 2),
        "aggregate_tok_s": round(sum(n for *_, n in records) / wall, 2),
        "ttft_s": [first - t0 for t0, first, _, _ in records],
        "tokens_per_request": statistics.mean(n for *_, n in records),
    }


def engine_round(engine: Any, concurrency: int, max_tokens: int, tag: str) -> dict[str, Any]:
    """One batch of `concurrency` requests through the engine loop on this process's main
    thread, the thread that built the engine, as in the engine process (server/engine_core.py:
    a loop on a second thread runs a second OpenMP team, ~3x slower per step on 2 cores)."""
    from scheduler.engine import EngineLoop, QueueInbox
    from scheduler.request import Request, SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    tok = engine.tokenizer
    state: dict[str, list[Any]] = {}  # req_id -> [t_submit, t_first, t_last, tokens]

    def on_step(outputs: list[Any], stats: Any) -> None:
        now = time.perf_counter()
        for o in outputs:
            rec = state[o.req_id]
            if o.new_token_ids:
                rec[1] = rec[1] or now
                rec[2], rec[3] = now, o.num_output_tokens

    inbox = QueueInbox()
    for i, text in enumerate(prompts(concurrency)):
        msgs = [{"role": "user", "content": text}]
        ids = tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
                         add_special_tokens=False)
        state[f"{tag}-{i}"] = [time.perf_counter(), None, None, 0]
        inbox.put(("add", Request(f"{tag}-{i}", ids, params, arrival_s=time.monotonic())))
    inbox.put(("drain", 600.0))  # after the adds: the loop returns once they have finished
    error = EngineLoop(engine, inbox, on_step).run()
    if error is not None:
        raise error
    return summarize([(t0, first, last, n) for t0, first, last, n in state.values()])


async def served_round(base: str, concurrency: int, max_tokens: int) -> dict[str, Any]:
    async def one(client: httpx.AsyncClient, text: str) -> Record:
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


def side(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Median rates over rounds; TTFT percentiles over every request of every round."""
    ttft = sorted(t for r in rounds for t in r["ttft_s"])

    def pct_ms(p: float) -> float:
        return round(1000 * ttft[min(len(ttft) - 1, round(p / 100 * (len(ttft) - 1)))], 1)

    return {
        "per_user_tok_s": round(statistics.median(r["per_user_tok_s"] for r in rounds), 2),
        "aggregate_tok_s": round(statistics.median(r["aggregate_tok_s"] for r in rounds), 2),
        "ttft_p50_ms": pct_ms(50),
        "ttft_p99_ms": pct_ms(99),
        "tokens_per_request": rounds[0]["tokens_per_request"],
        "per_user_tok_s_rounds": [r["per_user_tok_s"] for r in rounds],
    }


def compare(engine: Any, base: str, concurrency: int, max_tokens: int, rounds: int) -> dict[str, Any]:
    engine_round(engine, concurrency, max_tokens, f"warm{concurrency}")
    asyncio.run(served_round(base, concurrency, max_tokens))
    alone, served = [], []
    for r in range(rounds):
        alone.append(engine_round(engine, concurrency, max_tokens, f"c{concurrency}r{r}"))
        served.append(asyncio.run(served_round(base, concurrency, max_tokens)))

    def ratio(key: str) -> float:
        return round(statistics.median(b[key] / a[key] for a, b in zip(alone, served, strict=True)), 3)

    return {
        "engine": side(alone),
        "served": side(served),
        "served_vs_engine": {"per_user": ratio("per_user_tok_s"), "aggregate": ratio("aggregate_tok_s")},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the embedded model")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--speculative", default="none",
                    help="drafter on both sides (none: the plain decode path the targets are for)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads of the engine on both sides (0: torch's default)")
    ap.add_argument("--server-args", default="", help="extra flags for the served side")
    args = ap.parse_args()

    import torch

    from scheduler.build import build_engine
    from scheduler.config import EngineConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    max_seqs = max(args.concurrency)
    flags = {"device": args.device, "dtype": args.dtype, "max_num_seqs": max_seqs,
             "max_model_len": 1024, "max_num_batched_tokens": max(512, max_seqs),
             "speculative": args.speculative}
    if args.model:
        flags["model"] = args.model
    engine = build_engine(EngineConfig(**flags))
    server_args = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    server_args += ["--max-queue", str(max_seqs), "--threads", str(args.threads)]
    server = spawn_server([*server_args, *shlex.split(args.server_args)])
    result: dict[str, Any] = {
        "model": engine.model_name, "max_tokens": args.max_tokens, "rounds": args.rounds,
        "speculative": args.speculative, "torch_threads": torch.get_num_threads(),
        "server_args": shlex.join([*server_args, *shlex.split(args.server_args)]),
    }
    try:
        for c in args.concurrency:
            result[f"streams_{c}"] = compare(engine, server.url, c, args.max_tokens, args.rounds)
    finally:
        server.stop()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
