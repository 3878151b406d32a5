"""Greedy verification of a draft: pure Python, shared by the torch runner and FakeRunner."""

from __future__ import annotations

from collections.abc import Sequence


def verify_greedy(target_argmax: Sequence[int], draft_ids: Sequence[int]) -> tuple[int, list[int]]:
    """target_argmax: argmax of p_0..p_k (k = len(draft_ids)).

    Accepts drafts while they equal the target's choice; the first mismatch is replaced by the
    target's token, or, when all k match, the target's token after the last draft is the bonus.
    Returns (number of accepted drafts, emitted tokens).
    """
    accepted = 0
    for d, t in zip(draft_ids, target_argmax):
        if d != t:
            break
        accepted += 1
    return accepted, [*draft_ids[:accepted], target_argmax[accepted]]
