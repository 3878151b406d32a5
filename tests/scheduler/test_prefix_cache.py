"""Automatic prefix caching: the index (scheduler/prefix_cache.py) on its own, the batcher's
admission with it, and on the real embedded model (float32) the greedy outputs of engines that
reuse stored prompt blocks, with and without drafting, against an engine that computes every
prompt token."""

from __future__ import annotations

import itertools

import pytest

from scheduler.batching import ContinuousBatcher
from scheduler.plan import RequestResult, StepResult
from scheduler.prefix_cache import PrefixIndex
from scheduler.request import Request, SamplingParams

B = 4  # block size in the index tests


def stored(index: PrefixIndex, prompt: list[int]) -> list[tuple[int, int]]:
    """Claim every whole block of `prompt` as one chunk would, and mark the step done."""
    claimed = index.claim(prompt, len(prompt))
    index.mark_ready()
    return claimed


def test_a_prompt_matches_the_stored_blocks_it_starts_with():
    index = PrefixIndex(num_blocks=8, block_size=B)
    first = list(range(10))  # blocks [0..3] [4..7]; 8, 9 are no whole block
    assert stored(index, first) == [(0, 0), (1, 4)]
    assert index.match([0, 1, 2, 3, 4, 5, 6, 7, 50, 51]) == [0, 1]
    assert index.match([0, 1, 2, 3, 4, 5, 6, 99, 50]) == [0]  # the second block differs
    assert index.match([9, 1, 2, 3, 4, 5, 6, 7, 50]) == []  # a block is its whole prefix
    # At least the last token is left to compute: its logits give the first output token.
    assert index.match(list(range(8))) == [0]
    assert index.match(list(range(9))) == [0, 1]


def test_blocks_claimed_this_step_are_not_handed_out_before_the_step_ran():
    index = PrefixIndex(num_blocks=8, block_size=B)
    assert index.claim(list(range(9)), 9) == [(0, 0), (1, 4)]
    assert index.match(list(range(9))) == []  # a request admitted beside the one computing them
    assert index.claim(list(range(9)), 9) == []  # and it stores nothing a second time
    index.mark_ready()
    assert index.match(list(range(9))) == [0, 1]


def test_a_chunk_claims_the_block_an_earlier_chunk_began():
    index = PrefixIndex(num_blocks=8, block_size=B)
    prompt = list(range(20))
    assert index.claim(prompt, 6) == [(0, 0)]  # block 1 (4..7) is not finished
    # The next chunk computes 6..19: it finishes block 1, whose first positions the earlier
    # chunk computed (their KV and features are in the request's slot), and blocks 2-4.
    assert index.claim(prompt, 20) == [(1, 4), (2, 8), (3, 12), (4, 16)]
    index.mark_ready()
    assert index.match(prompt) == [0, 1, 2, 3]  # at least the last token is left to compute


def test_the_least_recently_matched_prompt_goes_first():
    index = PrefixIndex(num_blocks=2, block_size=B)
    a, b = [1] * 4 + [0], [3] * 4 + [0]
    stored(index, a)
    stored(index, b)
    assert index.match(a) == [0]  # a is now the more recent
    assert stored(index, [4] * 4 + [0]) == [(1, 0)]  # b's block went
    assert index.match(b) == []
    assert index.match(a) == [0]


def test_an_evicted_block_takes_the_blocks_stored_under_it():
    index = PrefixIndex(num_blocks=2, block_size=B)
    a = [1] * 4 + [2] * 4 + [0]
    stored(index, a)  # block 0 (1111), block 1 (2222 under 0); block 0 the least recent
    assert stored(index, [4] * 4 + [0]) == [(1, 0)]  # block 0 went, and block 1 with it
    assert index.match(a) == []
    assert index.num_used == 1
    # Block 0's id now starts another prompt: a's second block must not match under it.
    assert stored(index, [6] * 4 + [0]) == [(0, 0)]
    assert index.match([6] * 4 + [2] * 4 + [0]) == [0]


def test_blocks_claimed_this_step_are_never_evicted():
    index = PrefixIndex(num_blocks=2, block_size=B)
    assert index.claim(list(range(9)), 9) == [(0, 0), (1, 4)]
    # Full of blocks the step is about to write: another prompt stores nothing.
    assert index.claim([7] * 9, 9) == []


