"""A local Ray head with the Serve application on it, as `python -m server.cluster` builds it."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx

# The embedded SmolLM2 in float32 (the exactness reference), no drafting and no start-up
# profile: the quickest real engine to load, twice (and once more after the fault test).
REAL_MODEL_FLAGS = [
    "--dtype", "float32", "--device", "cpu", "--max-num-seqs", "8", "--max-model-len", "512",
    "--max-num-batched-tokens", "256", "--speculative", "none", "--no-profile-on-start",
]
API_KEY = "cluster-test-key"
APP_NAME = "dspark"
REPORT_INTERVAL_ENV = "RAY_metrics_report_interval_ms"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(cond: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


@dataclass
class LocalCluster:
    base_url: str
    ray_metrics_port: int
    settings: Any
    options: Any

    def url(self, path: str) -> str:
        return self.base_url + path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"}

    def replica_targets(self) -> list[dict[str, Any]]:
        r = httpx.get(self.url("/metrics/replicas"), timeout=30)
        r.raise_for_status()
        return r.json()  # type: ignore[no-any-return]

    def running_replicas(self) -> int:
        from ray import serve

        app = serve.status().applications.get(APP_NAME)
        if app is None:
            return 0
        (deployment,) = app.deployments.values()
        return int(deployment.replica_states.get("RUNNING", 0))


@contextmanager
def local_cluster(flags: list[str]) -> Iterator[LocalCluster]:
    """A local Ray head (small object store, no dashboard) serving `flags` on a free port;
    `serve.run` returns once every replica has passed its first health check (model loaded)."""
    import ray
    from ray import serve

    from server.cluster import application, connect, parse_cluster_args

    port, metrics_port = free_port(), free_port()
    settings, options = parse_cluster_args(
        [*flags, "--port", str(port), "--ray-metrics-port", str(metrics_port),
         "--log-level", "warning"],
        env={},
    )
    # Ray reports its own metrics every 10 s by default; a second keeps the metrics test short
    # (read by the head's processes as they start, so it is unset again right after).
    previous = os.environ.get(REPORT_INTERVAL_ENV)
    os.environ[REPORT_INTERVAL_ENV] = "1000"
    try:
        connect(options, "warning")
    finally:
        if previous is None:
            os.environ.pop(REPORT_INTERVAL_ENV)
        else:
            os.environ[REPORT_INTERVAL_ENV] = previous
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application(settings, options), name=APP_NAME, route_prefix="/")
        yield LocalCluster(f"http://127.0.0.1:{port}", metrics_port, settings, options)
    finally:
        # Not serve.shutdown(): that drains every replica first; ray.shutdown() ends the
        # replicas outright, and each engine process stops when its replica's process is gone.
        ray.shutdown()


@dataclass
class StreamResult:
    status: int
    replica: str | None
    text: str = ""
    done: bool = False  # the stream ended with `data: [DONE]`
    error: str | None = None  # an SSE error event, or how the transport failed


async def stream_chat(
    client: httpx.AsyncClient, body: dict[str, Any], result: StreamResult | None = None
) -> StreamResult:
    """One streamed chat completion, read to its end or its failure (never raises); `result`,
    if given, is filled in as the stream goes, for a caller that watches it mid-way."""
    import json

    result = result or StreamResult(status=0, replica=None)
    try:
        async with client.stream("POST", "/v1/chat/completions",
                                 json={**body, "stream": True}) as r:
            from server.cluster import REPLICA_HEADER

            result.status, result.replica = r.status_code, r.headers.get(REPLICA_HEADER)
            if r.status_code != 200:
                result.error = (await r.aread()).decode()
                return result
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    result.done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        result.error = chunk["error"]["message"]
                    for choice in chunk.get("choices", []):
                        result.text += choice["delta"].get("content") or ""
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result
