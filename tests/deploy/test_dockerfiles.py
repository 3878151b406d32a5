"""The Dockerfiles, checked without a Docker engine.

Static: what each stage copies exists and survives the build-context whitelist, the model is
converted into the cache the runtime stage reads, and the runtime is forced offline.
Dynamic (slow): the exact conversion command from the Dockerfile is run into a fresh cache, then
the real server starts from that cache with the hub switched off and answers a request, which is
what the image does when it starts.
"""

from __future__ import annotations

import fnmatch
import os
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import pytest
from dockerfile_parse import DockerfileParser

from scheduler.loader import default_cache_dir

from .support import DOCKER, REPO, start_server

DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda"]
Stage = list[dict[str, str]]


def stages(path: Path) -> list[Stage]:
    """Instructions grouped by build stage (each FROM starts one)."""
    out: list[Stage] = []
    for ins in DockerfileParser(fileobj=path.open("rb")).structure:
        if ins["instruction"] == "FROM":
            out.append([])
        if out:
            out[-1].append(ins)
    return out


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in stage:
        if ins["instruction"] == "ENV":
            for pair in shlex.split(ins["value"]):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def included(ignore_file: Path, path: str) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or a parent decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    keep = True
    for line in ignore_file.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").rstrip("/")
        if any(fnmatch.fnmatch(p, pattern) for p in prefixes):
            keep = negate
    return keep


def copy_sources(stage: Stage) -> list[str]:
    out = []
    for ins in stage:
        if ins["instruction"] == "COPY" and "--from=" not in ins["value"]:
            args = [a for a in shlex.split(ins["value"]) if not a.startswith("--")]
            out += args[:-1]
    return out


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copied_sources_exist_and_pass_the_context_whitelist(dockerfile: Path) -> None:
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    build = stages(dockerfile)[0]
    sources = copy_sources(build)
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    # `pip install -e .` needs the readme pyproject names and every package it finds.
    needed = {"pyproject.toml", pyproject["project"]["readme"]} | {
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    assert needed <= set(sources), f"not copied: {needed - set(sources)}"
    for src in sources:
        assert (REPO / src).exists(), f"{dockerfile.name} copies {src}, which does not exist"
        assert included(ignore, src), f"{src} is excluded by {ignore.name}"
        probe = src if (REPO / src).is_file() else f"{src}/__init__.py"
        assert included(ignore, probe), f"{probe} is excluded by {ignore.name}"
    assert not included(ignore, ".venv/bin/python")
    assert not included(ignore, "server/__pycache__/app.cpython-311.pyc")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_model_is_converted_into_the_cache_the_runtime_reads(dockerfile: Path) -> None:
    build, runtime = stages(dockerfile)
    cache = env_of(build)["DSPARK_CACHE_DIR"]
    assert env_of(runtime)["DSPARK_CACHE_DIR"] == cache
    runs = " ".join(i["value"] for i in build if i["instruction"] == "RUN")
    assert "load_target(" in runs
    copies = [i["value"] for i in runtime if i["instruction"] == "COPY"]
    assert any("--from=build" in c and cache.startswith(c.split()[-1]) for c in copies)
    # The runtime must never reach for a hub: a missing file should fail loudly, not download.
    assert env_of(runtime)["HF_HUB_OFFLINE"] == "1"
    assert env_of(runtime)["TRANSFORMERS_OFFLINE"] == "1"


def entrypoint(stage: Stage) -> list[str]:
    """The exec-form ENTRYPOINT as an argument list."""
    (value,) = [i["value"] for i in stage if i["instruction"] == "ENTRYPOINT"]
    return shlex.split(value.replace("[", "").replace("]", "").replace(",", " "))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runtime_serves_on_all_interfaces_with_a_liveness_probe(dockerfile: Path) -> None:
    runtime = stages(dockerfile)[-1]
    by = {i["instruction"]: i["value"] for i in runtime}
    entry = entrypoint(runtime)
    assert entry[:3] == ["python", "-m", "server"]
    assert entry[entry.index("--host") + 1] == "0.0.0.0"
    assert entry[entry.index("--port") + 1] == by["EXPOSE"] == "8000"
    assert "http://127.0.0.1:8000/health" in by["HEALTHCHECK"]
    assert by["USER"] != "root"


def conversion_command(dockerfile: Path) -> str:
    """The Python source passed to `python -c` in the RUN that converts the model."""
    for ins in stages(dockerfile)[0]:
        if ins["instruction"] == "RUN" and "load_target(" in ins["value"]:
            first = ins["value"].split("&&")[0]
            argv = shlex.split(first)
            return argv[argv.index("-c") + 1]
    raise AssertionError("no conversion RUN")


@pytest.mark.slow
def test_build_conversion_then_offline_start(tmp_path: Path) -> None:
    """Emulates the image: convert at 'build' time, then serve with the hub switched off."""
    cache = tmp_path / "cache"
    env = {**os.environ, "DSPARK_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    convert = subprocess.run(
        [sys.executable, "-c", conversion_command(DOCKER / "Dockerfile")],
        cwd=REPO,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert convert.returncode == 0, convert.stderr[-3000:]
    baked = cache / "models" / "SmolLM2-135M-Instruct"
    assert (baked / "config.json").is_file()
    stamps = {p.name: p.stat().st_mtime_ns for p in baked.iterdir()}
    # Any other cache the server might fall back to is empty, so using it would show up below.
    elsewhere = tmp_path / "xdg"
    offline = {
        "DSPARK_CACHE_DIR": str(cache),
        "XDG_CACHE_HOME": str(elsewhere),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        # The compiled step comes from the suite's shared graph cache (a folder the user chose is
        # kept): compiling it afresh into this new cache would add minutes and test nothing here.
        "TORCHINDUCTOR_CACHE_DIR": str(default_cache_dir() / "inductor"),
    }
    # A smaller step budget than the image's: start-up still runs every stage the image's does
    # (the weights measurement, the compiled step, the throughput profile, the warm-up), but the
    # profile times steps of up to 64 tokens instead of 512 (over a minute on a busy 2-core host).
    # Slots and length stay as they were: another KV cache shape compiles another graph.
    small = ["--max-model-len", "256", "--max-num-batched-tokens", "64"]
    server = start_server(tmp_path, small, env=offline, ready_timeout_s=600)
    try:
        model = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]["id"]
        r = httpx.post(
            f"{server.url}/v1/completions",
            json={"model": model, "prompt": "Hello", "max_tokens": 4},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1
    finally:
        server.stop()
    assert {p.name: p.stat().st_mtime_ns for p in baked.iterdir()} == stamps, "cache rewritten"
    assert not list(cache.glob("models/*.tmp")), "the server converted again instead of reusing"
    assert not (elsewhere / "dspark-serve").exists(), "the server used a cache outside the image's"
