"""The cluster's deployment files, checked offline: the compose `ray` profile, the Serve configs
for `serve run` / `serve deploy`, and the KubeRay RayService manifests (no Docker engine and no
Kubernetes cluster here: what KubeRay and Compose require is checked field by field)."""

from __future__ import annotations

import re
import shlex
import tomllib
from typing import Any

import pytest
import ray
import yaml
from ray.serve.schema import ServeDeploySchema

from server.cluster import DEPLOYMENT_NAME, build_app, build_cluster_parser, parse_cluster_args
from tests.deploy.support import DOCKER, REPO
from tests.deploy.test_compose import errors, interpolate, load

RAY_DIR = DOCKER / "ray"
KINDS = ["cpu", "cuda"]
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def ray_service() -> dict[str, Any]:
    return load(REPO / "docker-compose.yml")["services"]["ray"]


# --- compose -------------------------------------------------------------------------------


def test_compose_ray_profile_validates_against_compose_spec() -> None:
    doc = load(REPO / "docker-compose.yml")
    assert errors(doc) == []
    assert errors(yaml.safe_load(interpolate((REPO / "docker-compose.yml").read_text(), {}))) == []
    broken = {**doc, "services": {**doc["services"], "ray": {**ray_service(), "shm_sise": "1g"}}}
    assert any("shm_sise" in e for e in errors(broken))


def test_compose_ray_service_runs_the_cluster_command_with_real_flags() -> None:
    svc = ray_service()
    assert svc["profiles"] == ["ray"]
    entry = svc["entrypoint"]
    assert entry[:3] == ["python", "-m", "server.cluster"]
    argv = [*entry[3:], *svc["command"]]
    env = {k: interpolate(str(v), {}) for k, v in svc["environment"].items() if v is not None}
    flags = {a.dest for a in build_cluster_parser(env={})._actions}
    assert {k.removeprefix("DSPARK_").lower() for k in svc["environment"]} <= flags
    settings, options = parse_cluster_args(argv, env=env)
    assert (options.replicas, options.threads_per_replica) == (2, 1)
    assert (settings.host, settings.port) == ("0.0.0.0", 8000)
    assert svc["ports"] == [f"127.0.0.1:8001:{settings.port}"]
    assert f"127.0.0.1:{settings.port}/-/healthz" in " ".join(svc["healthcheck"]["test"])
    # Prometheus reaches the Serve endpoint (replica discovery) and Ray's own metrics port.
    jobs = {j["job_name"]: j for j in load(DOCKER / "prometheus.yml")["scrape_configs"]}
    (sd,) = jobs["dspark-replicas"]["http_sd_configs"]
    assert sd["url"] == f"http://ray:{settings.port}/metrics/replicas"
    assert jobs["ray"]["static_configs"][0]["targets"] == [f"ray:{options.ray_metrics_port}"]


def test_the_ray_image_installs_the_cluster_extra() -> None:
    svc = ray_service()
    extra = svc["build"]["args"]["EXTRAS"]
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    deps = pyproject["project"]["optional-dependencies"][extra]
    assert any(d.startswith("ray[serve]") for d in deps)
    for dockerfile in (DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda"):
        text = dockerfile.read_text()
        assert 'ARG EXTRAS=""' in text
        assert 'pip install -e ".${EXTRAS:+[${EXTRAS}]}"' in text
    assert ".[dev,cluster]" in (REPO / "Makefile").read_text()  # make test installs it


# --- Serve configs (serve run / serve deploy) ----------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_serve_config_is_a_valid_serve_deploy_config_that_builds(kind: str) -> None:
    config = yaml.safe_load((RAY_DIR / f"serve-{kind}.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == "server.cluster:build_app" and app.route_prefix == "/"
    deployment = build_app(app.args)._bound_deployment
    assert deployment.name == DEPLOYMENT_NAME
    auto = deployment._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas) == (app.args["min_replicas"],
                                                      app.args["max_replicas"])
    gpus = deployment.ray_actor_options["num_gpus"]
    assert (gpus > 0) == (kind == "cuda")


# --- KubeRay RayService --------------------------------------------------------------------


def manifest(kind: str) -> dict[str, Any]:
    return load(RAY_DIR / f"rayservice-{kind}.yaml")


def containers(group: dict[str, Any]) -> list[dict[str, Any]]:
    return group["template"]["spec"]["containers"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("kind", KINDS)
def test_rayservice_has_what_kuberay_requires(kind: str) -> None:
    doc = manifest(kind)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    assert DNS_1123.match(doc["metadata"]["name"])
    spec = doc["spec"]
    # serveConfigV2 is a string holding the Serve config: the same one as `serve deploy` uses.
    assert isinstance(spec["serveConfigV2"], str)
    served = yaml.safe_load(spec["serveConfigV2"])
    assert served == yaml.safe_load((RAY_DIR / f"serve-{kind}.yaml").read_text())
    ServeDeploySchema.model_validate(served)
    cluster = spec["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__  # KubeRay's and the image's Ray agree
    head = cluster["headGroupSpec"]
    groups = cluster["workerGroupSpecs"]
    assert groups, "replicas run on worker pods"
    for group in [head, *groups]:
        # rayStartParams is map[string]string in the CRD: a bare number is rejected.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        for c in containers(group):
            assert DNS_1123.match(c["name"]) and c["image"]
            for probe in ("readinessProbe", "livenessProbe"):
                # KubeRay's default probes run wget, which the image lacks; ours use Python.
                assert c[probe]["exec"]["command"][0] == "python"
    assert head["rayStartParams"]["num-cpus"] == "0"  # no replicas on the head
    ports = {p["name"]: p["containerPort"] for p in containers(head)[0]["ports"]}
    assert ports["serve"] == served["http_options"]["port"]
    assert ports["gcs-server"] == 6379 and ports["dashboard"] == 8265
    for group in groups:
        assert DNS_1123.match(group["groupName"])
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert cluster["enableInTreeAutoscaling"] is True  # Serve autoscaling can add pods


@pytest.mark.parametrize("kind", KINDS)
def test_rayservice_pods_fit_the_replicas_they_host(kind: str) -> None:
    doc = manifest(kind)
    args = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"][0]["args"]
    (group,) = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    (worker,) = containers(group)
    limits = worker["resources"]["limits"]
    cpus = int(limits["cpu"])
    assert cpus >= args["threads_per_replica"], "a pod holds at least one replica"
    gpus = int(limits.get("nvidia.com/gpu", 0))
    if kind == "cuda":
        assert gpus >= args["gpus_per_replica"] > 0
        assert any(t["key"] == "nvidia.com/gpu" for t in group["template"]["spec"]["tolerations"])
        assert worker["image"].endswith("cuda")
    else:
        assert gpus == 0 and "gpus_per_replica" not in args
    # The image named in the manifest is the one its header says how to build.
    build = [ln for ln in (RAY_DIR / f"rayservice-{kind}.yaml").read_text().splitlines()
             if "docker build" in ln]
    (command,) = build
    assert shlex.split(command.lstrip("# "))[-2] == worker["image"]
