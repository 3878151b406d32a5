"""Small builders for Grafana dashboard JSON (the subset these dashboards use).

The dashboards are generated rather than hand-edited so that every panel carries the fixed
datasource uid, a gridPos and a unique id by construction; `generate.py` writes the JSON files
that Grafana provisions. Stdlib only: the image build and CI need nothing extra to regenerate.
"""

from __future__ import annotations

from typing import Any

Panel = dict[str, Any]

DATASOURCE: dict[str, str] = {"type": "prometheus", "uid": "prometheus"}
# Every selector is filtered by the dashboard's model and replica variables. "All" replicas is
# `.*`, which also matches series with no replica label: a single `python -m server` has none;
# replicas on Ray Serve get theirs from Prometheus's discovery (docker/prometheus.yml).
SEL = 'model_name=~"$model_name", replica=~"$replica"'
RATE = "$__rate_interval"


def m(name: str, extra: str = "") -> str:
    """A selector for one of our metrics, filtered by the model variable (plus extra matchers)."""
    return f"{name}{{{SEL}{', ' + extra if extra else ''}}}"


def rate(name: str, by: str = "", extra: str = "") -> str:
    """Per-second rate of a counter (or a histogram's _sum/_count), summed over instances."""
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({m(name, extra)}[{RATE}]))"


def quantile(q: float, hist: str) -> str:
    return f"histogram_quantile({q}, sum by (le) (rate({m(hist + '_bucket')}[{RATE}])))"


def mean(hist: str) -> str:
    return f"{rate(hist + '_sum')} / {rate(hist + '_count')}"


def target(
    expr: str, legend: str = "", *, instant: bool = False, fmt: str = "time_series"
) -> Panel:
    return {
        "datasource": DATASOURCE,
        "expr": expr,
        "legendFormat": legend or "__auto",
        "instant": instant,
        "range": not instant,
        "format": fmt,
    }


def _panel(kind: str, title: str, targets: list[Panel], w: int, h: int, desc: str) -> Panel:
    for i, t in enumerate(targets):
        t["refId"] = chr(ord("A") + i)
    return {
        "type": kind,
        "title": title,
        "description": desc,
        "datasource": DATASOURCE,
        "targets": targets,
        "gridPos": {"w": w, "h": h},
    }


def stat(
    title: str, expr: str, unit: str, *, desc: str = "", w: int = 3, decimals: int = 2
) -> Panel:
    p = _panel("stat", title, [target(expr)], w, 4, desc)
    p["fieldConfig"] = {
        "defaults": {"unit": unit, "decimals": decimals, "color": {"mode": "thresholds"}},
        "overrides": [],
    }
    p["options"] = {
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "colorMode": "value",
        "graphMode": "area",
        "textMode": "value",
    }
    return p


def timeseries(
    title: str,
    targets: list[Panel],
    unit: str,
    *,
    desc: str = "",
    w: int = 12,
    h: int = 8,
    right_axis: dict[str, str] | None = None,
    stack: bool = False,
) -> Panel:
    """A time series; `right_axis` maps a legend (series name) to the unit of a second y axis."""
    p = _panel("timeseries", title, targets, w, h, desc)
    overrides = [
        {
            "matcher": {"id": "byName", "options": name},
            "properties": [
                {"id": "custom.axisPlacement", "value": "right"},
                {"id": "unit", "value": right_unit},
            ],
        }
        for name, right_unit in (right_axis or {}).items()
    ]
    p["fieldConfig"] = {
        "defaults": {
            "unit": unit,
            "custom": {
                "drawStyle": "line",
                "lineWidth": 1,
                "fillOpacity": 10,
                "showPoints": "never",
                "spanNulls": True,
                "stacking": {"mode": "normal" if stack else "none", "group": "A"},
            },
        },
        "overrides": overrides,
    }
    p["options"] = {
        "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "lastNotNull"]},
        "tooltip": {"mode": "multi", "sort": "desc"},
    }
    return p


def heatmap(title: str, hist: str, unit: str, *, desc: str = "", w: int = 12, h: int = 8) -> Panel:
    """Distribution over time of a Prometheus histogram (buckets de-accumulated by Grafana)."""
    expr = f"sum by (le) (increase({m(hist + '_bucket')}[{RATE}]))"
    p = _panel("heatmap", title, [target(expr, "{{le}}", fmt="heatmap")], w, h, desc)
    p["options"] = {
        "calculate": False,
        "yAxis": {"unit": unit, "axisPlacement": "left"},
        "rowsFrame": {"layout": "auto"},
        "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
        "cellGap": 1,
        "tooltip": {"mode": "single", "yHistogram": True},
        "legend": {"show": True},
    }
    p["fieldConfig"] = {"defaults": {}, "overrides": []}
    return p


