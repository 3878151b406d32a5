"""Open-loop load on the engine alone: configurations side by side at offered request rates.

Requests arrive at a constant rate (the load test's prompt mix, greedy, ignore_eos, fixed
max_tokens) straight into an in-process engine, with no HTTP server or load generator sharing
the CPU. For each configuration and rate it reports the per-user TPOT (median over requests
that arrived after the warm-up) and where the engine's time went: decode and prefill steps,
with and without drafting, their mean step, forward and drafting times. The last line printed
is one JSON object.

    python benchmarks/openloop.py --configs none:none,dspark:dspark --rates 2.8,6 --duration 20

The HTTP load test (`python -m loadtest.matched`) is the product-level measurement; this one
isolates the engine, for diagnosing what the scheduler does under load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from drafts.train.data import encode_chat
from loadtest.prompts import load_mix
from scheduler.build import assemble_engine
from scheduler.config import EngineConfig
from scheduler.loader import load_target
from scheduler.request import Request, SamplingParams
from scheduler.stats import StepStats

StepKind = Callable[[StepStats], bool]
KINDS: dict[str, StepKind] = {
    "decode": lambda s: s.num_prefill_tokens == 0 and s.num_draft_tokens == 0,
    "decode+draft": lambda s: s.num_prefill_tokens == 0 and s.num_draft_tokens > 0,
    "prefill": lambda s: s.num_prefill_tokens > 0 and s.num_draft_tokens == 0,
    "prefill+draft": lambda s: s.num_prefill_tokens > 0 and s.num_draft_tokens > 0,
}


def run_point(
    engine: Any,
    prompts: list[list[int]],
    rate: float,
    duration: float,
    warmup: float,
    max_tokens: int,
) -> dict[str, Any]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    num_requests = round(rate * duration)
    arrival = {f"r{i}": i / rate for i in range(num_requests)}
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    count: dict[str, int] = {}
    steps: list[StepStats] = []
    sent, t0 = 0, time.monotonic()
    while True:
        now = time.monotonic() - t0
        while sent < num_requests and arrival[f"r{sent}"] <= now:
            engine.add_request(Request(f"r{sent}", prompts[sent % len(prompts)], params))
            sent += 1
        if not engine.has_work:
            if sent == num_requests:
                break
            time.sleep(0.001)
            continue
        outputs, stats = engine.step()
        now = time.monotonic() - t0
        steps.append(stats)
        for out in outputs:
            if out.new_token_ids:
                first.setdefault(out.req_id, now)
                last[out.req_id] = now
                count[out.req_id] = count.get(out.req_id, 0) + len(out.new_token_ids)
    tpots = [
        (last[r] - first[r]) / (count[r] - 1)
        for r in first
        if count[r] > 1 and arrival[r] >= warmup
    ]
    kinds = {}
    for name, is_kind in KINDS.items():
        sel = [s for s in steps if is_kind(s)]
        if sel:
            kinds[name] = {
                "steps": len(sel),
                "requests": statistics.mean(s.num_scheduled_requests for s in sel),
                "tokens": statistics.mean(s.num_scheduled_tokens for s in sel),
                "verified_drafts": statistics.mean(s.num_draft_tokens for s in sel),
                "accepted_drafts": statistics.mean(s.num_accepted_tokens for s in sel),
                "step_ms": 1e3 * statistics.mean(s.step_time_s for s in sel),
                "forward_ms": 1e3 * statistics.mean(s.forward_time_s for s in sel),
                "draft_ms": 1e3 * statistics.mean(s.draft_time_s for s in sel),
            }
    return {
        "rate": rate,
        "requests": len(tpots),
        "tpot_p50_ms": 1e3 * statistics.median(tpots),
        "busy_s": sum(s.step_time_s for s in steps),
        "wall_s": time.monotonic() - t0,
        "steps": kinds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--configs", default="none:none,dspark:dspark", help="drafter:policy list")
    ap.add_argument("--rates", default="2.8,6", help="offered requests per second")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per point")
    ap.add_argument(
        "--warmup", type=float, default=5.0, help="requests arriving earlier are not timed"
    )
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--mix", default="mixed")
    ap.add_argument("--prompt-max-chars", type=int, default=600)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_target(EngineConfig().model, dtype="auto")
    prompts = [
        encode_chat(loaded.tokenizer, p.chat)
        for p in load_mix(args.mix, max_chars=args.prompt_max_chars)
    ]
    results = []
    for rate in (float(r) for r in args.rates.split(",")):
        for config in args.configs.split(","):
            drafter, policy = config.split(":")
            engine = assemble_engine(
                loaded, EngineConfig(speculative=drafter, verify_policy=policy)
            )
            point = {
                "config": config,
                **run_point(engine, prompts, rate, args.duration, args.warmup, args.max_tokens),
            }
            results.append(point)
            print(
                f"{config:>16} {rate:4.1f} rps: TPOT p50 {point['tpot_p50_ms']:.1f} ms, "
                f"busy {point['busy_s']:.1f} of {point['wall_s']:.1f} s; "
                + "; ".join(
                    f"{k} {v['steps']} x {v['step_ms']:.1f} ms ({v['requests']:.1f} req, "
                    f"{v['verified_drafts']:.1f} verified, {v['accepted_drafts']:.1f} accepted)"
                    for k, v in point["steps"].items()
                ),
                flush=True,
            )
    print(json.dumps({"results": results}))


if __name__ == "__main__":
    main()
