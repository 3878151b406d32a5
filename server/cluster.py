"""Many engine replicas behind one OpenAI endpoint, on Ray Serve.

    python -m server.cluster --replicas 2 --threads-per-replica 1
    python -m server.cluster --min-replicas 1 --max-replicas 4      # autoscaling
    serve run deploy/ray/serve-cpu.yaml                              # a running cluster

Each replica is the app `python -m server` serves (`create_app`, same routes, errors, streaming
and API key) with its own engine core process; Ray Serve's proxy routes every request to the
replica with the fewest ongoing requests, restarts replicas that die or fail their health
check, and scales their number on ongoing requests per replica. With `RAY_ADDRESS` unset this
command starts a local Ray head; with it set, it joins that cluster. Every server and engine
flag of `python -m server` applies to each replica; `--host`/`--port` are the Serve proxy's.

Admission stays the engine's: Serve may send a replica a few more requests than its engine
holds (`max_num_seqs + max_queue`), so the replica's own guard answers the surplus with the
usual 429, instead of Serve queueing them invisibly in its router.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import ray
from fastapi import FastAPI
from ray import serve
from ray.serve import Application
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.__main__ import engine_factory
from server.app import create_app
from server.replica_metrics import ReplicaExporter
from server.settings import ServerSettings, add_flag, build_parser, settings_from_values
from server.state import AppState

log = logging.getLogger("server.cluster")

DEPLOYMENT_NAME = "DSparkServer"
REPLICA_HEADER = "x-dspark-replica"
# Requests Serve may send a full replica beyond its engine's capacity: those get a 429 from the
# replica itself (cheap: refused before the body is read) rather than waiting in Serve's router.
ADMISSION_HEADROOM = 8
HEALTH_CHECK_PERIOD_S = 2.0
HEALTH_CHECK_TIMEOUT_S = 10.0
READY_POLL_S = 0.1


def _option(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ClusterOptions:
    replicas: int = _option(1, "replicas when not autoscaling (each one engine core)")
    min_replicas: int = _option(1, "autoscaling floor (used when --max-replicas is set)")
    max_replicas: int = _option(
        0, "autoscaling ceiling; 0: no autoscaling, exactly --replicas replicas"
    )
    target_ongoing_requests: float = _option(
        0.0, "autoscaling target of ongoing requests per replica (0: the engine's max_num_seqs)"
    )
    threads_per_replica: int = _option(
        1, "CPUs Ray reserves per replica, and the engine's torch threads"
    )
    gpus_per_replica: float = _option(0.0, "GPUs Ray reserves per replica (CUDA images)")
    app_name: str = _option("dspark", "Ray Serve application name")
    object_store_mb: int = _option(
        128, "object store of a local Ray head (requests travel as HTTP, not objects: keep small)"
    )
    ray_metrics_port: int = _option(
        0, "port of a local Ray head's own metrics (ray_serve_* series); 0: Ray picks one"
    )

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError("replicas must be >= 1")
        if self.max_replicas and not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError("need 0 <= min_replicas <= max_replicas")
        if self.threads_per_replica < 1:
            raise ValueError("threads_per_replica must be >= 1")
        if self.object_store_mb < 80:
            raise ValueError("object_store_mb must be >= 80 (Ray's minimum is about 75 MB)")


_CLUSTER_FIELDS = tuple(f.name for f in fields(ClusterOptions))


def build_cluster_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    env = os.environ if env is None else env
    parser = build_parser(env)
    parser.prog = "python -m server.cluster"
    parser.description = (
        "dspark-serve replicas on Ray Serve behind one OpenAI endpoint (a local Ray head when "
        "RAY_ADDRESS is unset). --host/--port are the Serve proxy's."
    )
    group = parser.add_argument_group("cluster (Ray Serve)")
    for f in fields(ClusterOptions):
        add_flag(group, f, env)
    return parser


def parse_cluster_args(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> tuple[ServerSettings, ClusterOptions]:
    parser = build_cluster_parser(env)
    values = vars(parser.parse_args(argv))
    try:
        options = ClusterOptions(**{name: values.pop(name) for name in _CLUSTER_FIELDS})
        values["threads"] = options.threads_per_replica  # the engine uses what Ray reserved
        return settings_from_values(values), options
    except ValueError as exc:
        parser.error(str(exc))  # exits with status 2 and the usage, as for any bad flag


def args_to_argv(args: Mapping[str, Any]) -> list[str]:
    """A `serve run` / config-file `args:` mapping as the flags it stands for
    ({"max_replicas": 4, "warmup": False} -> --max-replicas 4 --no-warmup). `serve run`'s
    `key=value` arguments arrive as strings, so "true" and "false" are booleans too."""
    argv: list[str] = []
    for key, value in args.items():
        flag = "--" + str(key).replace("_", "-")
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    return argv


# --- the replica --------------------------------------------------------------------------


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class DSparkReplica:
    """One engine core and the full `python -m server` app in front of it."""

    async def __init__(self, settings: ServerSettings) -> None:  # type: ignore[misc]
        self._settings = settings
        self._app: FastAPI | None = None
        self._exporter: ReplicaExporter | None = None

    async def __serve_build_asgi_app__(self) -> FastAPI:
        # Engine death: the app fails what is pending and turns /health to 503; check_health
        # then fails and Serve replaces this replica (python -m server would exit instead).
        app = create_app(self._settings, engine_factory(self._settings),
                         on_fatal=lambda reason: log.error("replica unhealthy: %s", reason))
        context = serve.get_replica_context()
        self._exporter = ReplicaExporter(
            app.state.dspark.metrics.registry,
            context.replica_tag,
            {"application": context.app_name, "deployment": context.deployment},
        )
        self._exporter.start()
        exporter = self._exporter

        async def replica_targets() -> list[dict[str, Any]]:
            return await exporter.targets()

        app.add_api_route("/metrics/replicas", replica_targets, methods=["GET"],
                          include_in_schema=False)
        app.add_middleware(ReplicaHeader, replica=context.replica_tag)  # type: ignore[arg-type]
        self._app = app
        return app

    @property
    def _state(self) -> AppState:
        assert self._app is not None
        return self._app.state.dspark  # type: ignore[no-any-return]

    async def check_health(self) -> None:
        """Serve holds traffic back until a replica's first check passes, so that one waits
        for the model load and warm-up; later checks fail once the engine has died."""
        state = self._state
        while not state.ready and state.fatal is None:
            await asyncio.sleep(READY_POLL_S)
        if state.fatal is not None:
            raise RuntimeError(f"replica unhealthy: {state.fatal}")

    async def __del__(self) -> None:
        if self._exporter is not None:
            await self._exporter.close()


class ReplicaHeader:
    """Names the replica that answered (`x-dspark-replica`), the tag Ray Serve's own series and
    logs carry: which replica served a request, readable before its body arrives."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app = app
        self._header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self._header]}
            await send(message)

        await self.app(scope, receive, tagged)