def histogram_bars(title: str, hist: str, *, desc: str = "", w: int = 12, h: int = 8) -> Panel:
    """Bucket counts over the whole selected time range, one bar per bucket."""
    expr = f"sum by (le) (increase({m(hist + '_bucket')}[$__range]))"
    p = _panel("bargauge", title, [target(expr, "{{le}}", instant=True, fmt="heatmap")], w, h, desc)
    p["options"] = {
        "orientation": "vertical",
        "displayMode": "gradient",
        "showUnfilled": True,
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
    }
    p["fieldConfig"] = {"defaults": {"unit": "short", "decimals": 0}, "overrides": []}
    return p


def barchart(
    title: str, expr: str, x_label: str, unit: str, *, desc: str = "", w: int = 12
) -> Panel:
    """One bar per value of label `x_label` (instant query), sorted numerically by that label.

    The label is made a number to sort (as text "16" < "2"), then text again: the bar chart
    takes its categories from a string field.
    """
    p = _panel("barchart", title, [target(expr, instant=True, fmt="table")], w, 8, desc)

    def convert(kind: str) -> Panel:
        return {
            "id": "convertFieldType",
            "options": {"conversions": [{"targetField": x_label, "destinationType": kind}]},
        }

    p["transformations"] = [
        convert("number"),
        {"id": "sortBy", "options": {"sort": [{"field": x_label, "desc": False}]}},
        convert("string"),
        {
            "id": "organize",
            "options": {"excludeByName": {"Time": True}, "renameByName": {"Value": title}},
        },
    ]
    p["options"] = {"xField": x_label, "orientation": "vertical", "showValue": "auto"}
    p["fieldConfig"] = {"defaults": {"unit": unit}, "overrides": []}
    return p


def row(title: str) -> Panel:
    return {
        "type": "row",
        "title": title,
        "collapsed": False,
        "panels": [],
        "gridPos": {"w": 24, "h": 1},
    }


def layout(panels: list[Panel]) -> list[Panel]:
    """Assign ids and pack panels left to right into 24-column lines; rows start a new line."""
    x = y = line_h = 0
    for pid, p in enumerate(panels, start=1):
        pos = p["gridPos"]
        if p["type"] == "row" or x + pos["w"] > 24:
            x, y, line_h = 0, y + line_h, 0
        pos["x"], pos["y"] = x, y
        p["id"] = pid
        x += pos["w"]
        line_h = max(line_h, pos["h"])
        if p["type"] == "row":
            x, y, line_h = 0, y + 1, 0
    return panels


MODEL_VARIABLE: Panel = {
    "name": "model_name",
    "label": "model",
    "type": "query",
    "datasource": DATASOURCE,
    "definition": "label_values(dspark_num_requests_running, model_name)",
    "query": {
        "query": "label_values(dspark_num_requests_running, model_name)",
        "refId": "model_name",
    },
    "refresh": 2,
    "includeAll": True,
    "multi": True,
    "allValue": ".+",
    "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    "sort": 1,
}


REPLICA_VARIABLE: Panel = {
    "name": "replica",
    "label": "replica",
    "type": "query",
    "datasource": DATASOURCE,
    "definition": "label_values(dspark_num_requests_running, replica)",
    "query": {
        "query": "label_values(dspark_num_requests_running, replica)",
        "refId": "replica",
    },
    "refresh": 2,
    "includeAll": True,
    "multi": True,
    "allValue": ".*",
    "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    "sort": 1,
}


def dashboard(uid: str, title: str, description: str, panels: list[Panel]) -> Panel:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["dspark-serve"],
        "editable": False,
        "graphTooltip": 1,  # shared crosshair: line latency up with acceptance across panels
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "timezone": "",
        "schemaVersion": 39,
        "version": 1,
        "links": [
            {
                "type": "dashboards",
                "tags": ["dspark-serve"],
                "asDropdown": False,
                "includeVars": True,
                "keepTime": True,
                "title": "dspark-serve",
            }
        ],
        "annotations": {"list": []},
        "templating": {"list": [MODEL_VARIABLE, REPLICA_VARIABLE]},
        "panels": layout(panels),
    }
