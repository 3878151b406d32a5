"""Prompt sets and answer regeneration (resumable, batches alternate between prompt sources)."""

from __future__ import annotations

import json
from pathlib import Path

from drafts.train.data import (
    ANSWER_FILE_KEY_STRIDE,
    calibration_prompts,
    per_prompt_seeds,
    prompt_of,
    read_answer_files,
    regenerate_answers,
    training_prompts,
)
from scheduler.request import SamplingParams


class _CharTokenizer:
    def apply_chat_template(
        self, msgs: list[dict[str, str]], add_generation_prompt: bool, tokenize: bool
    ) -> str:
        return msgs[0]["content"]

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return [ord(c) for c in text]


def test_batches_alternate_sources_and_resume(tmp_path: Path) -> None:
    prompts = [("chat", "x" * i) for i in range(1, 6)] + [
        ("math", "y" * (10 + i)) for i in range(1, 6)
    ]
    seen: list[set[int]] = []

    def gen(batch: list[list[int]]) -> list[list[int]]:
        seen.append({p[0] for p in batch})
        return [[7, 2] for _ in batch]

    out = tmp_path / "answers.jsonl"
    rows = regenerate_answers(prompts, _CharTokenizer(), gen, out, batch_size=2)
    assert len(rows) == 10 and all(r["answer_ids"] == [7, 2] for r in rows)
    assert [s.pop() for s in seen[:2]] == [ord("x"), ord("y")]  # first two batches: both sources
    seen.clear()
    assert len(regenerate_answers(prompts, _CharTokenizer(), gen, out, batch_size=2)) == 10
    assert seen == []  # everything was already on disk


def test_prompt_fields() -> None:
    assert prompt_of({"turns": ["a", "b"]}) == "a"
    assert prompt_of({"instruction": "do", "input": "this"}) == "do\n\nthis"
    assert prompt_of({"question": "q"}) == "q"
    assert prompt_of({"prompt": "p"}) == "p"


def test_calibration_prompts_cover_every_source_and_stay_out_of_training() -> None:
    """Training takes every prompt that is not held out; calibration still sees chat, math and
    code (mbpp's validation split) and never a training prompt."""
    train = training_prompts()
    calib = calibration_prompts(10)
    assert [s for s, _ in calib].count("mbpp") == 10
    assert {s for s, _ in calib} == {"alpaca", "gsm8k", "mbpp"}
    assert not {p for _, p in train} & {p for _, p in calib}
    assert {s for s, _ in train} == {"alpaca", "gsm8k", "mbpp"}
    assert len(training_prompts(5)) == 15 and training_prompts(5)[0] == train[0]
    chat_and_code = training_prompts(sources={"alpaca", "mbpp"})
    assert chat_and_code == [(s, p) for s, p in train if s != "gsm8k"]


def test_sampled_answers_draw_one_stream_per_prompt() -> None:
    base = SamplingParams(max_tokens=8, temperature=1.0)
    batch = [[1, 2, 3], [1, 2, 4], [5], [1, 2, 3]]
    params = per_prompt_seeds(base, batch)
    seeds = [p.seed for p in params]
    assert len(set(seeds[:3])) == 3  # different prompts, different streams
    assert seeds[0] == seeds[3]  # the same prompt draws the same answer wherever it is batched
    assert per_prompt_seeds(base, [[5]])[0].seed == seeds[2]
    assert all(p.temperature == 1.0 and p.max_tokens == 8 for p in params)


def test_answer_files_to_the_same_prompts_are_keyed_apart(tmp_path: Path) -> None:
    # Greedy and sampled answers to the same prompts share their prompts' indices, which key
    # the feature cache: read together, no two rows may share a key, and the first file's
    # keys stay what a cache filled from it alone holds.
    def write(name: str, answers: list[list[int]]) -> Path:
        path = tmp_path / name
        rows = [{"index": i, "prompt_ids": [1], "answer_ids": a} for i, a in enumerate(answers)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    sampled = write("sampled.jsonl", [[5, 6], [7]])
    greedy = write("greedy.jsonl", [[5, 9], [8]])
    rows = read_answer_files([sampled, greedy])
    assert [r["answer_ids"] for r in rows] == [[5, 6], [7], [5, 9], [8]]
    assert [r["index"] for r in rows] == [0, 1, ANSWER_FILE_KEY_STRIDE, ANSWER_FILE_KEY_STRIDE + 1]
    assert read_answer_files([sampled]) == rows[:2]
