"""The data that crosses the batcher <-> runner boundary each step. Plain dataclasses.

For a scheduled request the step feeds the target these tokens, at consecutive positions
starting at `req.num_computed_tokens`:

    all_token_ids[num_computed : num_computed + num_new_tokens]  +  draft_ids

A request *samples* when those committed tokens reach the end of what it has (its last token is
the anchor). Then the runner needs logits at the anchor and at every draft position
(1 + len(draft_ids) rows) and returns the accepted drafts plus one bonus/recovered token.
A prefill chunk that stops short of the end samples nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from scheduler.request import Request, TokenLogprob

if TYPE_CHECKING:
    import torch


@dataclass(slots=True)
class ScheduledRequest:
    req: Request
    num_new_tokens: int  # committed tokens whose KV this step computes
    draft_ids: list[int] = field(default_factory=list)  # drafts verified after them
    # [len(draft_ids), vocab] distribution each draft was drawn from; None = deterministic draft.
    # One row more when a grammar cut the draft: the q of the cut draft, so the token sampled in
    # its place comes from the residual, as a rejection would have drawn it.
    draft_probs: torch.Tensor | None = None
    predicted_survival: list[float] = field(default_factory=list)  # per verified draft position
    # Prefix caching (scheduler/prefix_cache.py): stored blocks the runner copies into the slot
    # before the step (the prompt's first `num_prefix_tokens` tokens, skipped), and
    # (block id, first position) of the blocks this chunk completes, which it stores after.
    prefix_block_ids: list[int] = field(default_factory=list)
    num_prefix_tokens: int = 0
    save_blocks: list[tuple[int, int]] = field(default_factory=list)
    # Taken from the request's counters when the step is planned: update() moves those counters,
    # and whoever reads the plan after it (stats, the proposer's features) must see the step as
    # it was scheduled.
    start_pos: int = field(init=False)  # position of the first new token
    samples: bool = field(init=False)  # the new tokens reach the anchor: this step emits tokens

    def __post_init__(self) -> None:
        self.start_pos = self.req.num_computed_tokens
        self.samples = self.start_pos + self.num_new_tokens == self.req.num_tokens

    @property
    def is_decoding(self) -> bool:
        """Only the anchor is new: the request may verify drafts after it."""
        return self.samples and self.num_new_tokens == 1

    @property
    def first_feature_pos(self) -> int:
        """Position of the first row of this step's target features: the loaded prefix's come
        before the computed tokens'."""
        return self.start_pos - self.num_prefix_tokens

    @property
    def num_query_tokens(self) -> int:
        return self.num_new_tokens + len(self.draft_ids)

    def input_ids(self) -> list[int]:
        start = self.start_pos
        return self.req.all_token_ids[start : start + self.num_new_tokens] + self.draft_ids


@dataclass(slots=True)
class StepPlan:
    scheduled: list[ScheduledRequest]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_query_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(slots=True)
class RequestResult:
    """What the runner produced for one scheduled request."""

    token_ids: list[int] = field(default_factory=list)  # accepted drafts + bonus/recovered
    num_accepted_drafts: int = 0
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None  # per-request failure; the request ends with FinishReason.ERROR


@dataclass(slots=True)
class StepResult:
    results: list[RequestResult]  # aligned with StepPlan.scheduled
    forward_time_s: float = 0.0
    # Per scheduled request: [num committed positions this step, feature dim] target features
    # for the proposer (from `first_feature_pos`), or None for a request that does not feed
    # the model drafter (Request.feeds_drafter). None when no proposer needs them.
    aux_hidden: list[Any] | None = None
