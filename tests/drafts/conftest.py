"""Tiny random targets (no download) shared by the draft tests."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


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
