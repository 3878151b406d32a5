"""Suffix drafting, in the spirit of SuffixDecoding (Oliaro et al., 2024): no model, no training.

Two indexes of token patterns:

- per request, over its prompt and output so far (RAG answers and summaries copy their context,
  code edits copy the code, multi-turn chats repeat earlier turns);
- one global index over the outputs of recently finished requests (agents resend the same tool
  outputs, users ask the same things), bounded in tokens: the oldest responses are evicted.

A proposal finds the longest suffix of the request's tokens (up to `max_match`, at least
`min_match` tokens) that occurred before in either index, then walks the continuations of all
those occurrences at once, one position at a time, taking the most frequent next token and
keeping only the occurrences that agree with it. That is the greedy path through the suffix
tree below the matched node, computed from the occurrence lists instead of a stored tree.
Ties go to the most recent occurrence, the request's own before the global ones.

Every draft position carries what the online acceptance estimator conditions on
(scheduler/acceptance.py): the match length, how many occurrences still support the path and
the share of them that chose this token. The drafts are a deterministic function of the
committed tokens, so features that read the drafted tokens cannot bias the output (the bias
docs/scheduling.md describes needs a drafted token that was *sampled*).

An index maps each pattern (a tuple of 1..max_match tokens) to the end positions of its most
recent occurrences (at most `max_occurrences`: old occurrences of a frequent pattern are
dropped), so memory is O(tokens x max_match) per index and a proposal costs
O(max_match + occurrences x draft length). Pure Python: no torch.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from scheduler.drafter import DraftProposal, DraftRequest

SEPARATOR = -1  # between responses in the global store: no continuation crosses it


@dataclass
class _Index:
    """Patterns of one token store -> end positions of their recent occurrences.

    Positions are absolute (they survive eviction from the front of the store):
    tokens[pos - base] is the token at absolute position pos.
    """

    max_match: int
    max_occurrences: int
    tokens: list[int] = field(default_factory=list)
    base: int = 0  # absolute position of tokens[0]
    num_indexed: int = 0  # absolute end of the tokens whose patterns are recorded
    ends: dict[tuple[int, ...], list[int]] = field(default_factory=dict)
    num_entries: int = 0

    @property
    def end(self) -> int:
        return self.base + len(self.tokens)

    def continuation(self, pos: int, k: int) -> list[int]:
        """Up to k tokens from absolute position pos, stopping at a separator or the end."""
        i = pos - self.base
        run = self.tokens[i : i + k] if i >= 0 else []
        return run[: run.index(SEPARATOR)] if SEPARATOR in run else run

    def extend(self, new_tokens: Sequence[int]) -> None:
        self.tokens.extend(new_tokens)
        self.index_up_to(self.end)

    def index_up_to(self, end: int) -> None:
        """Record every pattern that ends at a position < end (each has a known continuation)."""
        tokens, base = self.tokens, self.base
        for e in range(max(self.num_indexed, base + 1), end):
            if tokens[e - 1 - base] == SEPARATOR:
                continue
            for n in range(1, self.max_match + 1):
                start = e - n - base
                if start < 0:
                    break
                pattern = tuple(tokens[start : e - base])
                if SEPARATOR in pattern:
                    break
                occ = self.ends.setdefault(pattern, [])
                occ.append(e)
                self.num_entries += 1
                if len(occ) > 2 * self.max_occurrences:  # amortised trim to the recent ones
                    self.num_entries -= len(occ) - self.max_occurrences
                    del occ[: len(occ) - self.max_occurrences]
        self.num_indexed = max(self.num_indexed, end)

    def occurrences(self, pattern: tuple[int, ...]) -> list[int]:
        """End positions of the pattern's recent occurrences, most recent first."""
        occ = self.ends.get(pattern)
        return occ[::-1][: self.max_occurrences] if occ else []

    def evict_before(self, pos: int) -> None:
        """Forget the tokens before absolute position pos and every occurrence that reads them.

        Occurrence lists are in increasing end order, so a stale occurrence (one that starts
        before pos) is always at the front of its list, unless the recency trim dropped it.
        """
        old_base, cut = self.base, pos - self.base
        if cut <= 0:
            return
        window = self.tokens[: cut + self.max_match]  # absolute positions old_base ...
        del self.tokens[:cut]
        self.base = pos
        for e in range(old_base + 1, min(pos + self.max_match, old_base + len(window)) + 1):
            for n in range(1, self.max_match + 1):
                start = e - n
                if start < old_base:
                    break
                if start >= pos:
                    continue  # reads kept tokens only
                pattern = tuple(window[start - old_base : e - old_base])
                occ = self.ends.get(pattern)
                if occ and occ[0] == e:
                    occ.pop(0)
                    self.num_entries -= 1
                    if not occ:
                        del self.ends[pattern]


@dataclass
class _Request:
    index: _Index
    num_prompt_tokens: int
    last_draft: list[int] = field(default_factory=list)  # the previous call's proposal
    last_draft_at: int = 0  # the number of tokens it continued


