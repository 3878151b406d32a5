"""Shared fixtures. The real embedded model is loaded once per test session (cached conversion)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def target():
    """SmolLM2-135M-Instruct in float32 on CPU (exactness tests need float32)."""
    import torch

    from scheduler.loader import load_target

    torch.manual_seed(0)
    return load_target(device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def chat_prompts(target):
    """Eight short chat prompts, tokenized with the model's chat template."""
    questions = [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "Explain photosynthesis in one sentence.",
        "List three prime numbers.",
        "def fibonacci(n):",
        "Translate 'good morning' into Spanish.",
        "What is 12 times 7?",
        "Name a famous painter and one of their works.",
    ]
    tok = target.tokenizer
    out = []
    for q in questions:
        text = tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        out.append(tok.encode(text, add_special_tokens=False))
    return out
