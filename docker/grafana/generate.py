"""Write the provisioned Grafana dashboards: `python docker/grafana/generate.py`.

Three dashboards, all on the Prometheus datasource with the fixed uid `prometheus`:
overview (traffic, latency, saturation, outcomes), speculation (is drafting paying off?) and
adaptive scheduling (what the verify policy chose and how well its predictions held).
Metric names are the ones in docs/structures.md; derived ratios follow vLLM's definitions.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The script runs from any working directory, so its own folder goes on the path first.
from panels import (
    Panel,
    barchart,
    dashboard,
    heatmap,
    histogram_bars,
    m,
    mean,
    quantile,
    rate,
    row,
    stat,
    target,
    timeseries,
)

OUT_DIR = Path(__file__).resolve().parent / "dashboards"

ACCEPTED = "dspark_spec_decode_num_accepted_tokens_total"
DRAFT_TOKENS = "dspark_spec_decode_num_draft_tokens_total"
DRAFTS = "dspark_spec_decode_num_drafts_total"
PROPOSED = "dspark_spec_decode_num_proposed_tokens_total"
PER_POS = "dspark_spec_decode_num_accepted_tokens_per_pos_total"
VERIFIED_POS = "dspark_spec_decode_verified_positions_total"
PREDICTED = "dspark_spec_decode_predicted_acceptance_total"
REALISED = "dspark_spec_decode_realised_acceptance_total"
RUNNING = "dspark_num_requests_running"
DRAFTER_ACCEPTED = "dspark_spec_decode_drafter_accepted_tokens_total"
DRAFTER_DRAFT_TOKENS = "dspark_spec_decode_drafter_draft_tokens_total"

ACCEPTANCE_RATE = f"{rate(ACCEPTED)} / {rate(DRAFT_TOKENS)}"
ACCEPTANCE_LENGTH = f"1 + {rate(ACCEPTED)} / {rate(DRAFTS)}"
RUNNING_NOW = f"sum({m(RUNNING)})"


def quantiles(hist: str, qs: tuple[float, ...] = (0.5, 0.9, 0.99)) -> list[Panel]:
    return [target(quantile(q, hist), f"p{round(q * 100)}") for q in qs] + [
        target(mean(hist), "mean")
    ]


def overview() -> Panel:
    itl_note = (
        "Per engine step. Under speculation one step can emit several tokens, so read this "
        "together with the mean acceptance length (speculation dashboard)."
    )
    panels = [
        row("At a glance"),
        stat("Requests / s", rate("dspark_request_success_total"), "reqps"),
        stat("Output tokens / s", rate("dspark_generation_tokens_total"), "short", decimals=1),
        stat("Running", RUNNING_NOW, "short", decimals=0),
        stat("Waiting", f"sum({m('dspark_num_requests_waiting')})", "short", decimals=0),
        stat("KV slots used", f"max({m('dspark_kv_cache_usage_perc')})", "percentunit"),
        stat("TTFT p95", quantile(0.95, "dspark_time_to_first_token_seconds"), "s"),
        stat(
            "Draft acceptance rate",
            ACCEPTANCE_RATE,
            "percentunit",
            desc="Accepted / verified draft tokens. Empty when speculation is off.",
        ),
        stat(
            "Mean acceptance length",
            ACCEPTANCE_LENGTH,
            "short",
            desc="Tokens emitted per verify step per request, bonus token included. "
            "Above 1 means each target forward yields more than one token.",
        ),
        row("Latency"),
        timeseries("Time to first token", quantiles("dspark_time_to_first_token_seconds"), "s"),
        timeseries(
            "Time per output token (per request)",
            quantiles("dspark_request_time_per_output_token_seconds"),
            "s",
            desc="Per-request mean decode time per token: the fair speed measure under "
            "speculation.",
        ),
        timeseries(
            "Inter-token latency",
            quantiles("dspark_inter_token_latency_seconds"),
            "s",
            desc=itl_note,
        ),
        timeseries(
            "End-to-end request latency", quantiles("dspark_e2e_request_latency_seconds"), "s"
        ),
        row("Load and saturation"),
        timeseries(
            "Token throughput",
            [
                target(rate("dspark_prompt_tokens_total"), "prompt"),
                target(rate("dspark_prefix_cache_hits_total"), "prompt, from the prefix cache"),
                target(rate("dspark_generation_tokens_total"), "generation"),
            ],
            "short",
        ),
        timeseries(
            "Scheduler state",
            [
                target(RUNNING_NOW, "running"),
                target(f"sum({m('dspark_num_requests_waiting')})", "waiting"),
                target(f"max({m('dspark_kv_cache_usage_perc')})", "KV slots used"),
            ],
            "short",
            right_axis={"KV slots used": "percentunit"},
        ),
        timeseries(
            "Queue, prefill and decode time (p95)",
            [
                target(quantile(0.95, "dspark_request_queue_time_seconds"), "queue"),
                target(quantile(0.95, "dspark_request_prefill_time_seconds"), "prefill"),
                target(quantile(0.95, "dspark_request_decode_time_seconds"), "decode"),
            ],
            "s",
        ),
        timeseries(
            "Tokens per engine step",
            quantiles("dspark_iteration_tokens", (0.5, 0.95)),
            "short",
            desc="Prompt plus verified tokens processed by one target forward.",
        ),
        row("Outcomes"),
        timeseries(
            "Finished requests by reason",
            [
                target(
                    rate("dspark_request_success_total", by="finished_reason"),
                    "{{finished_reason}}",
                )
            ],
            "reqps",
            stack=True,
        ),
        timeseries(
            "Rejected requests by reason",
            [target(rate("dspark_request_rejected_total", by="reason"), "{{reason}}")],
            "reqps",
            stack=True,
        ),
        heatmap("Prompt length", "dspark_request_prompt_tokens", "short"),
        heatmap("Generation length", "dspark_request_generation_tokens", "short"),
    ]
    return dashboard(
        "dspark-overview",
        "dspark-serve / Overview",
        "Traffic, latency, saturation and outcomes of the OpenAI-compatible server.",
        panels,
    )


def speculation() -> Panel:
    per_pos_verified = f"{rate(PER_POS, by='position')} / {rate(VERIFIED_POS, by='position')}"
    per_pos_drafts = (
        f"{rate(PER_POS, by='position')} / ignoring(position) group_left {rate(DRAFTS)}"
    )
    panels = [
        row("Is speculation paying off?"),
        stat("Draft acceptance rate", ACCEPTANCE_RATE, "percentunit", w=4),
        stat("Mean acceptance length", ACCEPTANCE_LENGTH, "short", w=4),
        stat("Accepted tokens / s", rate(ACCEPTED), "short", w=4, decimals=1),
        stat("Verified draft tokens / s", rate(DRAFT_TOKENS), "short", w=4, decimals=1),
        stat("Drafts / s", rate(DRAFTS), "short", w=4, decimals=1),
        stat(
            "Output from drafts",
            f"{rate(ACCEPTED)} / {rate('dspark_generation_tokens_total')}",
            "percentunit",
            w=4,
            desc="Share of generated tokens that were accepted draft tokens.",
        ),
        row("Acceptance"),
        timeseries(
            "Acceptance rate and length",
            [
                target(ACCEPTANCE_RATE, "acceptance rate"),
                target(ACCEPTANCE_LENGTH, "acceptance length"),
            ],
            "percentunit",
            right_axis={"acceptance length": "short"},
            desc="Rate = accepted / verified draft tokens; length = 1 + accepted / drafts.",
        ),
        timeseries(
            "Acceptance by draft position (of verified positions)",
            [target(per_pos_verified, "position {{position}}")],
            "percentunit",
            desc="Accepted at position j / positions j that were verified. Under an adaptive "
            "verify policy later positions are verified less often; this ratio stays comparable.",
        ),
        timeseries(
            "Acceptance by draft position (per draft, vLLM definition)",
            [target(per_pos_drafts, "position {{position}}")],
            "percentunit",
            desc="Accepted at position j / drafts, as vLLM reports it; sums to length - 1.",
        ),
        row("Token flow"),
        timeseries(
            "Proposed, verified, accepted, rejected tokens / s",
            [
                target(rate(PROPOSED), "proposed"),
                target(rate(DRAFT_TOKENS), "verified"),
                target(rate(ACCEPTED), "accepted"),
                target(f"{rate(DRAFT_TOKENS)} - {rate(ACCEPTED)}", "rejected"),
                target(f"{rate(PROPOSED)} - {rate(DRAFT_TOKENS)}", "trimmed by verify policy"),
            ],
            "short",
            desc="Proposed = drafted; verified = sent to the target after the verify policy "
            "trimmed.",
        ),
        timeseries(
            "Inter-token latency next to acceptance length",
            [
                target(quantile(0.5, "dspark_inter_token_latency_seconds"), "ITL p50"),
                target(quantile(0.95, "dspark_inter_token_latency_seconds"), "ITL p95"),
                target(quantile(0.5, "dspark_request_time_per_output_token_seconds"), "TPOT p50"),
                target(ACCEPTANCE_LENGTH, "acceptance length"),
            ],
            "s",
            right_axis={"acceptance length": "short"},
            desc="One streamed step can carry several tokens: ITL is per step, TPOT per token.",
        ),
        row("Per drafter"),
        timeseries(
            "Acceptance rate by drafter",
            [
                target(
                    f"{rate(DRAFTER_ACCEPTED, by='drafter')} / "
                    f"{rate(DRAFTER_DRAFT_TOKENS, by='drafter')}",
                    "{{drafter}}",
                )
            ],
            "percentunit",
            desc="Accepted / verified tokens of each configured drafter (one, or each of a "
            "composite such as suffix+dspark).",
        ),
        timeseries(
            "Mean acceptance length by drafter",
            [
                target(
                    f"1 + {rate(DRAFTER_ACCEPTED, by='drafter')} / "
                    f"{rate('dspark_spec_decode_drafter_num_drafts_total', by='drafter')}",
                    "{{drafter}}",
                )
            ],
            "short",
            desc="Tokens per verification round when that drafter's draft was verified.",
        ),
        timeseries(
            "Proposed and verified tokens by drafter",
            [
                target(
                    rate("dspark_spec_decode_drafter_proposed_tokens_total", by="drafter"),
                    "proposed {{drafter}}",
                ),
                target(rate(DRAFTER_DRAFT_TOKENS, by="drafter"), "verified {{drafter}}"),
            ],
            "short",
            desc="A composite asks every drafter; only the kept candidate's tokens are verified.",
        ),
        timeseries(
            "Kept drafts by drafter",
            [target(rate("dspark_spec_decode_drafter_chosen_total", by="drafter"), "{{drafter}}")],
            "short",
            stack=True,
            desc="Request-steps per second whose kept candidate came from each drafter: the "
            "composite's choice, per request and step, by expected tokens at the step's cost.",
        ),
        timeseries(
            "Drafter steps skipped by its gate",
            [
                target(
                    rate("dspark_spec_decode_drafter_steps_skipped_total", by="drafter"),
                    "{{drafter}}",
                )
            ],
            "short",
            desc="Steps per second in which a drafter's gate judged drafting not worth its time.",
        ),
        timeseries(
            "Lookup requests not asked",
            [
                target(
                    rate("dspark_spec_decode_drafter_requests_not_asked_total", by="drafter"),
                    "{{drafter}}",
                )
            ],
            "short",
            desc="Request-steps per second for which a lookup's gate did not ask it: what its "
            "drafts won back for that request stayed below what asking costs (under load).",
        ),
        timeseries(
            "Suffix index size",
            [target(f"max by (index) ({m('dspark_spec_decode_index_entries')})", "{{index}}")],
            "short",
            desc="Tokens and pattern occurrences held by the suffix drafter, per request and "
            "in the bounded global index over recent responses.",
        ),
    ]
    return dashboard(
        "dspark-speculation",
        "dspark-serve / Speculative decoding",
        "Draft acceptance and token flow (vLLM's spec-decode definitions, dspark_ prefix).",
        panels,
    )


def scheduling() -> Panel:
    verify_len = "dspark_spec_decode_verify_length"
    per_step = "dspark_scheduler_verified_tokens_per_step"
    calib = (
        f"abs({rate(PREDICTED, by='position')} - {rate(REALISED, by='position')})"
        f" / {rate(VERIFIED_POS, by='position')}"
    )
    calib_all = (
        f"sum(abs({rate(PREDICTED, by='position')} - {rate(REALISED, by='position')}))"
        f" / {rate(VERIFIED_POS)}"
    )
    panels = [
        row("Verify length"),
        heatmap(
            "Verify length distribution",
            verify_len,
            "short",
            desc="Chosen verify length per request and step (0 = no drafts verified).",
        ),
        histogram_bars("Verify length over the time range", verify_len, desc="Cumulative buckets."),
        timeseries(
            "Mean verify length against batch size",
            [
                target(mean(verify_len), "mean verify length"),
                target(RUNNING_NOW, "running requests"),
            ],
            "short",
            w=24,
            right_axis={"running requests": "short"},
            desc="An adaptive policy should shorten verification as the batch grows.",
        ),
        row("Step budget"),
        timeseries(
            "Verified tokens per step against batch size",
            [
                target(mean(per_step), "mean per step"),
                target(quantile(0.95, per_step), "p95 per step"),
                target(RUNNING_NOW, "running requests"),
            ],
            "short",
            right_axis={"running requests": "short"},
        ),
        timeseries(
            "Verified tokens per step per running request",
            [target(f"({mean(per_step)}) / {RUNNING_NOW}", "per request")],
            "short",
        ),
        row("Calibration"),
        timeseries(
            "Predicted vs realised acceptance by position",
            [
                target(
                    f"{rate(PREDICTED, by='position')} / {rate(VERIFIED_POS, by='position')}",
                    "predicted pos {{position}}",
                ),
                target(
                    f"{rate(REALISED, by='position')} / {rate(VERIFIED_POS, by='position')}",
                    "realised pos {{position}}",
                ),
            ],
            "percentunit",
        ),
        timeseries(
            "Calibration error by position",
            [target(calib, "position {{position}}"), target(calib_all, "all positions")],
            "percentunit",
            desc="|predicted - realised| / verified positions. Large values mean the policy "
            "ranks drafts on confidences that do not match what the target accepts.",
        ),
        row("Throughput profile"),
        barchart(
            "Profiled steps / s by step size",
            f"max by (tokens) ({m('dspark_throughput_profile_steps_per_second')})",
            "tokens",
            "short",
            desc="Measured at startup: target forwards per second for a step of N tokens.",
        ),
        timeseries(
            "Verify tokens trimmed by the policy / s",
            [target(f"{rate(PROPOSED)} - {rate(DRAFT_TOKENS)}", "trimmed")],
            "short",
        ),
        timeseries(
            "Steps without drafting (draft gate) / s",
            [target(rate("dspark_spec_decode_draft_steps_skipped_total"), "skipped")],
            "short",
            desc="Steps in which recent outcomes said drafting would not pay for its cost.",
        ),
        timeseries(
            "Steps that explored the profile / s",
            [target(rate("dspark_spec_decode_profile_explore_steps_total"), "explored")],
            "short",
            desc="Steps that verified a few drafts past the policy's choice to time a step "
            "size the throughput profile had not observed for a while.",
        ),
        timeseries(
            "Requests admitted with and without target features / s",
            [target(rate("dspark_spec_decode_feature_admissions_total", "features"),
                    "{{features}}")],
            "reqps",
            desc="Whether the model drafter is fed a new request's target features (and may "
            "draft for it): where one of its gate's last 64 verdicts said drafting pays, and "
            "one request in eight otherwise, so the gate can go on probing.",
        ),
    ]
    return dashboard(
        "dspark-scheduling",
        "dspark-serve / Adaptive scheduling",
        "What the verify policy chose per step, against batch size, and how calibrated it was.",
        panels,
    )


DASHBOARDS = {"overview": overview, "speculation": speculation, "scheduling": scheduling}


def render() -> dict[str, str]:
    """File name -> JSON text, exactly as committed."""
    return {
        f"{name}.json": json.dumps(build(), indent=2, sort_keys=False) + "\n"
        for name, build in DASHBOARDS.items()
    }


def main() -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (OUT_DIR / name).write_text(text)
        print(f"wrote {OUT_DIR / name}")


if __name__ == "__main__":
    main()
