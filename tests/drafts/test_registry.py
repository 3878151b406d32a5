"""The drafter registry: a drafter defined here is registered once and served by the engine;
every trainable drafter's spec resolves; the registry itself loads no torch."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from drafts.checkpoint import build_model, draft_config
from drafts.common import FrozenTargetParts
from drafts.proposer import make_proposer
from drafts.registry import (
    AUTO,
    DrafterSpec,
    available,
    build_proposer,
    get,
    register,
    resolve,
    resolve_auto,
    trainable,
    unregister,
)
from drafts.train.trainer import TrainBatch, TrainConfig
from scheduler.build import build_engine, gate_for
from scheduler.config import EngineConfig
from scheduler.draft_gate import DraftGate
from scheduler.drafter import DraftProposal, DraftRequest
from scheduler.fake import FAKE_TEXT, build_fake_tokenizer
from scheduler.profiler import ThroughputProfile
from scheduler.request import SamplingParams

PROMPT = [5, 6, 7, 8]


class ReferenceTextProposer:
    """Proposes the next tokens of a fixed text, assuming the output follows that text; records
    how many of its drafts were committed (a request's next call shows what it kept)."""

    aux_layer_ids: tuple[int, ...] = ()

    def __init__(self, text_ids: list[int], prompt_len: int, k: int) -> None:
        self.text_ids, self.prompt_len, self.max_draft_tokens = text_ids, prompt_len, k
        self.calls = 0
        self.drafted = 0
        self.kept = 0
        self._last: dict[str, tuple[int, list[int]]] = {}  # req_id -> (context length, drafts)

    def propose(self, requests: Sequence[DraftRequest]) -> DraftProposal:
        self.calls += 1
        out = []
        for r in requests:
            if r.req_id in self._last:
                start, drafts = self._last[r.req_id]
                self.kept += _common_prefix(list(r.token_ids[start:]), drafts)
            done = len(r.token_ids) - self.prompt_len
            drafts = self.text_ids[done : done + r.num_draft_tokens]
            self._last[r.req_id] = (len(r.token_ids), drafts)
            self.drafted += len(drafts)
            out.append(drafts)
        return DraftProposal(out)

    def observe(self, req_id: str, start_pos: int, hidden: torch.Tensor) -> None:
        pass  # reads no target features

    def release(self, req_id: str) -> None:
        self._last.pop(req_id, None)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.fixture
def toy() -> Iterator[list[ReferenceTextProposer]]:
    """Registers the "toy" drafter for one test; yields the proposers it built."""
    text_ids = build_fake_tokenizer().encode(FAKE_TEXT, add_special_tokens=False)
    built: list[ReferenceTextProposer] = []

    def build(target: object, checkpoint: str | None, k: int) -> ReferenceTextProposer:
        built.append(ReferenceTextProposer(text_ids, len(PROMPT), k))
        return built[-1]

    register(DrafterSpec("toy", "drafts the fake model's fixed text", build))
    yield built
    unregister("toy")


def _generate(speculative: str, max_tokens: int) -> list[int]:
    engine = build_engine(
        EngineConfig(
            model="fake",
            speculative=speculative,
            num_speculative_tokens=4,
            verify_policy="fixed",
            profile_on_start=False,
        )
    )
    return engine.generate([PROMPT], SamplingParams(max_tokens=max_tokens, temperature=0.0))[0]


def test_a_drafter_registered_in_one_place_is_served_by_the_engine(
    toy: list[ReferenceTextProposer],
) -> None:
    assert "toy" in available()
    out = _generate("toy", 40)
    (proposer,) = toy
    assert proposer.calls > 0 and proposer.drafted > 0
    assert proposer.kept > 0  # the fake target emits FAKE_TEXT, so the drafts are accepted
    # fewer steps than tokens: each step with accepted drafts emitted several tokens
    assert proposer.calls < len(out)
    assert out == _generate("none", 40)


def test_registration_is_undone_and_names_are_unique(toy: list[ReferenceTextProposer]) -> None:
    with pytest.raises(ValueError, match="already exists"):
        register(DrafterSpec("toy", "again", lambda *a: None))
    with pytest.raises(ValueError, match="already exists"):
        register(DrafterSpec("none", "shadowing no drafting", lambda *a: None))
    unregister("toy")
    assert "toy" not in available()
    register(DrafterSpec("toy", "back for the fixture to remove", lambda *a: None))
    with pytest.raises(ValueError, match="built in"):
        unregister("dspark")


def test_names_and_unknown_drafter() -> None:
    assert available()[0] == "none"
    assert {"ngram", "eagle3", "dflash", "dspark", "deepspec"} <= set(available())
    assert trainable() == ["eagle3", "dflash", "dspark"]
    assert build_proposer("none", None, None, 4) is None
    assert build_proposer("ngram", None, None, 0) is None
    ngram = build_proposer("ngram", None, None, 3)
    assert ngram is not None and ngram.max_draft_tokens == 3
    with pytest.raises(ValueError, match="unknown drafter 'nope'.*ngram.*dspark"):
        build_proposer("nope", None, None, 4)
    with pytest.raises(ValueError, match="checkpoint"):
        build_proposer("deepspec", None, None, 4)  # ships none


@pytest.mark.parametrize("name", trainable())
def test_trainable_spec_resolves_to_a_model_a_proposer_and_a_loss(
    name: str, tiny_target: LlamaForCausalLM
) -> None:
    spec = get(name)
    assert spec.trainable and spec.model is not None and spec.proposer_class is not None
    assert spec.draft_config is not None and spec.loss is not None
    assert spec.shipped_checkpoint is not None
    assert (spec.shipped_checkpoint / "config.json").exists()
    tc = TrainConfig(out_dir=Path("unused"), steps=1, num_anchors=4, dspark_layers=1, markov_rank=4)
    cfg = resolve(spec.draft_config)(tiny_target.config, tc, 3)
    assert cfg.method == name and cfg.hidden_size == tiny_target.config.hidden_size
    model = build_model(cfg)
    assert isinstance(model, resolve(spec.model))
    assert draft_config(model) is cfg
    assert isinstance(make_proposer(model, tiny_target, 4), resolve(spec.proposer_class))
    b, s, layers = 2, 16, len(cfg.aux_layer_ids)
    mask = torch.zeros(b, s, dtype=torch.long)
    mask[:, 4:] = 1
    batch = TrainBatch(
        input_ids=torch.randint(4, 96, (b, s)),
        loss_mask=mask,
        lengths=torch.full((b,), s),
        feats=torch.randn(b, s, layers * cfg.hidden_size),
        target_logits=torch.randn(b, s, cfg.vocab_size),
    )
    parts = FrozenTargetParts(tiny_target.get_input_embeddings(), tiny_target.lm_head)
    res = resolve(spec.loss)(model, parts, batch, tc, torch.Generator().manual_seed(0))
    assert torch.isfinite(res["loss"]) and float(res["loss"].detach()) > 0
    res["loss"].backward()
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())


