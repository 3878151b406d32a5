"""The compose `locust` service's command, run the way its container would run it.

Only what compose mounts is visible: the loadtest folder copied alone into a scratch
/mnt/dspark, the prompt data through DSPARK_DATA_DIR, the working directory and PYTHONPATH from
the service. The server host is swapped for a live fake-model server on loopback, and the UI
run is swapped for a short headless one.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from .support import REPO, ServerProcess, start_server

SERVICE = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["locust"]


def host_data_dir() -> Path:
    """What compose mounts at the data path: $DSPARK_DATA_DIR, else the default beside the repo."""
    source = next(v for v in SERVICE["volumes"] if v.endswith(":/mnt/dspark/data:ro"))
    default = source.split(":-", 1)[1].split("}", 1)[0]
    return Path(os.environ.get("DSPARK_DATA_DIR") or REPO / default)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = start_server(tmp_path_factory.mktemp("locust-server"), ["--model", "fake"])
    yield srv
    srv.stop()


def success_count(url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "dspark_request_success_total"
    )


def test_compose_locust_command_drives_the_server(server: ServerProcess, tmp_path: Path) -> None:
    data = host_data_dir()
    assert (data / "mt_bench" / "question.jsonl").is_file(), f"prompt data not found in {data}"
    root = tmp_path / "mnt" / "dspark"
    shutil.copytree(
        REPO / "loadtest", root / "loadtest", ignore=shutil.ignore_patterns("__pycache__")
    )
    container = SERVICE["working_dir"]
    env = {k: str(v).replace(container, str(root)) for k, v in SERVICE["environment"].items()}
    env["DSPARK_DATA_DIR"] = str(data)  # the container path is a mount of this folder
    args = [a.replace(container, str(root)) for a in shlex.split(SERVICE["command"])]
    args[args.index("--host") + 1] = server.url
    # Compose fills in the served model name; this server serves the fake model.
    args[args.index("--model-name") + 1] = httpx.get(f"{server.url}/v1/models").json()["data"][0][
        "id"
    ]
    before = success_count(server.url)
    proc = subprocess.run(
        [sys.executable, "-m", "locust", *args, "--headless", "-u", "2", "-r", "2", "-t", "6s"]
        + ["--max-tokens", "16", "--exit-code-on-error", "1", "--only-summary"],
        cwd=root,
        env={**os.environ, **env},
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert success_count(server.url) > before