def test_admission_starts_a_prompt_after_its_stored_blocks():
    batcher = ContinuousBatcher(max_num_seqs=2, max_model_len=64, max_num_batched_tokens=64)
    batcher.prefix = PrefixIndex(num_blocks=8, block_size=B)
    params = SamplingParams(max_tokens=4)
    batcher.add(Request("a", list(range(10)), params))
    plan = batcher.schedule()
    (s,) = plan.scheduled
    assert (s.start_pos, s.num_new_tokens, s.prefix_block_ids) == (0, 10, [])
    assert s.save_blocks == [(0, 0), (1, 4)]
    batcher.update(plan, StepResult([RequestResult([42])]))
    batcher.add(Request("b", [0, 1, 2, 3, 4, 5, 6, 7, 8, 20, 21], params))
    assert batcher.schedule().scheduled[-1].prefix_block_ids == []  # not marked stored yet
    batcher = ContinuousBatcher(max_num_seqs=2, max_model_len=64, max_num_batched_tokens=64)
    batcher.prefix = PrefixIndex(num_blocks=8, block_size=B)
    batcher.add(Request("a", list(range(10)), params))
    batcher.update(batcher.schedule(), StepResult([RequestResult([42])]))
    batcher.blocks_stored()
    batcher.add(Request("b", [0, 1, 2, 3, 4, 5, 6, 7, 8, 20, 21], params))
    plan = batcher.schedule()
    s = next(s for s in plan.scheduled if s.req.req_id == "b")
    assert (s.start_pos, s.num_new_tokens) == (8, 3)
    assert (s.prefix_block_ids, s.num_prefix_tokens, s.first_feature_pos) == ([0, 1], 8, 0)
    assert s.save_blocks == []  # positions 8..10: no whole block
    batcher.update(plan, StepResult([RequestResult([5]), RequestResult([6])]))
    out = batcher.update(batcher.schedule(), StepResult([RequestResult([5]), RequestResult([6])]))
    assert {o.req_id: o.num_cached_tokens for o in out} == {"a": 0, "b": 8}


def test_a_finished_request_stores_the_blocks_of_its_prompt_and_answer():
    """A conversation's next turn starts with the last turn's prompt and answer."""
    batcher = ContinuousBatcher(max_num_seqs=1, max_model_len=64, max_num_batched_tokens=64)
    batcher.prefix = PrefixIndex(num_blocks=8, block_size=B)
    batcher.add(Request("a", list(range(6)), SamplingParams(max_tokens=4)))
    plan = batcher.schedule()
    assert plan.scheduled[0].save_blocks == [(0, 0)]  # positions 0..3 of the prompt
    batcher.update(plan, StepResult([RequestResult([6, 7])]))
    plan = batcher.schedule()  # positions 6, 7 computed; 8 and 9 emitted
    batcher.update(plan, StepResult([RequestResult([8, 9], num_accepted_drafts=0)]))
    # 0..5 prompt, 6..9 output; positions 0..7 have KV (9 is the anchor, never computed)
    (finished,) = batcher.take_finished_blocks()
    assert finished == (0, [(1, 4)])  # block 0 is stored already; block 1 is 4..7
    assert batcher.take_finished_blocks() == []
    batcher.blocks_stored()
    assert batcher.prefix.match([*range(10), 50, 51]) == [0, 1]


# -- the real model ----------------------------------------------------------------------------

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def prompts(chat_prompts):
    """Eight chat prompts: every one opens with the template's system turn (24 tokens)."""
    return chat_prompts


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def serve(engine, prompts, params):
    from tests.scheduler.test_spec_lossless import run_staggered

    return run_staggered(engine, prompts, lambda i: params)[0]


@pytest.fixture(scope="module")
def uncached(target, prompts):
    from tests.scheduler.test_engine_real import make_engine

    engine = make_engine(target, num_slots=4, budget=48)
    return serve(engine, prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))


def record_cached_tokens(engine) -> dict[str, int]:
    """Per finished request, the prompt tokens it read from the cache (filled as it steps)."""
    cached: dict[str, int] = {}
    engine_step = engine.step

    def step():
        stepped = engine_step()
        for out in stepped[0] if stepped else []:
            if out.finished:
                cached[out.req_id] = out.num_cached_tokens
        return stepped

    engine.step = step
    return cached


