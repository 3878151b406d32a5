"""One command: per-user speed at matched aggregate throughput, for several serving configurations.

    python -m loadtest.matched --configs none,fixed4,dspark --publish docs/loadtest
    python -m loadtest.matched --quick --model fake --configs none,ngram --out runs/loadtest/quick

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
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loadtest.analysis import PointSummary, Slo
from loadtest.prompts import load_mix
from loadtest.report import publish, write_report
from loadtest.runtime import ServerProcess
from loadtest.sweep import (
    PointSettings,
    Workload,
    config_args,
    probe_capacity,
    prompt_offsets,
    run_point,
)

QUICK_FRACTIONS = (0.25, 0.6, 1.0)
# Past 1.0 in case the probe underestimated; a sweep stops at its first saturated point anyway.
FULL_FRACTIONS = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0, 1.2, 1.5, 2.0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--out", type=Path, default=Path("runs/loadtest/matched"), help="results folder (resumable)"
    )
    p.add_argument(
        "--publish",
        type=Path,
        default=None,
        help="also copy report.md, plots and points.json here (e.g. docs/loadtest)",
    )
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
    p.add_argument(
        "--min-requests",
        type=int,
        default=30,
        help="extend a low rate's window until this many requests arrive in it",
    )
    p.add_argument("--drain-timeout", type=float, default=180.0)
    p.add_argument("--e2e-budget", type=float, default=60.0, help="sizes the open-loop pool")
    p.add_argument("--ready-timeout", type=float, default=600.0)
    p.add_argument(
        "--stop-after-saturated",
        type=int,
        default=2,
        help="skip a configuration's higher rates after this many saturated points (2: one "
        "noisy point on a busy host does not end the sweep)",
    )
    p.add_argument("--tolerance", type=float, default=0.1, help="achieved vs offered")
    p.add_argument("--slo-ttft", type=float, default=2.0, help="goodput TTFT target, seconds")
    p.add_argument("--slo-tpot", type=float, default=0.1, help="goodput TPOT target, seconds")
    p.add_argument(
        "--quick",
        action="store_true",
        help="3 short points per config, 32 tokens: a few minutes on a small CPU",
    )
    p.add_argument(
        "--interleave",
        action="store_true",
        help="run rate by rate, all configurations in turn (one server start per point): "
        "fairer on a host whose load drifts",
    )
    p.add_argument("--fresh", action="store_true", help="discard earlier results in --out")
    p.add_argument("--report-only", action="store_true", help="rewrite the report and exit")
    a = p.parse_args(argv)
    if a.quick:
        # Only the values the user left at their defaults change.
        for key, value in (
            ("max_tokens", 32),
            ("min_requests", 0),
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
        if a.publish:
            publish(out, a.publish)
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
        a.min_requests,
    )
    settings = PointSettings(
        a.drain_timeout, a.e2e_budget, Slo(a.slo_ttft, a.slo_tpot), a.tolerance
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
        tolerance=a.tolerance,
    )
    run_info.setdefault("commands", []).append("python -m loadtest.matched " + shlex.join(a.argv))
    run_file.write_text(json.dumps(run_info, indent=2))

    probe = out / "probe.json"
    capacity = json.loads(probe.read_text())["capacity_rps"] if probe.exists() else None
    failed: dict[str, str] = {}

    def attempt(name: str, args: list[str], upto: int | None) -> None:
        nonlocal capacity
        if name in failed:
            return
        if capacity is None and a.rates == "auto" and name != configs[0][0]:
            failed[name] = "no rates: the baseline's capacity probe did not run"
            return
        try:
            capacity = sweep_config(name, args, capacity, wl, settings, a, upto)
        except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as e:
            # One broken configuration (say, a drafter without a checkpoint) must not cost the
            # others; its finished points stay on disk and a rerun retries the rest.
            failed[name] = str(e).splitlines()[0] if str(e) else type(e).__name__
            log = out / name / "server.log"
            print(f"[{name}] FAILED: {failed[name]} (server log: {log})", flush=True)

    if not a.interleave:
        for name, args in configs:
            attempt(name, args, None)
    else:
        # Rate by rate, every configuration in turn: slow drifts in a shared host's load then
        # hit all configurations alike instead of whichever happened to run last.
        if capacity is None and a.rates == "auto":
            attempt(*configs[0], 0)  # the probe alone
        n_rates = len(_rates(a, capacity)) if capacity is not None or a.rates != "auto" else 0
        for k in range(1, n_rates + 1):
            for name, args in configs:
                attempt(name, args, k)
    run_info["failed"] = failed
    run_file.write_text(json.dumps(run_info, indent=2))
    report = write_report(out)
    print(f"report: {report}", flush=True)
    if a.publish:
        print(f"published: {publish(out, a.publish)}", flush=True)
    return 1 if failed else 0


def sweep_config(
    name: str,
    args: list[str],
    capacity: float | None,
    wl: Workload,
    settings: PointSettings,
    a: argparse.Namespace,
    upto: int | None = None,
) -> float | None:
    """Run the configuration's missing points among the first `upto` rates (all if None);
    returns the capacity, probed first if needed."""
    cdir = a.out / name
    cdir.mkdir(exist_ok=True)
    # Every rate, not only the first `upto`: each point's prompt offset counts them all.
    every_rate = _rates(a, capacity) if (a.rates != "auto" or capacity is not None) else None
    rates = every_rate[:upto] if every_rate is not None else None
    if rates is not None and _nothing_left(cdir, rates, a.stop_after_saturated):
        print(f"[{name}] finished earlier, skipping", flush=True)
        return capacity
    cmd = a.server_cmd.format(python=sys.executable, port="{port}").split()
    cmd += (["--model", a.model] if a.model else []) + a.server_args.split() + args
    with ServerProcess(cmd, log=cdir / "server.log", ready_timeout=a.ready_timeout) as server:
        print(f"[{name}] ready at {server.url} ({' '.join(args)})", flush=True)
        if rates is None:  # only ever the baseline: the probe is cached after it runs
            capacity = probe_capacity(
                server,
                wl,
                a.out,
                max_users=a.probe_users,
                seconds=a.probe_seconds,
                drain_s=a.drain_timeout,
            )
            every_rate = _rates(a, capacity)
            print(f"[{name}] probed capacity {capacity:.3f} rps -> rates {every_rate}", flush=True)
            rates = every_rate[:upto]
        assert every_rate is not None
        offsets = prompt_offsets(every_rate, wl)
        pool = len(load_mix(wl.mix, max_chars=wl.prompt_max_chars))
        if offsets[every_rate[-1]] + wl.arrivals(every_rate[-1]) > pool:
            print(
                f"[{name}] warning: the points send more than the mix's {pool} prompts, so "
                "later points repeat prompts this server answered (a larger mix or "
                "--prompt-max-chars avoids it)",
                flush=True,
            )
        n_sat = 0
        for rate in rates:
            path = cdir / f"rate_{rate:g}.json"
            if path.exists():
                point = PointSummary.from_json(json.loads(path.read_text()))
            else:
                t = time.monotonic()
                point = run_point(server, name, rate, wl, cdir, settings, offsets[rate])
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(point.to_json(), indent=1))
                tmp.replace(path)
                print(_describe(point, time.monotonic() - t), flush=True)
            n_sat += point.saturated
            if n_sat >= a.stop_after_saturated:
                break
    return capacity


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
