"""docker/prometheus.yml: promtool accepts it, and a real Prometheus runs it against the service."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from .support import DOCKER, ServerProcess, start_prometheus, start_server

CONFIG = DOCKER / "prometheus.yml"


def check_config(promtool: str, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, "check", "config", str(path)], check=False, capture_output=True, text=True
    )


def test_promtool_accepts_the_shipped_config(promtool: str) -> None:
    proc = check_config(promtool, CONFIG)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout + proc.stderr


def test_promtool_rejects_a_broken_config(promtool: str, tmp_path: Path) -> None:
    """The check above can fail: a malformed duration is refused."""
    broken = tmp_path / "prometheus.yml"
    broken.write_text(CONFIG.read_text().replace("scrape_interval: 5s", "scrape_interval: 5 s"))
    assert broken.read_text() != CONFIG.read_text()
    assert check_config(promtool, broken).returncode != 0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = start_server(tmp_path_factory.mktemp("config-server"), ["--model", "fake"])
    yield srv
    srv.stop()


def test_shipped_config_scrapes_the_service(
    server: ServerProcess, prometheus_binary: str, tmp_path: Path
) -> None:
    """Only the compose DNS name is swapped for the loopback address; all else is as shipped."""
    config = yaml.safe_load(CONFIG.read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "dspark-serve")
    assert job["static_configs"][0]["targets"] == ["server:8000"]
    job["static_configs"][0]["targets"] = [server.url.removeprefix("http://")]
    prom = start_prometheus(prometheus_binary, tmp_path, "", config_text=yaml.safe_dump(config))
    try:
        deadline, result = time.monotonic() + 40, []
        while time.monotonic() < deadline:
            result = prom.query('dspark_num_requests_running{job="dspark-serve"}')["data"]["result"]
            if result:
                break
            time.sleep(0.5)
        assert result, "the shipped config never scraped the service"
        labels = result[0]["metric"]
        # The static label from the shipped config, for telling configurations apart.
        assert labels["config"] == job["static_configs"][0]["labels"]["config"]
        assert labels["model_name"]
    finally:
        prom.stop()
