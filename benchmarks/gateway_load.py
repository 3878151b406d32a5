"""Shared pieces of the gateway benchmarks: start a server or use one, classify outcomes.

Every request ends in exactly one outcome:
  ok        200 and a complete body (non-streaming) or a stream ending in a finish_reason + [DONE]
  rejected  429 or 503 carrying Retry-After (the documented overload answer)
  dropped   the client hung up on purpose (disconnect tests)
  lost      anything else: 5xx, a connection error, a timeout, a truncated stream
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loadtest.runtime import ServerProcess, server_command

ROOT = Path(__file__).resolve().parents[1]
MSGS = [{"role": "user", "content": "Tell me about speculative decoding."}]


@dataclass
class Outcome:
    kind: str  # ok | rejected | dropped | lost
    latency_s: float
    detail: str = ""


@dataclass
class Tally:
    outcomes: list[Outcome] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(o.kind == kind for o in self.outcomes)

    def latencies(self, kind: str) -> list[float]:
        return sorted(o.latency_s for o in self.outcomes if o.kind == kind)

    def summary(self) -> dict[str, Any]:
        lost = [o.detail for o in self.outcomes if o.kind == "lost"]
        return {
            "tried": len(self.outcomes),
            "ok": self.count("ok"),
            "rejected": self.count("rejected"),
            "dropped": self.count("dropped"),
            "lost": len(lost),
            "lost_examples": lost[:5],
            "ok_latency_p50_s": pct(self.latencies("ok"), 50),
            "ok_latency_p99_s": pct(self.latencies("ok"), 99),
            "reject_latency_p50_s": pct(self.latencies("rejected"), 50),
            "reject_latency_p99_s": pct(self.latencies("rejected"), 99),
        }


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return round(values[k], 4)


async def chat(client: httpx.AsyncClient, base: str, *, stream: bool, max_tokens: int,
               drop_after_lines: int | None = None, timeout_s: float = 120.0) -> Outcome:
    body = {"messages": MSGS, "max_tokens": max_tokens, "stream": stream}
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream("POST", base + "/v1/chat/completions", json=body) as r:
                if r.status_code in (429, 503):
                    await r.aread()
                    ok = "retry-after" in r.headers and "error" in r.json()
                    kind = "rejected" if ok else "lost"
                    return Outcome(kind, time.monotonic() - t0, f"{r.status_code} no Retry-After")
                if r.status_code != 200:
                    await r.aread()
                    return Outcome("lost", time.monotonic() - t0, f"{r.status_code} {r.text[:100]}")
                if not stream:
                    data = json.loads(await r.aread())
                    done = bool(data["choices"] and data["choices"][0]["finish_reason"])
                    return Outcome("ok" if done else "lost", time.monotonic() - t0, "no finish")
                lines, finished, saw_done = 0, False, False
                async for line in r.aiter_lines():
                    if not line:
                        continue
                    lines += 1
                    if drop_after_lines is not None and lines >= drop_after_lines:
                        return Outcome("dropped", time.monotonic() - t0)
                    if line == "data: [DONE]":
                        saw_done = True
                    elif '"finish_reason":"' in line:
                        finished = True
                    elif line.startswith('data: {"error"'):
                        return Outcome("lost", time.monotonic() - t0, line[:120])
                ok = finished and saw_done
                return Outcome("ok" if ok else "lost", time.monotonic() - t0, "truncated stream")
    except (httpx.HTTPError, TimeoutError, json.JSONDecodeError) as exc:
        return Outcome("lost", time.monotonic() - t0, f"{type(exc).__name__}: {exc}"[:120])


def metric(base: str, name: str) -> float | None:
    """One unlabelled-or-first sample of a metric from /metrics."""
    return metrics(base, [name])[name]


def metrics(base: str, names: list[str]) -> dict[str, float | None]:
    """First samples of several metrics from one scrape (a consistent snapshot)."""
    return first_samples(httpx.get(base + "/metrics", timeout=10).text, names)


async def metrics_async(
    client: httpx.AsyncClient, base: str, names: list[str]
) -> dict[str, float | None]:
    """`metrics` for a coroutine that scrapes while requests are in flight: a blocking scrape
    would stall every request of the event loop and add its time to their latencies."""
    return first_samples((await client.get(base + "/metrics", timeout=10)).text, names)


def first_samples(text: str, names: list[str]) -> dict[str, float | None]:
    out: dict[str, float | None] = dict.fromkeys(names)
    for line in text.splitlines():
        for name in names:
            if out[name] is None and line.startswith((name + " ", name + "{")):
                out[name] = float(line.rsplit(" ", 1)[1])
    return out


RSS = "process_resident_memory_bytes"


def rss_mb(base: str) -> float | None:
    return to_mib(metric(base, RSS))


def to_mib(num_bytes: float | None) -> float | None:
    return None if num_bytes is None else round(num_bytes / 2**20, 1)


def spawn_server(args: list[str], env: dict[str, str] | None = None) -> ServerProcess:
    """`python -m server <args>` on a free port, logging warnings to this terminal; started."""
    cmd = server_command("--log-level", "warning", *args)
    return ServerProcess(cmd, ready_timeout=300.0, env=env, cwd=ROOT).start()


def add_common_options(ap: argparse.ArgumentParser, default_server_args: str) -> None:
    """The server to load (--url, or one spawned with --server-args) and the request options."""
    ap.add_argument("--url", help="an already running server (default: spawn one)")
    ap.add_argument("--server-args", default=default_server_args,
                    help="flags for the spawned server")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)


Scenario = Callable[[str], Coroutine[Any, Any, dict[str, Any]]]  # base URL -> result


def run_against_server(url: str | None, server_args: list[str],
                       scenario: Scenario) -> dict[str, Any]:
    """`scenario(base_url)` against `url`, or against a server spawned for it and stopped after
    (then the result also holds its exit code: 0 when it drained and shut down cleanly)."""
    if url is not None:
        return asyncio.run(scenario(url.rstrip("/")))
    server = spawn_server(server_args)
    try:
        result = asyncio.run(scenario(server.url))
    finally:
        code = server.stop()
    result["server_exit_code"] = code
    return result


async def wait_idle(base: str, timeout_s: float = 30.0) -> float:
    """Seconds until the running and waiting gauges read 0 (raises on timeout)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if metric(base, "dspark_num_requests_running") == 0 and \
                metric(base, "dspark_num_requests_waiting") == 0:
            return round(time.monotonic() - t0, 3)
        await asyncio.sleep(0.05)
    raise TimeoutError("server did not go idle")
