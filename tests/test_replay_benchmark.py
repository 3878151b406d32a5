"""benchmarks/replay.py: the lookup replayed against saved answers on a virtual clock."""

from __future__ import annotations

from tests.scripts import load_benchmark

replay = load_benchmark("replay").replay

# Step time 10 ms + 1 ms per token: a verified draft costs a tenth of a plain step.
PROFILE = [(n, 0.010 + 0.001 * n) for n in (1, 2, 4, 8, 16, 64, 512)]
TEXT = list(range(1000, 1060))


def saved(answers: list[list[int]]) -> dict:
    return {"prompts": "test", "profile": PROFILE,
            "requests": [{"prompt": [7, *TEXT, 8], "answer": a} for a in answers]}


def test_an_answer_that_copies_its_prompt_is_drafted_and_replayed_exactly() -> None:
    point = replay(saved([TEXT[:40], TEXT[10:50]]), "suffix:fixed", k=7)
    assert point["tokens_per_step"] > 4  # 7 drafts a step, nearly all accepted
    # A plain step takes 11 ms a token; a step of 8 tokens 18 ms for up to 8.
    assert point["decode_speedup"] > 2


def test_an_answer_that_copies_nothing_gains_nothing_under_the_dspark_policy() -> None:
    fresh = list(range(5000, 5040))
    point = replay(saved([fresh, fresh[::-1]]), "suffix:dspark", k=7)
    assert 0.9 < point["decode_speedup"] <= 1.2
