"""Offline acceptance evaluation of a trained drafter (DeepSpec protocol, dspark.md §4.3-4.4).

    python -m drafts.train.evaluate --drafter dspark --temperature 0 --limit 10 --json out.json
    python -m drafts.train.evaluate --drafter eagle3 --prompts FILE.jsonl --temperature 1 --limit 20

Reports tau (mean accepted length per round, bonus included, gamma = 7, lossless rule),
per-position acceptance (unconditional and conditional) and, for DSpark, the per-position
calibration error of the cumulative confidence before and after STS.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from drafts.common import StsTable
from drafts.offline import GenResult, speculative_generate
from drafts.registry import available, build_proposer, describe, get
from drafts.train.data import MATH_SUFFIX, data_dir, encode_chat, prompt_of, read_jsonl
from drafts.train.sts import ece_noise_floor, per_position_ece
from scheduler.request import SamplingParams

SEED = 980406
HUMANEVAL_TEMPLATE = (
    "Write a solution to the following problem and make sure that it passes the tests:\n"
    "```python\n{prompt}\n```"
)


def standard_sets(limit: int) -> dict[str, list[str]]:
    """MT-bench first turns, a GSM8K test subset, HumanEval; shuffled with DeepSpec's seed."""
    root = data_dir()
    sets = {
        "mt_bench": [prompt_of(r) for r in read_jsonl(root / "mt_bench" / "question.jsonl")],
        "gsm8k": [prompt_of(r) + MATH_SUFFIX for r in read_jsonl(root / "gsm8k" / "test.jsonl")],
        "humaneval": [
            HUMANEVAL_TEMPLATE.format(prompt=r["prompt"])
            for r in read_jsonl(root / "humaneval" / "HumanEval.jsonl.gz")
        ],
    }
    for v in sets.values():
        random.Random(SEED).shuffle(v)
    return {k: v[:limit] for k, v in sets.items()}


def load_prompts(path: Path, limit: int) -> list[str]:
    return [prompt_of(r) for r in read_jsonl(path)][:limit]


def model_drafters() -> list[str]:
    """The drafters this evaluates: those with a draft model (it reads target features)."""
    return [n for n in available() if n != "none" and get(n).model is not None]


def summarize(results: list[GenResult], gamma: int, sts: StsTable | None) -> dict[str, Any]:
    rounds = [r for res in results for r in res.rounds]
    n = max(len(rounds), 1)
    proposed = [sum(1 for r in rounds if r.proposed > k) for k in range(gamma)]
    acc = [sum(1 for r in rounds if r.accepted > k) for k in range(gamma)]
    out: dict[str, Any] = {
        "tau": sum(r.tau for r in rounds) / n,
        "rounds": len(rounds),
        "output_tokens": sum(len(res.output_ids) for res in results),
        "accept_unconditional": [a / p if p else None for a, p in zip(acc, proposed, strict=True)],
        "accept_conditional": [
            acc[k] / (acc[k - 1] if k else proposed[0])
            if (acc[k - 1] if k else proposed[0])
            else None
            for k in range(gamma)
        ],
    }
    full = [
        r
        for r in rounds
        if r.conf_logits is not None and r.proposed == gamma and len(r.conf_logits) == gamma
    ]
    if full:
        z = torch.tensor([r.conf_logits for r in full])
        a = torch.tensor([r.accepted for r in full])
        out["calibration_error_before"] = per_position_ece(z, a, StsTable())
        if sts:
            out["calibration_error_after"] = per_position_ece(z, a, sts)
        # what sampling noise alone gives on this many rounds, for the table in use
        out["calibration_error_floor"] = ece_noise_floor(z, sts or StsTable())
        out["calibration_rounds"] = len(full)
        # raw head outputs and outcomes, so a later STS table can be scored on the same rounds
        out["calibration_data"] = {"conf_logits": z.tolist(), "accepted": a.tolist()}
    return out


def run_set(
    target: Any,
    proposer: Any,
    tokenizer: Any,
    prompts: list[str],
    temperature: float,
    max_tokens: int,
    gamma: int,
    seed: int,
    progress: Any = None,
) -> list[GenResult]:
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
    gen = torch.Generator().manual_seed(seed)
    eos = {int(tokenizer.eos_token_id)}
    it = progress(prompts) if progress else prompts
    return [
        speculative_generate(
            target, proposer, encode_chat(tokenizer, p), params, gamma, eos, f"eval-{i}", gen
        )
        for i, p in enumerate(it)
    ]


def evaluate(
    drafter: str,
    target: Any,
    tokenizer: Any,
    sets: dict[str, list[str]],
    temperature: float,
    max_tokens: int,
    gamma: int = 7,
    checkpoint: str | None = None,
    seed: int = SEED,
    progress: Any = None,
) -> dict[str, Any]:
    proposer = build_proposer(drafter, target, checkpoint, gamma)
    if proposer is None:
        raise ValueError("nothing to evaluate: choose a drafter and gamma > 0")
    cfg = getattr(proposer, "cfg", None)  # a trained draft's config carries its STS tables
    sts = (cfg.sts_for(temperature) or None) if cfg is not None else None
    report: dict[str, Any] = {
        "drafter": drafter,
        "temperature": temperature,
        "gamma": gamma,
        "max_tokens": max_tokens,
        "datasets": {},
    }
    for name, prompts in sets.items():
        t0 = time.time()
        res = run_set(
            target, proposer, tokenizer, prompts, temperature, max_tokens, gamma, seed, progress
        )
        s = summarize(res, gamma, sts)
        s.update(prompts=len(prompts), wall_s=round(time.time() - t0, 1))
        report["datasets"][name] = s
    taus = [d["tau"] for d in report["datasets"].values()]
    report["macro_tau"] = sum(taus) / max(len(taus), 1)
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__ + "\ndrafters:\n" + describe(model_drafters()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--drafter", required=True, choices=model_drafters())
    ap.add_argument("--checkpoint", default=None, help="draft folder (default: the shipped one)")
    ap.add_argument("--model", default=None, help="target model (default: the embedded SmolLM2)")
    ap.add_argument(
        "--prompts", type=Path, default=None, help="JSONL; omitted: MT-bench, GSM8K, HumanEval"
    )
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--limit", type=int, default=10, help="prompts per dataset")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--gamma", type=int, default=7)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="where the float32 target and draft run")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from tqdm import tqdm

    from scheduler.loader import DEFAULT_MODEL, load_target

    m = load_target(args.model or DEFAULT_MODEL, dtype="float32")
    m.hf_model.to(args.device)  # the draft follows the target's device (make_proposer)
    sets = (
        {args.prompts.stem: load_prompts(args.prompts, args.limit)}
        if args.prompts
        else standard_sets(args.limit)
    )
    rep = evaluate(
        args.drafter,
        m.hf_model,
        m.tokenizer,
        sets,
        args.temperature,
        args.max_tokens,
        args.gamma,
        args.checkpoint,
        args.seed,
        progress=tqdm,
    )
    text = json.dumps(rep, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
