"""Single-process serving, the reference the replicas must equal: `python -m server`'s app
(engine core in its own process) on loopback, with the same flags as each replica."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn

from server.__main__ import engine_factory
from server.app import create_app
from server.settings import parse_settings

from .support import free_port, wait_until


@contextmanager
def single_process_server(flags: list[str]) -> Iterator[str]:
    """The base URL of one `python -m server`-equivalent server until the block ends. It may
    still be loading: `wait_ready(url)` before the first request (so a caller can start other
    things, a Ray head, meanwhile)."""
    settings = parse_settings([*flags, "--log-level", "warning"], env={})
    app = create_app(settings, engine_factory(settings))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: server.started, 30, "uvicorn start")
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


def wait_ready(url: str, timeout_s: float = 180) -> None:
    wait_until(lambda: httpx.get(url + "/ready").status_code == 200, timeout_s,
               "the single-process server to load")
