"""The running service against the real Prometheus tools.

`python -m server --model fake` (the torch-free engine: real gateway, batcher, drafting and
metrics around a deterministic stand-in model) is started on loopback and sent traffic; then
its /metrics is linted by promtool, compared with every name the dashboards use, and scraped
by Debian's Prometheus binary, whose API must report the request count that was sent and
must evaluate every dashboard query.
"""

from __future__ import annotations

import math
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from scheduler.fake import FAKE_TEXT

from .support import (
    GRAFANA_VARS,
    TARGET_LABELS,
    PrometheusProcess,
    ServerProcess,
    dashboard_queries,
    exported_samples,
    selector_names,
    start_prometheus,
    start_server,
    variable_queries,
)

# n-gram drafting over a prompt that already holds the fake model's output text makes drafts
# that the target accepts, and the DSpark verify policy predicts their acceptance, so the
# speculation and calibration series have samples, not just zeros (as in the compose default).
SERVER_ARGS = [
    "--model",
    "fake",
    "--speculative",
    "ngram",
    "--num-speculative-tokens",
    "4",
    "--verify-policy",
    "dspark",
    # The draft gate judges by measured step times; on a busy host it may skip drafting for
    # the whole test and leave the acceptance panels empty. The policy still decides the
    # verify length from the profile and the estimator.
    "--no-draft-gate",
]
PROMPT = f"Repeat this: {FAKE_TEXT}"


def send_requests(url: str, n: int) -> None:
    """n successful requests, rotating over chat, streamed chat and completions."""
    with httpx.Client(base_url=url, timeout=60) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        for i in range(n):
            kind = i % 3
            if kind == 2:
                body = {"model": model, "prompt": PROMPT, "max_tokens": 24}
                r = client.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                continue
            body = {
                "model": model,
                "messages": [{"role": "user", "content": PROMPT}],
                "max_tokens": 24,
                "stream": kind == 1,
            }
            r = client.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            if kind == 1:
                assert r.text.rstrip().endswith("data: [DONE]")


