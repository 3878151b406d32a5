"""One command: per-user speed at matched aggregate throughput, for several serving configurations.

    python -m loadtest.matched --configs none,fixed4,dspark --out results/matched
    python -m loadtest.matched --quick --model fake --configs none,ngram --out /tmp/quick

For each configuration it starts `python -m server` with that configuration's flags, waits for
/ready, and sweeps the offered request rate in open loop with Locust (loadtest/traffic.py,
headless, one subprocess per point), then writes a markdown report with plots (report.py).
The same rates, prompts (in the same order), max_tokens and temperature are used for every
configuration. Rates come from `--rates` or, with `--rates auto`, from a short closed-loop probe
of the first configuration's capacity.

Resumable: every finished point is written to `<out>/<config>/rate_<r>.json` (with the raw
per-request records next to it) and skipped when the command is run again with the same
workload; a changed workload is refused unless `--fresh` is given.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadtest.analysis import PointSummary, Slo, read_records, summarize_point
from loadtest.pacing import pool_size
from loadtest.records import token_times
from loadtest.report import write_report
from loadtest.runtime import ServerProcess, free_port, scrape_counters, subtract

TRAFFIC = Path(__file__).resolve().with_name("traffic.py")
DRAFTERS = ("ngram", "eagle3", "dflash", "dspark")
QUICK_FRACTIONS = (0.25, 0.6, 1.0)
FULL_FRACTIONS = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0, 1.2)


def config_args(spec: str, drafter: str = "dspark", k: int | None = None) -> tuple[str, list[str]]:
    """Server flags of a configuration name.

    none | dspark | fixed<K> (drafter --drafter, fixed verify length K) | <drafter> |
    <drafter>-fixed<K> | <drafter>-dspark | NAME=<raw server flags>
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
    if head in DRAFTERS:
        if not tail:
            return spec, ["--speculative", head, *kk]
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
    duration_s: float
    model: str


def locust_cmd(
    host: str, rate: float, wl: Workload, records: Path, *, drain_s: float, e2e_budget_s: float
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
        f"{wl.warmup_s + wl.duration_s:g}",
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
        "--records-file",
        str(records),
    ]
    return cmd + (["--ignore-eos"] if wl.ignore_eos else [])


def run_point(
    server: ServerProcess, name: str, rate: float, wl: Workload, out: Path, a: argparse.Namespace
) -> PointSummary:
    records = out / f"rate_{rate:g}.jsonl"
    before = scrape_counters(server.url)
    cmd = locust_cmd(
        server.url, rate, wl, records, drain_s=a.drain_timeout, e2e_budget_s=a.e2e_budget
    )
    limit = wl.warmup_s + wl.duration_s + a.drain_timeout + 60
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
        duration_s=wl.duration_s,
        slo=Slo(a.slo_ttft, a.slo_tpot),
        tol=a.tolerance,
    )
    point.server = subtract(scrape_counters(server.url), before)
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


