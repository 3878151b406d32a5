"""benchmarks/speculative.py's summary: speedups pair each run with `none` on the same prompts."""

from __future__ import annotations

import pytest

from tests.scripts import load_benchmark

speculative = load_benchmark("speculative")


def _run(config: str, repeat: int, per_user: float, aggregate: float) -> dict:
    return {
        "prompts": "copy", "concurrency": 1, "config": config, "repeat": repeat,
        "per_user_tok_s": per_user, "aggregate_tok_s": aggregate, "mean_accepted_length": 2.0,
    }


def test_speedups_are_medians_of_paired_ratios() -> None:
    # Repeat 1's prompts are twice as fast for everyone: unpaired medians would give 1.0x for
    # the drafter (median 100 vs 100); paired ratios give 1.25x, 1.5x and 1.1x -> 1.25x.
    results = [
        _run("none", 0, 80.0, 80.0), _run("x", 0, 100.0, 100.0),
        _run("none", 1, 160.0, 160.0), _run("x", 1, 240.0, 200.0),
        _run("none", 2, 100.0, 100.0), _run("x", 2, 110.0, 110.0),
    ]
    by_config = {p["config"]: p for p in speculative.summarise(results)}
    x = by_config["x"]
    assert x["runs"] == 3
    assert x["per_user_tok_s"] == 110.0
    assert x["per_user_speedup_vs_none"] == pytest.approx(1.25)
    assert x["per_user_speedup_range"] == pytest.approx([1.1, 1.5])
    assert x["aggregate_speedup_vs_none"] == pytest.approx(1.25)
    assert x["aggregate_speedup_range"] == pytest.approx([1.1, 1.25])
    assert by_config["none"]["per_user_speedup_vs_none"] == 1.0


def test_points_without_none_have_no_speedup() -> None:
    [x] = speculative.summarise([_run("x", 0, 100.0, 100.0)])
    assert "per_user_speedup_vs_none" not in x


def test_a_configuration_listed_twice_runs_as_two_labelled_engines() -> None:
    labels = speculative.engine_labels(["none", "suffix:dspark", "none", "suffix:dspark", "none"])
    assert labels == ["none", "suffix:dspark", "none #2", "suffix:dspark #2", "none #3"]