def deployment_options(settings: ServerSettings, options: ClusterOptions) -> dict[str, Any]:
    capacity = settings.engine.max_num_seqs + settings.max_queue
    out: dict[str, Any] = {
        "ray_actor_options": {
            "num_cpus": options.threads_per_replica,
            "num_gpus": options.gpus_per_replica,
        },
        "max_ongoing_requests": capacity + ADMISSION_HEADROOM,
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S,
        "graceful_shutdown_timeout_s": settings.drain_timeout_s,
    }
    if options.max_replicas:
        target = options.target_ongoing_requests or settings.engine.max_num_seqs
        out["autoscaling_config"] = {
            "min_replicas": options.min_replicas,
            "max_replicas": options.max_replicas,
            "target_ongoing_requests": target,
        }
    else:
        out["num_replicas"] = options.replicas
    return out


def application(settings: ServerSettings, options: ClusterOptions) -> Application:
    deployment = DSparkReplica.options(**deployment_options(settings, options))  # type: ignore[attr-defined]
    return deployment.bind(settings)  # type: ignore[no-any-return]


def build_app(args: dict[str, Any]) -> Application:
    """The application builder for `serve run server.cluster:build_app key=value ...` and for
    `import_path: server.cluster:build_app` in a Serve config file (its `args:` are the flags)."""
    settings, options = parse_cluster_args(args_to_argv(args))
    return application(settings, options)


# --- python -m server.cluster -------------------------------------------------------------


def connect(options: ClusterOptions, log_level: str = "info") -> bool:
    """Join RAY_ADDRESS's cluster, or start a local head; True when a local head was started."""
    level = logging.getLevelNamesMapping()[log_level.upper()]
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=level)
        return False
    head: dict[str, Any] = {
        "object_store_memory": options.object_store_mb * 2**20,
        "include_dashboard": False,
        "logging_level": level,
        # Ray runs its workers at niceness 15 by default, as background jobs; here a replica's
        # engine is the foreground work of the machine, as under `python -m server`.
        "_system_config": {"worker_niceness": 0},
    }
    if options.ray_metrics_port:
        head["_metrics_export_port"] = options.ray_metrics_port
    ray.init(**head)
    return True


class _Stop(Exception):
    """SIGTERM or SIGINT: leave whatever is running (even `serve.run` still waiting for the
    model to load) and shut down."""


def _stop(*_: Any) -> None:
    raise _Stop


def main(argv: Sequence[str] | None = None) -> int:
    settings, options = parse_cluster_args(argv)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    local = connect(options, settings.log_level)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(application(settings, options), name=options.app_name, route_prefix="/")
        log.info("serving on http://%s:%d (%s)", settings.host, settings.port,
                 "local Ray head" if local else f"cluster {os.environ['RAY_ADDRESS']}")
        while True:
            signal.pause()
    except _Stop:
        log.info("stopping: replicas drain for up to %.0fs", settings.drain_timeout_s)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal must not cut the cleanup
            signal.signal(sig, signal.SIG_IGN)
        # Replicas drain like `python -m server` on SIGTERM (graceful_shutdown_timeout_s).
        serve.delete(options.app_name)
        if local:
            serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    # Run the copy imported as `server.cluster`: Ray pickles the deployment class by reference,
    # which a class of `__main__` cannot be on another worker.
    from server.cluster import main as cluster_main

    sys.exit(cluster_main())