class SuffixProposer:
    """Proposes the most frequent continuation of the longest suffix match (module docstring).

    `global_tokens` = 0 turns the global index off: prompt lookup within the request only.
    """

    aux_layer_ids: tuple[int, ...] = ()
    free_to_ask = True  # dictionary lookups: a per-request gate, not a draft gate (build.py)

    def __init__(
        self,
        num_speculative_tokens: int,
        min_match: int = 1,
        max_match: int = 8,
        max_occurrences: int = 32,
        global_tokens: int = 65536,
    ) -> None:
        if not 1 <= min_match <= max_match:
            raise ValueError("need 1 <= min_match <= max_match")
        if max_occurrences < 1 or global_tokens < 0:
            raise ValueError("need max_occurrences >= 1 and global_tokens >= 0")
        self.max_draft_tokens = num_speculative_tokens
        self.min_match, self.max_match = min_match, max_match
        self.max_occurrences = max_occurrences
        self.global_tokens = global_tokens
        self._requests: dict[str, _Request] = {}
        self._global = _Index(max_match, max_occurrences)
        self._response_ends: list[int] = []  # absolute end of each response in the global store

    # -- the Proposer seam ---------------------------------------------------------------------
    def propose(self, requests: Sequence[DraftRequest]) -> DraftProposal:
        drafts, features = [], []
        for r in requests:
            ids, feats = self._propose_one(r)
            drafts.append(ids)
            features.append(feats)
        return DraftProposal(token_ids=drafts, features=features)

    def observe(self, req_id: str, start_pos: int, hidden: object) -> None:
        pass  # needs no target features

    def release(self, req_id: str) -> None:
        """The request is done: its output joins the global index (oldest responses evicted)."""
        state = self._requests.pop(req_id, None)
        if state is None or self.global_tokens == 0:
            return
        output = state.index.tokens[state.num_prompt_tokens :]
        if len(output) < 2:
            return
        output = output[-self.global_tokens :]
        self._global.extend([*output, SEPARATOR])
        self._response_ends.append(self._global.end)
        while len(self._global.tokens) > self.global_tokens and self._response_ends:
            self._global.evict_before(self._response_ends.pop(0))

    # -- memory, exported as a metric ------------------------------------------------------------
    def memory(self) -> dict[str, int]:
        """Tokens held and pattern occurrences indexed, per request and global."""
        return {
            "request_tokens": sum(len(s.index.tokens) for s in self._requests.values()),
            "request_entries": sum(s.index.num_entries for s in self._requests.values()),
            "global_tokens": len(self._global.tokens),
            "global_entries": self._global.num_entries,
        }

    # -- drafting ------------------------------------------------------------------------------
    def _propose_one(self, r: DraftRequest) -> tuple[list[int], list[Hashable]]:
        tokens = r.token_ids
        state = self._requests.get(r.req_id)
        if state is None:
            prompt = r.num_prompt_tokens if r.num_prompt_tokens is not None else len(tokens) - 1
            state = _Request(_Index(self.max_match, self.max_occurrences), prompt)
            self._requests[r.req_id] = state
        index = state.index
        index.extend(tokens[index.end :])
        if r.num_draft_tokens < 1:
            return [], []
        followed = _followed(state.last_draft, tokens[state.last_draft_at :])
        drafts: list[int] = []
        features: list[Hashable] = []
        for n in range(min(self.max_match, len(tokens) - 1), self.min_match - 1, -1):
            pattern = tuple(tokens[len(tokens) - n :])
            # The request's own occurrences (the last one, ending at the end, has no
            # continuation yet and is not indexed), then the global ones.
            found = [(index, e) for e in index.occurrences(pattern)]
            found += [(self._global, e) for e in self._global.occurrences(pattern)]
            if found:
                drafts, features = _follow(found, n, r.num_draft_tokens, followed)
                break
        state.last_draft, state.last_draft_at = drafts, len(tokens)
        return drafts, features


def _followed(last_draft: Sequence[int], since: Sequence[int]) -> str:
    """How the text went on after the request's previous draft: "none" (there was none), "all"
    (every token committed since repeats it), "left" (the first did not), or "partly". A copy
    that ran on tends to run on, one the text just left tends to stay left: the lookup's
    drafts are accepted all or nothing more often than not (docs/scheduling.md)."""
    n = min(len(last_draft), len(since))
    if n == 0:
        return "none"
    same = next((i for i in range(n) if last_draft[i] != since[i]), n)
    return "all" if same == n else "left" if same == 0 else "partly"


def _follow(
    found: list[tuple[_Index, int]], match_len: int, k: int, followed: str
) -> tuple[list[int], list[Hashable]]:
    """Greedy most-frequent path through the continuations of the matched occurrences."""
    # Each occurrence's next k tokens, read once (slices, not a call per token: a one-token
    # match can have 64 occurrences, and this runs for every decoding request every step).
    runs = [store.continuation(e, k) for store, e in found]
    drafts: list[int] = []
    features: list[Hashable] = []
    for j in range(k):
        counts: dict[int, int] = {}  # insertion order = recency order, for ties
        for run in runs:
            if j < len(run):
                counts[run[j]] = counts.get(run[j], 0) + 1
        if not counts:
            break
        total = sum(counts.values())
        token = max(counts, key=counts.__getitem__)  # first maximum: the most recent
        drafts.append(token)
        features.append(suffix_feature(match_len, counts[token], total, followed))
        runs = [run for run in runs if j < len(run) and run[j] == token]
    return drafts, features


def suffix_feature(
    match_len: int, support: int, total: int, followed: str = "none"
) -> tuple[str, int, int, int, str]:
    """The estimator's cell for one suffix draft: match length, support and agreement, bucketed
    so that a few hundred outcomes teach every cell that occurs (scheduler/acceptance.py), and
    how the text followed the request's previous draft (`_followed`)."""
    length_bucket = min(match_len, 6)  # 1..5 tokens apart, 6 for 6 and longer
    support_bucket = 0 if support == 1 else 1 if support < 4 else 2
    share = support / total
    share_bucket = 3 if share == 1.0 else 2 if share >= 0.75 else 1 if share >= 0.5 else 0
    return ("suffix", length_bucket, support_bucket, share_bucket, followed)
