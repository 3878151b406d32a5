"""docker-compose.yml against the compose-spec schema, plus the wiring a schema cannot see.

No Docker engine is available to `docker compose config` these files, so the schema that Compose
itself embeds is applied with jsonschema, before and after variable interpolation.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from scheduler.config import EngineConfig
from server.settings import ENV_PREFIX, ServerSettings, build_parser, parse_settings

from .support import DOCKER, REPO
from .test_dockerfiles import entrypoint, env_of, stages

SCHEMA = json.loads((Path(__file__).parent / "compose_spec" / "compose-spec.json").read_text())
COMPOSE = REPO / "docker-compose.yml"
CUDA_OVERRIDE = DOCKER / "compose.cuda.yml"
_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")
ENGINE_FIELDS = frozenset(f.name for f in fields(EngineConfig))


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's `${VAR}` / `${VAR:-default}` substitution (the forms these files use)."""
    return _VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), text)


def errors(doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(SCHEMA)
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


@pytest.mark.parametrize("path", [COMPOSE, CUDA_OVERRIDE], ids=lambda p: p.name)
def test_compose_files_validate_against_compose_spec(path: Path) -> None:
    assert errors(load(path)) == []
    assert errors(yaml.safe_load(interpolate(path.read_text(), {}))) == []


def test_schema_rejects_a_misspelt_key() -> None:
    """The validation above can fail: the schema forbids unknown service keys."""
    doc = copy.deepcopy(load(COMPOSE))
    doc["services"]["server"]["portz"] = doc["services"]["server"].pop("ports")
    assert any("portz" in e for e in errors(doc))


def test_services_and_load_profile() -> None:
    services = load(COMPOSE)["services"]
    assert set(services) == {"server", "prometheus", "grafana", "locust", "ray"}
    # `docker compose up` starts everything but Locust, which needs `--profile load`, and the
    # Ray Serve replicas, `--profile ray` (tests/cluster/test_deploy_files.py checks those).
    assert services["locust"]["profiles"] == ["load"]
    assert services["ray"]["profiles"] == ["ray"]
    profiled = {"locust", "ray"}
    assert all("profiles" not in s for name, s in services.items() if name not in profiled)
    assert services["locust"]["depends_on"]["server"]["condition"] == "service_healthy"


def test_ports_are_published_on_loopback_only() -> None:
    for name, svc in load(COMPOSE)["services"].items():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} on all interfaces"


def _dockerfile(path: Path) -> DockerfileParser:
    parser = DockerfileParser(fileobj=path.open("rb"))
    return parser


def test_server_port_healthcheck_and_scrape_target_agree() -> None:
    server = load(COMPOSE)["services"]["server"]
    dockerfile = _dockerfile(REPO / server["build"]["context"] / server["build"]["dockerfile"])
    exposed = [i["value"] for i in dockerfile.structure if i["instruction"] == "EXPOSE"]
    assert exposed == ["8000"]
    assert server["ports"] == ["127.0.0.1:8000:8000"]
    probe = " ".join(server["healthcheck"]["test"])
    assert "http://127.0.0.1:8000/health" in probe
    scrape = load(DOCKER / "prometheus.yml")["scrape_configs"]
    server_job = next(j for j in scrape if j["job_name"] == "dspark-serve")
    assert server_job["static_configs"][0]["targets"] == ["server:8000"]


def container_env(shell: dict[str, str]) -> dict[str, str]:
    """The server container's DSPARK_* environment as compose builds it from `shell`: a key
    given no value is passed on from the shell when set there, and left out otherwise."""
    env: dict[str, str] = {}
    for key, value in load(COMPOSE)["services"]["server"]["environment"].items():
        if value is not None:
            env[key] = interpolate(str(value), shell)
        elif key in shell:
            env[key] = shell[key]
    return env


def setting(settings: ServerSettings, name: str) -> Any:
    return getattr(settings.engine if name in ENGINE_FIELDS else settings, name)


