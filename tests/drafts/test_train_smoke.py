"""A few CPU steps of the lockstep trainer on a tiny random target: every method's loss falls,
the run resumes from its state file, and checkpoints round-trip without the target's weights."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from drafts.checkpoint import load_draft, save_draft
from drafts.train.trainer import TrainConfig, train


def _rows() -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(0)
    # answers follow a fixed stride, so the next token is learnable from the previous ones
    return [
        {
            "prompt_ids": torch.randint(4, 96, (6,), generator=g).tolist(),
            "answer_ids": [4 + (s + 3 * i) % 90 for i in range(30)],
        }
        for s in (5, 40)
    ]


def _cfg(out: Path, steps: int) -> TrainConfig:
    return TrainConfig(
        out_dir=out,
        steps=steps,
        batch_size=2,
        lr=3e-2,
        warmup_frac=0.0,
        num_anchors=8,
        dspark_layers=1,
        markov_rank=8,
        save_every=2,
    )


def test_loss_falls_and_resume(tiny_target, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with torch.no_grad():  # a realistic embedding scale (HF init is 0.02): sharp, learnable logits
        tiny_target.model.embed_tokens.weight.mul_(40.0)
    first = train(tiny_target, _rows(), _cfg(tmp_path, 4), mask_token_id=3, pad_id=2)
    assert first["steps"] == 4
    resumed = train(tiny_target, _rows(), _cfg(tmp_path, 16), mask_token_id=3, pad_id=2)
    assert resumed["steps"] == 16
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(16))  # resumed at step 4, no step repeated
    for name in ("dflash", "dspark"):
        assert recs[-1][name]["loss"] < 0.92 * recs[0][name]["loss"], name
    # EAGLE-3's soft CE has the target's entropy as a floor; its KL part must fall
    kl = [sum(r["eagle3"][f"kl{k}"] for k in range(7)) for r in (recs[0], recs[-1])]
    assert kl[1] < 0.92 * kl[0], kl


def test_checkpoint_round_trip_excludes_target_weights(tiny_target, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from drafts.train.trainer import build_drafts

    models = build_drafts(tiny_target, _cfg(tmp_path, 1), mask_token_id=3)
    for name, model in models.items():
        save_draft(model, tmp_path / name)
        keys = set(load_file(str(tmp_path / name / "model.safetensors")))
        assert not any("embed" in k or "lm_head" in k for k in keys)
        back = load_draft(tmp_path / name)
        for k, v in model.state_dict().items():
            assert torch.equal(back.state_dict()[k], v.to(torch.bfloat16).float()), (name, k)
        assert back.cfg.to_dict() == model.cfg.to_dict()


def test_cached_features_equal_streamed_ones(tiny_target, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The second epoch reads what the first computed: same features, same target logits, and
    the target does not run again."""
    from drafts.train.features import TargetFeatures
    from drafts.train.trainer import collate, make_sequences

    seqs = make_sequences(_rows(), 64)
    ids, _, lengths = collate(seqs, pad_id=2)
    keys = [k for k, _, _ in seqs]
    vocab = torch.arange(4, 60)
    target = copy.deepcopy(tiny_target).to(torch.bfloat16)
    streamed = TargetFeatures(target, [0, 1], vocab)(keys, ids, lengths)
    cache = TargetFeatures(target, [0, 1], vocab, tmp_path / "cache")
    first = cache(keys, ids, lengths)
    reopened = TargetFeatures(target, [0, 1], vocab, tmp_path / "cache")
    second = reopened(keys, ids, lengths)
    assert reopened.computed_tokens == 0 and cache.computed_tokens == int(lengths.sum())
    for a, b, c in zip(streamed, first, second, strict=True):
        n = int(lengths.min())
        assert torch.equal(a[:, :n], b[:, :n]) and torch.equal(b[:, :n], c[:, :n])
    assert second[1].shape[-1] == vocab.numel()


