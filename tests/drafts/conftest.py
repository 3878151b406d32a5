"""Tiny random targets (no download) shared by the draft tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from drafts.common import config_from_target
from drafts.dspark import DSparkModel
from drafts.eagle3 import Eagle3Model


def tiny_llama(seed: int = 0, vocab: int = 96, layers: int = 6) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=True,
        eos_token_id=2,
        pad_token_id=2,
        bos_token_id=1,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture
def tiny_target() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture
def wide_vocab_target() -> LlamaForCausalLM:
    """Token ids past 256, which bfloat16 cannot hold exactly."""
    return tiny_llama(vocab=50_000, layers=3)


def tiny_draft(target: Any, method: str) -> torch.nn.Module:
    """A seeded random EAGLE-3 or DSpark draft for `target`, reading its layers 0-2. The DSpark
    one has a non-zero Markov head, so its sequential bias is in the logits."""
    torch.manual_seed(0)
    if method == "eagle3":
        return Eagle3Model(config_from_target(target.config, "eagle3", aux_layer_ids=[0, 1, 2]))
    cfg = config_from_target(
        target.config,
        "dspark",
        aux_layer_ids=[0, 1, 2],
        num_layers=1,
        markov_rank=8,
        confidence_head=True,
        mask_token_id=3,
    )
    model = DSparkModel(cfg)
    with torch.no_grad():
        model.markov_w2.weight.normal_(std=0.5)  # type: ignore[union-attr]
    return model


@pytest.fixture
def make_draft() -> Callable[[Any, str], torch.nn.Module]:
    return tiny_draft
