"""Markdown report and PNG plots from a matched-throughput results folder.

python -m loadtest.report results/matched       # rewrites results/matched/report.md + PNGs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt
from matplotlib.lines import Line2D

from loadtest.analysis import (
    Frontier,
    Matched,
    PointSummary,
    Slo,
    matched_speedup,
    max_goodput_rate,
    read_records,
    summarize_point,
)

PLOTS = ("frontier.png", "speedup.png", "latency.png", "goodput.png")
CLAIM = "DeepSeek report 1.60-1.85x (V4-Flash) and 1.57-1.78x (V4-Pro) in production"


def load_points(
    out: Path, slo: Slo | None = None, tol: float = 0.1
) -> dict[str, list[PointSummary]]:
    """Every point under `out`. With `slo`, goodput and saturation are recomputed from the raw
    records (so a report can apply another latency target without rerunning anything)."""
    run = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
    warmup = float(run.get("workload", {}).get("warmup_s", 0.0))
    points: dict[str, list[PointSummary]] = {}
    for path in sorted(out.glob("*/rate_*.json")):
        p = PointSummary.from_json(json.loads(path.read_text()))
        records = path.with_suffix(".jsonl")
        if slo is not None and records.exists():
            _, recs = read_records(records)
            again = summarize_point(
                recs,
                config=p.config,
                offered_rps=p.offered_rps,
                warmup_s=warmup,
                duration_s=p.window_s,
                slo=slo,
                tol=tol,
            )
            again.server, again.host_load = p.server, p.host_load
            p = again
        points.setdefault(p.config, []).append(p)
    for ps in points.values():
        ps.sort(key=lambda p: p.offered_rps)
    return points


def _ordered(run: dict[str, Any], points: dict[str, list[PointSummary]]) -> list[str]:
    names = [n for n in run.get("configs", {}) if n in points]
    return names + sorted(n for n in points if n not in names)


def _style(i: int) -> dict[str, Any]:
    return {"color": f"C{i}", "marker": "os^Dv<>p"[i % 8]}


def plot_frontier(points: dict[str, list[PointSummary]], names: list[str], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    handles = []
    for i, n in enumerate(names):
        st = _style(i)
        f = Frontier.from_points(points[n])
        ax.plot(f.x, f.y, "-", color=st["color"])
        ax.plot(f.x, f.measured, st["marker"], color=st["color"])
        handles.append(Line2D([], [], color=st["color"], marker=st["marker"], label=n))
        sat = [p for p in points[n] if p.saturated]
        ax.plot(
            [p.agg_tok_s for p in sat],
            [p.per_user_tok_s for p in sat],
            st["marker"],
            mfc="none",
            color=st["color"],
        )
    ax.set_xlabel("aggregate output tokens/s")
    ax.set_ylabel("per-user tokens/s (1 / median TPOT)")
    ax.set_title("Per-user speed vs aggregate throughput")
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.text(
        0.01,
        0.01,
        "lines: fitted frontiers; filled: measured; hollow: saturated (not used)",
        fontsize=7,
        color="dimgrey",
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_speedup(matched: list[Matched], names: list[str], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for m in matched:
        i = names.index(m.candidate)
        ax.plot(m.x, m.ratio, "-", color=f"C{i}", label=f"{m.candidate} / {m.baseline}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("aggregate output tokens/s (matched)")
    ax.set_ylabel("per-user speedup")
    ax.set_title("Per-user speedup at matched aggregate throughput")
    ax.grid(alpha=0.3)
    if matched:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_latency(points: dict[str, list[PointSummary]], names: list[str], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.0))
    for ax, key, label in ((axes[0], "ttft_s", "TTFT (s)"), (axes[1], "tpot_s", "TPOT (ms)")):
        scale = 1e3 if key == "tpot_s" else 1.0
        for i, n in enumerate(names):
            ps = points[n]
            rates = [p.offered_rps for p in ps]
            for q, ls in (("p50", "-"), ("p99", "--")):
                ax.plot(
                    rates,
                    [getattr(p, key)[q] * scale for p in ps],
                    ls,
                    color=f"C{i}",
                    marker=_style(i)["marker"],
                    ms=4,
                    label=f"{n} {q}",
                )
        ax.set_xlabel("offered requests/s")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if key == "ttft_s":
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle("Latency percentiles vs offered load")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_goodput(
    points: dict[str, list[PointSummary]], names: list[str], slo: Slo, path: Path
) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    top = 0.0
    for i, n in enumerate(names):
        ps = points[n]
        ax.plot(
            [p.offered_rps for p in ps],
            [p.goodput_rps for p in ps],
            "-",
            color=f"C{i}",
            marker=_style(i)["marker"],
            label=n,
        )
        top = max([top] + [p.offered_rps for p in ps])
    ax.plot([0, top], [0, top], ":", color="grey", lw=0.8, label="offered")
    ax.set_xlabel("offered requests/s")
    ax.set_ylabel("goodput (requests/s within SLO)")
    ax.set_title(f"Goodput (TTFT <= {slo.ttft_s:g}s, TPOT <= {slo.tpot_s * 1e3:g}ms)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def points_table(ps: list[PointSummary]) -> list[str]:
    rows = [
        (
            "| offered rps | sent rps | achieved rps | aggregate tok/s | per-user tok/s | TTFT p50 / p99 s"
            " | TPOT p50 / p99 ms | goodput rps | SLO met | tau | requests | host load | status |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in ps:
        status = "saturated: " + "; ".join(p.reasons) if p.saturated else "ok"
        rows.append(
            f"| {p.offered_rps:g} | {p.sent_rps:.2f} | {p.achieved_rps:.2f} | {p.agg_tok_s:.1f}"
            f" | {p.per_user_tok_s:.1f} | {_f(p.ttft_s['p50'])} / {_f(p.ttft_s['p99'])}"
            f" | {_f(p.tpot_s['p50'] * 1e3, '.1f')} / {_f(p.tpot_s['p99'] * 1e3, '.1f')}"
            f" | {p.goodput_rps:.2f} | {p.slo_attainment:.0%} | {_f(p.mean_acceptance_length)}"
            f" | {p.n_ok} | {_f(p.host_load, '.1f')} | {status} |"
        )
    return rows


def equal_rate_rows(base: list[PointSummary], cand: list[PointSummary]) -> list[str]:
    by_rate = {p.offered_rps: p for p in cand}
    rows = []
    for b in base:
        c = by_rate.get(b.offered_rps)
        if c is None or b.saturated or c.saturated or not b.per_user_tok_s:
            continue
        rows.append(
            f"| {b.offered_rps:g} | {b.agg_tok_s:.1f} / {c.agg_tok_s:.1f} | "
            f"{b.per_user_tok_s:.1f} | {c.per_user_tok_s:.1f} | "
            f"{c.per_user_tok_s / b.per_user_tok_s:.2f}x |"
        )
    return rows


def _context(
    out: Path, slo: Slo | None
) -> tuple[dict[str, Any], Slo, dict[str, list[PointSummary]]]:
    """run.json, the SLO in force (argument, else the run's), and the points judged by it."""
    run = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
    if slo is None:
        slo = Slo(**run["slo"]) if "slo" in run else Slo()
    return run, slo, load_points(out, slo, float(run.get("tolerance", 0.1)))


def write_report(out: Path, slo: Slo | None = None) -> Path:
    run, slo, points = _context(out, slo)
    names = _ordered(run, points)
    if not names:
        raise SystemExit(f"no results under {out}")
    baseline = run.get("baseline", names[0])
    if baseline not in points:
        baseline = names[0]
    frontiers = {n: Frontier.from_points(points[n]) for n in names}
    matched = [
        m
        for n in names
        if n != baseline
        if (m := matched_speedup(frontiers[baseline], frontiers[n], baseline=baseline, candidate=n))
        is not None
    ]
    plot_frontier(points, names, out / PLOTS[0])
    plot_speedup(matched, names, out / PLOTS[1])
    plot_latency(points, names, out / PLOTS[2])
    plot_goodput(points, names, slo, out / PLOTS[3])

    wl = run.get("workload", {})
    md = ["# Matched-throughput load test", ""]
    md += [
        (
            "Per-user decode speed of each configuration compared with the baseline "
            f"(`{baseline}`) at equal aggregate throughput, from open-loop sweeps of the offered "
            "request rate (method: `loadtest/README.md`)."
        ),
        "",
    ]
    md += ["## Headline", ""]
    loads = [p.host_load for ps in points.values() for p in ps if p.host_load is not None]
    cpus = os.cpu_count() or 1
    if loads and max(loads) > 1.5 * cpus:
        md += [
            (
                f"**Warning: the host was busy** (1-minute load average up to "
                f"{max(loads):.1f} on {cpus} CPUs): other work competed with the server, so "
                "points are noisy and the comparison is unreliable. Rerun on a quiet machine "
                "(`--interleave` spreads slow drifts over all configurations but cannot remove "
                "them)."
            ),
            "",
        ]
    if not matched:
        md += ["No matched comparison: fewer than two unsaturated points in a common range.", ""]
    for m in matched:
        s = m.stats()
        md.append(
            f"- **{m.candidate}** vs {baseline}: per-user speedup {s['min']:.2f}x to "
            f"{s['max']:.2f}x (median {s['median']:.2f}x) over {s['x_lo']:.1f} to "
            f"{s['x_hi']:.1f} aggregate tok/s, the range where both are unsaturated."
        )
    md += ["", f"For scale: {CLAIM}; their baseline is MTP-1, not plain decoding.", ""]
    for n, why in run.get("failed", {}).items():
        md += [f"- **{n} failed**: {why} (see `{n}/server.log` in the results folder)"]
    md += ["![per-user vs aggregate](frontier.png)", "", "![speedup](speedup.png)", ""]
    md += ["![latency](latency.png)", "", "![goodput](goodput.png)", ""]
    md += [
        "## Goodput",
        "",
        (
            f"SLO: TTFT <= {slo.ttft_s:g} s and TPOT <= {slo.tpot_s * 1e3:g} ms. "
            "Max rate = highest offered rate with >= 90% of requests within the SLO."
        ),
        "",
        "| config | max rate within SLO (rps) | best goodput (rps) |",
        "|---|---|---|",
    ]
    for n in names:
        best = max(p.goodput_rps for p in points[n])
        md.append(f"| {n} | {max_goodput_rate(points[n]):g} | {best:.2f} |")
    md += [""]
    for n in names:
        if n != baseline:
            rows = equal_rate_rows(points[baseline], points[n])
            if rows:
                md += [
                    f"## {n} vs {baseline} at equal offered rate",
                    "",
                    (
                        "| offered rps | aggregate tok/s (base / cand) | base per-user tok/s | "
                        "cand per-user tok/s | speedup |"
                    ),
                    "|---|---|---|---|---|",
                    *rows,
                    "",
                ]
    md += ["## Points", ""]
    for n in names:
        flags = " ".join(run.get("configs", {}).get(n, []))
        md += [f"### {n}", "", f"Server flags: `{flags}`" if flags else "", ""]
        md += points_table(points[n]) + [""]
    md += ["## Setup", ""]
    md += [f"- Workload: {', '.join(f'{k}={v}' for k, v in wl.items())}"]
    if (out / "probe.json").exists():
        cap = json.loads((out / "probe.json").read_text())["capacity_rps"]
        md += [f"- Rates: fractions of the baseline's probed capacity ({cap:.3f} rps)"]
    md += [
        (
            f"- Machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}, "
            f"Python {sys.version.split()[0]}"
        )
    ]
    if loads:
        cpus = os.cpu_count() or 1
        contended = " (above the CPU count: other work competed with the server)"
        md += [
            f"- Host 1-minute load average at the end of each point: {min(loads):.1f} to "
            f"{max(loads):.1f} on {cpus} CPUs" + (contended if max(loads) > cpus else "")
        ]
    md += ["- Command(s):", "", "```"] + run.get("commands", []) + ["```", ""]
    md += [
        (
            "Per-user tok/s is 1 / median TPOT of requests that arrived in the measured window; "
            "aggregate tok/s counts output tokens emitted in the window. Saturated points "
            "(achieved below offered, queue growth or errors) are hollow in the frontier plot and "
            "excluded from the matched comparison. Raw per-request records: "
            "`<config>/rate_<r>.jsonl`."
        )
    ]
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path


def publish(out: Path, dest: Path, slo: Slo | None = None) -> Path:
    """Copy the report and plots to `dest` (e.g. docs/loadtest), plus every point's summary in
    one `points.json`; the raw per-request records stay in `out`."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("report.md", *PLOTS):
        shutil.copyfile(out / name, dest / name)
    run, slo, loaded = _context(out, slo)
    points = {n: [p.to_json() for p in ps] for n, ps in loaded.items()}
    run["slo"] = asdict(slo)
    (dest / "points.json").write_text(json.dumps({"run": run, "points": points}, indent=1) + "\n")
    return dest / "report.md"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Rewrite the report of a matched-throughput run.")
    p.add_argument("out", type=Path, help="results folder of loadtest.matched")
    p.add_argument("--publish", type=Path, help="also copy report + plots here")
    p.add_argument("--slo-ttft", type=float, help="goodput TTFT target, s (default: the run's)")
    p.add_argument("--slo-tpot", type=float, help="goodput TPOT target, s (default: the run's)")
    a = p.parse_args(argv)
    slo = None
    if a.slo_ttft is not None or a.slo_tpot is not None:
        run = json.loads((a.out / "run.json").read_text()) if (a.out / "run.json").exists() else {}
        base = Slo(**run["slo"]) if "slo" in run else Slo()
        slo = Slo(a.slo_ttft or base.ttft_s, a.slo_tpot or base.tpot_s)
    print(write_report(a.out, slo))
    if a.publish:
        print(publish(a.out, a.publish, slo))


if __name__ == "__main__":
    main()