def test_server_environment_names_real_settings() -> None:
    """Each DSPARK_* variable is a settings twin, and the set ones parse as the server would."""
    declared = load(COMPOSE)["services"]["server"]["environment"]
    flags = {a.dest for a in build_parser(env={})._actions}
    assert declared and all(k.startswith(ENV_PREFIX) for k in declared)
    assert {k.removeprefix(ENV_PREFIX).lower() for k in declared} <= flags
    env = container_env({})
    settings = parse_settings([], env=env)
    for key, value in env.items():
        assert str(setting(settings, key.removeprefix(ENV_PREFIX).lower())) == value
    # A value set in the shell reaches the server.
    shell = {"DSPARK_SPECULATIVE": "dspark", "DSPARK_NUM_SPECULATIVE_TOKENS": "4"}
    engine = parse_settings([], env=container_env(shell)).engine
    assert (engine.speculative, engine.num_speculative_tokens) == ("dspark", 4)


def make_serve_argv() -> list[str]:
    """The arguments `make serve` passes to `python -m server` when the user adds none."""
    env = {k: v for k, v in os.environ.items() if k not in ("ARGS", "MAKEFLAGS", "MFLAGS")}
    dry = subprocess.run(["make", "-n", "serve"], cwd=REPO, env=env, check=True,
                         capture_output=True, text=True).stdout
    (line,) = [ln for ln in dry.splitlines() if " -m server" in ln]
    argv = shlex.split(line)
    return argv[argv.index("server") + 1 :]


def test_every_way_of_starting_the_server_serves_the_engine_defaults() -> None:
    """`python -m server`, `make serve`, both images and compose run EngineConfig()'s
    configuration: nothing on their way to the engine overrides one of its defaults."""
    default = EngineConfig()
    assert parse_settings([], env={}).engine == default
    assert parse_settings(make_serve_argv(), env={}).engine == default
    for dockerfile in (DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda"):
        runtime = stages(dockerfile)[-1]
        entry = entrypoint(runtime)
        argv = entry[entry.index("server") + 1 :]
        image_env = env_of(runtime)
        # The image points the model cache at what its build converted; nothing else differs.
        expected = replace(default, cache_dir=image_env["DSPARK_CACHE_DIR"])
        assert parse_settings(argv, env=image_env).engine == expected, dockerfile.name
        compose_env = {**image_env, **container_env({})}
        assert parse_settings(argv, env=compose_env).engine == expected, dockerfile.name


def test_prometheus_mounts_the_checked_config() -> None:
    prom = load(COMPOSE)["services"]["prometheus"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in prom["volumes"]}
    assert (REPO / mounts["/etc/prometheus/prometheus.yml"]).resolve() == (
        DOCKER / "prometheus.yml"
    ).resolve()
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]


def test_grafana_is_provisioned_with_anonymous_viewers() -> None:
    grafana = load(COMPOSE)["services"]["grafana"]
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    host_dir = mounts[str(Path(home).parent)]
    assert (REPO / host_dir / Path(home).name).is_file()


def test_bind_mounts_exist() -> None:
    for name, svc in load(COMPOSE)["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("${"):
                continue  # a user-supplied folder (the prompt data), not part of the repo
            if source.startswith((".", "/")):
                assert (REPO / source).exists(), f"{name}: {source} missing"


def test_locust_runs_the_repository_locustfile_against_the_server() -> None:
    locust = load(COMPOSE)["services"]["locust"]
    args = shlex.split(locust["command"])
    locustfile = args[args.index("-f") + 1]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in locust["volumes"]}
    container_dir, file_name = os.path.split(locustfile)
    assert (REPO / mounts[container_dir] / file_name).is_file()
    assert args[args.index("--host") + 1] == "http://server:8000"
    served = load(COMPOSE)["services"]["server"]["environment"]["DSPARK_SERVED_MODEL_NAME"]
    assert interpolate(args[args.index("--model-name") + 1], {}) == interpolate(served, {})
    assert locust["environment"]["PYTHONPATH"] == locust["working_dir"]
    assert mounts[f"{locust['working_dir']}/loadtest"] == "./loadtest"


def test_cuda_override_selects_the_cuda_image_and_a_gpu() -> None:
    server = load(CUDA_OVERRIDE)["services"]["server"]
    assert (REPO / server["build"]["context"] / server["build"]["dockerfile"]).is_file()
    assert server["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    (device,) = server["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
