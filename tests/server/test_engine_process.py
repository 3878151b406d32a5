"""The engine core in its own process: the EngineThreadLike contract across the boundary, death
and orphan handling, the HTTP process without torch, and every engine series reaching /metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path

import httpx
import pytest
from gateway_harness import fake_app, fake_settings, serve, wait_until
from gateway_proc import PROC_ENGINE, build, process_app
from prometheus_client.parser import text_string_to_metric_families

from scheduler.request import FinishReason, Request, RequestOutput, SamplingParams
from scheduler.stats import StepStats
from server.engine_core import EngineCoreSpec
from server.engine_process import EngineProcess, EngineProcessError, launch_engine_process

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


class Collector:
    """on_step for a bare EngineProcess: every output by request, every step's stats."""

    def __init__(self) -> None:
        self.outputs: dict[str, list[RequestOutput]] = {}
        self.stats: list[StepStats] = []
        self._lock = threading.Lock()

    def __call__(self, outputs: list[RequestOutput], stats: StepStats) -> None:
        with self._lock:
            self.stats.append(stats)
            for out in outputs:
                self.outputs.setdefault(out.req_id, []).append(out)

    def finished(self, req_id: str) -> FinishReason | None:
        outs = self.outputs.get(req_id, [])
        assert sum(o.finished for o in outs) <= 1, f"{req_id}: two final outputs"
        return outs[-1].finish_reason if outs else None

    def tokens(self, req_id: str) -> list[int]:
        return [t for o in self.outputs.get(req_id, []) for t in o.new_token_ids]


@contextmanager
def engine_process(step_s: float = 0.002, **config: object) -> Iterator[tuple[EngineProcess, Collector]]:
    spec = EngineCoreSpec(replace(PROC_ENGINE, **config), partial(build, step_s=step_s))
    engine = launch_engine_process(spec)
    collector = Collector()
    engine.attach(collector).start()
    try:
        yield engine, collector
    finally:
        engine.shutdown(2.0)


def request(engine: EngineProcess, req_id: str, text: str = "hello", **params: object) -> Request:
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    return Request(req_id, ids, SamplingParams(**{"temperature": 0.0, **params}))  # type: ignore[arg-type]


def test_requests_aborts_and_drain_cross_the_boundary() -> None:
    with engine_process(step_s=0.01) as (engine, got):
        assert engine.model_name == "fake" and engine.num_kv_slots == 4
        engine.add_request(request(engine, "short", max_tokens=5))
        engine.add_request(request(engine, "gone", max_tokens=200, ignore_eos=True))
        engine.abort("gone")
        wait_until(lambda: got.finished("short") and got.finished("gone"), 10, "two finished")
        assert got.finished("short") == FinishReason.LENGTH and len(got.tokens("short")) == 5
        assert got.finished("gone") == FinishReason.ABORT
        # Requests still running at shutdown are cut by the drain, with one final output each.
        for i in range(6):  # more than the 4 slots: some wait
            engine.add_request(request(engine, f"long{i}", max_tokens=500, ignore_eos=True))
        wait_until(lambda: engine.num_running == 4 and engine.num_waiting == 2, 10, "queue counts")
        engine.shutdown(0.2)
        assert not engine.is_alive and engine.error is None
        assert engine._process.exitcode == 0
        assert {got.finished(f"long{i}") for i in range(6)} == {FinishReason.ABORT}
        engine.abort("long0")  # late aborts (closing streams) after the shutdown are harmless


def test_a_failing_step_fails_every_request_and_reports_why() -> None:
    with engine_process(step_s=0.01) as (engine, got):
        engine.add_request(request(engine, "bystander", max_tokens=500, ignore_eos=True))
        wait_until(lambda: bool(got.tokens("bystander")), 10, "bystander running")
        engine.add_request(request(engine, "crash", "CRASH"))
        wait_until(lambda: not engine.is_alive, 10, "engine death seen")
        assert isinstance(engine.error, EngineProcessError)
        assert "injected engine step failure" in str(engine.error)
        assert got.finished("bystander") == FinishReason.ERROR
        assert got.finished("crash") == FinishReason.ERROR
        engine._process.join(5)
        assert engine._process.exitcode == 1


def test_a_killed_engine_process_is_detected() -> None:
    with engine_process() as (engine, _):
        assert engine.pid is not None
        os.kill(engine.pid, signal.SIGKILL)
        wait_until(lambda: not engine.is_alive, 10, "engine death seen")
        assert "status -9" in str(engine.error)


def test_one_poisoned_request_fails_alone() -> None:
    with engine_process() as (engine, got):
        engine.add_request(request(engine, "bad", "POISON"))
        engine.add_request(request(engine, "good", max_tokens=8))
        wait_until(lambda: got.finished("bad") and got.finished("good"), 10, "both finished")
        assert got.finished("bad") == FinishReason.ERROR
        assert got.finished("good") == FinishReason.LENGTH
        assert engine.is_alive