def test_reading_the_names_loads_no_torch() -> None:
    """`--speculative ngram` and the load test's configuration list must not import torch."""
    code = (
        "import sys, drafts.registry as r, loadtest.sweep as s\n"
        "s.config_args('dflash-fixed4'); r.describe(); r.build_proposer('ngram', None, None, 2)\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('drafts.') and "
        "m not in ('drafts.registry', 'drafts.ngram', 'drafts.suffix')]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_draft_gates_only_for_drafters_that_cost_time() -> None:
    """Under the dspark policy a drafter that takes time to draft gets a gate; a lookup, free to
    ask, does not, and `--no-draft-gate` builds none."""
    from drafts.suffix import SuffixProposer

    def gates(speculative: str, draft_gate: bool) -> list[object]:
        config = EngineConfig(model="fake", speculative=speculative, verify_policy="dspark",
                              draft_gate=draft_gate, profile_on_start=False)
        speculator = build_engine(config).speculator
        assert speculator is not None
        return [d.gate for d in speculator.drafters]

    assert gates("ngram", True) == gates("ngram", False) == [None]
    profile = ThroughputProfile(64)
    assert gate_for(SuffixProposer(4), profile, gated=True) is None
    model_drafter = ReferenceTextProposer([1, 2, 3], 1, 4)  # no free_to_ask: drafting costs
    assert isinstance(gate_for(model_drafter, profile, gated=True), DraftGate)
    assert gate_for(model_drafter, profile, gated=False) is None


def test_auto_is_the_composite_only_for_the_target_of_the_shipped_draft() -> None:
    """`--speculative auto` (the default) adds the DSpark draft where it was trained for the
    served model, and falls back to the weight-free lookup for any other model."""
    def target(folder: str) -> object:
        return type("Target", (), {"config": type("Cfg", (), {"name_or_path": folder})()})()

    shipped_for = draft_config(build_model_from_shipped()).target_name
    assert resolve_auto(AUTO, target(f"/some/cache/{shipped_for}")) == "suffix+dspark"
    assert resolve_auto(AUTO, target("/models/Qwen3-0.6B")) == "ngram"
    assert resolve_auto(AUTO, None) == "ngram"  # the fake model has no config
    assert resolve_auto("dspark", target("/models/Qwen3-0.6B")) == "dspark"
    assert EngineConfig().speculative == AUTO


def build_model_from_shipped() -> torch.nn.Module:
    from drafts.checkpoint import load_draft

    ckpt = get("dspark").shipped_checkpoint
    assert ckpt is not None
    return load_draft(ckpt)
