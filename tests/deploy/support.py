"""Shared helpers for the deployment tests: dashboard queries, metric names, child processes.

Nothing here fakes a tool: promtool and prometheus are Debian's binaries, the server is the real
`python -m server` process (started by loadtest.runtime, as the load tests and benchmarks start
it), and PromQL is parsed by promql-parser (a port of Prometheus's parser).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import promql_parser
from prometheus_client.parser import text_string_to_metric_families

from loadtest.runtime import ServerProcess, free_port, server_command

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DASHBOARD_DIR = DOCKER / "grafana" / "dashboards"
PROVISIONING = DOCKER / "grafana" / "provisioning"
ENSURE_SCRIPT = Path(__file__).resolve().parent / "ensure_prometheus.sh"
DATASOURCE_UID = "prometheus"

# Grafana's built-in and dashboard variables, replaced by plausible values before parsing.
# A variable missing here makes substitute() fail, so a new one cannot slip through unparsed.
GRAFANA_VARS = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "5m",
    "$model_name": ".+",
    "$replica": ".*",
}
# Labels Prometheus adds from service discovery rather than the server exporting them: replicas
# on Ray Serve are labelled by replica (docker/prometheus.yml, server/replica_metrics.py).
TARGET_LABELS = frozenset({"replica"})


@dataclass(frozen=True)
class Query:
    dashboard: str  # file stem
    panel: str  # panel title
    ref: str  # target refId
    expr: str  # with Grafana variables substituted

    @property
    def label(self) -> str:
        return f"{self.dashboard}/{self.panel}/{self.ref}"


def load_dashboards() -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(DASHBOARD_DIR.glob("*.json"))}


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """All panels, including those nested in collapsed rows."""
    for p in panels:
        yield p
        yield from iter_panels(p.get("panels", []))


def substitute(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    if "$" in expr:
        raise ValueError(f"unknown Grafana variable left in {expr!r}; add it to GRAFANA_VARS")
    return expr


def dashboard_queries() -> list[Query]:
    out = []
    for stem, dash in load_dashboards().items():
        for panel in iter_panels(dash["panels"]):
            for t in panel.get("targets", []):
                out.append(Query(stem, panel["title"], t["refId"], substitute(t["expr"])))
    return out


_LABEL_VALUES = re.compile(r"^label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,\s*(\w+)\s*\)$")


def variable_queries() -> list[tuple[str, str, str]]:
    """(dashboard, metric, label) for every `label_values(metric, label)` template variable."""
    out = []
    for stem, dash in load_dashboards().items():
        for var in dash.get("templating", {}).get("list", []):
            if var.get("type") != "query":
                continue
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = _LABEL_VALUES.match(q.strip())
            if not match:
                raise ValueError(f"{stem}: unsupported variable query {q!r}")
            out.append((stem, match.group(1), match.group(2)))
    return out


def selector_names(expr: str) -> set[str]:
    """Metric names of every vector/matrix selector in a PromQL expression."""
    names: set[str] = set()

    def visit(node: object) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            if not node.name:
                raise ValueError(f"selector without a literal metric name in {expr!r}")
            names.add(node.name)
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


_KINDS = ("histogram", "gauge", "counter")


def documented_metrics(structures: Path = REPO / "docs" / "structures.md") -> dict[str, str]:
    """name -> kind, from the metrics table in docs/structures.md."""
    out: dict[str, str] = {}
    for line in structures.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0] in _KINDS:
            for name in re.findall(r"`(dspark_[a-z0-9_]+)`", cells[1]):
                out[name] = cells[0]
    return out


def series_names(name: str, kind: str) -> set[str]:
    """The sample names a metric family shows in the text exposition."""
    if kind == "histogram":
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return {name}


_DECLARED_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}


def exported_samples(metrics_text: str) -> dict[str, set[str]]:
    """sample name -> label names seen, parsed from a /metrics body.

    A family declared by HELP/TYPE but without samples yet (a labelled counter before its first
    increment, e.g. rejections by reason) is exported too: its sample names are listed with no
    labels, because PromQL over it is valid and fills in once the first sample appears.
    """
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(metrics_text):
        for suffix in _DECLARED_SUFFIXES.get(family.type, ("",)):
            out.setdefault(family.name + suffix, set())
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


# ---------------------------------------------------------------- processes


def ensure_prometheus_tools() -> tuple[str, str]:
    """Paths of promtool and prometheus, installing Debian's package first when missing."""
    if not (shutil.which("promtool") and shutil.which("prometheus")):
        proc = subprocess.run(
            ["bash", str(ENSURE_SCRIPT)], check=False, capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{ENSURE_SCRIPT.name} failed:\n{proc.stdout}\n{proc.stderr}")
    promtool, prometheus = shutil.which("promtool"), shutil.which("prometheus")
    if not (promtool and prometheus):
        raise RuntimeError("promtool/prometheus still not on PATH after the install")
    return promtool, prometheus


def start_server(
    log_dir: Path,
    args: list[str],
    env: dict[str, str] | None = None,
    ready_timeout_s: float = 120,
) -> ServerProcess:
    """`python -m server` on a free loopback port, waited on until /ready answers 200."""
    port = free_port()
    log = log_dir / f"server-{port}.log"
    server = ServerProcess(server_command(*args), port, log, ready_timeout_s, env=env, cwd=REPO)
    return server.start()


class PrometheusProcess(ServerProcess):
    """A Prometheus server, started and stopped like the service it scrapes."""

    def query(self, expr: str) -> dict[str, Any]:
        """The raw API answer for an instant query (status 'success' or 'error')."""
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body: dict[str, Any] = r.json()
        return body


def start_prometheus(
    binary: str, work: Path, target: str, scrape_s: float = 1, config_text: str | None = None
) -> PrometheusProcess:
    """A real Prometheus on a free loopback port scraping `target` (host:port) every scrape_s,
    or running `config_text` as given."""
    config = work / "prometheus.yml"
    config.write_text(
        config_text
        or "global:\n"
        f"  scrape_interval: {scrape_s}s\n"
        f"  scrape_timeout: {scrape_s}s\n"
        "scrape_configs:\n"
        "  - job_name: dspark-serve\n"
        f"    static_configs: [{{targets: ['{target}']}}]\n"
    )
    cmd = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={work / 'tsdb'}",
        "--web.listen-address=127.0.0.1:{port}",
    ]
    prom = PrometheusProcess(
        cmd, log=work / "prometheus.log", ready_timeout=60, ready_path="/-/ready"
    )
    return prom.start()
