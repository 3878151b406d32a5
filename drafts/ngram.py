"""Prompt-lookup (n-gram) drafting: no model, no training.

If the last n tokens of a request appeared earlier in its prompt or output, propose the tokens
that followed that earlier occurrence. Longer n-grams are tried first (max_n down to min_n);
among equal-length matches the most recent occurrence wins.

Each request keeps an index {n-gram: end position of its latest earlier occurrence}, extended
incrementally with the tokens committed since the last call, so a proposal costs O(new tokens)
rather than a scan of the whole context. Pure Python: no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from scheduler.drafter import DraftProposal, DraftRequest


@dataclass
class _Index:
    num_indexed: int = 0  # tokens[:num_indexed] have had their n-grams recorded
    last_end: dict[tuple[int, ...], int] = field(default_factory=dict)


class NgramProposer:
    aux_layer_ids: tuple[int, ...] = ()

    def __init__(self, num_speculative_tokens: int, min_n: int = 2, max_n: int = 4) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError("need 1 <= min_n <= max_n")
        self.max_draft_tokens = num_speculative_tokens
        self.min_n, self.max_n = min_n, max_n
        self._indexes: dict[str, _Index] = {}

    def propose(self, requests: Sequence[DraftRequest]) -> DraftProposal:
        return DraftProposal(token_ids=[self._propose_one(r) for r in requests])

    def _propose_one(self, r: DraftRequest) -> list[int]:
        tokens = r.token_ids
        index = self._indexes.setdefault(r.req_id, _Index())
        # Record n-grams that end before the last token: each has a known continuation.
        for end in range(max(index.num_indexed, 1), len(tokens)):
            for n in range(self.min_n, self.max_n + 1):
                if end >= n:
                    index.last_end[tuple(tokens[end - n : end])] = end
        index.num_indexed = max(index.num_indexed, len(tokens))
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            match_end = index.last_end.get(tuple(tokens[len(tokens) - n :]))
            if match_end is not None and match_end < len(tokens):
                return list(tokens[match_end : match_end + r.num_draft_tokens])
        return []

    def observe(self, req_id: str, start_pos: int, hidden: object) -> None:
        pass  # needs no target features

    def release(self, req_id: str) -> None:
        self._indexes.pop(req_id, None)