def probe_capacity(server: ServerProcess, wl: Workload, out: Path, a: argparse.Namespace) -> float:
    """Requests/s the first configuration sustains: closed-loop runs doubling the users until
    token throughput stops growing by 10%. Cached in <out>/probe.json."""
    cached = out / "probe.json"
    if cached.exists():
        return float(json.loads(cached.read_text())["capacity_rps"])
    stages: list[dict[str, float]] = []
    users = 2
    while users <= a.probe_users:
        tok_s, mean_tokens = _closed_loop_tok_s(
            server, wl, out / f"probe_u{users}.jsonl", users, a.probe_seconds, a.drain_timeout
        )
        stages.append({"users": users, "tok_s": tok_s, "rps": tok_s / max(mean_tokens, 1.0)})
        print(f"  probe: {users} users -> {tok_s:.1f} tok/s", flush=True)
        if len(stages) > 1 and tok_s < 1.1 * stages[-2]["tok_s"]:
            break
        users *= 2
    capacity = max(s["rps"] for s in stages)
    if capacity <= 0:
        raise RuntimeError("capacity probe completed no requests; is the server working?")
    cached.write_text(json.dumps({"capacity_rps": capacity, "stages": stages}, indent=1))
    return capacity


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, required=True, help="results folder (resumable)")
    p.add_argument(
        "--configs",
        default="none,dspark",
        help="comma list; first is the baseline. " + (config_args.__doc__ or ""),
    )
    p.add_argument("--drafter", default="dspark", help="drafter used by fixed<K> configs")
    p.add_argument("--k", type=int, default=None, help="--num-speculative-tokens for drafters")
    p.add_argument("--model", default="", help="server --model (empty: server default)")
    p.add_argument(
        "--server-cmd",
        default="{python} -m server --port {port}",
        help="server command template; {python} and {port} are filled in",
    )
    p.add_argument("--server-args", default="", help="extra flags for every configuration")
    p.add_argument("--rates", default="auto", help="comma list of requests/s, or auto")
    p.add_argument("--fractions", default="", help="auto rates as fractions of probed capacity")
    p.add_argument("--probe-users", type=int, default=64, help="most users the probe tries")
    p.add_argument("--probe-seconds", type=float, default=30.0)
    p.add_argument("--mix", default="chat")
    p.add_argument("--endpoint", default="chat", choices=("chat", "completions"))
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at EOS")
    p.add_argument("--prompt-max-chars", type=int, default=1000)
    p.add_argument("--arrival", default="constant", choices=("constant", "poisson"))
    p.add_argument("--warmup", type=float, default=10.0, help="seconds excluded at the start")
    p.add_argument("--duration", type=float, default=60.0, help="measured seconds per point")
    p.add_argument("--drain-timeout", type=float, default=180.0)
    p.add_argument("--e2e-budget", type=float, default=60.0, help="sizes the open-loop pool")
    p.add_argument("--ready-timeout", type=float, default=600.0)
    p.add_argument(
        "--stop-after-saturated",
        type=int,
        default=1,
        help="skip a configuration's higher rates after this many saturated points",
    )
    p.add_argument("--tolerance", type=float, default=0.1, help="achieved vs offered")
    p.add_argument("--slo-ttft", type=float, default=2.0, help="goodput TTFT target, seconds")
    p.add_argument("--slo-tpot", type=float, default=0.1, help="goodput TPOT target, seconds")
    p.add_argument(
        "--quick",
        action="store_true",
        help="3 short points per config, 32 tokens: a few minutes on a small CPU",
    )
    p.add_argument("--fresh", action="store_true", help="discard earlier results in --out")
    p.add_argument("--report-only", action="store_true", help="rewrite the report and exit")
    a = p.parse_args(argv)
    if a.quick:
        # Only the values the user left at their defaults change.
        for key, value in (
            ("max_tokens", 32),
            ("warmup", 3.0),
            ("duration", 12.0),
            ("prompt_max_chars", 300),
            ("probe_seconds", 8.0),
            ("drain_timeout", 60.0),
            ("e2e_budget", 20.0),
        ):
            if getattr(a, key) == p.get_default(key):
                setattr(a, key, value)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    return a


