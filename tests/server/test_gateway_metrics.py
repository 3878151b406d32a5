"""The Prometheus exporter: every name in docs/structures.md exists, and values follow the data."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
from gateway_harness import Running

from scheduler.request import FinishReason, RequestOutput
from scheduler.stats import StepStats
from server.metrics import Metrics, RequestTimer

DOC = Path(__file__).resolve().parents[2] / "docs" / "structures.md"


def documented_names() -> set[str]:
    section = DOC.read_text().split("## Metrics", 1)[1]
    return set(re.findall(r"`(dspark_[a-z_]+)`", section))


def exposed_families(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            suffix = "_total" if kind == "counter" and not name.endswith("_total") else ""
            names.add(name + suffix)
    return names


def test_every_documented_metric_is_exported(fake_server: Running) -> None:
    names = documented_names()
    assert len(names) >= 25  # the table was parsed
    missing = names - exposed_families(httpx.get(fake_server.url("/metrics")).text)
    assert not missing, f"metrics in docs/structures.md but not exported: {sorted(missing)}"


def test_request_metrics_after_traffic(fake_server: Running) -> None:
    before = fake_server.metric("dspark_request_success_total", finished_reason="length")
    gen_before = fake_server.metric("dspark_generation_tokens_total")
    ttft_before = fake_server.metric("dspark_time_to_first_token_seconds_count")
    for _ in range(3):
        r = httpx.post(fake_server.url("/v1/completions"), json={"prompt": "abc", "max_tokens": 7})
        assert r.status_code == 200
    assert fake_server.metric("dspark_request_success_total", finished_reason="length") == before + 3
    assert fake_server.metric("dspark_generation_tokens_total") == gen_before + 21
    assert fake_server.metric("dspark_time_to_first_token_seconds_count") == ttft_before + 3
    assert fake_server.metric("dspark_request_generation_tokens_count") >= 3
    assert fake_server.metric("dspark_e2e_request_latency_seconds_count") >= 3
    assert fake_server.metric("process_resident_memory_bytes") > 0


def step(**kw: object) -> StepStats:
    base = {"step_time_s": 0.01, "forward_time_s": 0.008, "draft_time_s": 0.001, "num_running": 3,
            "num_waiting": 2, "num_scheduled_requests": 3, "num_scheduled_tokens": 12,
            "num_prefill_tokens": 4, "num_kv_slots_used": 3, "num_kv_slots_total": 4}
    return StepStats(**{**base, **kw})  # type: ignore[arg-type]


def test_observe_step_maps_speculation_and_engine_stats() -> None:
    m = Metrics("m", max_spec_tokens=4)
    m.observe_step(step(num_drafts=2, num_draft_tokens=5, num_draft_tokens_proposed=8,
                        num_accepted_tokens=3, accepted_per_position=[2, 1, 0],
                        verify_lengths=[3, 2], predicted_per_position=[1.5, 0.75],
                        realised_per_position=[2, 1], count_per_position=[2, 2],
                        profile=[(16, 40.0), (64, 25.0)]))
    value = m.registry.get_sample_value
    lbl = {"model_name": "m"}
    assert value("dspark_num_requests_running", lbl) == 3
    assert value("dspark_num_requests_waiting", lbl) == 2
    assert value("dspark_kv_cache_usage_perc", lbl) == 0.75
    assert value("dspark_spec_decode_num_drafts_total", lbl) == 2
    assert value("dspark_spec_decode_num_draft_tokens_total", lbl) == 5
    assert value("dspark_spec_decode_num_proposed_tokens_total", lbl) == 8
    assert value("dspark_spec_decode_num_accepted_tokens_total", lbl) == 3
    assert value("dspark_spec_decode_num_accepted_tokens_per_pos_total", {**lbl, "position": "1"}) == 1
    assert value("dspark_spec_decode_verify_length_count", lbl) == 2
    assert value("dspark_spec_decode_verify_length_sum", lbl) == 5
    assert value("dspark_spec_decode_predicted_acceptance_total", {**lbl, "position": "0"}) == 1.5
    assert value("dspark_spec_decode_realised_acceptance_total", {**lbl, "position": "1"}) == 1
    assert value("dspark_spec_decode_verified_positions_total", {**lbl, "position": "1"}) == 2
    assert value("dspark_throughput_profile_steps_per_second", {**lbl, "tokens": "64"}) == 25.0
    assert value("dspark_iteration_tokens_sum", lbl) == 12
    assert value("dspark_spec_decode_draft_steps_skipped_total", lbl) in (None, 0.0)
    m.observe_step(step(draft_skipped=True))
    assert value("dspark_spec_decode_draft_steps_skipped_total", lbl) == 1
    assert value("dspark_spec_decode_profile_explore_steps_total", lbl) in (None, 0.0)
    m.observe_step(step(profile_explored=True))
    assert value("dspark_spec_decode_profile_explore_steps_total", lbl) == 1
    assert value("dspark_scheduler_verified_tokens_per_step_sum", lbl) == 5


def test_request_timer_latencies() -> None:
    m = Metrics("m")
    t = RequestTimer(m, arrival=100.0)
    t.on_output(RequestOutput("r", [1], num_prompt_tokens=5, num_output_tokens=1), now=100.5)
    t.on_output(RequestOutput("r", [2, 3], num_output_tokens=3), now=100.7)
    t.on_output(RequestOutput("r", [4], FinishReason.LENGTH, num_prompt_tokens=5, num_output_tokens=4,
                              queue_time_s=0.1, prefill_time_s=0.3), now=101.1)
    value = m.registry.get_sample_value
    lbl = {"model_name": "m"}
    assert value("dspark_time_to_first_token_seconds_sum", lbl) == 0.5
    assert round(value("dspark_inter_token_latency_seconds_sum", lbl) or 0, 6) == 0.6
    assert value("dspark_inter_token_latency_seconds_count", lbl) == 2
    assert round(value("dspark_request_time_per_output_token_seconds_sum", lbl) or 0, 6) == 0.2
    assert round(value("dspark_e2e_request_latency_seconds_sum", lbl) or 0, 6) == 1.1
    assert round(value("dspark_request_decode_time_seconds_sum", lbl) or 0, 6) == 0.6
    assert value("dspark_request_queue_time_seconds_sum", lbl) == 0.1
    assert value("dspark_request_prefill_time_seconds_sum", lbl) == 0.3
    assert value("dspark_prompt_tokens_total", lbl) == 5
    assert value("dspark_generation_tokens_total", lbl) == 4
    assert value("dspark_request_success_total", {**lbl, "finished_reason": "length"}) == 1
