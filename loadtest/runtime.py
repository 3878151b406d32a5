"""Start a server subprocess, wait until it is ready, scrape its counters, stop it cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Self

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`cmd` with "{port}" filled in, run in its own process group, log to `log`.

    On exit: SIGINT (graceful shutdown), then SIGTERM, then SIGKILL, each after a grace period,
    all sent to the group this object created.
    """

    def __init__(self, cmd: list[str], port: int, log: Path, ready_timeout: float = 600.0) -> None:
        self.cmd = [c.replace("{port}", str(port)) for c in cmd]
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as f:
            f.write(f"$ {' '.join(self.cmd)}\n".encode())
            self.proc = subprocess.Popen(
                self.cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{tail}")
            try:
                if httpx.get(self.url + "/ready", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready after {self.ready_timeout:.0f}s; see {self.log}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, grace in ((signal.SIGINT, 20.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(grace)
                return
            except subprocess.TimeoutExpired:
                continue


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
