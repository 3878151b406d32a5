"""The suffix drafter: longest match, most frequent continuation, global index, bounded memory."""

from __future__ import annotations

import random
from array import array

from drafts.suffix import SEPARATOR, SuffixProposer, _Index, _Scan
from scheduler.drafter import DraftRequest
from scheduler.request import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


def propose(p: SuffixProposer, req_id: str, tokens: list[int], k: int = 4, prompt: int | None = None):
    out = p.propose([DraftRequest(req_id, tuple(tokens), GREEDY, k, prompt)])
    return out.token_ids[0], out.features[0]  # type: ignore[index]


def test_continues_the_longest_match_in_the_request() -> None:
    p = SuffixProposer(4, min_match=1, global_tokens=0)
    # "1 2" is followed by 9 once, "7 1 2" (longer) by 3 4 5 6.
    ids, feats = propose(p, "r", [1, 2, 9, 7, 1, 2, 3, 4, 5, 6, 8, 7, 1, 2])
    assert ids == [3, 4, 5, 6]
    assert all(f[1] == 3 for f in feats)  # match length 3


def test_most_frequent_continuation_wins_and_ties_go_to_the_most_recent() -> None:
    p = SuffixProposer(2, min_match=2, max_match=2, global_tokens=0)
    ids, feats = propose(p, "a", [5, 6, 1, 0, 5, 6, 1, 0, 5, 6, 2, 0, 5, 6], k=2)
    assert ids == [1, 0]  # 1 follows "5 6" twice, 2 once (the most recent)
    assert feats[0][3] == 1 and feats[1][3] == 3  # 2 of 3 agree, then all that remain
    ids, _ = propose(p, "b", [5, 6, 1, 0, 5, 6, 2, 0, 5, 6], k=2)
    assert ids == [2, 0]  # one each: the most recent occurrence


def test_no_match_no_draft_and_requests_are_independent() -> None:
    p = SuffixProposer(3, global_tokens=0)
    assert propose(p, "a", [1, 2, 3, 4]) == ([], [])
    propose(p, "b", [1, 2, 3, 1, 2])
    assert propose(p, "a", [1, 2, 3, 4, 1, 2], k=3) == ([3, 4, 1], [("suffix", 2, 0, 3, "none")] * 3)


def test_each_draft_says_how_the_text_followed_the_previous_one() -> None:
    p = SuffixProposer(3, global_tokens=0)
    text = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2]
    ids, feats = propose(p, "r", text, k=3)
    assert ids == [3, 4, 5] and feats[0][-1] == "none"  # no draft before this one
    ids, feats = propose(p, "r", [*text, 3, 4], k=3)  # both committed tokens repeat it
    assert ids == [5, 6, 7] and feats[0][-1] == "all"
    ids, feats = propose(p, "r", [*text, 3, 4, 5, 9, 1, 2], k=3)  # 5, then 9 where it said 6
    assert feats[0][-1] == "partly"
    _, feats = propose(p, "r", [*text, 3, 4, 5, 9, 1, 2, 7, 1, 2], k=3)  # 7 where it said 3
    assert feats[0][-1] == "left"


def test_finished_outputs_feed_the_global_index() -> None:
    p = SuffixProposer(4, min_match=2)
    prompt = [100, 101, 102]
    propose(p, "a", [*prompt, 7], prompt=3)
    propose(p, "a", [*prompt, 7, 8, 9, 10, 11, 12], prompt=3)
    p.release("a")
    assert p.memory()["global_tokens"] == 7  # the 6 output tokens and a separator
    ids, _ = propose(p, "b", [200, 201, 8, 9], prompt=3)
    assert ids == [10, 11, 12]  # stops at the end of the stored response
    assert propose(p, "c", [200, 201, 8, 9], prompt=4) == (ids, _)  # prompt not indexed globally
    assert SuffixProposer(4, global_tokens=0).memory()["global_tokens"] == 0


def test_global_memory_stays_bounded_and_eviction_leaves_an_exact_index() -> None:
    rng = random.Random(0)
    p = SuffixProposer(4, max_match=4, max_occurrences=10_000, global_tokens=300)
    for i in range(60):
        out = [rng.randrange(20) for _ in range(rng.randrange(2, 40))]
        propose(p, f"r{i}", [999, *out], prompt=1)
        p.release(f"r{i}")
        assert p.memory()["global_tokens"] <= 300
    g = p._global
    fresh = _Index(4, 10_000, base=g.base, num_indexed=g.base)
    fresh.extend(g.tokens)
    assert g.last.keys() == fresh.last.keys()  # no pattern left whose occurrences all went
    assert all(g.occurrences(key) == fresh.occurrences(key) for key in fresh.last)
    assert g.num_entries == fresh.num_entries == sum(len(fresh.occurrences(k)) for k in fresh.last)
    assert g.tokens[-1] == SEPARATOR


def test_occurrences_are_the_most_recent_ones() -> None:
    p = SuffixProposer(2, min_match=1, max_occurrences=4, global_tokens=0)
    propose(p, "r", [1, 2] * 200)
    tokens = p._requests["r"].index
    assert tokens.occurrences(array("i", [1, 2]).tobytes()) == [398, 396, 394, 392]
    index = _Index(2, 4)
    index.extend([1, 2] * 200)
    assert len(index.earlier) == 400 * index.max_match  # memory: a link per pattern length


def test_a_requests_scan_finds_what_an_index_of_its_tokens_finds() -> None:
    """Per request the tokens are scanned, not indexed: the same occurrences, in the same
    order, for every pattern, as the text grows; token ids whose bytes hold zeros too (a match
    across two tokens' bytes is none)."""
    rng = random.Random(1)
    for vocab in (range(3), range(6), [0, 256, 65536, 1, 65537]):
        scan, index = _Scan(max_occurrences=5), _Index(4, 5)
        tokens: list[int] = []
        for _ in range(40):
            new = [rng.choice(vocab) for _ in range(rng.randrange(1, 8))]
            tokens += new
            scan.extend(new)
            index.extend(new)
            for n in range(1, 5):
                for start in range(max(0, len(tokens) - 12), len(tokens) - n + 1):
                    key = array("i", tokens[start : start + n]).tobytes()
                    assert scan.occurrences(key) == index.occurrences(key)
