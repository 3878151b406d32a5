"""Configurations at N streams, stepped in turn: one process, one engine per configuration, each
with its own closed loop of N streams over the same prompts, and the engines take one step each
in rotation.

`speculative.py` runs a configuration for a few seconds, then the next; at 16 streams the host
drifts between those runs as much as the configurations differ (gsm8k aggregates ranged
0.86-1.07x of `none` over three runs). Here every configuration's step sits between steps of the
others, so drift falls on all of them alike, and each one's throughput is its tokens over the
time of its own steps. Per configuration: aggregate tokens/s against the first, tau, and where a
step's time goes (the target forward, the drafters, the rest), per step and per output token.
The last line printed is one JSON object. A configuration listed twice runs as two engines
("none #2"): the spread between them is the noise a gap must clear (benchmarks/paired.py).
Each round starts one engine further along the list: the engine that steps first in a round
runs its forward 1-6 % slower than the others (cause not found; with the same engine first in
every round, four identical engines served 1.000 / 1.019 / 1.030 / 1.030x, and the engine
stepped first was the slow one whichever was built first). Rotated, two runs gave 1.000 /
1.002 / 1.008 / 1.009x and 1.000 / 1.012 / 1.014 / 1.019x (docs/benchmarks.md): up to 2 %
remains, and it falls on the engine built first (five `none` engines in one run: 1.000 / 1.017
/ 1.018 / 1.014 / 1.016x on MT-bench, 1.000 / 1.018 / 1.027 / 1.022 / 1.013x on GSM8K; in
other runs the first agreed with the last within 1 %). So list `none` first and last, read
the configurations between against the last one (the figures printed are against the first),
and compare two configurations in both orders.

    python benchmarks/lockstep.py --configs none,suffix:dspark,suffix+dspark:dspark,none \\
        --prompts gsm8k --streams 16 --requests 64 --threads 2

Beside the aggregate, each engine's tokens per second over its steps that run no prompt
chunk ("decode steps"): at 16 streams the eight or so steps that prefill 512 prompt tokens take
~15 % of every engine's time, do the same work in each, and vary by +-150 ms between engines
(one MT-bench run: 2.13-2.43 s above three times the median step), which moved the aggregates
of identical engines by up to 2 %; drafting changes only the other steps.

`--max-tokens-spread F` draws each request's answer length from [max_tokens x (1 - F),
max_tokens] (seeded, the same for every engine). With one length for all, the requests that
`none` admits together end together wherever they reach it, and their successors' prompts are
prefilled together; drafting moves the ends apart, and a step with a prompt chunk costs ~26 ms
beyond its tokens here, so the drafting engines prefilled in 3-19 % more steps
(docs/benchmarks.md). Served traffic ends where its answers do.

A configuration `dense` is `none` on a second copy of the model loaded as on a CPU without
bfloat16 tiles: its prompt chunks multiply dense bf16 copies of the int4 layers instead of
their blocks in the tiles (scheduler/kernels/q4_prompt.cpp; docs/benchmarks.md, "Prompt
chunks in bfloat16 tiles").

`--parts` also times, per engine, the wall time inside the methods that `PARTS` names (the
target's forward alone, verification, the prefix store, the Speculator before and after the
forward): where a configuration's extra milliseconds a step go, which the spread between two
`none` engines hides in the totals.
"""

from __future__ import annotations

import argparse
import collections
import functools
import itertools
import json
import random
import time
from dataclasses import dataclass, field

import torch
from speculative import (  # beside this
    PROMPT_SETS,
    chat_token_ids,
    config_of,
    engine_labels,
    load_with_dense_prompt_copies,
    parse_config,
)

from scheduler.build import assemble_engine
from scheduler.config import EngineConfig
from scheduler.loader import load_target
from scheduler.model import TargetModel
from scheduler.request import Request, SamplingParams
from scheduler.runner import TorchModelRunner
from scheduler.speculator import Speculator

# What --parts times: (class, method, label). The Speculator's methods run inside the engine's
# step, the target's forward and the runner's inside its `execute` ("forward" above).
PARTS = [
    (TargetModel, "forward", "target forward"),
    (TorchModelRunner, "_verify", "verification"),
    (TorchModelRunner, "store_blocks", "prefix store"),
    (Speculator, "attach", "speculator before"),
    (Speculator, "_draft_with", "of which drafters"),
    (Speculator, "record", "speculator after"),
    (Speculator, "release", "speculator release"),
]


