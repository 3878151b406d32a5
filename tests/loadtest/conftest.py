"""Fixtures: a stub streaming server in a subprocess (see loadtest_stub.py)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from loadtest.runtime import ServerProcess

STUB = Path(__file__).resolve().with_name("loadtest_stub.py")
REPO = Path(__file__).resolve().parents[2]


def stub_cmd(*args: str) -> list[str]:
    return [sys.executable, str(STUB), "--port", "{port}", *args]


@pytest.fixture
def start_stub(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def start(*args: str) -> ServerProcess:
        srv = ServerProcess(
            stub_cmd(*args), log=tmp_path / f"stub{len(started)}.log", ready_timeout=60
        )
        started.append(srv.start())
        return srv

    yield start
    for srv in started:
        srv.stop()
