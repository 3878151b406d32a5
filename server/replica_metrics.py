"""Every replica's `dspark_*` series in Prometheus, labelled by replica, beside Ray Serve's own.

Behind Ray Serve, `/metrics` on the shared endpoint answers from whichever replica the router
picks, so it cannot be scraped. Instead each replica serves its own registry (the same
`Metrics` as `python -m server`, names unchanged) on a port of its node, and registers that
address with one small named actor, the directory. Prometheus discovers the replicas through
`GET /metrics/replicas` on the shared endpoint, in its HTTP service-discovery format
(`http_sd_configs`), each target carrying the labels Ray Serve puts on its own series
(`application`, `deployment`, `replica`), so the two line up in one query or one dashboard.

A replica refreshes its entry every `HEARTBEAT_S`; an entry not refreshed for `EXPIRY_S` is
dropped, so a replica that was killed (no chance to unregister) leaves discovery by itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import ray
from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger(__name__)

DIRECTORY_NAME = "dspark-metrics-directory"
DIRECTORY_NAMESPACE = "dspark"
HEARTBEAT_S = 5.0
EXPIRY_S = 3 * HEARTBEAT_S


@dataclass(frozen=True)
class ReplicaTarget:
    address: str  # host:port of the replica's metrics listener
    labels: dict[str, str]


@ray.remote(num_cpus=0, max_restarts=-1)
class MetricsDirectory:
    """Replica tag -> (target, last heartbeat). One per cluster, shared by every replica."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[ReplicaTarget, float]] = {}

    def register(self, replica: str, target: ReplicaTarget) -> None:
        self._entries[replica] = (target, time.monotonic())

    def unregister(self, replica: str) -> None:
        self._entries.pop(replica, None)

    def targets(self) -> list[dict[str, Any]]:
        """The live replicas in Prometheus's HTTP SD format, ordered by replica tag."""
        now = time.monotonic()
        self._entries = {k: v for k, v in self._entries.items() if now - v[1] <= EXPIRY_S}
        return [
            {"targets": [t.address], "labels": dict(t.labels)}
            for _, (t, _) in sorted(self._entries.items())
        ]


def directory() -> Any:
    """The cluster's directory actor, created by whoever asks first (detached: it outlives the
    replica that made it; restarted by Ray if its process dies, then refilled by heartbeats)."""
    return MetricsDirectory.options(  # type: ignore[attr-defined]
        name=DIRECTORY_NAME,
        namespace=DIRECTORY_NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
    ).remote()


class ReplicaExporter:
    """One replica's metrics listener and its heartbeat into the directory."""

    def __init__(self, registry: CollectorRegistry, replica: str, labels: dict[str, str],
                 bind_host: str = "0.0.0.0") -> None:
        self._server, self._thread = start_http_server(0, addr=bind_host, registry=registry)
        host = ray.util.get_node_ip_address()
        self.replica = replica
        self.target = ReplicaTarget(f"{host}:{self._server.server_port}",
                                    {**labels, "replica": replica})
        self._directory = directory()
        self._heartbeat: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Register now and keep the entry fresh (call from the replica's event loop)."""
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat())

    async def _beat(self) -> None:
        while True:
            try:
                await self._directory.register.remote(self.replica, self.target)
            except Exception:  # the directory is restarting: the next beat registers again
                log.warning("metrics directory unreachable; retrying", exc_info=True)
            await asyncio.sleep(HEARTBEAT_S)

    async def targets(self) -> list[dict[str, Any]]:
        return await self._directory.targets.remote()  # type: ignore[no-any-return]

    async def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        try:
            await self._directory.unregister.remote(self.replica)
        except Exception:
            log.warning("could not unregister from the metrics directory", exc_info=True)
        self._server.shutdown()
        self._server.server_close()