def with_prefix_cache(engine, num_blocks: int = 64, block_size: int = 8):
    engine.runner.enable_prefix_cache(num_blocks, block_size)
    engine.batcher.prefix = PrefixIndex(num_blocks, block_size)
    return engine


def feature_spans(engine, values: dict | None = None) -> dict[str, list[tuple[int, int]]]:
    """Per request, the (first position, rows) of each feature hand-over DSpark (the composite's
    second drafter) receives, filled as the engine steps; `values`, if given, gets per request
    a copy of each hand-over's features."""
    dspark = engine.speculator.drafters[1].proposer
    seen: dict[str, list[tuple[int, int]]] = {}
    observe = dspark.observe

    def spy(req_id, start_pos, hidden):
        seen.setdefault(req_id, []).append((start_pos, hidden.shape[0]))
        if values is not None:
            values.setdefault(req_id, []).append(hidden.clone())
        observe(req_id, start_pos, hidden)

    dspark.observe = spy
    return seen


def assert_contiguous_from_0(
    spans: list[tuple[int, int]], first_beyond: int = 0, last_beyond: int = 0
) -> None:
    """The hand-overs start at position 0, each where the last ended; the first covers more
    than `first_beyond` positions (a loaded prefix and the chunk after it), and they reach at
    least `last_beyond`."""
    assert spans[0][0] == 0 and spans[0][1] > first_beyond, spans
    ends = list(itertools.accumulate(n for _, n in spans))
    assert all(start == end for (start, _), end in zip(spans[1:], ends)), spans
    assert ends[-1] >= last_beyond, spans


def test_greedy_output_with_the_prefix_cache_equals_computing_every_token(
    target, prompts, uncached
):
    from tests.scheduler.test_engine_real import make_engine

    engine = with_prefix_cache(make_engine(target, num_slots=4, budget=48))
    cached_tokens = record_cached_tokens(engine)
    assert (
        serve(engine, prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)) == uncached
    )
    # The first prompt computes the system turn; every later one reads the whole blocks it
    # shares with an earlier prompt.
    assert cached_tokens["r0"] == 0
    for i, p in enumerate(prompts[1:], 1):
        shared = max(common_prefix(p, q) for q in prompts[:i])
        assert cached_tokens[f"r{i}"] == min(shared, len(p) - 1) // 8 * 8 >= 16, (i, cached_tokens)


def test_the_composite_drafter_gets_every_positions_features_and_stays_lossless(
    target, prompts, uncached
):
    """suffix+dspark with its gates: greedy output equal to the uncached engine without
    drafting, and DSpark is handed the target's features of every prompt position, the
    stored prefix's included, from position 0 on (every request feeds DSpark here)."""
    from tests.scheduler.test_composite_lossless import composite_engine, run

    engine = with_prefix_cache(composite_engine(target, "dspark", feed_drafter_every=1))
    seen = feature_spans(engine)
    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    outputs, *_ = run(engine, [Request(f"r{i}", p, greedy) for i, p in enumerate(prompts)])
    assert [outputs[f"r{i}"] for i in range(len(prompts))] == uncached
    for i, p in enumerate(prompts):
        assert_contiguous_from_0(seen[f"r{i}"], last_beyond=len(p))


