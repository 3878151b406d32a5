"""Open-loop schedules and prompt mixes."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from loadtest.pacing import ArrivalClock, ConstantRate, StepRate, pool_size
from loadtest.prompts import DATA_ENV, MIXES, data_dir, load_mix, load_source
from loadtest.sweep import Workload, prompt_offsets


def drain(clock: ArrivalClock) -> list[float]:
    out = []
    while (t := clock.claim()) is not None:
        out.append(t)
    return out


def test_constant_rate_spacing_and_count() -> None:
    times = drain(ArrivalClock(ConstantRate(4.0, 10.0), t0=100.0))
    assert len(times) == 40
    assert times[0] == 100.0
    assert np.allclose(np.diff(times), 0.25)


def test_step_rate_changes_rate_per_stage() -> None:
    sched = StepRate(start=1.0, step=2.0, stage_s=5.0, steps=3)  # 1, 3, 5 rps
    assert [sched.rate_at(t) for t in (0, 4.9, 5, 12, 99)] == [1, 1, 3, 5, 5]
    times = np.array(drain(ArrivalClock(sched, t0=0.0)))
    counts = [int(((times >= lo) & (times < lo + 5)).sum()) for lo in (0, 5, 10)]
    assert counts == [5, 15, 25]
    assert sched.peak == 5.0


def test_poisson_is_seeded_and_has_the_right_mean() -> None:
    a = drain(ArrivalClock(ConstantRate(5.0, 400.0), 0.0, poisson=True, seed=3))
    b = drain(ArrivalClock(ConstantRate(5.0, 400.0), 0.0, poisson=True, seed=3))
    assert a == b
    assert len(a) / 400.0 == pytest.approx(5.0, rel=0.05)
    gaps = np.diff(a)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.1)  # exponential: CV = 1


def test_unbounded_schedule_and_validation() -> None:
    clock = ArrivalClock(ConstantRate(2.0, math.inf), 0.0)
    assert [clock.claim() for _ in range(3)] == [0.0, 0.5, 1.0] and not clock.exhausted
    with pytest.raises(ValueError):
        ConstantRate(0.0, 1.0)
    with pytest.raises(ValueError):
        StepRate(1.0, -1.0, 1.0, 3)


@pytest.mark.parametrize("poisson", [False, True])
def test_each_points_prompts_follow_every_prompt_an_earlier_point_sent(poisson: bool) -> None:
    """A sweep's points run one after another against one server, which remembers what it
    served; each point's prompts must start after every arrival of the points before it."""
    wl = Workload("mixed_copy", "chat", 64, 0.0, True, 600, "poisson" if poisson else "constant",
                  warmup_s=8.0, duration_s=30.0, model="", min_requests=12)
    rates = [0.4, 1.2, 2.0, 2.8, 3.6, 4.4]
    offsets = prompt_offsets(rates, wl)
    assert offsets[rates[0]] == 0
    for seed in range(5):
        for rate, nxt in itertools.pairwise(rates):
            sent = drain(ArrivalClock(ConstantRate(rate, wl.warmup_s + wl.window_s(rate)), 0.0,
                                      poisson=poisson, seed=seed))
            assert offsets[rate] + len(sent) <= offsets[nxt]
    assert offsets[rates[-1]] + wl.arrivals(rates[-1]) < len(load_mix("mixed_copy", max_chars=600))


def test_pool_size_covers_rate_times_e2e() -> None:
    assert pool_size(2.0, 10.0) == 31
    assert pool_size(0.01, 1.0) == 4


@pytest.mark.parametrize(
    "mix,cats",
    [
        ("chat", {"chat"}),
        ("math", {"math"}),
        ("code", {"code"}),
        ("mixed", {"chat", "math", "code"}),
        ("mixed_copy", {"chat", "math", "code", "copy"}),
    ],
)
def test_mixes_load_from_shared_data(mix: str, cats: set[str]) -> None:
    prompts = load_mix(mix, max_chars=2000)
    assert {p.category for p in prompts} == cats
    assert all(p.chat and p.completion and len(p.chat) <= 2000 for p in prompts)
    assert len({p.pid for p in prompts}) == len(prompts)
    # Round-robin interleaving: every source shows up in the first few prompts.
    sources = {p.pid.split("/")[0] for p in prompts}
    assert {p.pid.split("/")[0] for p in prompts[: 2 * len(MIXES[mix])]} == sources


def test_copy_prompts_carry_their_context() -> None:
    """Every copy prompt holds its source text whole (what the answer is to copy from), and the
    source's order is the file's: the benchmark's fixed set."""
    prompts = load_source("copy")
    assert len(prompts) == 48
    texts = [
        r["input"]
        for r in json.loads((data_dir() / "alpaca" / "alpaca_5000.json").read_text())
        if len(r.get("input", "")) >= 200
    ][:48]
    assert all(t in p.chat and len(p.chat) > len(t) for p, t in zip(prompts, texts))
    assert [p.pid for p in prompts] == sorted(
        (p.pid for p in prompts), key=lambda pid: int(pid[5:])
    )


def test_mix_is_deterministic_and_seeded() -> None:
    a = [p.pid for p in load_mix("code", seed=1, limit=20)]
    assert a == [p.pid for p in load_mix("code", seed=1, limit=20)]
    assert a != [p.pid for p in load_mix("code", seed=2, limit=20)]
    assert len(a) == 20


def test_eval_splits_only() -> None:
    mbpp = [int(p.pid.split("/")[1]) for p in load_mix("mbpp")]
    assert mbpp and all(11 <= t <= 510 for t in mbpp)
    assert all(p.pid.startswith("gsm8k/test-") for p in load_mix("gsm8k", limit=50))


def test_data_dir_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mt_bench").mkdir()
    (tmp_path / "mt_bench" / "question.jsonl").write_text(
        json.dumps({"question_id": 7, "category": "x", "turns": ["only one", "second"]}) + "\n"
    )
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert data_dir() == tmp_path
    [p] = load_mix("mt_bench")
    assert (p.pid, p.chat) == ("mt_bench/7", "only one")


def test_bad_mix_and_missing_data(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        load_mix("poetry")
    with pytest.raises(FileNotFoundError):
        load_mix("chat", root=tmp_path / "nowhere")