class PartTimers:
    """Wall time inside each method of PARTS, per engine: the loop names the engine stepping.
    Wraps the classes' methods for the whole process (a benchmark's instrument only)."""

    def __init__(self) -> None:
        self.current: str | None = None
        self.seconds: dict[tuple[str | None, str], float] = collections.defaultdict(float)
        for cls, name, label in PARTS:
            setattr(cls, name, self._timed(getattr(cls, name), label))

    def _timed(self, method, label):  # type: ignore[no-untyped-def]
        @functools.wraps(method)
        def timed(*args, **kwargs):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[self.current, label] += time.perf_counter() - t0

        return timed

    def ms_per_step(self, engine: str, steps: float) -> dict[str, float]:
        return {label: 1e3 * self.seconds[engine, label] / steps for _, _, label in PARTS}


@dataclass
class ClosedLoop:
    """One engine serving `prompts` in order, `streams` requests in flight at a time."""

    engine: object
    prompts: list[list[int]]
    streams: int
    params: list[SamplingParams]  # one per prompt
    next_i: int = 0
    in_flight: int = 0
    totals: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(
            (
                "time_s",
                "forward_s",
                "draft_s",
                "steps",
                "tokens",
                "scheduled_tokens",
                "draft_tokens",
                "accepted",
                "predicted",
                "rounds",
                "finished",
                "decode_time_s",
                "decode_tokens",
            ),
            0.0,
        )
    )
    profile: list = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.next_i == len(self.prompts) and self.in_flight == 0

    def step(self) -> None:
        """Top up to `streams` requests, then one engine step, timed."""
        while self.next_i < len(self.prompts) and self.in_flight < self.streams:
            self.engine.add_request(
                Request(f"r{self.next_i}", self.prompts[self.next_i], self.params[self.next_i])
            )
            self.next_i += 1
            self.in_flight += 1
        t0 = time.perf_counter()
        stepped = self.engine.step()
        elapsed = time.perf_counter() - t0
        t = self.totals
        t["time_s"] += elapsed
        if not stepped:
            return
        outputs, stats = stepped
        t["steps"] += 1
        t["forward_s"] += stats.forward_time_s
        t["draft_s"] += stats.draft_time_s
        t["scheduled_tokens"] += stats.num_scheduled_tokens
        t["draft_tokens"] += stats.num_draft_tokens
        t["accepted"] += stats.num_accepted_tokens
        t["rounds"] += stats.num_drafts
        t["predicted"] += sum(stats.predicted_per_position)
        if stats.profile:  # sent at most once a second
            self.profile = stats.profile
        emitted = sum(len(out.new_token_ids) for out in outputs)
        t["tokens"] += emitted
        if stats.num_prefill_tokens == 0:  # decodes (and their drafts) only: see the docstring
            t["decode_time_s"] += elapsed
            t["decode_tokens"] += emitted
        for out in outputs:
            if out.finished:
                self.in_flight -= 1
                t["finished"] += 1


