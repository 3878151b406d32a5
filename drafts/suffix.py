"""Suffix drafting, in the spirit of SuffixDecoding (Oliaro et al., 2024): no model, no training.

Two stores of token patterns:

- per request, its prompt and output so far (RAG answers and summaries copy their context,
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

Each store finds the end positions of a pattern's (1..max_match tokens) most recent
occurrences (at most `max_occurrences` are read): the global one by hash chains (`_Index`,
memory O(tokens x max_match), a lookup O(occurrences)), a request's by scanning its tokens'
bytes from the end (`_Scan`, memory O(tokens), a lookup O(tokens) in C: a request's tokens are
few, and indexing them token by token in Python cost more than every scan). A proposal then
costs O(max_match + occurrences x draft length) beside the scans. Pure Python: no torch.

Indexing a token allocates no object the garbage collector tracks: the tokens and the
chains' links sit in `array`s, a pattern's key is the bytes of its tokens. With a tuple and a list
per pattern, indexing 12 k tokens in a 16-stream run allocated 100 k tracked objects, and the
collections they set off took 150 us of every engine step (21 us now, none of it here).
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from scheduler.drafter import DraftProposal, DraftRequest

SEPARATOR = -1  # between responses in the global store: no continuation crosses it


@dataclass
class _Index:
    """Patterns of one token store -> end positions of their occurrences, as hash chains.

    The end position e of a pattern is where its continuation starts: tokens [e - n, e) are
    the pattern. `last` maps a pattern (its tokens' bytes) to its most recent end, and
    `earlier` holds, per end position and pattern length, the previous end of the same pattern
    (-1: none), so occurrences are read newest first by following the chain (zlib finds
    earlier strings the same way). Every structure holds plain integers and bytes: indexing a
    token allocates nothing the garbage collector tracks. Positions are absolute (they survive
    eviction from the front of the store): tokens[pos - base] is the token at absolute
    position pos, earlier[(e - base) x max_match + n - 1] the link of the n-token pattern
    ending at e.
    """

    max_match: int
    max_occurrences: int
    tokens: array = field(default_factory=lambda: array("i"))  # int32 token ids
    base: int = 0  # absolute position of tokens[0]
    num_indexed: int = 0  # absolute end of the tokens whose patterns are recorded
    last: dict[bytes, int] = field(default_factory=dict)
    earlier: array = field(default_factory=lambda: array("q"))  # rows for ends base..num_indexed-1
    num_entries: int = 0  # occurrences recorded and not evicted

    @property
    def end(self) -> int:
        return self.base + len(self.tokens)

    def continuation(self, pos: int, k: int) -> list[int]:
        """Up to k tokens from absolute position pos, stopping at a separator or the end."""
        i = pos - self.base
        run = self.tokens[i : i + k].tolist() if i >= 0 else []
        return run[: run.index(SEPARATOR)] if SEPARATOR in run else run

    def extend(self, new_tokens: Sequence[int]) -> None:
        self.tokens.extend(new_tokens)
        self.index_up_to(self.end)

    def index_up_to(self, end: int) -> None:
        """Record every pattern that ends at a position < end (each has a known continuation)."""
        tokens, base, width = self.tokens, self.base, self.max_match
        last, earlier = self.last, self.earlier
        first = max(self.num_indexed, base)
        earlier.extend([-1] * ((end - first) * width))  # rows for ends first .. end - 1
        for e in range(max(first, base + 1), end):
            row = (e - base) * width
            for n in range(1, width + 1):
                start = e - n - base
                if start < 0 or tokens[start] == SEPARATOR:  # the token length n adds
                    break
                key = tokens[start : e - base].tobytes()
                earlier[row + n - 1] = last.get(key, -1)
                last[key] = e
                self.num_entries += 1
        self.num_indexed = max(self.num_indexed, end)

    def occurrences(self, key: bytes) -> list[int]:
        """End positions of the pattern whose tokens' bytes are `key`: its most recent
        `max_occurrences`, most recent first."""
        n = len(key) // self.tokens.itemsize
        found: list[int] = []
        e = self.last.get(key, -1)
        while e - n >= self.base and len(found) < self.max_occurrences:  # e = -1 ends it too
            found.append(e)
            e = self.earlier[(e - self.base) * self.max_match + n - 1]
        return found

    def evict_before(self, pos: int) -> None:
        """Forget the tokens before absolute position pos and every occurrence that reads them.

        A chain runs from newer to older ends, so an occurrence that starts before pos ends
        every chain it is on (`occurrences` stops there); a pattern whose newest occurrence
        is one of them has none left and leaves `last`.
        """
        old_base, cut = self.base, pos - self.base
        if cut <= 0:
            return
        window = self.tokens[: cut + self.max_match]  # absolute positions old_base ...
        del self.tokens[:cut]
        del self.earlier[: cut * self.max_match]
        self.base = pos
        for e in range(old_base + 1, min(pos + self.max_match, old_base + len(window)) + 1):
            for n in range(1, self.max_match + 1):  # the patterns `index_up_to` recorded
                start = e - n - old_base
                if start < 0 or window[start] == SEPARATOR:
                    break
                if start >= cut or e >= self.num_indexed:
                    continue  # reads kept tokens only, or was never recorded
                self.num_entries -= 1
                key = window[start : e - old_base].tobytes()
                if self.last.get(key) == e:
                    del self.last[key]


@dataclass
class _Scan:
    """One request's tokens, searched where `_Index` would look them up: the occurrences of a
    pattern are found by scanning the tokens' bytes from the end (`bytes.rfind`, in C) instead
    of hash chains built token by token.

    Indexing a token costs a dictionary entry and a link per pattern length (8), in Python:
    a request's first ask indexed its whole prompt, ~0.5-0.9 ms for 80 tokens, and at 16
    streams the lookups' asks were ~0.2 ms of every step where none paid. A request holds
    a few thousand tokens, so a scan of its bytes per pattern length costs microseconds. The
    global store keeps `_Index`: 65,536 tokens are too many to scan on every ask. Same
    answers as an `_Index` of the same tokens (tests/drafts/test_suffix.py)."""

    max_occurrences: int
    tokens: array = field(default_factory=lambda: array("i"))  # int32 token ids; nothing evicted
    _bytes: bytes = b""  # tokens.tobytes() as of the last `occurrences`, for its length

    @property
    def end(self) -> int:
        return len(self.tokens)

    def extend(self, new_tokens: Sequence[int]) -> None:
        self.tokens.extend(new_tokens)

    def continuation(self, pos: int, k: int) -> list[int]:
        """Up to k tokens from position pos (a request holds no separator)."""
        return self.tokens[pos : pos + k].tolist()

    def occurrences(self, key: bytes) -> list[int]:
        """End positions of the pattern whose tokens' bytes are `key` and that has a
        continuation (ends before the last token), most recent first, at most
        `max_occurrences`: what `_Index.occurrences` returns."""
        if len(self._bytes) != len(self.tokens) * 4:
            self._bytes = self.tokens.tobytes()
        data, width = self._bytes, len(key)
        found: list[int] = []
        stop = len(data) - 4  # a match must end before the last token: it needs a continuation
        while len(found) < self.max_occurrences:
            at = data.rfind(key, 0, stop)
            if at < 0:
                break
            if at % 4 == 0:  # a match across two tokens' bytes is none
                found.append((at + width) // 4)
            stop = at + width - 1  # the next search ends before this match's end
        return found


@dataclass
class _Request:
    index: _Scan
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
        tokens = state.index.tokens
        num_output = len(tokens) - state.num_prompt_tokens
        if num_output < 2:
            return
        output = tokens[len(tokens) - min(num_output, self.global_tokens) :]  # a copy
        output.append(SEPARATOR)
        self._global.extend(output)
        self._response_ends.append(self._global.end)
        while len(self._global.tokens) > self.global_tokens and self._response_ends:
            self._global.evict_before(self._response_ends.pop(0))

    # -- memory, exported as a metric ------------------------------------------------------------
    def memory(self) -> dict[str, int]:
        """Tokens held and pattern occurrences indexed, per request and global."""
        return {
            "request_tokens": sum(len(s.index.tokens) for s in self._requests.values()),
            "global_tokens": len(self._global.tokens),
            "global_entries": self._global.num_entries,
        }

    # -- drafting ------------------------------------------------------------------------------
    def _propose_one(self, r: DraftRequest) -> tuple[list[int], list[Hashable]]:
        tokens = r.token_ids
        state = self._requests.get(r.req_id)
        if state is None:
            prompt = r.num_prompt_tokens if r.num_prompt_tokens is not None else len(tokens) - 1
            state = _Request(_Scan(self.max_occurrences), prompt)
            self._requests[r.req_id] = state
        index = state.index
        index.extend(tokens[index.end :])
        if r.num_draft_tokens < 1:
            return [], []
        followed = _followed(state.last_draft, tokens[state.last_draft_at :])
        drafts: list[int] = []
        features: list[Hashable] = []
        tail = index.tokens[-self.max_match :]  # the request's tokens, all stored above
        for n in range(min(self.max_match, len(tokens) - 1), self.min_match - 1, -1):
            key = tail[len(tail) - n :].tobytes()
            # The request's own occurrences (the last one, ending at the end, has no
            # continuation yet and is not counted), then the global ones.
            found: list[tuple[_Index | _Scan, int]] = [
                (index, e) for e in index.occurrences(key)
            ]
            found += [(self._global, e) for e in self._global.occurrences(key)]
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
    found: list[tuple[_Index | _Scan, int]], match_len: int, k: int, followed: str
) -> tuple[list[int], list[Hashable]]:
    """Greedy most-frequent path through the continuations of the matched occurrences."""
    # Each occurrence's next k tokens, read once (slices, not a call per token: a one-token
    # match can have 64 occurrences, and this runs for every decoding request every step).
    runs = [store.continuation(e, k) for store, e in found]
    drafts: list[int] = []
    features: list[Hashable] = []
    for j in range(k):
        if len(runs) == 1:  # one occurrence left: the rest of it, each token its only choice
            rest = runs[0][j:]
            drafts += rest
            features += [suffix_feature(match_len, 1, 1, followed)] * len(rest)
            break
        column = [run[j] for run in runs if j < len(run)]
        if not column:
            break
        counts = Counter(column)  # insertion order = recency order, for ties
        token = max(counts, key=counts.__getitem__)  # first maximum: the most recent
        drafts.append(token)
        features.append(suffix_feature(match_len, counts[token], len(column), followed))
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
