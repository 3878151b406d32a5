"""Gateway soak: steady open-loop traffic at ~80% of measured capacity. Prints one JSON object.

    python benchmarks/soak.py --duration 900                  # the 15-minute run (spawns a server)
    python benchmarks/soak.py --duration 20 --url http://127.0.0.1:8000
    python benchmarks/soak.py --server-args "--max-num-seqs 8"   # the embedded model

First a short closed loop at max_num_seqs concurrency measures capacity (requests/s); then
requests arrive as a Poisson process at --load x that rate for --duration seconds, half of them
streaming. Reported: requests tried / ok / rejected / lost (must be 0), latency percentiles,
and the server's RSS at the start, at the end and its growth (from /metrics, so it also works
against a remote server).
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
    RSS,
    Outcome,
    Tally,
    add_common_options,
    chat,
    metrics_async,
    rss_mb,
    run_against_server,
    to_mib,
    wait_idle,
)

DEFAULT_SERVER = "--model fake --max-num-seqs 4 --max-queue 32"
WAITING = "dspark_num_requests_waiting"


async def measure_capacity(client: httpx.AsyncClient, base: str, concurrency: int,
                           max_tokens: int, seconds: float) -> float:
    done = 0
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            if (await chat(client, base, stream=False, max_tokens=max_tokens)).kind == "ok":
                done += 1

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.monotonic() - t0)


async def soak(base: str, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        capacity = await measure_capacity(client, base, args.concurrency, args.max_tokens,
                                          args.calibrate_s)
        await wait_idle(base)
        rate = capacity * args.load
        rss_start = rss_mb(base)
        tasks: list[asyncio.Task[Outcome]] = []
        samples: list[dict[str, Any]] = []
        t0 = time.monotonic()
        next_sample = t0
        while (now := time.monotonic()) - t0 < args.duration:
            if now >= next_sample:
                m = await metrics_async(client, base, [RSS, WAITING])
                samples.append({"t_s": round(now - t0, 1), "rss_mb": to_mib(m[RSS]),
                                "waiting": m[WAITING]})
                next_sample = now + max(args.duration / 20, 1.0)
            tasks.append(asyncio.create_task(
                chat(client, base, stream=rng.random() < 0.5, max_tokens=args.max_tokens)))
            await asyncio.sleep(rng.expovariate(rate))
        outcomes = await asyncio.gather(*tasks)
        idle_after_s = await wait_idle(base)
        rss_end = rss_mb(base)
    tally = Tally(list(outcomes))
    return {
        **tally.summary(),
        "duration_s": args.duration,
        "capacity_req_per_s": round(capacity, 2),
        "offered_req_per_s": round(rate, 2),
        "achieved_ok_per_s": round(tally.count("ok") / args.duration, 2),
        "rss_start_mb": rss_start,
        "rss_end_mb": rss_end,
        "rss_growth_mb": None if rss_start is None or rss_end is None else round(rss_end - rss_start, 1),
        "idle_after_s": idle_after_s,
        "samples": samples,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_options(ap, DEFAULT_SERVER)
    ap.add_argument("--duration", type=float, default=900.0, help="seconds of steady load")
    ap.add_argument("--load", type=float, default=0.8, help="fraction of measured capacity")
    ap.add_argument("--concurrency", type=int, default=4, help="closed-loop clients for calibration")
    ap.add_argument("--calibrate-s", type=float, default=5.0)
    args = ap.parse_args()
    result = run_against_server(args.url, shlex.split(args.server_args),
                                lambda base: soak(base, args))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
