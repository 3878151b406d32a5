"""Gateway stress: an overload burst and a disconnect storm. Prints one JSON object.

    python benchmarks/stress.py                       # spawns `python -m server --model fake ...`
    python benchmarks/stress.py --url http://host:8000 --capacity 20
    python benchmarks/stress.py --server-args "--max-num-seqs 8 --max-queue 24"   # embedded model

burst: 10x capacity (max_num_seqs + max_queue) requests at once, half streaming. Every one must
complete or be refused quickly with 429/503 + Retry-After; `lost` must be 0; the waiting gauge
must stay <= max_queue; afterwards the server must serve again.
storm: N streaming clients hang up mid-stream; the running/waiting gauges must return to 0
(every slot freed) and a fresh request must complete.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import time
from typing import Any

import httpx
from gateway_load import (
    Tally,
    add_common_options,
    chat,
    metrics_async,
    rss_mb,
    run_against_server,
    wait_idle,
)

DEFAULT_SERVER = "--model fake --max-num-seqs 4 --max-queue 12"


async def burst(base: str, capacity: int, factor: int, max_tokens: int) -> dict[str, Any]:
    tally = Tally()
    max_waiting = max_in_system = 0.0
    stop = asyncio.Event()

    async def watch_queue(client: httpx.AsyncClient) -> None:
        nonlocal max_waiting, max_in_system
        names = ["dspark_num_requests_waiting", "dspark_num_requests_running"]
        while not stop.is_set():
            m = await metrics_async(client, base, names)
            waiting, running = (m[n] or 0.0 for n in names)
            max_waiting = max(max_waiting, waiting)
            max_in_system = max(max_in_system, waiting + running)
            await asyncio.sleep(0.05)

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        watcher = asyncio.create_task(watch_queue(client))
        n = capacity * factor
        t0 = time.monotonic()
        tally.outcomes = list(await asyncio.gather(*(
            chat(client, base, stream=i % 2 == 0, max_tokens=max_tokens) for i in range(n))))
        wall = time.monotonic() - t0
        stop.set()
        await watcher
        idle_after_s = await wait_idle(base)
        recovered = (await chat(client, base, stream=False, max_tokens=4)).kind == "ok"
    return {**tally.summary(), "wall_s": round(wall, 2), "max_waiting_seen": max_waiting,
            "max_in_system_seen": max_in_system,
            "idle_after_s": idle_after_s, "recovered": recovered}


async def storm(base: str, clients: int, max_tokens: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        outcomes = await asyncio.gather(*(
            chat(client, base, stream=True, max_tokens=max_tokens,
                 drop_after_lines=rng.randint(1, 6)) for _ in range(clients)))
        t0 = time.monotonic()
        idle_after_s = await wait_idle(base)
        recovered = (await chat(client, base, stream=True, max_tokens=4)).kind == "ok"
    tally = Tally(list(outcomes))
    return {**tally.summary(), "idle_after_s": idle_after_s, "recovered": recovered,
            "freed_within_s": round(time.monotonic() - t0, 3)}


async def run(args: argparse.Namespace, base: str) -> dict[str, Any]:
    out: dict[str, Any] = {"capacity": args.capacity, "rss_start_mb": rss_mb(base)}
    if args.scenario in ("burst", "all"):
        out["burst"] = await burst(base, args.capacity, args.factor, args.max_tokens)
    if args.scenario in ("storm", "all"):
        out["storm"] = await storm(base, args.clients, args.max_tokens, args.seed)
    out["rss_end_mb"] = rss_mb(base)
    if out["rss_start_mb"] is not None and out["rss_end_mb"] is not None:
        out["rss_growth_mb"] = round(out["rss_end_mb"] - out["rss_start_mb"], 1)
    out["lost"] = sum(out[k]["lost"] for k in ("burst", "storm") if k in out)
    return out


def capacity_of(server_args: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-queue", type=int, default=64)
    known, _ = p.parse_known_args(server_args)
    return int(known.max_num_seqs + known.max_queue)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_options(ap, DEFAULT_SERVER)
    ap.add_argument("--capacity", type=int, help="max_num_seqs + max_queue (default: from --server-args)")
    ap.add_argument("--scenario", choices=["burst", "storm", "all"], default="all")
    ap.add_argument("--factor", type=int, default=10, help="burst size as a multiple of capacity")
    ap.add_argument("--clients", type=int, default=100, help="storm clients")
    args = ap.parse_args()
    server_args = shlex.split(args.server_args)
    if args.capacity is None:
        args.capacity = capacity_of(server_args)
    result = run_against_server(args.url, server_args, lambda base: run(args, base))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
