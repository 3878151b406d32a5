"""Plain-data statistics the engine emits once per step; server/metrics.py maps them to Prometheus.

No prometheus import here (stats are data; exporters observe).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class DrafterStepStats:
    """One drafter's share of a step, when several drafters serve (and also when one does)."""

    name: str
    num_asked: int = 0  # requests it drafted for
    skipped: bool = False  # its draft gate said no this step
    num_gated: int = 0  # a lookup's: requests its gate did not ask this step
    num_proposed: int = 0  # draft tokens it proposed
    num_chosen: int = 0  # requests whose kept candidate was its draft
    num_drafts: int = 0  # of those, requests that verified >= 1 of its tokens
    num_draft_tokens: int = 0  # its draft tokens verified
    num_accepted: int = 0  # its draft tokens accepted
    draft_time_s: float = 0.0


@dataclass(slots=True)
class StepStats:
    """One engine step."""

    step_time_s: float  # wall time of the whole step (schedule + draft + forward + verify)
    forward_time_s: float  # the target forward (+ verification) alone
    draft_time_s: float  # proposer time
    num_running: int  # requests resident after the step
    num_waiting: int  # requests queued after the step
    num_scheduled_requests: int
    num_scheduled_tokens: int  # tokens through the target this step (prefill + decode + drafts)
    num_prefill_tokens: int
    num_kv_slots_used: int
    num_kv_slots_total: int
    # Speculation, this step only.
    num_drafts: int = 0  # requests that verified >= 1 draft token
    num_draft_tokens: int = 0  # draft tokens verified
    num_draft_tokens_proposed: int = 0  # drafted before the verify policy trimmed them
    draft_skipped: bool = False  # the draft gate judged drafting not worth it this step
    profile_explored: bool = False  # verified past the policy to price a stale step size
    # Requests scheduled for the first time, and of those the ones whose target features the
    # model drafter gets (Speculator._admit; 0 and 0 without a model drafter).
    num_admitted: int = 0
    num_admitted_feeding_drafter: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # index j: drafts accepted at position j
    verify_lengths: list[int] = field(default_factory=list)  # chosen verify length per speculating request
    # Predicted vs realised acceptance per position (for calibration error):
    # predicted_per_position[j] = sum of predicted prefix-survival probabilities at j,
    # realised_per_position[j] = number of requests whose drafts survived through j,
    # count_per_position[j] = number of (request, position) pairs verified at j.
    predicted_per_position: list[float] = field(default_factory=list)
    realised_per_position: list[int] = field(default_factory=list)
    count_per_position: list[int] = field(default_factory=list)
    # Grammar bitmasks of this step's structured requests (0 when none): part of step_time_s,
    # so the throughput profile, which learns from step times, already pays for it.
    mask_time_s: float = 0.0
    # Current throughput profile of the device: (tokens per step, steps per second) points.
    # This and draft_memory are filled at most once a second (engine.GAUGE_INTERVAL_S), empty
    # on the steps between: gauges keep their last value.
    profile: list[tuple[int, float]] = field(default_factory=list)
    drafters: list[DrafterStepStats] = field(default_factory=list)  # per configured drafter
    # Size of drafters' indexes ("<drafter>_<what>" -> count; the suffix drafter's tokens and
    # pattern occurrences, per request and global).
    draft_memory: dict[str, int] = field(default_factory=dict)
