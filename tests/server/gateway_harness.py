"""Harness for gateway tests: real uvicorn servers on loopback around a chosen engine."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI
from gateway_doubles import Script, ScriptedEngine, ScriptedThread

from scheduler.config import EngineConfig
from server.app import create_app
from server.settings import ServerSettings
from server.state import AppState

# The torch-free fake model, no drafting (tests that speculate ask for it), no startup profile.
FAKE_ENGINE = EngineConfig(model="fake", max_num_seqs=4, max_model_len=512,
                           max_num_batched_tokens=64, speculative="none", profile_on_start=False)
FAKE_SETTINGS = ServerSettings(max_queue=64, engine=FAKE_ENGINE)
_ENGINE_FIELDS = frozenset(f.name for f in fields(EngineConfig))


def fake_settings(**overrides: Any) -> ServerSettings:
    """FAKE_SETTINGS with server and engine fields overridden by name, as flags would."""
    engine = {k: v for k, v in overrides.items() if k in _ENGINE_FIELDS}
    server = {k: v for k, v in overrides.items() if k not in _ENGINE_FIELDS}
    return replace(FAKE_SETTINGS, engine=replace(FAKE_SETTINGS.engine, **engine), **server)


@dataclass
class Running:
    app: FastAPI
    base_url: str
    server: uvicorn.Server

    @property
    def state(self) -> AppState:
        return self.app.state.dspark  # type: ignore[no-any-return]

    def url(self, path: str) -> str:
        return self.base_url + path

    def metric(self, name: str, **labels: str) -> float:
        """Current value of one sample from /metrics (0 if absent)."""
        text = httpx.get(self.url("/metrics")).text
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(cond: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def serve(app: FastAPI, wait_ready: bool = True, timeout_s: float = 60.0) -> Iterator[Running]:
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    running = Running(app, f"http://127.0.0.1:{port}", server)
    wait_until(lambda: server.started, timeout_s, "uvicorn start")
    if wait_ready:
        wait_until(lambda: httpx.get(running.url("/ready")).status_code == 200, timeout_s, "ready")
    try:
        yield running
    finally:
        server.should_exit = True
        thread.join(30)


def fake_engine_factory(
    step_s: float = 0.002, config: EngineConfig = FAKE_ENGINE
) -> Callable[[], Any]:
    def build() -> Any:
        from scheduler.build import build_engine

        engine = build_engine(config)
        engine.runner.step_time_s = step_s  # a few ms per step: realistic interleaving
        return engine

    return build


def fake_app(settings: ServerSettings = FAKE_SETTINGS, step_s: float = 0.002, **config: Any) -> FastAPI:
    """The real engine (scheduler.engine) around the torch-free FakeRunner; `config` overrides
    the settings' engine fields for the engine alone."""
    return create_app(settings, fake_engine_factory(step_s, replace(settings.engine, **config)))


def fake_tokenizer() -> Any:
    from scheduler.fake import build_fake_tokenizer

    return build_fake_tokenizer()


def scripted_app(script: Script, settings: ServerSettings = FAKE_SETTINGS, **engine_kw: Any) -> FastAPI:
    tok = fake_tokenizer()
    engine = ScriptedEngine(tok, script, **engine_kw)
    return create_app(settings, lambda: engine, thread_factory=ScriptedThread)


def fake_text_script(tok: Any) -> Script:
    """The fake engine's output (scheduler.fake.FAKE_TEXT, one byte per token, then EOS)."""
    from scheduler.fake import FAKE_TEXT

    ids = [*tok.encode(FAKE_TEXT, add_special_tokens=False), tok.eos_token_id]
    return lambda req: ids