def test_a_build_failure_is_raised_with_its_reason() -> None:
    spec = EngineCoreSpec(replace(PROC_ENGINE, speculative="no-such-drafter"))
    with pytest.raises(EngineProcessError, match="could not be built.*no-such-drafter"):
        launch_engine_process(spec)


ORPHAN_SCRIPT = """
import os, signal, sys
from gateway_proc import PROC_ENGINE, build
from server.engine_core import EngineCoreSpec
from server.engine_process import launch_engine_process
if __name__ == "__main__":
    engine = launch_engine_process(EngineCoreSpec(PROC_ENGINE, build))
    print(engine.pid, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no shutdown, no atexit: the engine is orphaned
"""


def test_the_engine_process_stops_when_the_http_process_dies(tmp_path: Path) -> None:
    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)])}
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert run.returncode == -signal.SIGKILL, run.stderr
    pid = int(run.stdout.split()[0])

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # An exited child of a dead parent is reaped by init; until then it is a zombie.
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].startswith("Z")

    wait_until(gone, 15, "the orphaned engine process to exit")


NO_TORCH_SCRIPT = """
import json, sys
from dataclasses import replace
import httpx
from gateway_harness import fake_settings, serve
from gateway_proc import process_app
if __name__ == "__main__":
    settings = replace(fake_settings(), threads=3)
    with serve(process_app(settings)) as running:
        r = httpx.post(running.url("/v1/chat/completions"), timeout=30, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True})
        engine = running.state.client.engine
        print(json.dumps({"status": r.status_code, "done": r.text.rstrip().endswith("[DONE]"),
                          "torch": "torch" in sys.modules, "threads": engine.info.torch_threads}))
"""


def test_the_http_process_runs_no_torch_and_the_engine_gets_its_threads(tmp_path: Path) -> None:
    script = tmp_path / "no_torch.py"
    script.write_text(NO_TORCH_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)])}
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result == {"status": 200, "done": True, "torch": False, "threads": 3}


# Engine-side series: fed by the StepStats and outputs the engine sends, no timings in them.
ENGINE_SERIES = (
    "dspark_iteration_tokens", "dspark_spec_decode_num_drafts", "dspark_spec_decode_num_draft_tokens",
    "dspark_spec_decode_num_accepted_tokens", "dspark_spec_decode_num_proposed_tokens",
    "dspark_spec_decode_num_accepted_tokens_per_pos", "dspark_spec_decode_verify_length",
    "dspark_scheduler_verified_tokens_per_step", "dspark_spec_decode_predicted_acceptance",
    "dspark_spec_decode_realised_acceptance", "dspark_spec_decode_verified_positions",
    "dspark_generation_tokens", "dspark_prompt_tokens", "dspark_request_success",
    "dspark_request_generation_tokens", "dspark_request_prompt_tokens",
)


def engine_series(base_url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(base_url + "/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        if family.name in ENGINE_SERIES
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_every_engine_series_is_the_same_across_the_process_boundary() -> None:
    """The same requests, one at a time, through an engine thread and an engine process: every
    engine-side sample on /metrics is equal, so no step's stats went missing on the way."""
    settings = fake_settings(speculative="ngram", verify_policy="fixed", num_speculative_tokens=3)
    bodies = [{"prompt": f"tell me {i} " * (i + 1), "max_tokens": 20 + 7 * i} for i in range(4)]
    seen = []
    for app in (fake_app(settings), process_app(settings)):
        with serve(app) as running:
            for body in bodies:
                assert httpx.post(running.url("/v1/completions"), json=body, timeout=30).status_code == 200
            seen.append(engine_series(running.base_url))
    thread_series, process_series = seen
    drafts = [v for (name, _), v in process_series.items() if name.endswith("num_drafts_total")]
    assert drafts and drafts[0] > 0  # speculation ran, so its series are compared too
    assert process_series == thread_series


def test_queue_gauges_follow_the_engine_process() -> None:
    with serve(process_app(fake_settings(), step_s=0.02)) as running:
        body = {"prompt": "x", "max_tokens": 300, "ignore_eos": True, "stream": True}
        with ExitStack() as streams:
            for _ in range(6):  # 4 slots: 2 wait
                streams.enter_context(
                    httpx.stream("POST", running.url("/v1/completions"), json=body, timeout=30))
            wait_until(lambda: running.metric("dspark_num_requests_running") == 4
                       and running.metric("dspark_num_requests_waiting") == 2, 10, "gauges")
        # The clients hung up: every slot is freed and nothing stays registered.
        client = running.state.client
        assert client is not None
        wait_until(lambda: client.num_in_flight == 0, 10, "aborted requests finished")
        wait_until(lambda: running.metric("dspark_num_requests_running") == 0, 10, "gauge freed")
