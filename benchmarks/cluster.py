"""Scale-out on Ray Serve, on one machine: is two replicas better than one replica with twice
the threads, and what does the Serve hop cost a request?

    python benchmarks/cluster.py                                  # prints JSON
    python benchmarks/cluster.py --streams 4,16,32 --max-tokens 64 --out runs/cluster.json
    python benchmarks/cluster.py --engine-args "--speculative none"
    python benchmarks/cluster.py --layouts "" --overhead-requests 100   # the overhead alone

Layouts, each started as a user would (`python -m server.cluster ...`, a local Ray head):
  1x2  one replica, 2 torch threads    (--replicas 1 --threads-per-replica 2)
  2x1  two replicas, 1 thread each     (--replicas 2 --threads-per-replica 1)
At each stream count, N clients each send requests back to back (streamed chats, greedy,
`--max-tokens` each, prompts from the chat mix of the shared data); reported: aggregate output
tokens/s over the run, and p50/p99 of per-request TPOT ((last token - first token) / (tokens - 1))
and TTFT. Then at 1 stream: `python -m server --threads 2` and the 1x2 layout, both up, take
turns on the same requests; the median of the paired differences is what the Serve proxy hop
and routing add to TTFT, TPOT and the whole request.
Every server gets the same engine flags (`--engine-args`, default: the shipped defaults).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtest.prompts import load_mix
from loadtest.runtime import ServerProcess, server_command

LAYOUTS = {"1x2": (1, 2), "2x1": (2, 1)}


@dataclass
class Sample:
    ttft_s: float
    tpot_s: float | None
    tokens: int
    e2e_s: float


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


async def one_request(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> Sample:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(c["delta"].get("content") for c in chunk.get("choices", [])):
                now = time.perf_counter()
                first = first or now
                last = now
    if first is None or last is None:
        raise RuntimeError("a stream without content")
    tpot = (last - first) / (tokens - 1) if tokens > 1 else None
    return Sample(first - start, tpot, tokens, last - start)


async def closed_loop(base: str, prompts: list[str], streams: int, per_stream: int,
                      max_tokens: int) -> dict[str, Any]:
    """`streams` clients, each sending `per_stream` requests back to back."""
    samples: list[Sample] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:

        async def worker(w: int) -> None:
            for i in range(per_stream):
                prompt = prompts[(w * per_stream + i) % len(prompts)]
                try:
                    samples.append(await one_request(client, prompt, max_tokens))
                except (httpx.HTTPError, RuntimeError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")

        start = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(streams)))
        wall = time.perf_counter() - start
    tpots = [s.tpot_s for s in samples if s.tpot_s is not None]
    return {
        "streams": streams,
        "requests": len(samples),
        "errors": len(errors),
        "error_examples": errors[:3],
        "wall_s": round(wall, 2),
        "output_tokens": sum(s.tokens for s in samples),
        "tokens_per_s": round(sum(s.tokens for s in samples) / wall, 1),
        "tpot_p50_ms": ms(pct(tpots, 50)),
        "tpot_p99_ms": ms(pct(tpots, 99)),
        "ttft_p50_ms": ms(pct([s.ttft_s for s in samples], 50)),
        "ttft_p99_ms": ms(pct([s.ttft_s for s in samples], 99)),
    }


async def interleaved(bases: dict[str, str], prompts: list[str], n: int,
                      max_tokens: int) -> dict[str, Any]:
    """One stream per server, taking turns: request i goes to every server, in an order that
    alternates, so drift in the machine's load falls on both sides alike. Reported: medians
    per server, and the median over requests of each server's difference to the first."""
    names = list(bases)
    samples: dict[str, list[Sample]] = {name: [] for name in names}
    clients = {name: httpx.AsyncClient(base_url=url, timeout=600) for name, url in bases.items()}
    try:
        for name in names:  # unmeasured: first connections, first tokenizer calls
            await one_request(clients[name], prompts[0], max_tokens)
        for i in range(n):
            for name in names if i % 2 == 0 else names[::-1]:
                samples[name].append(
                    await one_request(clients[name], prompts[i % len(prompts)], max_tokens))
    finally:
        for client in clients.values():
            await client.aclose()

    def medians(rows: list[Sample]) -> dict[str, float | None]:
        return {
            "ttft_p50_ms": ms(statistics.median(s.ttft_s for s in rows)),
            "tpot_p50_ms": ms(statistics.median(s.tpot_s for s in rows if s.tpot_s is not None)),
            "e2e_p50_ms": ms(statistics.median(s.e2e_s for s in rows)),
        }

    out: dict[str, Any] = {"requests_each": n, "max_tokens": max_tokens}
    out.update({name: medians(samples[name]) for name in names})
    base = names[0]
    for name in names[1:]:
        pairs = list(zip(samples[name], samples[base]))
        out[f"{name}_minus_{base}_ms"] = {
            "ttft_p50": ms(statistics.median(a.ttft_s - b.ttft_s for a, b in pairs)),
            "e2e_p50": ms(statistics.median(a.e2e_s - b.e2e_s for a, b in pairs)),
            "tpot_p50": ms(statistics.median(a.tpot_s - b.tpot_s for a, b in pairs
                                             if a.tpot_s is not None and b.tpot_s is not None)),
        }
    return out


def start(cmd: list[str], log: Path, replicas: int) -> ServerProcess:
    """A started server (stop() it), waited on until ready with all its replicas up."""
    server = ServerProcess(cmd, log=log, ready_timeout=900, cwd=ROOT).start()
    if replicas:  # /ready answers once one replica is up; wait for all of them
        deadline = time.monotonic() + 300
        while len(httpx.get(server.url + "/metrics/replicas", timeout=10).json()) < replicas:
            if time.monotonic() > deadline:
                server.stop()
                raise TimeoutError(f"{replicas} replicas not up:\n{server.log_tail()}")
            time.sleep(1)
    return server


def cluster_command(replicas: int, threads: int, engine_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "server.cluster", "--host", "127.0.0.1", "--port", "{port}",
            "--replicas", str(replicas), "--threads-per-replica", str(threads), *engine_args]


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--streams", default="4,16,32", help="concurrent streams per point")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=64,
                    help="requests per point (at least 2 per stream)")
    ap.add_argument("--overhead-requests", type=int, default=60,
                    help="requests to each server in the 1-stream comparison (0: skip it)")
    ap.add_argument("--overhead-max-tokens", type=int, default=16)
    ap.add_argument("--layouts", default="1x2,2x1", help="in this order ('': none)")
    ap.add_argument("--engine-args", default="", help="engine flags for every server")
    ap.add_argument("--max-prompt-chars", type=int, default=400)
    ap.add_argument("--logs", type=Path, default=ROOT / "runs" / "cluster-bench")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the servers started below are stopped on the way out.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    engine_args = shlex.split(args.engine_args)
    prompts = [p.chat for p in load_mix("chat", max_chars=args.max_prompt_chars, limit=256)]
    streams = [int(s) for s in args.streams.split(",")]
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "max_tokens": args.max_tokens,
        "engine_args": engine_args,
        "load_average_before": load_average(),
        "layouts": {},
    }
    for layout in [name for name in args.layouts.split(",") if name]:
        replicas, threads = LAYOUTS[layout]
        log = args.logs / f"cluster-{layout}.log"
        server = start(cluster_command(replicas, threads, engine_args), log, replicas)
        try:
            points = []
            for n in streams:
                per_stream = max(2, -(-args.requests // n))
                points.append(asyncio.run(
                    closed_loop(server.url, prompts, n, per_stream, args.max_tokens)))
                print(f"{layout} {points[-1]}", file=sys.stderr)
            report["layouts"][layout] = points
        finally:
            server.stop()
    if args.overhead_requests:
        # Both up at once, idle but for the one request in flight: python -m server --threads 2
        # and the 1x2 layout, taking turns.
        direct = start(server_command("--threads", "2", *engine_args),
                       args.logs / "single.log", 0)
        try:
            ray_side = start(cluster_command(1, 2, engine_args), args.logs / "overhead-1x2.log", 1)
            try:
                report["overhead_1_stream"] = asyncio.run(interleaved(
                    {"python_m_server": direct.url, "ray_1x2": ray_side.url}, prompts,
                    args.overhead_requests, args.overhead_max_tokens))
            finally:
                ray_side.stop()
        finally:
            direct.stop()
    report["load_average_after"] = load_average()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
