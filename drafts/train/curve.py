"""The training curve: held-out tau of each snapshot of a run against its training CPU-hours.

    python -m drafts.train.curve --run-dir runs/dspark --method dspark --limit 8 \
        --plot docs/images/dspark_curve.png

The trainer keeps a copy of the draft every half CPU-hour (train/snapshots/<hours>h/); each is
evaluated once (the result is kept next to it, so a rerun only evaluates new snapshots) on the
standard sets at temperature 0, and the run's current draft is evaluated as the last point.
Prints a markdown table and writes the plot with matplotlib.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tqdm import tqdm

from drafts.train.evaluate import evaluate, standard_sets


def points(
    run: Path, method: str, limit: int, max_tokens: int, temperature: float
) -> list[dict[str, Any]]:
    from scheduler.loader import DEFAULT_MODEL, load_target

    m = load_target(DEFAULT_MODEL, dtype="float32")
    sets = standard_sets(limit)
    folders = sorted((run / "train" / "snapshots").glob("*h"))
    out = []
    for folder in folders:
        result = folder / f"eval_{method}_T{temperature:g}_n{limit}.json"
        if not result.exists():
            rep = evaluate(
                method,
                m.hf_model,
                m.tokenizer,
                sets,
                temperature,
                max_tokens,
                checkpoint=str(folder / method),
                progress=lambda x, f=folder.name: tqdm(x, desc=f"eval {f}", leave=False),
            )
            result.write_text(json.dumps(rep, indent=2))
        rep = json.loads(result.read_text())
        info = json.loads((folder / "snapshot.json").read_text())
        out.append(
            {
                "cpu_hours": round(info["cpu_s"] / 3600, 2),
                "step": info["step"],
                "epoch": info["epoch"],
                "positions": info["positions"],
                "macro_tau": round(rep["macro_tau"], 3),
                **{k: round(v["tau"], 3) for k, v in rep["datasets"].items()},
            }
        )
    return out


def table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no snapshots yet"
    sets = [k for k in rows[0] if k not in {"cpu_hours", "step", "epoch", "positions", "macro_tau"}]
    lines = [
        "| CPU-hours | step | epoch | supervised positions | "
        + " | ".join(sets)
        + " | macro tau |",
        "|---|---|---|---|" + "---|" * len(sets) + "---|",
    ]
    for r in rows:
        cells = " | ".join(f"{r[s]:.2f}" for s in sets)
        lines.append(
            f"| {r['cpu_hours']:.2f} | {r['step']} | {r['epoch']} | {r['positions'] / 1e6:.1f} M "
            f"| {cells} | {r['macro_tau']:.2f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    hours = [r["cpu_hours"] for r in rows]
    for key in [k for k in rows[0] if k not in {"cpu_hours", "step", "epoch", "positions"}]:
        style = {"linewidth": 2.5, "color": "black"} if key == "macro_tau" else {"alpha": 0.7}
        ax.plot(hours, [r[key] for r in rows], marker="o", label=key, **style)
    ax.set_xlabel("training CPU-hours")
    ax.set_ylabel("held-out tau (T=0, gamma=7)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def acceptance_plot(run: Path, method: str, path: Path, window: int = 100) -> str:
    """The analytic acceptance the loss computes on each batch (before the update), smoothed
    over `window` steps, against training time, with the epoch boundaries: in the first epoch
    every batch is new to the draft, so that stretch is a held-out measure. Returns a summary
    line per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (run / "train" / "metrics.jsonl").open()]
    acc = [r[method]["accept_rate"] for r in rows]
    smooth = [sum(acc[max(0, i - window + 1) : i + 1]) / len(acc[max(0, i - window + 1) : i + 1])
              for i in range(len(acc))]  # fmt: skip
    minutes = [r["elapsed_s"] / 60 for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(minutes, smooth, color="black")
    lines = []
    for epoch in sorted({r["epoch"] for r in rows}):
        idx = [i for i, r in enumerate(rows) if r["epoch"] == epoch]
        ax.axvline(minutes[idx[0]], color="grey", alpha=0.3)
        mean = sum(acc[i] for i in idx) / len(idx)
        lines.append(f"epoch {epoch}: steps {idx[0]}-{idx[-1]}, mean acceptance {mean:.1%}")
    ax.set_xlabel("training minutes")
    ax.set_ylabel(f"batch acceptance (mean of {window} steps)")
    ax.set_title(f"{method}: acceptance on each batch before its update")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--run-dir", type=Path, default=Path("runs/dspark"))
    ap.add_argument("--method", default="dspark")
    ap.add_argument("--limit", type=int, default=8, help="prompts per evaluation set")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--plot", type=Path, help="write the curve as a PNG here")
    ap.add_argument(
        "--acceptance-plot",
        type=Path,
        help="instead: plot the per-batch acceptance of train/metrics.jsonl as a PNG here",
    )
    args = ap.parse_args(argv)
    if args.acceptance_plot:
        print(acceptance_plot(args.run_dir, args.method, args.acceptance_plot))
        return
    rows = points(args.run_dir, args.method, args.limit, args.max_tokens, args.temperature)
    (args.run_dir / "curve.json").write_text(json.dumps(rows, indent=2))
    print(table(rows))
    if args.plot and rows:
        plot(rows, args.plot, f"{args.method}: held-out tau against training CPU time")


if __name__ == "__main__":
    main()
