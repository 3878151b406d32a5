"""The whole draft pipeline in one command, resumable step by step (state under --run-dir):

    python -m drafts.train --run-dir runs/dspark --methods dspark --epochs 3 --ship

1 prompts (every training prompt of ../shared/data)  2 answers regenerated greedily by the
target through our engine (batched)  3 the draft vocabulary (the most frequent answer tokens)
4 training of the named drafters (one method gets the whole budget; several train in lockstep on
the same batches) on target features cached on disk after the first epoch  5 STS calibration of
the DSpark confidence head on held-out prompts  6 evaluation (tau table).

Stop it at any time: a rerun continues from the last saved step (and, with --init-from, a new run
starts from a shipped checkpoint).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from drafts.checkpoint import draft_config, load_draft, save_draft
from drafts.common import StsTable
from drafts.registry import get, trainable
from drafts.train import data
from drafts.train.trainer import TrainConfig, train
from drafts.vocab import extended_vocab, frequent_tokens


def _done(run: Path, step: str) -> bool:
    return (run / f".done-{step}").exists()


def _mark(run: Path, step: str) -> None:
    (run / f".done-{step}").write_text("ok\n")


def calibrate(
    run: Path,
    target: Any,
    tokenizer: Any,
    n_prompts: int,
    max_tokens: int,
    temperature: float,
) -> dict[str, object]:
    """Roll out the DSpark draft with full-length verification on held-out prompts; fit STS."""
    from drafts.proposer import make_proposer
    from drafts.train.evaluate import run_set, summarize
    from drafts.train.sts import fit_sts, per_position_ece

    model = load_draft(run / "train" / "dspark")
    cfg = draft_config(model)
    proposer = make_proposer(model, target, cfg.block_size)
    prompts = [p for _, p in data.calibration_prompts(n_prompts // 3 + 1)][:n_prompts]
    res = run_set(
        target,
        proposer,
        tokenizer,
        prompts,
        temperature,
        max_tokens,
        cfg.block_size,
        7,
        progress=lambda x: tqdm(x, desc="STS rollouts"),
    )
    g = cfg.block_size
    full = [r for x in res for r in x.rounds if r.conf_logits is not None and r.proposed == g]
    z = torch.tensor([r.conf_logits for r in full])
    a = torch.tensor([r.accepted for r in full])
    # kept, so a calibration method can be refitted and compared without new rollouts
    rollouts = {"conf_logits": z.tolist(), "accepted": a.tolist()}
    (run / f"sts_rollouts_T{temperature:g}.json").write_text(json.dumps(rollouts))
    table = fit_sts(z, a)
    cfg.set_sts(temperature, table)
    info = {
        "rounds": len(full),
        "temperature": temperature,
        "sts_temperatures": list(table.temperatures),
        "sts_offsets": list(table.offsets),
        "prompts": len(prompts),
        "ece_before": per_position_ece(z, a, StsTable()),
        "ece_after": per_position_ece(z, a, table),
        "ece_after_temperature_only": per_position_ece(z, a, fit_sts(z, a, offsets=False)),
        "heldout_tau": summarize(res, g, table)["tau"],
    }
    save_draft(model, run / "train" / "dspark", extra={f"sts_T{temperature:g}": info})
    return info


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--run-dir", type=Path, default=Path("runs/dspark"))
    ap.add_argument(
        "--methods", default="dspark", help=f"comma-separated, from {', '.join(trainable())}"
    )
    ap.add_argument(
        "--per-source", type=int, default=0, help="training prompts per source (0: all of them)"
    )
    ap.add_argument(
        "--sources",
        default="",
        help="comma-separated training sources to answer (alpaca, gsm8k, mbpp; empty: all)",
    )
    ap.add_argument(
        "--max-rows", type=int, default=0, help="use at most this many answers (0: all)"
    )
    ap.add_argument("--gen-max-tokens", type=int, default=256)
    ap.add_argument("--gen-temperature", type=float, default=0.0)
    ap.add_argument("--gen-seqs", type=int, default=64, help="sequences the engine decodes at once")
    ap.add_argument(
        "--gen-batch", type=int, default=0, help="prompts per generation batch (0: 8 x gen-seqs)"
    )
    ap.add_argument(
        "--gen-time-budget-min",
        type=float,
        default=0.0,
        help="stop generating after this long and train on the answers so far (0: no limit)",
    )
    ap.add_argument(
        "--generator",
        choices=["auto", "engine", "hf"],
        default="auto",
        help="answer regeneration: our engine (continuous batching) or transformers generate "
        "(auto: the engine on CPU, transformers' batched generate on an accelerator)",
    )
    ap.add_argument("--model", default=None, help="target model (default: the embedded one)")
    ap.add_argument(
        "--device",
        default="cpu",
        help="where the target and the drafts run (cpu, cuda); on an accelerator the target "
        "runs in bf16 and its features are streamed",
    )
    ap.add_argument("--epochs", type=float, default=3.0, help="length of the LR schedule")
    ap.add_argument(
        "--steps", type=int, default=0, help="schedule length in steps (overrides --epochs)"
    )
    ap.add_argument("--time-budget-min", type=float, default=0.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument(
        "--num-anchors", type=int, default=0, help="DSpark/DFlash blocks per sequence (0: all)"
    )
    ap.add_argument("--ce-start-frac", type=float, default=0.0)
    ap.add_argument(
        "--alpha-ce", type=float, default=TrainConfig.alpha_ce,
        help="DSpark's cross-entropy weight (default: the paper's)",
    )
    ap.add_argument(
        "--alpha-tv", type=float, default=TrainConfig.alpha_tv,
        help="DSpark's total-variation weight (default: the paper's)",
    )
    ap.add_argument("--init", choices=["random", "target"], default="random")
    ap.add_argument("--init-from", type=Path, help="start from this checkpoint folder's weights")
    ap.add_argument("--no-autocast", action="store_true", help="train the draft in float32")
    ap.add_argument("--stream-features", action="store_true", help="no feature cache on disk")
    ap.add_argument("--save-every", type=int, default=20, help="steps between saved states")
    ap.add_argument(
        "--snapshot-every-min",
        type=float,
        default=30.0,
        help="minutes of training (process CPU time) between kept copies of the draft, the "
        "points of the training curve (python -m drafts.train.curve)",
    )
    ap.add_argument("--markov-rank", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2, help="DFlash/DSpark backbone layers")
    ap.add_argument(
        "--draft-vocab",
        type=int,
        default=8192,
        help="draft vocabulary: the N most frequent answer tokens (0: the whole vocabulary); "
        "with --init-from, the checkpoint's, widened to N tokens if N is larger",
    )
    ap.add_argument("--calib-prompts", type=int, default=96)
    ap.add_argument("--eval-limit", type=int, default=24)
    ap.add_argument("--eval-max-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument(
        "--ship", action="store_true", help="copy the checkpoints to drafts/checkpoints/"
    )
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument(
        "--stop-after",
        choices=["answers", "train"],
        help="end the pipeline after this step (e.g. generate answers in one process while "
        "another trains with --train-while-generating)",
    )
    ap.add_argument("--skip-calibration", action="store_true", help="no STS fit (A/B runs)")
    ap.add_argument(
        "--eval-temperatures", default="0,1", help="comma-separated sampling temperatures"
    )
    ap.add_argument(
        "--answers",
        type=Path,
        nargs="+",
        help="train on these answer files (default: the run's own), e.g. greedy and sampled "
        "answers to the same prompts (data.read_answer_files keys their features apart)",
    )
    ap.add_argument(
        "--feature-cache", type=Path, help="feature cache folder (default: the run's features/)"
    )
    ap.add_argument(
        "--train-while-generating",
        action="store_true",
        help="train on the answers generated so far (generation runs in another process)",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from scheduler.loader import DEFAULT_MODEL, load_target

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    run: Path = args.run_dir
    run.mkdir(parents=True, exist_ok=True)
    model_name = args.model or DEFAULT_MODEL
    on_cpu = torch.device(args.device).type == "cpu"
    # float32 on CPU (the trainer makes its own bf16 copy for features, generation uses the
    # engine); bf16 on an accelerator, where the features and transformers' generate run from it
    m = load_target(model_name, device=args.device, dtype="float32" if on_cpu else "bfloat16")
    target: Any = m.hf_model
    tok: Any = m.tokenizer
    target.requires_grad_(False)

    sources = {x.strip() for x in args.sources.split(",") if x.strip()} or None
    prompts = data.training_prompts(args.per_source or None, sources=sources)
    print(f"[1/6] prompts: {len(prompts)} from {', '.join(dict.fromkeys(s for s, _ in prompts))}")

    answers = args.answers or [run / "data" / "answers.jsonl"]
    if not args.answers and not _done(run, "answers") and not args.train_while_generating:
        gen = None
        if args.generator == "engine" or (args.generator == "auto" and on_cpu):
            gen = data.engine_generate_fn(
                model_name, args.gen_max_tokens, args.gen_temperature, 1.0, args.gen_seqs
            )
        how = "our engine" if gen is not None else "transformers generate"
        gen = gen or data.hf_generate_fn(
            target, int(tok.eos_token_id), args.gen_max_tokens, args.gen_temperature, 1.0
        )
        print(f"[2/6] regenerating answers (T={args.gen_temperature:g}) with the target via {how}")
        budget_s = args.gen_time_budget_min * 60
        rows_done = data.regenerate_answers(
            prompts,
            tok,
            gen,
            answers[0],
            args.gen_batch or 8 * args.gen_seqs,
            progress=lambda x: tqdm(x, desc="answers"),
            time_budget_s=budget_s,
        )
        if len(rows_done) == len(prompts):
            _mark(run, "answers")
        else:  # a rerun generates the rest
            print(f"[2/6] generation budget spent: {len(rows_done)} of {len(prompts)} answers")
    if args.stop_after == "answers":
        return

    def load_rows() -> list[dict[str, Any]]:
        rows = data.read_answer_files(answers)
        return rows[: args.max_rows] if args.max_rows else rows

    rows = load_rows()
    n_answer = sum(len(r["answer_ids"]) for r in rows)
    print(f"[2/6] answers: {len(rows)} conversations, {n_answer} answer tokens")

    vocab_path = run / "draft_vocab.json"
    if args.draft_vocab and not vocab_path.exists():
        # A continued draft keeps the vocabulary its weights were trained over (new answers
        # would rank the tokens at the margin differently), extended to --draft-vocab tokens.
        ids = checkpoint_vocab(args.init_from, methods) if args.init_from else None
        answer_ids = (r["answer_ids"] for r in rows)
        if ids is None:
            ids = frequent_tokens(answer_ids, args.draft_vocab)
        elif args.draft_vocab > ids.numel():
            ids = extended_vocab(ids, answer_ids, args.draft_vocab)
        vocab_path.write_text(json.dumps(ids.tolist()))
    vocab = torch.tensor(json.loads(vocab_path.read_text())) if args.draft_vocab else None
    print(f"[3/6] draft vocabulary: {'all' if vocab is None else len(vocab)} tokens")

    tc = TrainConfig(
        out_dir=run / "train",
        steps=args.steps or int(args.epochs * len(rows) / args.batch_size),
        batch_size=args.batch_size,
        max_len=args.max_len,
        time_budget_s=args.time_budget_min * 60,
        lr=args.lr,
        num_anchors=args.num_anchors,
        markov_rank=args.markov_rank,
        dspark_layers=args.layers,
        ce_start_frac=args.ce_start_frac,
        alpha_ce=args.alpha_ce,
        alpha_tv=args.alpha_tv,
        save_every=args.save_every,
        snapshot_every_cpu_s=60 * args.snapshot_every_min,
        init="checkpoint" if args.init_from else args.init,
        autocast=not args.no_autocast,
        methods=methods,
        feature_cache=None
        if args.stream_features or not on_cpu
        else args.feature_cache or run / "features",
        device=args.device,
    )
    if args.init_from and not (tc.out_dir / "state.pt").exists():
        seed_from_checkpoint(tc.out_dir, methods, args.init_from, vocab)
    if not _done(run, "train"):
        source = load_rows if args.train_while_generating else rows
        summary = train(
            target,
            source,
            tc,
            mask_token_id=16,
            pad_id=int(tok.eos_token_id),
            vocab=vocab,
            progress=lambda **kw: tqdm(desc="train", mininterval=30, **kw),
        )
        print(f"[4/6] trained: {json.dumps(summary)}")
        _mark(run, "train")
    if args.stop_after == "train":
        return

    # STS per sampling mode: acceptance under greedy verification differs from sampling.
    if "dspark" in methods and not args.skip_calibration:
        for step, temp, name in (("sts", 1.0, "sts.json"), ("sts-greedy", 0.0, "sts_greedy.json")):
            if not _done(run, step):
                info = calibrate(run, target, tok, args.calib_prompts, args.eval_max_tokens, temp)
                (run / name).write_text(json.dumps(info, indent=2))
                _mark(run, step)
            print(f"[5/6] STS (temperature {temp:g}): " + (run / name).read_text())

    if args.ship:
        for name in methods:
            dst = get(name).shipped_checkpoint
            if dst is None:
                print(f"{name} has no shipped checkpoint folder; not shipped")
                continue
            dst.mkdir(parents=True, exist_ok=True)
            for f in ("model.safetensors", "config.json"):
                shutil.copy2(run / "train" / name / f, dst / f)
            print(f"shipped {name} to {dst}")

    if not args.skip_eval:
        from drafts.train.evaluate import evaluate, standard_sets
        from drafts.train.report import write_table

        sets = standard_sets(args.eval_limit)
        for name in methods:
            for temp in (float(t) for t in args.eval_temperatures.split(",")):
                out = run / "eval" / f"{name}_T{temp:g}.json"
                if out.exists():
                    continue
                rep = evaluate(
                    name,
                    target,
                    tok,
                    sets,
                    temp,
                    args.eval_max_tokens,
                    checkpoint=str(run / "train" / name),
                    progress=lambda x, n=name, t=temp: tqdm(x, desc=f"eval {n} T={t:g}"),
                )
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(rep, indent=2))
        print("[6/6] " + write_table(run))


def _draft_folder(checkpoint: Path, name: str) -> Path:
    """`checkpoint` is a folder per method (drafts/checkpoints) or one draft's folder."""
    return checkpoint / name if (checkpoint / name).is_dir() else checkpoint


def checkpoint_vocab(checkpoint: Path, methods: tuple[str, ...]) -> torch.Tensor | None:
    """The draft vocabulary stored with the first of `methods` in `checkpoint` (None: it has
    none, i.e. it drafts over the whole vocabulary)."""
    return getattr(load_draft(_draft_folder(checkpoint, methods[0])), "draft_vocab", None)


def seed_from_checkpoint(
    out_dir: Path, methods: tuple[str, ...], checkpoint: Path, vocab: torch.Tensor | None = None
) -> None:
    """A new run that continues a shipped draft: its weights become step 0's state (fresh
    optimiser), with the run's draft vocabulary (the checkpoint's, or a superset of it)."""
    state: dict[str, Any] = {"models": {}, "opts": {}}
    for name in methods:
        weights = load_draft(_draft_folder(checkpoint, name)).state_dict()
        weights.pop("draft_vocab", None)  # the run's vocabulary decides (None: the whole one)
        if vocab is not None:
            weights["draft_vocab"] = vocab.clone()
        state["models"][name] = weights
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({**state, "step": 0, "elapsed": 0.0, "cpu": 0.0}, out_dir / "state.pt")


if __name__ == "__main__":
    main()
