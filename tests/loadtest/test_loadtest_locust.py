"""Locust runs of loadtest/traffic.py against the stub server, in subprocesses.

Locust monkey-patches the interpreter with gevent on import, so it never runs inside pytest.
The stub's timing is known: with --step-base-ms 20 and no per-token cost, every engine step
takes 20 ms and yields one token per request, so TPOT must come out near 20 ms.
"""

from __future__ import annotations

import ast
import csv
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from loadtest.analysis import read_records
from loadtest.runtime import ServerProcess, free_port

REPO = Path(__file__).resolve().parents[2]
TRAFFIC = REPO / "loadtest" / "traffic.py"


def locust(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(TRAFFIC),
        "--headless",
        "--only-summary",
        "--loglevel",
        "WARNING",
        *args,
    ]
    return subprocess.run(
        cmd, check=False, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT, then SIGTERM, then SIGKILL: a Locust that ignores the polite signal must not
    outlive the test. It stays in pytest's process group, so killing a hung CI job kills it too."""
    for send, grace in (
        (lambda: proc.send_signal(signal.SIGINT), 10),
        (proc.terminate, 5),
        (proc.kill, 5),
    ):
        if proc.poll() is not None:
            return
        send()
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def stats_rows(prefix: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(f"{prefix}_stats.csv", newline="") as f:
        return {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}


def test_open_loop_run_hits_rate_and_measures_stream_timing(
    start_stub: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    srv = start_stub(
        "--step-base-ms",
        "20",
        "--step-per-token-ms",
        "0",
        "--prefill-per-token-ms",
        "0",
        "--max-num-seqs",
        "64",
    )
    records = tmp_path / "rec.jsonl"
    res = locust(
        "-H",
        srv.url,
        "--load-shape",
        "constant-rate",
        "--request-rate",
        "5",
        "--load-duration",
        "6",
        "--max-tokens",
        "4",
        "--mix",
        "math",
        "--records-file",
        str(records),
        "--csv",
        str(tmp_path / "out"),
    )
    assert res.returncode == 0, res.stdout + res.stderr
    meta, recs = read_records(records)
    # Streams (about 80 ms) end well before the next arrival (every 200 ms): the run must not
    # stop while users are merely waiting for their claimed slots.
    assert meta["load_shape"] == "constant-rate" and meta["request_rate"] == 5.0
    assert len(recs) == 30 and all(r.ok for r in recs)
    # Open loop: arrival k is scheduled at exactly k / rate and leaves (almost) on time.
    sched = sorted(r.t_sched for r in recs if r.t_sched is not None)
    assert sched == pytest.approx([k / 5 for k in range(30)])
    assert max(r.lag for r in recs) < 0.1
    assert {r.n_tokens for r in recs} == {4} and {r.category for r in recs} == {"math"}
    tpot = float(np.median([r.tpot for r in recs]))
    ttft = float(np.median([r.ttft for r in recs]))
    assert tpot == pytest.approx(0.020, abs=0.004)
    assert 0.015 < ttft < 0.06  # one step, plus at most one step already in progress

    rows = stats_rows(tmp_path / "out")
    post = rows[("POST", "/v1/chat/completions stream")]
    e2e_ms = 1e3 * float(np.mean([r.e2e for r in recs]))
    # The HTTP entry covers the whole stream (about 80 ms), not just the headers.
    assert float(post["Average Response Time"]) == pytest.approx(e2e_ms, rel=0.15)
    assert float(rows[("METRIC", "tpot_us")]["50%"]) == pytest.approx(20000, rel=0.2)
    assert int(rows[("METRIC", "output_tokens")]["Request Count"]) == 30
    assert int(rows[("METRIC", "itl_us")]["Request Count"]) == 30 * 3
    # Custom entries stay out of the Aggregated row.
    assert int(rows[("", "Aggregated")]["Request Count"]) == 30


def test_step_users_completions_and_spec_entries(
    start_stub: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    srv = start_stub("--spec-k", "3", "--accept-prob", "0.8", "--step-base-ms", "10")
    records = tmp_path / "rec.jsonl"
    res = locust(
        "-H",
        srv.url,
        "--load-shape",
        "step-users",
        "--step-users",
        "2",
        "--step-seconds",
        "2",
        "--steps",
        "2",
        "--endpoint",
        "completions",
        "--mix",
        "code",
        "--max-tokens",
        "16",
        "--records-file",
        str(records),
        "--csv",
        str(tmp_path / "out"),
        "--stop-timeout",
        "10",
    )
    assert res.returncode == 0, res.stdout + res.stderr
    _, recs = read_records(records)
    assert recs and all(r.ok for r in recs)
    # Closed loop, 2 then 4 users: never more than 4 requests in flight.
    events = sorted([(r.t_start, 1) for r in recs] + [(r.t_end or 0.0, -1) for r in recs])
    assert max(np.cumsum([e for _, e in events])) <= 4
    taus = [r.spec["mean_acceptance_length"] for r in recs if r.spec]
    assert len(taus) == len(recs) and np.mean(taus) > 2.0  # 1 + 0.8 + 0.64 + 0.512 = 2.95
    rows = stats_rows(tmp_path / "out")
    assert ("POST", "/v1/completions stream") in rows
    assert float(rows[("SPEC", "acceptance_length_x1000")]["Average Response Time"]) > 2000
    assert ("SPEC", "acceptance_rate_permille") in rows


def documented_headless_command() -> list[str]:
    """The headless closed-loop command in traffic.py's docstring, split into arguments."""
    doc = ast.get_docstring(ast.parse(TRAFFIC.read_text())) or ""
    line = next(ln for ln in doc.splitlines() if "--headless" in ln and " -t " in ln)
    return shlex.split(line.split("#")[0])


def test_documented_command_stops_at_its_run_time(
    start_stub: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    # Locust waits for a shape class to finish before it starts its own -t timer, so a shape
    # that ignored -t ran the documented closed-loop command forever.
    srv = start_stub("--step-base-ms", "10")
    args = documented_headless_command()
    assert args[:3] == ["locust", "-f", "loadtest/traffic.py"] and "-u" in args
    args[args.index("-H") + 1] = srv.url
    args[args.index("-t") + 1] = "3s"
    args[args.index("--csv") + 1] = str(tmp_path / "out")
    t0 = time.monotonic()
    try:
        res = subprocess.run(
            [sys.executable, "-m", *args, "--only-summary", "--max-tokens", "8"],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("locust -t 3s was still running after 60 s")
    assert res.returncode == 0, res.stdout + res.stderr
    assert time.monotonic() - t0 >= 3.0  # ended by -t, not before it
    rows = stats_rows(tmp_path / "out")
    assert int(rows[("POST", "/v1/chat/completions stream")]["Request Count"]) > 0


def test_run_time_also_ends_an_open_loop_without_load_duration(
    start_stub: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    srv = start_stub("--step-base-ms", "10")
    records = tmp_path / "rec.jsonl"
    shape = ["--load-shape", "constant-rate", "--request-rate", "5", "--max-tokens", "4"]
    res = locust("-H", srv.url, *shape, "-t", "3s", "--records-file", str(records), timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    meta, recs = read_records(records)
    assert meta["run_time"] == 3 and meta["load_duration"] == 0
    # Arrivals every 200 ms until the 3 s limit: 15, give or take the one at the cut.
    assert 13 <= len(recs) <= 16


def test_web_ui_starts_a_constant_rate_test(
    start_stub: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    srv = start_stub()
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(TRAFFIC),
            "-H",
            srv.url,
            "--web-host",
            "127.0.0.1",
            "--web-port",
            str(port),
            "--max-tokens",
            "8",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ui = f"http://127.0.0.1:{port}"
    try:
        for _ in range(60):
            try:
                if httpx.get(ui + "/", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        r = httpx.post(
            ui + "/swarm",
            data={
                "user_count": "4",
                "spawn_rate": "4",
                "host": srv.url,
                "load_shape": "constant-rate",
                "request_rate": "4",
                "shape_class": "TrafficShape",
            },
        )
        assert r.status_code == 200 and r.json()["success"], r.text
        names: set[str] = set()
        for _ in range(20):
            time.sleep(0.5)
            names = {s["name"] for s in httpx.get(ui + "/stats/requests").json()["stats"]}
            if "ttft_ms" in names:
                break
        assert {"ttft_ms", "tpot_us", "/v1/chat/completions stream"} <= names
        httpx.get(ui + "/stop")
    finally:
        stop(proc)


def test_open_loop_refuses_multiple_processes() -> None:
    # Workers never see the master's arrival clock; silently running closed loop would be wrong.
    res = locust(
        "-H",
        "http://127.0.0.1:9",
        "--processes",
        "2",
        "--load-shape",
        "constant-rate",
        "-t",
        "3s",
        timeout=60,
    )
    assert res.returncode != 0
    assert "need a single process" in res.stdout + res.stderr


def test_locustfile_needs_only_locust_and_the_standard_library() -> None:
    # docker-compose runs traffic.py in the stock Locust image with only loadtest/ mounted, so
    # its imports must not reach numpy, httpx, matplotlib or prometheus_client.
    code = (
        "import sys\n"
        "for m in ('numpy', 'httpx', 'matplotlib', 'prometheus_client', 'pandas'):\n"
        "    sys.modules[m] = None\n"
        "import loadtest.traffic\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr
