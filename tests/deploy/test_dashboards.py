"""Grafana dashboards and provisioning, checked without a Grafana server (none is packaged here).

The live-server half (every referenced metric is really exported, every query runs on a real
Prometheus) is in test_live_stack.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.scripts import load_script

from .support import (
    DASHBOARD_DIR,
    DATASOURCE_UID,
    DOCKER,
    PROVISIONING,
    REPO,
    dashboard_queries,
    documented_metrics,
    iter_panels,
    load_dashboards,
    selector_names,
    series_names,
    variable_queries,
)

EXPECTED = {"overview", "speculation", "scheduling"}


def _generator() -> Any:
    return load_script(DOCKER / "grafana" / "generate.py")


def test_committed_json_is_what_the_generator_writes() -> None:
    rendered = _generator().render()
    assert set(rendered) == {p.name for p in DASHBOARD_DIR.glob("*.json")}
    for name, text in rendered.items():
        assert (DASHBOARD_DIR / name).read_text() == text, (
            f"{name} is stale: run `python docker/grafana/generate.py`"
        )


def test_three_dashboards_with_unique_uids_and_titles() -> None:
    dashboards = load_dashboards()
    assert set(dashboards) == EXPECTED
    uids = [d["uid"] for d in dashboards.values()]
    titles = [d["title"] for d in dashboards.values()]
    assert len(set(uids)) == len(uids) and all(uids)
    assert len(set(titles)) == len(titles) and all(titles)


@pytest.mark.parametrize("stem", sorted(EXPECTED))
def test_panels_are_laid_out_and_bound_to_the_provisioned_datasource(stem: str) -> None:
    dash = load_dashboards()[stem]
    text = json.dumps(dash)
    # Exported-for-sharing dashboards use placeholders that file provisioning never fills in.
    assert "${DS_" not in text and "__inputs" not in dash
    panels = list(iter_panels(dash["panels"]))
    ids = [p["id"] for p in panels]
    assert len(set(ids)) == len(ids)
    occupied: set[tuple[int, int]] = set()
    for p in panels:
        pos = p["gridPos"]
        assert pos["w"] > 0 and pos["h"] > 0 and pos["x"] + pos["w"] <= 24, p["title"]
        cells = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & occupied, f"{p['title']} overlaps another panel"
        occupied |= cells
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == DATASOURCE_UID, p["title"]
        assert p["targets"], f"{p['title']} has no query"
        for t in p["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}
    for var in dash["templating"]["list"]:
        assert var["datasource"]["uid"] == DATASOURCE_UID


def test_issue_panels_are_present() -> None:
    titles = {
        stem: {p["title"] for p in iter_panels(d["panels"])}
        for stem, d in load_dashboards().items()
    }
    assert {"Draft acceptance rate", "Mean acceptance length"} <= titles["speculation"]
    assert any("by draft position" in t for t in titles["speculation"])
    assert any("Proposed" in t and "accepted" in t for t in titles["speculation"])
    assert "Verify length distribution" in titles["scheduling"]
    assert "Verified tokens per step against batch size" in titles["scheduling"]
    assert "Calibration error by position" in titles["scheduling"]
    assert any("Profiled steps" in t for t in titles["scheduling"])
    assert {"Time to first token", "Scheduler state"} <= titles["overview"]


def test_datasource_provisioning_matches_dashboards_and_compose() -> None:
    ds = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    (only,) = ds["datasources"]
    assert only["uid"] == DATASOURCE_UID and only["type"] == "prometheus"
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    prom_port = compose["services"]["prometheus"]["ports"][0].rsplit(":", 1)[1]
    assert only["url"] == f"http://prometheus:{prom_port}"
    scrape = yaml.safe_load((DOCKER / "prometheus.yml").read_text())["global"]["scrape_interval"]
    assert only["jsonData"]["timeInterval"] == scrape


def test_dashboard_provider_points_at_the_mounted_json() -> None:
    prov = yaml.safe_load((PROVISIONING / "dashboards" / "dspark.yml").read_text())
    (provider,) = prov["providers"]
    grafana = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    host = next(h for h, c in mounts.items() if c == provider["options"]["path"])
    assert (REPO / host).resolve() == DASHBOARD_DIR.resolve()
    assert (
        REPO / next(h for h, c in mounts.items() if c == "/etc/grafana/provisioning")
    ).resolve() == (PROVISIONING.resolve())


def _rules_file(exprs: dict[str, str], path: Path) -> Path:
    rules = [{"record": f"dashboard:{name}", "expr": e} for name, e in exprs.items()]
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    return path


def test_every_dashboard_expression_parses_with_promtool(promtool: str, tmp_path: Path) -> None:
    queries = dashboard_queries()
    assert len(queries) > 50
    exprs = {f"q{i}": q.expr for i, q in enumerate(queries)}
    rules = _rules_file(exprs, tmp_path / "rules.yml")
    proc = subprocess.run(
        [promtool, "check", "rules", str(rules)], check=False, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in proc.stdout


def test_promtool_rule_check_rejects_bad_promql(promtool: str, tmp_path: Path) -> None:
    """The parse check above can fail: a dashboard-style query with an unclosed paren does."""
    bad = dashboard_queries()[0].expr.rstrip(")")
    rules = _rules_file({"bad": bad}, tmp_path / "bad.yml")
    proc = subprocess.run(
        [promtool, "check", "rules", str(rules)], check=False, capture_output=True, text=True
    )
    assert proc.returncode != 0 and "parse error" in proc.stdout + proc.stderr


def test_dashboards_use_only_documented_metric_names() -> None:
    documented = documented_metrics()
    assert len(documented) >= 25, "docs/structures.md metric table not found"
    allowed = set().union(*(series_names(n, k) for n, k in documented.items()))
    for q in dashboard_queries():
        unknown = selector_names(q.expr) - allowed
        assert not unknown, f"{q.label}: {unknown} not in docs/structures.md"
    for stem, metric, _label in variable_queries():
        assert metric in allowed, stem


def test_every_documented_metric_is_on_a_dashboard() -> None:
    used = set().union(*(selector_names(q.expr) for q in dashboard_queries()))
    missing = {n for n, k in documented_metrics().items() if not series_names(n, k) & used}
    assert not missing, f"documented but on no dashboard: {sorted(missing)}"