def send_rejected(url: str) -> None:
    """One request the gateway refuses (unknown model), so rejections have a sample."""
    body = {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 404, r.text


def metric_values(text: str) -> dict[str, float]:
    """sample name -> value summed over label sets."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def scrape(url: str) -> str:
    r = httpx.get(f"{url}/metrics", timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return r.text


N_LOADED = 12


@pytest.fixture(scope="module")
def loaded_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ServerProcess, dict[str, float]]]:
    """A server after N_LOADED requests, with its metric values from before them."""
    server = start_server(tmp_path_factory.mktemp("server"), SERVER_ARGS)
    try:
        before = metric_values(scrape(server.url))
        send_requests(server.url, N_LOADED)
        send_rejected(server.url)
        yield server, before
    finally:
        server.stop()


@pytest.fixture(scope="module")
def metrics_text(loaded_server: tuple[ServerProcess, dict[str, float]]) -> str:
    return scrape(loaded_server[0].url)


def test_metrics_pass_promtool_lint(metrics_text: str, promtool: str) -> None:
    proc = subprocess.run(
        [promtool, "check", "metrics"],
        input=metrics_text,
        check=False,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), (
        proc.stdout + proc.stderr
    )


def test_histograms_and_counters_have_samples(
    loaded_server: tuple[ServerProcess, dict[str, float]], metrics_text: str
) -> None:
    before, after = loaded_server[1], metric_values(metrics_text)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("dspark_request_success_total") == N_LOADED
    assert delta("dspark_e2e_request_latency_seconds_count") == N_LOADED
    assert delta("dspark_time_to_first_token_seconds_count") == N_LOADED
    assert delta("dspark_generation_tokens_total") >= N_LOADED
    assert delta("dspark_spec_decode_num_draft_tokens_total") > 0
    assert delta("dspark_spec_decode_num_accepted_tokens_total") > 0
    assert delta("dspark_request_rejected_total") == 1


def test_dashboards_reference_only_exported_metrics(metrics_text: str) -> None:
    exported = exported_samples(metrics_text)
    for q in dashboard_queries():
        missing = selector_names(q.expr) - set(exported)
        assert not missing, f"{q.label} uses {missing}, which the server does not export"
    for stem, metric, label in variable_queries():
        labels = exported.get(metric, set()) | (TARGET_LABELS if metric in exported else set())
        assert label in labels, f"{stem}: {metric} has no label {label}"


def test_promtool_lint_flags_a_bad_exposition(promtool: str) -> None:
    """The lint above can fail: a counter without the _total suffix is reported."""
    bad = "# HELP dspark_bad Bad.\n# TYPE dspark_bad counter\ndspark_bad 1\n"
    proc = subprocess.run(
        [promtool, "check", "metrics"], input=bad, check=False, capture_output=True, text=True
    )
    assert proc.returncode != 0 and "_total" in proc.stdout + proc.stderr


# ------------------------------------------------------------ a real Prometheus scraping us


def poll(prom: PrometheusProcess, expr: str, want: float, timeout_s: float = 30) -> float:
    """Query until the single result equals `want` (scrapes are asynchronous); last value."""
    deadline, value = time.monotonic() + timeout_s, float("nan")
    while time.monotonic() < deadline:
        body = prom.query(expr)
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        if result:
            value = float(result[0]["value"][1])
            if value == want:
                return value
        time.sleep(0.5)
    return value


@pytest.fixture(scope="module")
def scraped(
    tmp_path_factory: pytest.TempPathFactory, prometheus_binary: str
) -> Iterator[tuple[ServerProcess, PrometheusProcess]]:
    """A fresh server (so its count starts at zero) and a Prometheus scraping it every second."""
    work: Path = tmp_path_factory.mktemp("prometheus")
    server = start_server(work, SERVER_ARGS)
    prom = None
    try:
        prom = start_prometheus(prometheus_binary, work, server.url.removeprefix("http://"))
        yield server, prom
    finally:
        if prom is not None:
            prom.stop()
        server.stop()


N_SCRAPED = 9


def test_prometheus_scrapes_the_service_and_counts_requests(
    scraped: tuple[ServerProcess, PrometheusProcess],
) -> None:
    server, prom = scraped
    assert poll(prom, 'up{job="dspark-serve"}', 1) == 1
    # The server's own count before (start-up warm-up and other tests, if any) is the baseline.
    before = metric_values(scrape(server.url))
    send_requests(server.url, N_SCRAPED)
    for name in ("dspark_request_success_total", "dspark_e2e_request_latency_seconds_count"):
        want = before.get(name, 0.0) + N_SCRAPED
        assert poll(prom, f"sum({name})", want) == want, name
    by_model = prom.query("sum by (model_name) (dspark_request_success_total)")["data"]["result"]
    assert len(by_model) == 1 and by_model[0]["metric"]["model_name"]


def test_every_dashboard_query_evaluates_on_prometheus(
    scraped: tuple[ServerProcess, PrometheusProcess],
) -> None:
    server, prom = scraped
    assert poll(prom, 'up{job="dspark-serve"}', 1) == 1
    # Two bursts a few scrapes apart, so every rate() window holds an increase.
    send_requests(server.url, 3)
    time.sleep(2.5)
    send_requests(server.url, 3)
    rps = f"sum(rate(dspark_request_success_total[{GRAFANA_VARS['$__rate_interval']}]))"
    deadline = time.monotonic() + 30
    while not _positive(prom.query(rps)) and time.monotonic() < deadline:
        time.sleep(0.5)
    showing, failed = set(), []
    for q in dashboard_queries():
        body = prom.query(q.expr)
        if body["status"] != "success":
            failed.append(f"{q.label}: {body.get('error')}")
        elif _positive(body):
            showing.add(q.label)
    assert not failed, failed
    # Headline panels must show a positive value after traffic; others (rejections,
    # preemptions, queueing on an idle server) may legitimately be empty or zero.
    must_show = {
        "overview/Requests / s/A",
        "overview/Output tokens / s/A",
        "overview/Time to first token/A",
        "overview/End-to-end request latency/D",
        "speculation/Draft acceptance rate/A",
        "speculation/Mean acceptance length/A",
        "speculation/Acceptance by draft position (of verified positions)/A",
        "scheduling/Verify length distribution/A",
        "scheduling/Verified tokens per step against batch size/A",
        "scheduling/Predicted vs realised acceptance by position/A",
        "scheduling/Predicted vs realised acceptance by position/B",
    }
    assert must_show <= showing, f"no data after traffic: {sorted(must_show - showing)}"


def _positive(body: dict[str, Any]) -> bool:
    """Whether an instant-query answer holds at least one finite value above zero."""
    if body.get("status") != "success":
        return False
    values = [float(r["value"][1]) for r in body["data"]["result"]]
    return any(math.isfinite(v) and v > 0 for v in values)
