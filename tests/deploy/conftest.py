"""Fixtures for the deployment tests: Debian's Prometheus tools, installed on first use."""

from __future__ import annotations

import pytest

from .support import ensure_prometheus_tools


@pytest.fixture(scope="session")
def prometheus_tools() -> tuple[str, str]:
    """(promtool, prometheus) paths; runs ensure_prometheus.sh (apt-get) when they are missing."""
    return ensure_prometheus_tools()


@pytest.fixture(scope="session")
def promtool(prometheus_tools: tuple[str, str]) -> str:
    return prometheus_tools[0]


@pytest.fixture(scope="session")
def prometheus_binary(prometheus_tools: tuple[str, str]) -> str:
    return prometheus_tools[1]
