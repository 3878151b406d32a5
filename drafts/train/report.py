"""Results table (markdown) from the evaluation JSONs of a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from drafts.checkpoint import draft_config, load_draft
from drafts.registry import available, trainable


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if pct else f"{x:.2f}"


def write_table(run: Path) -> str:
    evals: dict[tuple[str, float], dict[str, Any]] = {}
    for f in sorted((run / "eval").glob("*.json")):
        rep = json.loads(f.read_text())
        evals[(rep["drafter"], float(rep["temperature"]))] = rep
    if not evals:
        return "no evaluation results"
    datasets = list(next(iter(evals.values()))["datasets"])
    order = available()  # registry order; a drafter it no longer lists goes last
    names = sorted(
        {n for n, _ in evals}, key=lambda n: (order.index(n) if n in order else len(order), n)
    )
    lines = [
        "| method | T | " + " | ".join(datasets) + " | macro tau |",
        "|---|---|" + "---|" * len(datasets) + "---|",
    ]
    for name in names:
        for t in (0.0, 1.0):
            rep = evals.get((name, t))
            if rep is None:
                continue
            cells = [_fmt(rep["datasets"][d]["tau"]) for d in datasets]
            lines.append(
                f"| {name} | {t:g} | " + " | ".join(cells) + f" | {_fmt(rep['macro_tau'])} |"
            )
    lines += ["", "| T | DSpark / EAGLE-3 | DSpark / DFlash |", "|---|---|---|"]
    for t in (0.0, 1.0):
        ds, e3, dfl = (evals.get((n, t)) for n in ("dspark", "eagle3", "dflash"))
        if ds and e3 and dfl:
            lines.append(
                f"| {t:g} | {ds['macro_tau'] / e3['macro_tau']:.3f} | {ds['macro_tau'] / dfl['macro_tau']:.3f} |"
            )
    lines += [
        "",
        "Per-position acceptance (conditional, pooled over datasets):",
        "",
        "| method | T | " + " | ".join(f"k={k + 1}" for k in range(7)) + " |",
        "|---|---|" + "---|" * 7,
    ]
    for (name, t), rep in sorted(evals.items()):
        pooled = []
        for k in range(7):
            vals = [
                d["accept_conditional"][k]
                for d in rep["datasets"].values()
                if d["accept_conditional"][k] is not None
            ]
            pooled.append(sum(vals) / len(vals) if vals else None)
        lines.append(f"| {name} | {t:g} | " + " | ".join(_fmt(v, True) for v in pooled) + " |")
    cal = [
        (t, d, rep["datasets"][d])
        for (n, t), rep in sorted(evals.items())
        if n == "dspark"
        for d in rep["datasets"]
        if "calibration_error_before" in rep["datasets"][d]
    ]
    if cal:
        lines += [
            "",
            (
                "DSpark per-position calibration error (ECE of the cumulative confidence, before ->"
                " after STS; in brackets the floor a perfectly calibrated head would show on as"
                " many rounds):"
            ),
            "",
            "| T | dataset | " + " | ".join(f"k={k + 1}" for k in range(7)) + " |",
            "|---|---|" + "---|" * 7,
        ]
        for t, d, s in cal:
            after = s.get("calibration_error_after") or [None] * 7
            floor = s.get("calibration_error_floor") or [None] * 7  # older runs lack it
            cells = [
                f"{_fmt(b, True)} -> {_fmt(a, True)}"
                + (f" ({_fmt(f, True)})" if f is not None else "")
                for b, a, f in zip(s["calibration_error_before"], after, floor, strict=True)
            ]
            lines.append(f"| {t:g} | {d} | " + " | ".join(cells) + " |")
    sizes = ["", "| method | layers | draft params | checkpoint MB |", "|---|---|---|---|"]
    for name in trainable():
        p = run / "train" / name
        if (p / "model.safetensors").exists():
            model = load_draft(p)
            n = sum(x.numel() for x in model.parameters())
            mb = (p / "model.safetensors").stat().st_size / 2**20
            sizes.append(
                f"| {name} | {draft_config(model).num_layers} | {n / 1e6:.1f} M | {mb:.1f} |"
            )  # type: ignore[attr-defined]
    lines += sizes
    summary = run / "train" / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        lines += [
            "",
            (
                f"Training (shared by the three methods): {s['steps']} steps, {s['sequences']} sequences, "
                f"{s['train_tokens']} answer tokens, {s['wall_s'] / 3600:.2f} h wall, "
                f"{s['cpu_s'] / 3600:.2f} CPU h (process time, all three drafts + target streaming)."
            ),
        ]
    text = "\n".join(lines) + "\n"
    (run / "results.md").write_text(text)
    return text
