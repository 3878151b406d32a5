"""Start a server subprocess, wait until it is ready, scrape its counters, stop it cleanly.

The one place that spawns servers for the load tests, the gateway benchmarks and the deploy
tests. It speaks HTTP only: the server is a child process (`python -m server`, the load-test
stub, Prometheus: any command that answers on a ready path), never imported.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import httpx
from prometheus_client.parser import text_string_to_metric_families

# Counters whose deltas over a point are kept next to the client-side figures: the server's own
# token count cross-checks the client's, and acceptance is best taken from counter deltas.
COUNTERS = (
    "dspark_generation_tokens",
    "dspark_prompt_tokens",
    "dspark_spec_decode_num_drafts",
    "dspark_spec_decode_num_draft_tokens",
    "dspark_spec_decode_num_accepted_tokens",
)

# Longer than the server's default drain (30 s) plus its engine shutdown (5 s), so a graceful
# stop is never cut short by the kill that follows.
STOP_GRACE_S = 45.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_command(*args: str) -> list[str]:
    """`python -m server` on loopback, on the port ServerProcess fills in."""
    return [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", "{port}", *args]


class ServerProcess:
    """`cmd` with "{port}" filled in, run in its own process group until /ready answers 200.

    `log`: the file that takes the server's output (None: it shares this process's terminal).
    `env`: variables added to this process's environment. `ready_path`: the URL path polled
    until it answers 200. Use it as a context manager, or call start() and stop(). Stopping
    sends SIGTERM (the server drains and exits 0), then SIGKILL after STOP_GRACE_S, to the
    whole group this object created.
    """

    def __init__(
        self,
        cmd: list[str],
        port: int | None = None,
        log: Path | None = None,
        ready_timeout: float = 600.0,
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        ready_path: str = "/ready",
    ) -> None:
        self.port = free_port() if port is None else port
        self.cmd = [c.replace("{port}", str(self.port)) for c in cmd]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.ready_timeout = ready_timeout
        # Unbuffered, so the log tail in an error message is the whole story.
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.cwd = cwd
        self.ready_path = ready_path
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise RuntimeError("server not started")
        return self._proc

    def start(self) -> Self:
        with ExitStack() as stack:
            out: IO[bytes] | None = None
            if self.log is not None:
                self.log.parent.mkdir(parents=True, exist_ok=True)
                out = stack.enter_context(open(self.log, "ab"))
                out.write(f"$ {' '.join(self.cmd)}\n".encode())
                out.flush()
            self._proc = subprocess.Popen(
                self.cmd,
                stdout=out,
                stderr=None if out is None else subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def log_tail(self, chars: int = 4000) -> str:
        if self.log is None or not self.log.exists():
            return "(output went to the terminal)"
        return self.log.read_text(errors="replace")[-chars:]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        last: object = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                r = httpx.get(self.url + self.ready_path, timeout=2.0)
                if r.status_code == 200:
                    return
                last = r.status_code
            except httpx.HTTPError as e:
                last = e
            time.sleep(0.2)
        raise TimeoutError(
            f"{self.url}{self.ready_path} not ready after {self.ready_timeout:.0f}s "
            f"(last: {last!r}):\n{self.log_tail()}"
        )

    def stop(self, grace_s: float = STOP_GRACE_S) -> int | None:
        """The exit status: negative if a signal ended it, None if never started or unkillable."""
        if self._proc is None:
            return None
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            if self._proc.poll() is not None:
                break
            try:
                os.killpg(self._proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self._proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                continue
        return self._proc.poll()


def scrape_counters(url: str) -> dict[str, float]:
    """Sums of the known counters over their label sets; {} when /metrics is unavailable."""
    try:
        text = httpx.get(url + "/metrics", timeout=5.0).text
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError:
        return {}
    for fam in families:
        # Typed counters are families without "_total"; untyped lines keep the full name.
        name = fam.name.removesuffix("_total")
        if name in COUNTERS:
            total = sum(s.value for s in fam.samples if s.name == name + "_total")
            out[name] = out.get(name, 0.0) + total
    return out


def subtract(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}
