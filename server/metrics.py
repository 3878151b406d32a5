"""Prometheus exporter: maps engine StepStats and per-request timings to `dspark_*` metrics.

Names, suffixes and buckets follow vLLM (docs/structures.md lists them) so its dashboards port
with a prefix rename. Each app owns a CollectorRegistry (not the global one), so tests can build
many apps in one process. Label `model_name` on everything.

Engine-level series (gauges, iteration tokens, speculation counters) come from `observe_step`;
request-level series (TTFT, ITL, TPOT, e2e, queue/prefill/decode, finish reasons) come from
`RequestTimer`, driven by the engine client as outputs reach the event loop.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from scheduler.request import RequestOutput
from scheduler.stats import StepStats

CONTENT_TYPE = CONTENT_TYPE_LATEST

# vLLM's bucket families (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def token_buckets(max_model_len: int) -> list[float]:
    """vLLM's 1-2-5 series up to max_model_len."""
    out: list[float] = []
    mantissa, exp = [1, 2, 5], 0
    while True:
        for m in mantissa:
            v = m * 10**exp
            if v > max_model_len:
                return out
            out.append(float(v))
        exp += 1


class Metrics:
    def __init__(self, model_name: str, max_model_len: int = 2048, max_spec_tokens: int = 16) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        r, L = self.registry, ["model_name"]
        ProcessCollector(registry=r)  # process_resident_memory_bytes etc., for soak runs

        def hist(name: str, doc: str, buckets: tuple[float, ...] | list[float]) -> Histogram:
            return Histogram(name, doc, L, buckets=buckets, registry=r)

        def counter(name: str, doc: str, extra: list[str] | None = None) -> Counter:
            return Counter(name, doc, L + (extra or []), registry=r)

        def gauge(name: str, doc: str, extra: list[str] | None = None) -> Gauge:
            return Gauge(name, doc, L + (extra or []), registry=r)

        tok = token_buckets(max_model_len)
        self.ttft = hist("dspark_time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.itl = hist("dspark_inter_token_latency_seconds",
                        "Time between successive outputs of a request (one engine step).", ITL_BUCKETS)
        self.tpot = hist("dspark_request_time_per_output_token_seconds",
                         "Per-request mean time per output token after the first.", ITL_BUCKETS)
        self.e2e = hist("dspark_e2e_request_latency_seconds", "End-to-end request latency.",
                        LATENCY_BUCKETS)
        self.queue_time = hist("dspark_request_queue_time_seconds",
                               "Time waiting before first being scheduled.", LATENCY_BUCKETS)
        self.prefill_time = hist("dspark_request_prefill_time_seconds",
                                 "First scheduled to first token.", LATENCY_BUCKETS)
        self.decode_time = hist("dspark_request_decode_time_seconds",
                                "First token to last token.", LATENCY_BUCKETS)
        self.prompt_tokens_hist = hist("dspark_request_prompt_tokens",
                                       "Prompt tokens per request.", tok)
        self.gen_tokens_hist = hist("dspark_request_generation_tokens",
                                    "Generated tokens per request.", tok)
        self.mask_time = hist("dspark_grammar_mask_seconds",
                              "Grammar bitmask time of engine steps with structured requests.",
                              (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1))
        self.iteration_tokens = hist("dspark_iteration_tokens",
                                     "Tokens through the target per engine step.", ITERATION_BUCKETS)
        self.running = gauge("dspark_num_requests_running", "Requests resident in the engine.")
        self.waiting = gauge("dspark_num_requests_waiting", "Requests queued for a slot.")
        self.kv_usage = gauge("dspark_kv_cache_usage_perc", "Fraction of KV slots in use (0-1).")
        self.prompt_tokens = counter(
            "dspark_prompt_tokens", "Prompt tokens (computed or read from the prefix cache)."
        )
        self.prefix_cache_hits = counter(
            "dspark_prefix_cache_hits", "Prompt tokens read from the prefix cache, not computed."
        )
        self.gen_tokens = counter("dspark_generation_tokens", "Tokens generated.")
        self.success = counter("dspark_request_success", "Finished engine requests.",
                               ["finished_reason"])
        self.rejected = counter("dspark_request_rejected", "Requests refused by the gateway.",
                                ["reason"])
        self.drafts = counter("dspark_spec_decode_num_drafts",
                              "Request-steps that verified at least one draft token.")
        self.draft_tokens = counter("dspark_spec_decode_num_draft_tokens",
                                    "Draft tokens verified by the target.")
        self.accepted = counter("dspark_spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        self.proposed = counter("dspark_spec_decode_num_proposed_tokens",
                                "Draft tokens proposed before the verify policy trimmed them.")
        self.draft_skipped = counter("dspark_spec_decode_draft_steps_skipped",
                                     "Engine steps in which the draft gate skipped drafting.")
        self.profile_explored = counter(
            "dspark_spec_decode_profile_explore_steps",
            "Engine steps that verified past the policy's choice to price a step size the "
            "throughput profile had not observed for a while.")
        self.feature_admissions = counter(
            "dspark_spec_decode_feature_admissions",
            "Requests admitted where a model drafter reads target features, by whether it is "
            "fed theirs (fed: it may draft for them).", ["features"])
        self.accepted_per_pos = counter("dspark_spec_decode_num_accepted_tokens_per_pos",
                                        "Accepted draft tokens by draft position.", ["position"])
        verify_buckets = tuple(float(k) for k in range(max_spec_tokens + 1))
        self.verify_length = hist("dspark_spec_decode_verify_length",
                                  "Chosen verify length per speculating request-step.", verify_buckets)
        self.verified_per_step = hist("dspark_scheduler_verified_tokens_per_step",
                                      "Draft tokens verified per engine step (the verify budget).",
                                      ITERATION_BUCKETS)
        self.predicted = counter("dspark_spec_decode_predicted_acceptance",
                                 "Sum of predicted survival probabilities by position.", ["position"])
        self.realised = counter("dspark_spec_decode_realised_acceptance",
                                "Drafts that survived through a position.", ["position"])
        self.verified_positions = counter("dspark_spec_decode_verified_positions",
                                          "(request, position) pairs verified.", ["position"])
        self.profile = gauge("dspark_throughput_profile_steps_per_second",
                             "Measured engine steps per second by step size.", ["tokens"])
        # Per drafter (one, or each of a composite such as suffix+dspark).
        self.drafter_proposed = counter("dspark_spec_decode_drafter_proposed_tokens",
                                        "Draft tokens a drafter proposed.", ["drafter"])
        self.drafter_chosen = counter("dspark_spec_decode_drafter_chosen",
                                      "Request-steps whose kept draft was this drafter's.",
                                      ["drafter"])
        self.drafter_drafts = counter("dspark_spec_decode_drafter_num_drafts",
                                      "Request-steps that verified this drafter's tokens.",
                                      ["drafter"])
        self.drafter_draft_tokens = counter("dspark_spec_decode_drafter_draft_tokens",
                                            "A drafter's tokens verified.", ["drafter"])
        self.drafter_accepted = counter("dspark_spec_decode_drafter_accepted_tokens",
                                        "A drafter's tokens accepted.", ["drafter"])
        self.drafter_skipped = counter("dspark_spec_decode_drafter_steps_skipped",
                                       "Steps in which a drafter's gate skipped it.", ["drafter"])
        self.drafter_not_asked = counter("dspark_spec_decode_drafter_requests_not_asked",
                                         "Request-steps a lookup's gate did not ask it for.",
                                         ["drafter"])
        self.draft_memory = gauge("dspark_spec_decode_index_entries",
                                  "Size of drafters' lookup indexes (suffix drafter: tokens "
                                  "and pattern occurrences, per request and global).", ["index"])

    # --- engine side -----------------------------------------------------------------------

    def observe_step(self, s: StepStats) -> None:
        m = self.model_name
        self.running.labels(m).set(s.num_running)
        self.waiting.labels(m).set(s.num_waiting)
        if s.num_kv_slots_total:
            self.kv_usage.labels(m).set(s.num_kv_slots_used / s.num_kv_slots_total)
        if s.num_scheduled_tokens:
            self.iteration_tokens.labels(m).observe(s.num_scheduled_tokens)
        if s.num_draft_tokens_proposed or s.num_draft_tokens:
            self.drafts.labels(m).inc(s.num_drafts)
            self.draft_tokens.labels(m).inc(s.num_draft_tokens)
            self.accepted.labels(m).inc(s.num_accepted_tokens)
            self.proposed.labels(m).inc(s.num_draft_tokens_proposed)
            self.verified_per_step.labels(m).observe(s.num_draft_tokens)
        if s.draft_skipped:
            self.draft_skipped.labels(m).inc()
        if s.profile_explored:
            self.profile_explored.labels(m).inc()
        if s.num_admitted:
            self.feature_admissions.labels(m, "fed").inc(s.num_admitted_feeding_drafter)
            self.feature_admissions.labels(m, "withheld").inc(
                s.num_admitted - s.num_admitted_feeding_drafter)
        if s.mask_time_s:
            self.mask_time.labels(m).observe(s.mask_time_s)
        for j, n in enumerate(s.accepted_per_position):
            self.accepted_per_pos.labels(m, str(j)).inc(n)
        for k in s.verify_lengths:
            self.verify_length.labels(m).observe(k)
        for j, p in enumerate(s.predicted_per_position):
            self.predicted.labels(m, str(j)).inc(p)
        for j, n in enumerate(s.realised_per_position):
            self.realised.labels(m, str(j)).inc(n)
        for j, n in enumerate(s.count_per_position):
            self.verified_positions.labels(m, str(j)).inc(n)
        for tokens, sps in s.profile:
            self.profile.labels(m, str(tokens)).set(sps)
        for d in s.drafters:
            self.drafter_proposed.labels(m, d.name).inc(d.num_proposed)
            self.drafter_chosen.labels(m, d.name).inc(d.num_chosen)
            self.drafter_drafts.labels(m, d.name).inc(d.num_drafts)
            self.drafter_draft_tokens.labels(m, d.name).inc(d.num_draft_tokens)
            self.drafter_accepted.labels(m, d.name).inc(d.num_accepted)
            self.drafter_skipped.labels(m, d.name).inc(d.skipped)
            self.drafter_not_asked.labels(m, d.name).inc(d.num_gated)
        for index, n in s.draft_memory.items():
            self.draft_memory.labels(m, index).set(n)

    def set_queue(self, running: int, waiting: int) -> None:
        self.running.labels(self.model_name).set(running)
        self.waiting.labels(self.model_name).set(waiting)

    # --- request side ----------------------------------------------------------------------

    def reject(self, reason: str) -> None:
        self.rejected.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Timing of one engine request, observed as its outputs reach the event loop."""

    __slots__ = ("_m", "arrival", "first_token", "last_token")

    def __init__(self, metrics: Metrics, arrival: float) -> None:
        self._m = metrics
        self.arrival = arrival
        self.first_token: float | None = None
        self.last_token: float | None = None

    def on_output(self, out: RequestOutput, now: float | None = None, stopped: bool = False) -> None:
        """`stopped`: the gateway aborted it on a stop string, so its ABORT is a "stop"."""
        m, name = self._m, self._m.model_name
        now = time.monotonic() if now is None else now
        if out.new_token_ids:
            m.gen_tokens.labels(name).inc(len(out.new_token_ids))
            if self.first_token is None:
                self.first_token = now
                m.ttft.labels(name).observe(now - self.arrival)
                if out.num_prompt_tokens:
                    m.prompt_tokens.labels(name).inc(out.num_prompt_tokens)
                    m.prefix_cache_hits.labels(name).inc(out.num_cached_tokens)
            else:
                assert self.last_token is not None
                m.itl.labels(name).observe(now - self.last_token)
            self.last_token = now
        if out.finish_reason is None:
            return
        reason = "stop" if stopped and out.finish_reason.value == "abort" else out.finish_reason.value
        m.success.labels(name, reason).inc()
        m.e2e.labels(name).observe(now - self.arrival)
        if out.num_prompt_tokens:
            m.prompt_tokens_hist.labels(name).observe(out.num_prompt_tokens)
        m.gen_tokens_hist.labels(name).observe(out.num_output_tokens)
        if out.queue_time_s is not None:
            m.queue_time.labels(name).observe(out.queue_time_s)
        if out.prefill_time_s is not None:
            m.prefill_time.labels(name).observe(out.prefill_time_s)
        if self.first_token is not None and self.last_token is not None:
            m.decode_time.labels(name).observe(self.last_token - self.first_token)
            if out.num_output_tokens > 1:
                tpot = (self.last_token - self.first_token) / (out.num_output_tokens - 1)
                m.tpot.labels(name).observe(tpot)
