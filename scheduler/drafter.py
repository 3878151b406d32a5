"""The drafter seam: what every proposer (n-gram, EAGLE-3, DFlash, DSpark, test doubles) offers.

Timeline of one request under speculation (positions are token indices):

    committed tokens  t_0 ... t_{n-1}     t_{n-1} is the *anchor*: sampled by the target, no KV yet
    step s:   propose  d_1..d_k  after the anchor (from target features of t_0..t_{n-2})
              target verifies [t_{n-1}, d_1..d_k] in one forward -> a accepted + 1 bonus/corrected
    after s:  observe() receives target features of t_{n-1}, d_1..d_a (now committed, with KV)

A proposal must say which distribution each draft token was drawn from (`probs`), because
lossless rejection sampling needs q(x). Deterministic drafters (n-gram, greedy heads at
temperature 0) return None: the verifier treats them as one-hot.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from scheduler.request import SamplingParams


@dataclass(frozen=True, slots=True)
class DraftRequest:
    """Read-only view of a running request, handed to the proposer."""

    req_id: str
    token_ids: Sequence[int]  # committed tokens, prompt + output; the last one is the anchor
    params: SamplingParams
    num_draft_tokens: int  # how many to propose (the proposer may return fewer)
    num_prompt_tokens: int | None = None  # token_ids[:num_prompt_tokens] is the prompt


@dataclass(slots=True)
class DraftProposal:
    """Drafts for a batch, aligned with the DraftRequest list that was passed in."""

    token_ids: list[list[int]]  # [num_requests][k_r], k_r <= requested
    # Per request: [k_r, vocab] float32 distribution each token was sampled from, or None
    # (deterministic draft: one-hot on the token).
    probs: list[torch.Tensor | None] | None = None
    # Per request, per position: P(draft j accepted | drafts < j accepted). None: no estimate.
    confidences: list[list[float]] | None = None
    # Per request, per position: what the online acceptance estimator conditions on, for
    # drafters that know more about their drafts than the draft distribution says (the suffix
    # drafter: match length, support). Hashable cell keys (scheduler/acceptance.py). None: the
    # estimator reads the draft distribution's top probability instead.
    features: list[list[Hashable]] | None = None


class Proposer(Protocol):
    """Contract for drafters. All calls come from the engine thread, in step order."""

    # Target decoder layers whose outputs the proposer needs (0-based; empty for n-gram).
    aux_layer_ids: tuple[int, ...]
    # Largest number of draft tokens one propose() call returns per request (gamma).
    max_draft_tokens: int
    # Optional, False when absent: a proposer sets `free_to_ask = True` when a propose() call
    # costs microseconds against a step of milliseconds (a lookup). It then gets a per-request
    # lookup gate instead of a draft gate (scheduler/build.py `gate_for`, `lookup_gate_for`).

    def propose(self, requests: Sequence[DraftRequest]) -> DraftProposal:
        """Draft up to `num_draft_tokens` tokens after each request's anchor."""
        ...

    def observe(self, req_id: str, start_pos: int, hidden: torch.Tensor) -> None:
        """Target features of newly committed positions start_pos..start_pos+len-1.

        hidden: [num_new_positions, len(aux_layer_ids) * hidden_size], concatenated in
        aux_layer_ids order. Not called when aux_layer_ids is empty.
        """
        ...

    def release(self, req_id: str) -> None:
        """The request finished or was aborted: drop any per-request state."""
        ...