def test_a_request_that_does_not_feed_the_drafter_still_stores_features_with_its_blocks(
    target, prompts, uncached
):
    """A request admitted while the model drafter did not pay never hands DSpark its features,
    but the blocks it stores carry them: a later request that feeds DSpark and reads those
    blocks hands over every position's from 0 on, the very features an engine without the
    cache computes for them, and both answers are exactly the uncached ones."""
    import torch

    from tests.scheduler.test_composite_lossless import composite_engine, run

    engine = with_prefix_cache(composite_engine(target, "dspark", feed_drafter_every=1))
    values: dict[str, list] = {}
    seen = feature_spans(engine, values)
    cached = record_cached_tokens(engine)
    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    without = Request("without", prompts[0], greedy)
    without.feeds_drafter = False  # as `Speculator._admit` decides under load
    outputs, *_ = run(engine, [without])
    later = Request("later", prompts[0], greedy)
    outputs.update(run(engine, [later])[0])
    assert [outputs["without"], outputs["later"]] == [uncached[0], uncached[0]]
    assert later.feeds_drafter and cached["later"] >= len(prompts[0]) - 8
    assert "without" not in seen
    assert_contiguous_from_0(seen["later"], first_beyond=cached["later"])

    # The same prompt through an engine without the cache: what DSpark is handed there for
    # the positions the later request read from the blocks.
    plain = composite_engine(target, "dspark", feed_drafter_every=1)
    computed: dict[str, list] = {}
    feature_spans(plain, computed)
    run(plain, [Request("plain", prompts[0], greedy)])
    n = cached["later"]
    torch.testing.assert_close(
        torch.cat(values["later"])[:n], torch.cat(computed["plain"])[:n], rtol=1e-4, atol=1e-4
    )


def test_a_block_across_two_prompt_chunks_is_stored_while_its_request_runs(target, prompts):
    """A prompt longer than the step's budget is prefilled in chunks; at a budget of 45 the
    first chunk ends inside a block (40..47). The second chunk claims that block too (the slot
    holds the first chunk's keys, values and features), so a request with the same prompt,
    admitted while the first still decodes, reads every whole block before its last token,
    hands DSpark the features an engine without the cache computes, and both answers are the
    uncached one."""
    import torch

    from tests.scheduler.test_composite_lossless import composite_engine, run

    long_prompt = prompts[0] + prompts[1]  # two chat turns back to back: > 45 tokens
    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    plain = composite_engine(target, "dspark", budget=45, feed_drafter_every=1)
    computed: dict[str, list] = {}
    feature_spans(plain, computed)
    reference = run(plain, [Request("plain", long_prompt, greedy)])[0]["plain"]

    engine = with_prefix_cache(
        composite_engine(target, "dspark", budget=45, feed_drafter_every=1)
    )
    values: dict[str, list] = {}
    feature_spans(engine, values)
    cached = record_cached_tokens(engine)
    first, second = Request("a", long_prompt, greedy), Request("b", long_prompt, greedy)
    outputs = run(engine, [first, second], stagger=3)[0]  # b comes after a's two chunks
    assert outputs == {"a": reference, "b": reference}
    n = cached["b"]
    assert n == (len(long_prompt) - 1) // 8 * 8 > 48, (n, len(long_prompt))
    torch.testing.assert_close(
        torch.cat(values["b"])[:n], torch.cat(computed["plain"])[:n], rtol=1e-4, atol=1e-4
    )


def test_a_conversations_next_turn_reads_the_last_turns_prompt_and_answer(target, chat_prompts):
    """Turn 2 of a conversation repeats turn 1's prompt and answer: with the composite drafter
    (DSpark reads the target's features), it reads every whole block of them from the cache,
    DSpark gets the features of every position, and the greedy answer is the one an engine
    without the cache gives."""
    from tests.scheduler.test_composite_lossless import composite_engine, run
    from tests.scheduler.test_engine_real import make_engine

    tok = target.tokenizer
    follow_up = tok.encode(
        "<|im_start|>user\nWhy is that?<|im_end|>\n<|im_start|>assistant\n",
        add_special_tokens=False,
    )
    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)

    def conversation(engine):
        first = run(engine, [Request("turn1", chat_prompts[0], greedy)])[0]["turn1"]
        second = chat_prompts[0] + first + follow_up
        finished = record_cached_tokens(engine)
        answer = run(engine, [Request("turn2", second, greedy)])[0]["turn2"]
        return first, answer, finished.get("turn2", 0)

    reference = conversation(make_engine(target, num_slots=4, budget=48))
    engine = with_prefix_cache(composite_engine(target, "dspark", feed_drafter_every=1))
    seen = feature_spans(engine)
    first, answer, cached = conversation(engine)
    assert (first, answer) == reference[:2]
    # Turn 1's last token was emitted, never computed: the blocks end before it.
    assert cached == (len(chat_prompts[0]) + len(first) - 1) // 8 * 8
    assert_contiguous_from_0(seen["turn2"], first_beyond=cached)