def _rates(a: argparse.Namespace, capacity: float | None) -> list[float]:
    if a.rates != "auto":
        return sorted(float(r) for r in a.rates.split(","))
    assert capacity is not None
    fractions = (
        [float(f) for f in a.fractions.split(",")]
        if a.fractions
        else QUICK_FRACTIONS
        if a.quick
        else FULL_FRACTIONS
    )
    return sorted({round(capacity * f, 3) for f in fractions})


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    out: Path = a.out
    if a.report_only:
        write_report(out)
        return 0
    wl = Workload(
        a.mix,
        a.endpoint,
        a.max_tokens,
        a.temperature,
        not a.no_ignore_eos,
        a.prompt_max_chars,
        a.arrival,
        a.warmup,
        a.duration,
        a.model,
    )
    configs = [config_args(s.strip(), a.drafter, a.k) for s in a.configs.split(",") if s.strip()]
    run_file = out / "run.json"
    if a.fresh and out.exists():
        shutil.rmtree(out)
    if run_file.exists():
        prev = json.loads(run_file.read_text())
        if prev["workload"] != asdict(wl):
            raise SystemExit(
                f"{out} holds results of a different workload; use --fresh or "
                f"another --out\n  was: {prev['workload']}\n  now: {asdict(wl)}"
            )
    out.mkdir(parents=True, exist_ok=True)
    run_info: dict[str, Any] = json.loads(run_file.read_text()) if run_file.exists() else {}
    run_info.update(
        workload=asdict(wl),
        baseline=configs[0][0],
        configs={n: args for n, args in configs},
        slo={"ttft_s": a.slo_ttft, "tpot_s": a.slo_tpot},
    )
    run_info.setdefault("commands", []).append("python -m loadtest.matched " + shlex.join(a.argv))
    run_file.write_text(json.dumps(run_info, indent=2))

    probe = out / "probe.json"
    capacity = json.loads(probe.read_text())["capacity_rps"] if probe.exists() else None
    for name, args in configs:
        cdir = out / name
        cdir.mkdir(exist_ok=True)
        rates = _rates(a, capacity) if (a.rates != "auto" or capacity is not None) else None
        if rates is not None and _nothing_left(cdir, rates, a.stop_after_saturated):
            print(f"[{name}] finished earlier, skipping", flush=True)
            continue
        cmd = a.server_cmd.format(python=sys.executable, port="{port}").split()
        cmd += (["--model", a.model] if a.model else []) + a.server_args.split() + args
        with ServerProcess(cmd, free_port(), cdir / "server.log", a.ready_timeout) as server:
            print(f"[{name}] ready at {server.url} ({' '.join(args)})", flush=True)
            if rates is None:  # only ever the baseline: the probe is cached after it runs
                capacity = probe_capacity(server, wl, out, a)
                rates = _rates(a, capacity)
                print(f"[{name}] probed capacity {capacity:.3f} rps -> rates {rates}", flush=True)
            n_sat = 0
            for rate in rates:
                path = cdir / f"rate_{rate:g}.json"
                if path.exists():
                    point = PointSummary.from_json(json.loads(path.read_text()))
                else:
                    t = time.monotonic()
                    point = run_point(server, name, rate, wl, cdir, a)
                    tmp = path.with_suffix(".tmp")
                    tmp.write_text(json.dumps(point.to_json(), indent=1))
                    tmp.replace(path)
                    print(_describe(point, time.monotonic() - t), flush=True)
                n_sat += point.saturated
                if n_sat >= a.stop_after_saturated:
                    break
    report = write_report(out)
    print(f"report: {report}", flush=True)
    return 0


def _describe(p: PointSummary, took_s: float) -> str:
    sat = f" SATURATED: {'; '.join(p.reasons)}" if p.saturated else ""
    return (
        f"[{p.config}] {p.offered_rps:g} rps: {p.agg_tok_s:.1f} tok/s aggregate, "
        f"{p.per_user_tok_s:.1f} tok/s per user, TTFT p50 {p.ttft_s['p50']:.2f}s "
        f"({took_s:.0f}s){sat}"
    )


def _nothing_left(cdir: Path, rates: list[float], limit: int) -> bool:
    """True if every rate is done, or the done prefix already hit the saturation limit."""
    n = 0
    for r in rates:
        path = cdir / f"rate_{r:g}.json"
        if not path.exists():
            return False
        n += PointSummary.from_json(json.loads(path.read_text())).saturated
        if n >= limit:
            return True
    return True


if __name__ == "__main__":
    raise SystemExit(main())
