"""The runner against the real gateway (`python -m server --model fake`): no torch model, so it is
quick, but the HTTP edge, SSE framing, usage chunk, speculation field and /metrics counters are
the product's own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.analysis import PointSummary, read_records

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_runner_against_the_fake_engine(tmp_path: Path) -> None:
    out = tmp_path / "fake"
    cmd = [
        sys.executable,
        "-m",
        "loadtest.matched",
        "--quick",
        "--model",
        "fake",
        "--configs",
        "none,ngram",
        "--rates",
        "4,8",
        "--warmup",
        "1",
        "--duration",
        "3",
        "--out",
        str(out),
    ]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    for name in ("none", "ngram"):
        for rate in (4, 8):
            p = PointSummary.from_json(json.loads((out / name / f"rate_{rate}.json").read_text()))
            _, recs = read_records(out / name / f"rate_{rate}.jsonl")
            assert recs and all(r.ok for r in recs), [r.error for r in recs if not r.ok][:3]
            assert not p.saturated, (name, rate, p.reasons)
            assert p.achieved_rps == pytest.approx(rate, rel=0.2)
            # ignore_eos: every request yields max_tokens, counted alike by client and server.
            assert {r.n_tokens for r in recs} == {32}
            assert p.server["dspark_generation_tokens"] == sum(r.n_tokens for r in recs)
            if name == "ngram":
                assert all(r.spec and r.spec["num_draft_tokens"] > 0 for r in recs)
                accepted = sum(r.spec["num_accepted_tokens"] for r in recs if r.spec)
                assert p.server["dspark_spec_decode_num_accepted_tokens"] == accepted
            else:
                assert all(r.spec is None for r in recs)
    assert (out / "report.md").exists()
