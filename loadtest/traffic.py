"""Locust traffic for dspark-serve (or any OpenAI-compatible streaming server).

    locust -f loadtest/traffic.py -H http://127.0.0.1:8000                      # web UI
    locust -f loadtest/traffic.py -H http://127.0.0.1:8000 --headless -u 4 -r 4 -t 60s --csv out
    locust -f loadtest/traffic.py -H ... --headless --load-shape constant-rate \
        --request-rate 2 --load-duration 60 --records-file points.jsonl       # open loop

Each request streams (`stream_options.include_usage`) and is recorded as:
- the HTTP entry, whose response time is set to the full stream (Locust alone stops the clock
  when the headers arrive);
- METRIC entries ttft_ms, e2e_ms, tpot_us, itl_us, output_tokens, user_tok_per_s, and SPEC entries
  from the per-request speculation stats (acceptance_length_x1000, acceptance_rate_permille,
  draft_tokens, accepted_tokens). They are logged straight into their own stats entries, so they
  show in the UI and `--csv` but stay out of the "Aggregated" row. Values are rounded by Locust's
  bucketing, hence microseconds for TPOT/ITL; exact per-request records go to `--records-file`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# Locust runs this file by path; make the repository importable as in `python -m`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gevent
from locust import HttpUser, events, task
from locust.env import Environment
from locust.runners import LocalRunner

from loadtest.prompts import MIXES, Prompt, load_mix
from loadtest.records import (
    RequestOptions,
    StreamRecord,
    build_body,
    sse_payloads,
)
from loadtest.shapes import OPEN_LOOP, SHAPES, TrafficShape

OUR_OPTIONS: tuple[str, ...] = ()  # filled by the parser hook below, for the records' meta line


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    g = parser.add_argument_group("dspark-serve traffic")
    g.add_argument("--mix", choices=sorted(MIXES), default="chat", help="prompt mix")
    g.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    g.add_argument(
        "--model-name", default="", help="`model` field of each request (empty: left out)"
    )
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument(
        "--ignore-eos",
        action="store_true",
        default=False,
        help="send ignore_eos=true so every request generates max_tokens",
    )
    g.add_argument("--prompt-max-chars", type=int, default=2000, help="drop longer prompts")
    g.add_argument("--prompt-seed", type=int, default=0, help="prompt order and Poisson seed")
    g.add_argument(
        "--prompt-offset",
        type=int,
        default=0,
        help="the run's first prompt in that order: a sweep gives each point prompts that no "
        "earlier point against the same server sent (loadtest/sweep.py)",
    )
    g.add_argument(
        "--load-shape",
        choices=SHAPES,
        default="users",
        help="users: closed loop (-u/-r); constant-rate/step-rate: open loop",
    )
    g.add_argument("--request-rate", type=float, default=1.0, help="offered requests/s")
    g.add_argument("--arrival", choices=("constant", "poisson"), default="constant")
    g.add_argument(
        "--load-duration",
        type=float,
        default=0.0,
        help="seconds of arrivals (0: until -t or stopped)",
    )
    g.add_argument(
        "--drain-timeout",
        type=float,
        default=120.0,
        help="open loop: seconds to let in-flight streams finish after arrivals end",
    )
    g.add_argument(
        "--max-users",
        type=int,
        default=0,
        help="open loop: user pool size (0: 1.5 x rate x --e2e-budget)",
    )
    g.add_argument(
        "--e2e-budget",
        type=float,
        default=30.0,
        help="open loop: the slowest E2E seconds the pool must absorb",
    )
    g.add_argument("--step-rate", type=float, default=1.0, help="step-rate: rate added per stage")
    g.add_argument("--step-users", type=int, default=2, help="step-users: users added per stage")
    g.add_argument("--step-seconds", type=float, default=30.0)
    g.add_argument("--steps", type=int, default=4)
    g.add_argument("--wait-seconds", type=float, default=0.0, help="closed loop think time")
    g.add_argument("--request-timeout", type=float, default=600.0)
    g.add_argument("--records-file", default="", help="write one JSON line per request here")
    global OUR_OPTIONS
    OUR_OPTIONS = tuple(a.dest for a in g._group_actions)


class _RunState:
    """Per-process test state, reset at every test start (the web UI can run several tests)."""

    def __init__(self) -> None:
        self.prompts: list[Prompt] = []
        self.opts = RequestOptions()
        self.records: list[StreamRecord] = []
        self.t0 = time.perf_counter()
        self.next_prompt = 0
        self.prompt_offset = 0


STATE = _RunState()


def _shape(env: Environment) -> TrafficShape | None:
    return env.shape_class if isinstance(env.shape_class, TrafficShape) else None


@events.init.add_listener
def _on_init(environment: Environment, **_: Any) -> None:
    o = environment.parsed_options
    if o is None or isinstance(environment.runner, LocalRunner):
        return
    # The arrival clock lives in the shape, which only the master runs (workers' users would
    # silently fall back to closed loop), and every process would overwrite the records file.
    if o.load_shape in OPEN_LOOP or o.records_file:
        raise SystemExit(
            "--load-shape constant-rate/step-rate and --records-file need a single process "
            "(no --processes, --master or --worker)"
        )


@events.test_start.add_listener
def _on_test_start(environment: Environment, **_: Any) -> None:
    o = environment.parsed_options
    assert o is not None, "run through the locust command line"
    STATE.prompts = load_mix(o.mix, seed=o.prompt_seed, max_chars=o.prompt_max_chars)
    STATE.opts = RequestOptions(
        endpoint=o.endpoint,
        model=o.model_name,
        max_tokens=o.max_tokens,
        temperature=o.temperature,
        ignore_eos=o.ignore_eos,
    )
    STATE.records = []
    STATE.next_prompt = 0
    STATE.prompt_offset = o.prompt_offset
    shape = _shape(environment)
    STATE.t0 = shape.t0 if shape is not None and shape.clock is not None else time.perf_counter()


@events.test_stop.add_listener
def _on_test_stop(environment: Environment, **_: Any) -> None:
    path = environment.parsed_options.records_file if environment.parsed_options else ""
    if path:
        write_records(environment, Path(path))


def write_records(env: Environment, path: Path) -> None:
    """JSONL: a `meta` line (the options, so a result file explains itself), then one per request."""
    o = env.parsed_options
    meta = {k: getattr(o, k, None) for k in OUR_OPTIONS + ("num_users", "spawn_rate", "run_time")}
    meta["host"] = env.host
    shape = _shape(env)
    meta["pool_users"] = shape.pool if shape is not None else None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps({"meta": meta}) + "\n")
        f.writelines(json.dumps(rec.to_json(STATE.t0)) + "\n" for rec in STATE.records)
    os.replace(tmp, path)


def _log(env: Environment, kind: str, name: str, value: float) -> None:
    # Straight into the entry, not events.request: keeps these out of the Aggregated row.
    # Locust types response_time as int but buckets floats fine; keep the precision for averages.
    env.stats.get(name, kind).log(value, 0)  # type: ignore[arg-type]


def log_record(env: Environment, rec: StreamRecord) -> None:
    if not rec.ok:
        return
    assert rec.ttft is not None and rec.e2e is not None
    _log(env, "METRIC", "ttft_ms", rec.ttft * 1e3)
    _log(env, "METRIC", "e2e_ms", rec.e2e * 1e3)
    _log(env, "METRIC", "output_tokens", rec.n_tokens)
    if rec.tpot:
        _log(env, "METRIC", "tpot_us", rec.tpot * 1e6)
        _log(env, "METRIC", "user_tok_per_s", 1.0 / rec.tpot)
    for gap in rec.itl:
        _log(env, "METRIC", "itl_us", gap * 1e6)
    spec = rec.spec or {}
    if spec.get("num_drafts"):
        tau = (
            spec.get("mean_acceptance_length")
            or 1 + spec["num_accepted_tokens"] / spec["num_drafts"]
        )
        _log(env, "SPEC", "acceptance_length_x1000", tau * 1000)
    if spec.get("num_draft_tokens"):
        rate = spec.get("num_accepted_tokens", 0.0) / spec["num_draft_tokens"]
        _log(env, "SPEC", "acceptance_rate_permille", rate * 1000)
        _log(env, "SPEC", "draft_tokens", spec["num_draft_tokens"])
        _log(env, "SPEC", "accepted_tokens", spec.get("num_accepted_tokens", 0.0))


class LLMUser(HttpUser):
    """Streams one generation per task: chat or completions, per `--endpoint`."""

    def wait_time(self) -> float:
        # Open loop paces inside the task (sleep until the claimed slot); closed loop thinks.
        shape = _shape(self.environment)
        if shape is not None and shape.clock is not None:
            return 0.0
        opts = self.environment.parsed_options
        return float(opts.wait_seconds) if opts is not None else 0.0

    @task
    def generate(self) -> None:
        shape = _shape(self.environment)
        t_sched = None
        if shape is not None and shape.clock is not None:
            t_sched = shape.clock.claim()
            if t_sched is None:  # arrivals are over; idle until the shape stops the run
                gevent.sleep(0.5)
                return
            index = shape.clock.claimed - 1  # arrival k always gets prompt k: same workload
        else:
            index = STATE.next_prompt
            STATE.next_prompt += 1
        prompt = STATE.prompts[(STATE.prompt_offset + index) % len(STATE.prompts)]
        # Counted from the claim, not the send: idle users hold future slots, and the shape
        # must not stop while any claimed arrival is still to be sent.
        if shape is not None:
            shape.in_flight += 1
        try:
            if t_sched is not None:
                gevent.sleep(max(0.0, t_sched - time.perf_counter()))
            rec = self.stream(prompt, t_sched)
        finally:
            if shape is not None:
                shape.in_flight -= 1
        STATE.records.append(rec)
        log_record(self.environment, rec)

    def stream(self, prompt: Prompt, t_sched: float | None) -> StreamRecord:
        opts = STATE.opts
        rec = StreamRecord(
            prompt.pid, prompt.category, t_start=time.perf_counter(), t_sched=t_sched
        )
        with self.client.post(
            opts.path,
            json=build_body(prompt, opts),
            stream=True,
            catch_response=True,
            name=f"{opts.path} stream",
            timeout=self.environment.parsed_options.request_timeout,
        ) as resp:
            try:
                if resp.status_code != 200:
                    rec.error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                else:
                    for payload in sse_payloads(resp.iter_lines()):
                        rec.feed(payload, time.perf_counter())
                        if rec.error:
                            break
                    if rec.error is None and not rec.saw_done:
                        rec.error = "stream closed before [DONE]"
            except Exception as e:  # noqa: BLE001  (reset mid-stream, timeouts: a failed request)
                rec.error = f"{type(e).__name__}: {e}"
            rec.finish(time.perf_counter())
            # The fix for streamed responses: report the whole stream, not time-to-headers.
            resp.request_meta["response_time"] = (rec.e2e or 0.0) * 1e3
            resp.request_meta["response_length"] = rec.n_tokens
            if rec.ok:
                resp.success()
            else:
                resp.failure(rec.error)
        return rec
