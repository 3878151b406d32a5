"""Process lifecycle: SIGTERM drains and exits 0; engine death -> unhealthy, errors, exit 1.

The server processes here run the engine in a process of its own (the default); every test
that stops one also checks that no process of its group is left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from gateway_harness import Running, fake_app, fake_settings, free_port, serve, wait_until
from gateway_proc import process_app

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
MSGS = [{"role": "user", "content": "hello"}]


@contextmanager
def server_process(*args: str, step_s: float = 0.02,
                   entry: tuple[str, ...] = (str(HERE / "gateway_proc.py"),),
                   ) -> Iterator[tuple[subprocess.Popen[str], str]]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)]),
           "GATEWAY_TEST_STEP_S": str(step_s)}
    proc = subprocess.Popen(
        [sys.executable, *entry, "--port", str(port), "--log-level", "warning", *args],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group, as under a supervisor or a terminal
    )
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        try:
            return httpx.get(base + "/ready").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, 60, "server process ready")
        yield proc, base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def group_exited(proc: subprocess.Popen[str]) -> bool:
    """No process of the server's group (the engine process included) is left."""
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_sigterm_drains_running_requests_then_exits_zero() -> None:
    with server_process("--drain-timeout-s", "20") as (proc, base):
        lines: list[str] = []
        first = threading.Event()

        def consume() -> None:
            body = {"messages": MSGS, "max_tokens": 60, "stream": True}
            with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=30) as r:
                for line in r.iter_lines():
                    lines.append(line)
                    first.set()

        reader = threading.Thread(target=consume)
        reader.start()
        assert first.wait(10)
        # The whole group gets it, as from a terminal or a supervisor: the engine process ignores
        # it and keeps decoding until the HTTP process has drained and stops it.
        os.killpg(proc.pid, signal.SIGTERM)
        reader.join(30)
        assert proc.wait(30) == 0
        wait_until(lambda: group_exited(proc), 10, "the engine process to exit")
        # The running stream was allowed to finish (60 tokens at 20 ms, after SIGTERM).
        events = [line for line in lines if line]
        assert events[-1] == "data: [DONE]"
        assert any('"finish_reason":"length"' in line for line in lines)
        with pytest.raises(httpx.TransportError):  # and the listener is gone
            httpx.get(base + "/health", timeout=2)


def test_python_m_server_serves_and_stops_cleanly() -> None:
    """The real entry point: settings -> EngineConfig -> build_engine -> uvicorn."""
    with server_process("--model", "fake", "--served-model-name", "tiny", "--max-queue", "3",
                        entry=("-m", "server")) as (proc, base):
        r = httpx.post(base + "/v1/chat/completions", timeout=30,
                       json={"model": "tiny", "messages": MSGS, "max_tokens": 5})
        assert r.status_code == 200 and r.json()["model"] == "tiny"
        assert r.json()["usage"]["completion_tokens"] == 5
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        wait_until(lambda: group_exited(proc), 10, "the engine process to exit")


def test_engine_death_fails_requests_and_exits_nonzero() -> None:
    with server_process() as (proc, base):
        r = httpx.post(base + "/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": "CRASH"}]}, timeout=30)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert proc.wait(30) == 1
        out = proc.stdout.read() if proc.stdout else ""
        assert "injected engine step failure" in out and "engine died" in out
        wait_until(lambda: group_exited(proc), 10, "the engine process to exit")


def assert_engine_death_turns_health_red(running: Running, fatal: list[str], kill: object) -> None:
    """`kill()` ends the engine while a stream is open: the stream ends with an error event,
    the server turns unhealthy, refuses new work with 503 and reports the death once."""
    body = {"messages": MSGS, "max_tokens": 150, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", running.url("/v1/chat/completions"), json=body) as r:
        lines = r.iter_lines()
        next(lines)
        next(lines)
        kill()  # type: ignore[operator]
        rest = list(lines)
    # The open stream ends with an OpenAI error event, then [DONE].
    events = [line for line in rest if line]
    assert any('"error"' in e and "server_error" in e for e in events)
    assert events[-1] == "data: [DONE]"
    wait_until(lambda: httpx.get(running.url("/health")).status_code == 503, 5, "unhealthy")
    assert httpx.get(running.url("/ready")).status_code == 503
    r2 = httpx.post(running.url("/v1/chat/completions"), json={"messages": MSGS})
    assert r2.status_code == 503 and r2.json()["error"]["code"] == "engine_unavailable"
    assert fatal == ["engine died"]


def test_engine_death_in_process_turns_health_red() -> None:
    """--no-engine-process: the engine thread's step fails."""
    fatal: list[str] = []
    app = fake_app(step_s=0.05)
    app.state.dspark.on_fatal = fatal.append
    with serve(app) as running:

        def break_step() -> None:
            def broken_step(plan: object) -> None:
                raise RuntimeError("injected step failure")

            running.state.client.engine.runner.execute = broken_step  # type: ignore[union-attr]

        assert_engine_death_turns_health_red(running, fatal, break_step)


def test_a_killed_engine_process_turns_health_red() -> None:
    """The engine process is killed outright (out of memory, an operator): no last word."""
    fatal: list[str] = []
    app = process_app(fake_settings(), step_s=0.05)
    app.state.dspark.on_fatal = fatal.append
    with serve(app) as running:
        pid = running.state.client.engine.pid  # type: ignore[union-attr]
        assert_engine_death_turns_health_red(running, fatal, lambda: os.kill(pid, signal.SIGKILL))


def test_help_lists_flags_with_environment_twins() -> None:
    out = subprocess.run([sys.executable, "-m", "server", "--help"], cwd=ROOT, text=True,
                         capture_output=True, check=True,
                         env={**os.environ, "DSPARK_API_KEY": "hidden-value"}).stdout
    for flag in ("--host", "--port", "--model", "--served-model-name", "--device", "--dtype",
                 "--max-num-seqs", "--max-model-len", "--max-queue", "--api-key", "--speculative",
                 "--num-speculative-tokens", "--verify-policy", "--draft-checkpoint"):
        assert flag in out
    assert "DSPARK_MAX_QUEUE" in out
    assert "hidden-value" not in out  # the key from the environment is never echoed
