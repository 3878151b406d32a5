"""Running one sweep point or a capacity probe with Locust, and the configuration presets.

Each point is a headless Locust subprocess running loadtest/traffic.py in open loop; Locust is
never imported here (it monkey-patches the interpreter with gevent).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from drafts.registry import available
from loadtest.analysis import PointSummary, Slo, read_records, summarize_point
from loadtest.pacing import pool_size
from loadtest.records import token_times
from loadtest.runtime import ServerProcess, scrape_counters, subtract

TRAFFIC = Path(__file__).resolve().with_name("traffic.py")


def config_args(spec: str, drafter: str = "dspark", k: int | None = None) -> tuple[str, list[str]]:
    """Server flags of a configuration name.

    none | dspark | fixed<K> (drafter --drafter, fixed verify length K) | <drafter> (its
    drafts all verified: the fixed policy) | <drafter>-fixed<K> | <drafter>-dspark |
    NAME=<raw server flags>. Every name pins drafter and policy, so a configuration means the
    same whatever the server's defaults are.
    """
    if "=" in spec:
        name, raw = spec.split("=", 1)
        return name.strip(), raw.split()
    kk = ["--num-speculative-tokens", str(k)] if k else []
    if spec == "none":
        return spec, ["--speculative", "none", "--verify-policy", "none"]
    if spec == "dspark":
        return spec, ["--speculative", "dspark", "--verify-policy", "dspark", *kk]
    head, _, tail = spec.partition("-")
    if head.startswith("fixed") and head[5:].isdigit() and not tail:
        return spec, [
            "--speculative",
            drafter,
            "--verify-policy",
            "fixed",
            "--num-speculative-tokens",
            head[5:],
        ]
    if head in available() and head != "none":  # the registry's names (it imports no torch)
        if not tail:
            return spec, ["--speculative", head, "--verify-policy", "fixed", *kk]
        if tail == "dspark":
            return spec, ["--speculative", head, "--verify-policy", "dspark", *kk]
        if tail.startswith("fixed") and tail[5:].isdigit():
            return spec, [
                "--speculative",
                head,
                "--verify-policy",
                "fixed",
                "--num-speculative-tokens",
                tail[5:],
            ]
    raise ValueError(f"unknown configuration {spec!r} (see --help)")


@dataclass(frozen=True)
class Workload:
    """Everything that must be identical across configurations and reruns."""

    mix: str
    endpoint: str
    max_tokens: int
    temperature: float
    ignore_eos: bool
    prompt_max_chars: int
    arrival: str
    warmup_s: float
    duration_s: float  # measured seconds per point, at least
    model: str
    min_requests: int = 0  # low rates measure longer, until this many requests arrived

    def window_s(self, rate: float) -> float:
        return max(self.duration_s, self.min_requests / rate)

    def arrivals(self, rate: float) -> int:
        """At most how many requests a point at `rate` sends: warm-up and window, with room
        for Poisson gaps that run short."""
        return math.ceil(1.25 * rate * (self.warmup_s + self.window_s(rate))) + 4


def prompt_offsets(rates: list[float], wl: Workload) -> dict[float, int]:
    """Each point's first prompt: after every prompt the points before it sent (in `rates`'
    order, the order they run against one server). A server remembers what it served: its
    prefix cache, and the suffix drafter's index over recent responses, which drafts a repeated
    prompt's whole greedy answer. With every point starting at the first prompt, the
    composite's tau rose point by point with the prompts the server had already answered
    (2.3 at the first rate, 5.0 at the sixth; docs/loadtest/report.md)."""
    offsets, start = {}, 0
    for rate in rates:
        offsets[rate] = start
        start += wl.arrivals(rate)
    return offsets


def locust_cmd(
    host: str,
    rate: float,
    wl: Workload,
    records: Path,
    *,
    drain_s: float,
    e2e_budget_s: float,
    prompt_offset: int = 0,
) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(TRAFFIC),
        "--headless",
        "-H",
        host,
        "--only-summary",
        "--loglevel",
        "WARNING",
        "--csv",
        str(records.with_suffix("")),
        "--load-shape",
        "constant-rate",
        "--request-rate",
        f"{rate:g}",
        "--load-duration",
        f"{wl.warmup_s + wl.window_s(rate):g}",
        "--drain-timeout",
        f"{drain_s:g}",
        "--max-users",
        str(pool_size(rate, e2e_budget_s)),
        "--arrival",
        wl.arrival,
        "--mix",
        wl.mix,
        "--endpoint",
        wl.endpoint,
        "--max-tokens",
        str(wl.max_tokens),
        "--temperature",
        f"{wl.temperature:g}",
        "--prompt-max-chars",
        str(wl.prompt_max_chars),
        "--prompt-offset",
        str(prompt_offset),
        "--records-file",
        str(records),
    ]
    return cmd + (["--ignore-eos"] if wl.ignore_eos else [])


@dataclass(frozen=True)
class PointSettings:
    """How points are run and judged (may change between reruns, unlike the Workload)."""

    drain_s: float = 180.0  # let in-flight streams finish after the arrivals
    e2e_budget_s: float = 60.0  # sizes the open-loop user pool
    slo: Slo = field(default_factory=Slo)
    tolerance: float = 0.1  # achieved vs offered


def run_point(
    server: ServerProcess,
    name: str,
    rate: float,
    wl: Workload,
    out: Path,
    ps: PointSettings,
    prompt_offset: int = 0,
) -> PointSummary:
    records = out / f"rate_{rate:g}.jsonl"
    before = scrape_counters(server.url)
    cmd = locust_cmd(
        server.url,
        rate,
        wl,
        records,
        drain_s=ps.drain_s,
        e2e_budget_s=ps.e2e_budget_s,
        prompt_offset=prompt_offset,
    )
    limit = wl.warmup_s + wl.window_s(rate) + ps.drain_s + 60
    log = out / f"rate_{rate:g}.locust.log"
    with open(log, "w") as f:
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=limit, check=False)
    if not records.exists():
        raise RuntimeError(f"locust wrote no records for {name} at {rate:g} rps; see {log}")
    _, recs = read_records(records)
    point = summarize_point(
        recs,
        config=name,
        offered_rps=rate,
        warmup_s=wl.warmup_s,
        duration_s=wl.window_s(rate),
        slo=ps.slo,
        tol=ps.tolerance,
    )
    point.server = subtract(scrape_counters(server.url), before)
    # CPU contention from other processes skews a small host's figures; keep it on record.
    point.host_load = round(os.getloadavg()[0], 2)
    return point


def _closed_loop_tok_s(
    server: ServerProcess, wl: Workload, records: Path, users: int, seconds: float, drain_s: float
) -> tuple[float, float]:
    """(output tok/s, mean output tokens per request) over the second half of a closed-loop run.

    In-flight requests are allowed to finish after the run (--stop-timeout): their tokens inside
    the window count, and only finished requests are recorded.
    """
    cmd = locust_cmd(server.url, 1.0, wl, records, drain_s=0, e2e_budget_s=1)
    cmd[cmd.index("--load-shape") + 1] = "users"
    cmd += [
        "-u",
        str(users),
        "-r",
        str(users),
        "--load-duration",
        f"{seconds:g}",
        "--stop-timeout",
        f"{drain_s:g}",
    ]
    subprocess.run(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=seconds + drain_s + 120,
        check=False,
    )
    _, recs = read_records(records)
    half = seconds / 2  # skip the ramp
    tokens = sum(n for r in recs for t, n in token_times(r) if half <= t < seconds)
    done = [r.n_tokens for r in recs if r.ok]
    return tokens / half, (sum(done) / len(done) if done else float(wl.max_tokens))


def saturated(tok_s: list[float], gain: float = 1.1, patience: int = 2) -> bool:
    """True once the last `patience` probe stages each failed to beat the best earlier stage by
    `gain`: one flat stage can be noise on a shared host."""
    if len(tok_s) <= patience:
        return False
    return all(tok_s[i] < gain * max(tok_s[:i]) for i in range(len(tok_s) - patience, len(tok_s)))


def probe_capacity(
    server: ServerProcess,
    wl: Workload,
    out: Path,
    *,
    max_users: int,
    seconds: float,
    drain_s: float,
) -> float:
    """Requests/s the first configuration sustains: closed-loop runs doubling the users until
    token throughput stops growing by 10% (twice in a row). Cached in <out>/probe.json."""
    cached = out / "probe.json"
    if cached.exists():
        return float(json.loads(cached.read_text())["capacity_rps"])
    stages: list[dict[str, float]] = []
    users = 2
    while users <= max_users:
        tok_s, mean_tokens = _closed_loop_tok_s(
            server, wl, out / f"probe_u{users}.jsonl", users, seconds, drain_s
        )
        stages.append({"users": users, "tok_s": tok_s, "rps": tok_s / max(mean_tokens, 1.0)})
        print(f"  probe: {users} users -> {tok_s:.1f} tok/s", flush=True)
        if saturated([st["tok_s"] for st in stages]):
            break
        users *= 2
    capacity = max(s["rps"] for s in stages)
    if capacity <= 0:
        raise RuntimeError("capacity probe completed no requests; is the server working?")
    cached.write_text(json.dumps({"capacity_rps": capacity, "stages": stages}, indent=1))
    return capacity