def test_epochs_shuffle_across_sources_and_group_lengths() -> None:
    from drafts.train.trainer import epoch_batches

    # 64 sequences, in blocks of one source (as the answer file stores them), lengths 10..73
    seqs = [(i, [0] * (10 + i), 0) for i in range(64)]
    one, two = (epoch_batches(seqs, 4, seed=1, epoch=e) for e in (0, 1))
    assert sorted(i for b in one for i in b) == list(range(64))
    assert one != two  # a new order every epoch
    spread = [max(b) - min(b) for b in one]  # a batch spans few lengths, not the whole range
    assert sum(spread) / len(spread) < 64 / 4


def test_init_from_target_continues_the_target(tiny_target) -> None:  # type: ignore[no-untyped-def]
    from drafts.train.trainer import build_drafts

    tc = _cfg(Path("unused"), 1)
    tc.init, tc.methods = "target", ("dspark",)
    model = build_drafts(tiny_target, tc, mask_token_id=3)["dspark"]
    last = tiny_target.model.layers[-1]
    assert torch.equal(model.layers[-1].mlp.up_proj.weight, last.mlp.up_proj.weight)
    feats = torch.randn(5, model.fc.in_features)
    assert torch.allclose(model.fc(feats), feats[:, -32:])  # the last feature layer, passed through


def test_a_continued_draft_keeps_its_vocabulary(tiny_target, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """--init-from takes the draft vocabulary stored with the checkpoint, not one ranked
    afresh from the new answers (the weights' rows are indexed by it)."""
    from drafts.train.__main__ import checkpoint_vocab
    from drafts.train.trainer import build_drafts

    tc = _cfg(tmp_path, 1)
    tc.methods = ("dspark",)
    vocab = torch.tensor([3, 7, 11, 40, 90])
    save_draft(build_drafts(tiny_target, tc, 3, vocab)["dspark"], tmp_path / "with" / "dspark")
    save_draft(build_drafts(tiny_target, tc, 3)["dspark"], tmp_path / "without")
    assert torch.equal(checkpoint_vocab(tmp_path / "with", ("dspark",)), vocab)
    assert checkpoint_vocab(tmp_path / "without", ("dspark",)) is None


@pytest.mark.parametrize(
    ("shipped_vocab", "run_vocab"),
    [((4, 60), (4, 90)), (None, (4, 90)), ((4, 60), None)],
    ids=["wider", "first-vocabulary", "whole-vocabulary"],
)
def test_a_continued_draft_takes_the_runs_vocabulary_and_starts_from_its_weights(
    tiny_target, tmp_path: Path, shipped_vocab, run_vocab
) -> None:  # type: ignore[no-untyped-def]
    """--init-from: the seeded state takes the run's vocabulary (a wider one, a first one, or
    none: the whole vocabulary), training runs over it, and every trained weight starts from
    the checkpoint."""
    from drafts.train.__main__ import seed_from_checkpoint
    from drafts.train.trainer import build_drafts

    tc = _cfg(tmp_path / "run", 1)
    tc.methods, tc.lr = ("dspark",), 1e-9
    shipped_ids = None if shipped_vocab is None else torch.arange(*shipped_vocab)
    vocab = None if run_vocab is None else torch.arange(*run_vocab)
    shipped = build_drafts(tiny_target, tc, 3, shipped_ids)["dspark"]
    save_draft(shipped, tmp_path / "shipped" / "dspark")
    seed_from_checkpoint(tc.out_dir, ("dspark",), tmp_path / "shipped", vocab)
    train(tiny_target, _rows(), tc, mask_token_id=3, pad_id=2, vocab=vocab)
    back = load_draft(tc.out_dir / "dspark")
    if vocab is None:
        assert not hasattr(back, "draft_vocab")
    else:
        assert torch.equal(back.draft_vocab, vocab)
    before = load_draft(tmp_path / "shipped" / "dspark").state_dict()
    for k, v in back.state_dict().items():
        if k != "draft_vocab":
            assert torch.allclose(v, before[k], atol=1e-2), k
