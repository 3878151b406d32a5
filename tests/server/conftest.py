"""Server test fixtures: real uvicorn servers on loopback, built around engines of three kinds.

- `fake_server` / `fake_app(...)`: the real engine around the torch-free `model="fake"` runner
  (most tests).
- `scripted_app(...)`: the ScriptedThread double (exact token scripts, recorded requests).
- `real_server`: the embedded SmolLM2 model, one server for the whole session.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from gateway_harness import FAKE_SETTINGS, Running, fake_engine_factory, serve

from scheduler.config import EngineConfig
from server.app import create_app


@pytest.fixture(scope="module")
def fake_server() -> Iterator[Running]:
    with serve(create_app(FAKE_SETTINGS, fake_engine_factory())) as running:
        yield running


@pytest.fixture(scope="session")
def real_server() -> Iterator[Running]:
    """The embedded SmolLM2 (float32, CPU, no drafting) behind a real server, for the session."""
    import torch

    from scheduler.build import build_engine

    torch.set_num_threads(2)
    engine = EngineConfig(dtype="float32", device="cpu", max_num_seqs=8, max_model_len=1024,
                          max_num_batched_tokens=256, speculative="none")
    settings = replace(FAKE_SETTINGS, max_queue=64, engine=engine)

    def build() -> Any:
        return build_engine(settings.engine)

    with serve(create_app(settings, build), timeout_s=300) as running:
        yield running