def answer_lengths(n: int, max_tokens: int, spread: float) -> list[int]:
    """Each request's max_tokens: all `max_tokens`, or with spread > 0 drawn uniformly from
    [max_tokens x (1 - spread), max_tokens], the same draws for every engine (seeded)."""
    if not 0.0 <= spread < 1.0:
        raise ValueError("--max-tokens-spread must be in [0, 1)")
    rng = random.Random(0)
    low = max(1, round(max_tokens * (1.0 - spread)))  # max_tokens itself without a spread
    return [rng.randint(low, max_tokens) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--configs",
        default="none,suffix:dspark,suffix+dspark:dspark",
        help="drafter[:policy[@k]] list, as speculative.py's; the first is the baseline",
    )
    ap.add_argument("--prompts", default="gsm8k", help=", ".join(sorted(PROMPT_SETS)))
    ap.add_argument("--first", type=int, default=0, help="first prompt of the set")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument(
        "--max-tokens-spread",
        type=float,
        default=0.0,
        help="answer lengths drawn from [max_tokens x (1 - spread), max_tokens] (docstring)",
    )
    ap.add_argument("--k", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--parts", action="store_true", help="time the parts of a step (docstring)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_target(device="cpu", dtype="auto", weights="auto")
    texts = PROMPT_SETS[args.prompts]()[args.first : args.first + args.requests]
    prompts = chat_token_ids(loaded.tokenizer, texts)
    params = [
        SamplingParams(max_tokens=n, temperature=0.0)
        for n in answer_lengths(len(prompts), args.max_tokens, args.max_tokens_spread)
    ]
    specs = engine_labels(args.configs.split(","))  # a configuration twice: two engines
    timers = PartTimers() if args.parts else None
    loops = {}
    for spec in specs:  # speculative.py's engine settings, so the two agree
        dense = config_of(spec) == "dense"
        drafter, policy, k = parse_config("none" if dense else config_of(spec), args.k)
        config = EngineConfig(
            speculative=drafter,
            verify_policy=policy,
            num_speculative_tokens=k,
            max_num_seqs=args.streams,
            max_model_len=1024,
            max_num_batched_tokens=max(512, args.streams * (k + 1)),
            dtype="auto",
            weights="auto",
        )
        model = (
            load_with_dense_prompt_copies(device="cpu", dtype="auto", weights="auto")
            if dense
            else loaded
        )
        engine = assemble_engine(model, config)
        ClosedLoop(engine, [[1, 2, 3, 4]], 1, [SamplingParams(max_tokens=8)]).step()  # warm-up
        while engine.has_work:
            engine.step()
        loops[spec] = ClosedLoop(engine, prompts, args.streams, params)
    order = list(loops.items())
    for round_no in itertools.count():
        if all(loop.done for _, loop in order):
            break
        first = round_no % len(order)  # every engine steps first in a round as often
        for spec, loop in order[first:] + order[:first]:
            if not loop.done:
                if timers is not None:
                    timers.current = spec
                loop.step()
    base = loops[specs[0]].totals
    report = []
    for spec in specs:
        t = loops[spec].totals
        other_s = t["time_s"] - t["forward_s"] - t["draft_s"]
        point = {
            "config": spec,
            **t,
            "aggregate_tok_s": t["tokens"] / t["time_s"],
            "speedup": (t["tokens"] / t["time_s"]) / (base["tokens"] / base["time_s"]),
            "decode_tok_s": t["decode_tokens"] / t["decode_time_s"],
            "decode_speedup": (t["decode_tokens"] / t["decode_time_s"])
            / (base["decode_tokens"] / base["decode_time_s"]),
            "tau": 1 + t["accepted"] / t["rounds"] if t["rounds"] else 1.0,
            "ms_per_step": {
                "forward": 1e3 * t["forward_s"] / t["steps"],
                "draft": 1e3 * t["draft_s"] / t["steps"],
                "other": 1e3 * other_s / t["steps"],
            },
            "tokens_per_step": t["tokens"] / t["steps"],
            "scheduled_per_step": t["scheduled_tokens"] / t["steps"],
            "profile": loops[spec].profile,
        }
        if timers is not None:
            point["parts_ms_per_step"] = timers.ms_per_step(spec, t["steps"])
        report.append(point)
        ms = point["ms_per_step"]
        print(
            f"{spec:>22}: {point['aggregate_tok_s']:6.1f} tok/s ({point['speedup']:.3f}x; decode "
            f"steps {point['decode_tok_s']:.1f}, {point['decode_speedup']:.3f}x), "
            f"tau {point['tau']:.2f}, {t['steps']:.0f} steps of {point['tokens_per_step']:.1f} "
            f"tokens out / {point['scheduled_per_step']:.1f} in; ms a step: forward "
            f"{ms['forward']:.2f}, drafters {ms['draft']:.2f}, other {ms['other']:.2f}; "
            f"accepted {t['accepted']:.0f} of {t['draft_tokens']:.0f} verified drafts, "
            f"predicted {t['predicted']:.0f}",
            flush=True,
        )
        if timers is not None:
            parts = ", ".join(f"{k} {v:.2f}" for k, v in point["parts_ms_per_step"].items())
            print(f"{'':>22}  ms a step by part: {parts}", flush=True)
    print(
        json.dumps(
            {
                "prompts": args.prompts,
                "first": args.first,
                "requests": len(prompts),
                "streams": args.streams,
                "max_tokens": args.max_tokens,
                "weights": loaded.weights,
                "results": report,
            }
        )
    )


if __name__ == "__main__":
    main()
