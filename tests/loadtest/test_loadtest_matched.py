"""The one-command matched-throughput runner in quick mode, end to end against the stub server.

The stub's speculative configuration (3 drafts, acceptance 0.8 per position) emits about 2.95
tokens per step for a step only slightly dearer than plain decoding, so at matched throughput its
per-user speed must come out well above the baseline's; the runner must also resume without
rerunning finished points and refuse to mix workloads in one folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loadtest.analysis import Frontier, PointSummary, matched_speedup, read_records

REPO = Path(__file__).resolve().parents[2]
STUB = Path(__file__).resolve().with_name("loadtest_stub.py")


def runner(
    out: Path, *extra: str, configs: str = "none=--spec-k 0,spec=--spec-k 3 --accept-prob 0.8"
) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "-m",
        "loadtest.matched",
        "--quick",
        "--out",
        str(out),
        "--server-cmd",
        f"{{python}} {STUB} --port {{port}}",
        "--configs",
        configs,
        *extra,
    ]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600, cwd=REPO)


# Quick mode, shortened further for the suite's time. The probe stops at 16 users, the stub's
# max_num_seqs: 16 users already fill every slot, so the capacity it finds is the one 32 and 64
# would find. Each point measures 6 s after a 2 s warm-up: ~20 arrivals at 25% of capacity.
# The mixed prompts (~1,800 under quick mode's 300 characters): no point repeats a prompt.
SHORT = ("--probe-users", "16", "--probe-seconds", "4", "--warmup", "2", "--duration", "6",
         "--mix", "mixed")


@pytest.mark.slow
def test_quick_mode_end_to_end_and_resume(tmp_path: Path) -> None:
    out = tmp_path / "matched"
    res = runner(out, "--publish", str(tmp_path / "docs"), *SHORT)
    assert res.returncode == 0, res.stdout + res.stderr

    points = {
        n: [
            PointSummary.from_json(json.loads(p.read_text()))
            for p in sorted((out / n).glob("rate_*.json"))
        ]
        for n in ("none", "spec")
    }
    probe = json.loads((out / "probe.json").read_text())
    assert probe["capacity_rps"] > 0
    for name, ps in points.items():
        assert len(ps) == 3, name
        assert [p.offered_rps for p in ps] == [p.offered_rps for p in points["none"]]
        for p in ps[:2]:  # 25% and 60% of capacity: the load must really be matched
            assert not p.saturated, (name, p.reasons)
            assert p.achieved_rps == pytest.approx(p.offered_rps, rel=0.15)
            assert p.agg_tok_s == pytest.approx(p.offered_rps * 32, rel=0.15)
    assert all(p.mean_acceptance_length and p.mean_acceptance_length > 2 for p in points["spec"])
    # The client's token count (usage chunks) agrees exactly with the server's counter delta.
    # No prompt reaches one server twice: each point starts after the prompts of the points
    # before it (loadtest/sweep.py `prompt_offsets`).
    for name, ps in points.items():
        sent = []
        for p in ps:
            _, recs = read_records(out / name / f"rate_{p.offered_rps:g}.jsonl")
            assert p.server["dspark_generation_tokens"] == sum(r.n_tokens for r in recs)
            sent += [r.pid for r in recs]
        assert len(sent) == len(set(sent)) > 30, name

    m = matched_speedup(
        Frontier.from_points(points["none"]),
        Frontier.from_points(points["spec"]),
        baseline="none",
        candidate="spec",
    )
    assert m is not None and m.stats()["min"] > 1.5
    report = (out / "report.md").read_text()
    assert "**spec** vs none: per-user speedup" in report
    assert f"{m.stats()['median']:.2f}x" in report
    for png in ("frontier", "speedup", "latency", "goodput"):
        data = (out / f"{png}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        assert (tmp_path / "docs" / f"{png}.png").read_bytes() == data
    assert (tmp_path / "docs" / "report.md").read_text() == report
    published = json.loads((tmp_path / "docs" / "points.json").read_text())
    assert len(published["points"]["spec"]) == 3 and published["run"]["baseline"] == "none"

    # Resume: everything is on disk, so nothing runs again.
    logs = {p: p.stat().st_mtime for p in out.glob("*/rate_*.locust.log")}
    t = time.monotonic()
    again = runner(out, *SHORT)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("finished earlier, skipping") == 2
    assert time.monotonic() - t < 30
    assert {p: p.stat().st_mtime for p in out.glob("*/rate_*.locust.log")} == logs

    # A different workload in the same folder is refused.
    other = runner(out, "--max-tokens", "16", *SHORT)
    assert other.returncode != 0 and "different workload" in other.stderr


def test_a_broken_configuration_does_not_stop_the_others(tmp_path: Path) -> None:
    out = tmp_path / "m"
    res = runner(
        out,
        "--rates",
        "2",
        "--warmup",
        "1",
        "--duration",
        "3",
        configs="broken=--no-such-flag,none=--spec-k 0",
    )
    assert res.returncode == 1
    assert "[broken] FAILED: server exited with 2" in res.stdout
    assert (out / "none" / "rate_2.json").exists()
    assert "**broken failed**" in (out / "report.md").read_text()


@pytest.mark.slow
def test_interleave_runs_rate_by_rate(tmp_path: Path) -> None:
    out = tmp_path / "m"
    res = runner(out, "--rates", "2,4", "--warmup", "1", "--duration", "3", "--interleave")
    assert res.returncode == 0, res.stdout + res.stderr
    order = sorted(out.glob("*/rate_*.json"), key=lambda p: p.stat().st_mtime)
    assert [f"{p.parent.name}/{p.name}" for p in order] == [
        "none/rate_2.json",
        "spec/rate_2.json",
        "none/rate_4.json",
        "spec/rate_4.json",
    ]
    # One server start per point.
    assert (out / "spec" / "server.log").read_text().count("$ ") == 2
