"""Prompt-lookup (n-gram) drafting: the suffix drafter restricted to the request itself.

If the last n tokens of a request (max_n down to min_n) appeared earlier in its prompt or output,
propose what followed them. `--speculative ngram` keeps its name and its match lengths; the
matching, the choice among several earlier occurrences (the most frequent continuation, ties to
the most recent) and the incremental index are the suffix drafter's (drafts/suffix.py), without
its global index over other requests' responses. Pure Python: no torch.
"""

from __future__ import annotations

from drafts.suffix import SuffixProposer


class NgramProposer(SuffixProposer):
    def __init__(self, num_speculative_tokens: int, min_n: int = 2, max_n: int = 4) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError("need 1 <= min_n <= max_n")
        super().__init__(num_speculative_tokens, min_match=min_n, max_match=max_n, global_tokens=0)
