"""Prompt mixes for load tests, read from the benchmark copies in the sibling `shared/data` folder.

Evaluation splits only: the drafters are trained on alpaca_5000, gsm8k train and the mbpp train
split, so a load test on those prompts would overstate acceptance. The chat mix therefore uses
MT-bench first turns plus the 175 human-written Alpaca seed tasks (`--mix alpaca` exists for the
5k subset when that bias does not matter).

The data folder is found relative to this repository (`<repo>/../shared/data`) unless the
environment variable DSPARK_DATA_DIR points elsewhere.
"""

from __future__ import annotations

import gzip
import json
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

DATA_ENV = "DSPARK_DATA_DIR"


@dataclass(frozen=True, slots=True)
class Prompt:
    """One prompt in both shapes the endpoints need."""

    pid: str  # "<source>/<id>", stable across runs
    category: str  # chat | math | code | copy
    chat: str  # user message for /v1/chat/completions
    completion: str  # raw text for /v1/completions


def data_dir() -> Path:
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def _jsonl(path: Path) -> Iterator[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _mt_bench(root: Path) -> list[Prompt]:
    out = []
    for r in _jsonl(root / "mt_bench" / "question.jsonl"):
        turn = r["turns"][0]
        out.append(Prompt(f"mt_bench/{r['question_id']}", "chat", turn, turn))
    return out


def _alpaca_seed(root: Path) -> list[Prompt]:
    out = []
    for r in _jsonl(root / "alpaca" / "seed_tasks.jsonl"):
        inp = r["instances"][0]["input"] if r.get("instances") else ""
        text = r["instruction"] + (f"\n\n{inp}" if inp else "")
        out.append(Prompt(f"alpaca_seed/{r['id']}", "chat", text, text))
    return out


def _alpaca_5000(root: Path) -> list[Prompt]:
    with open(root / "alpaca" / "alpaca_5000.json", encoding="utf-8") as f:
        rows = json.load(f)
    out = []
    for i, r in enumerate(rows):
        text = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        out.append(Prompt(f"alpaca/{i}", "chat", text, text))
    return out


def _copy(root: Path) -> list[Prompt]:
    """Answers that copy their context, as in RAG and summaries: the first 48 alpaca items that
    come with an input text of 200+ characters, asked in turn to follow their own instruction on
    it, to rewrite it, and to answer from it (quoting it). (From the drafts' training split: the
    instructions were trained on, the rewriting and quoting tasks were not.)"""
    with open(root / "alpaca" / "alpaca_5000.json", encoding="utf-8") as f:
        items = [(i, r) for i, r in enumerate(json.load(f)) if len(r.get("input", "")) >= 200]
    out = []
    for n, (i, r) in enumerate(items[:48]):
        text, task = r["input"], r["instruction"]
        if n % 3 == 0:
            chat = f"{task}\n\n{text}"
        elif n % 3 == 1:
            chat = (
                f"Rewrite the following text in clear, plain English, keeping every fact "
                f"and every name:\n\n{text}"
            )
        else:
            chat = (
                f"Answer from the text below, quoting it where you can.\n\nText: {text}"
                f"\n\nQuestion: {task}"
            )
        out.append(Prompt(f"copy/{i}", "copy", chat, chat))
    return out


def _gsm8k(root: Path) -> list[Prompt]:
    out = []
    for i, r in enumerate(_jsonl(root / "gsm8k" / "test.jsonl")):
        q = r["question"]
        chat = f"Solve this problem step by step.\n\n{q}"
        out.append(Prompt(f"gsm8k/test-{i}", "math", chat, f"Question: {q}\nAnswer:"))
    return out


def _humaneval(root: Path) -> list[Prompt]:
    out = []
    for r in _jsonl(root / "humaneval" / "HumanEval.jsonl.gz"):
        code = r["prompt"]
        chat = f"Complete the following Python function.\n\n```python\n{code}```"
        out.append(Prompt(r["task_id"], "code", chat, code))
    return out


def _mbpp(root: Path) -> list[Prompt]:
    out = []
    for r in _jsonl(root / "mbpp" / "mbpp.jsonl"):
        if not 11 <= int(r["task_id"]) <= 510:  # the test split
            continue
        # The first assert shows the expected function name and signature.
        text = f"{r['text']}\nYour code should pass this test:\n{r['test_list'][0]}"
        out.append(Prompt(f"mbpp/{r['task_id']}", "code", text, f'"""{text}"""\n'))
    return out


SOURCES: dict[str, Callable[[Path], list[Prompt]]] = {
    "mt_bench": _mt_bench,
    "alpaca_seed": _alpaca_seed,
    "alpaca": _alpaca_5000,
    "gsm8k": _gsm8k,
    "humaneval": _humaneval,
    "mbpp": _mbpp,
    "copy": _copy,
}

MIXES: dict[str, tuple[str, ...]] = {
    "chat": ("mt_bench", "alpaca_seed"),
    "math": ("gsm8k",),
    "code": ("humaneval", "mbpp"),
    "mixed": ("mt_bench", "alpaca_seed", "gsm8k", "humaneval", "mbpp"),
    # the mixed traffic plus answers that copy their context (RAG, summaries, rewrites)
    "mixed_copy": ("mt_bench", "alpaca_seed", "gsm8k", "humaneval", "mbpp", "copy"),
    # single sources, for per-category reports
    **{
        name: (name,)
        for name in ("mt_bench", "alpaca_seed", "alpaca", "gsm8k", "humaneval", "mbpp", "copy")
    },
}


def load_source(name: str, root: Path | None = None) -> list[Prompt]:
    """One source's prompts in file order (the benchmarks' fixed sets)."""
    return SOURCES[name](root or data_dir())


def load_mix(
    mix: str,
    *,
    seed: int = 0,
    limit: int | None = None,
    max_chars: int | None = None,
    root: Path | None = None,
) -> list[Prompt]:
    """Prompts of `mix`, shuffled with `seed` and interleaved so every source appears early.

    `max_chars` drops long prompts (prefill cost dominates on a small CPU); `limit` truncates.
    The same arguments always give the same list, so configurations see the same workload.
    """
    if mix not in MIXES:
        raise ValueError(f"unknown prompt mix {mix!r}; choose from {sorted(MIXES)}")
    root = root or data_dir()
    if not root.is_dir():
        raise FileNotFoundError(f"prompt data not found at {root}; set {DATA_ENV}")
    rng = random.Random(seed)
    pools = []
    for name in MIXES[mix]:
        pool = [p for p in SOURCES[name](root) if max_chars is None or len(p.chat) <= max_chars]
        rng.shuffle(pool)
        pools.append(pool)
    # Round-robin across sources: a short run still covers each of them.
    out: list[Prompt] = []
    for i in range(max((len(p) for p in pools), default=0)):
        out.extend(pool[i] for pool in pools if i < len(pool))
    if not out:
        raise ValueError(f"mix {mix!r} has no prompts under {max_chars} characters")
    return out[:limit] if limit else out
