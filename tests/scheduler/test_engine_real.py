"""The engine against transformers on the real embedded model (float32 on CPU)."""

from __future__ import annotations

import pytest
import torch

from scheduler.batching import ContinuousBatcher
from scheduler.engine import LLMEngine, ServedModel
from scheduler.model import (
    MATMUL_ATTENTION_MIN_ROWS,
    TargetModel,
    build_packed_batch,
    grouped_query_attention,
)
from scheduler.request import Request, SamplingParams
from scheduler.runner import TorchModelRunner
from tests.scheduler.doubles import make_speculator

NEW_TOKENS = 24
# float32 on CPU: packed attention and transformers' eager/SDPA path differ only in summation
# order; measured max |diff| is ~5e-5 on logits of magnitude ~20.
LOGITS_ATOL = 1e-3


def make_engine(
    target, num_slots=4, max_model_len=512, budget=64, proposer=None, policy=None, gate=None
):
    speculator = make_speculator(proposer, policy, gate) if proposer is not None else None
    runner = TorchModelRunner(
        target.hf_model, num_slots, max_model_len,
        aux_layer_ids=speculator.aux_layer_ids if speculator is not None else (),
    )
    batcher = ContinuousBatcher(num_slots, max_model_len, budget)
    model = ServedModel("test", target.tokenizer, frozenset({target.tokenizer.eos_token_id}))
    return LLMEngine(runner, batcher, model, speculator)


@pytest.fixture(scope="module")
def hf_greedy(target, chat_prompts):
    """transformers `generate`, greedy, one prompt at a time: the reference outputs."""
    refs = []
    with torch.inference_mode():
        for p in chat_prompts:
            out = target.hf_model.generate(
                torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False,
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
            )
            refs.append(out[0, len(p):].tolist())
    return refs


def test_logits_match_transformers_for_prefill_and_appends(target):
    model = TargetModel(target.hf_model, num_slots=4, max_model_len=256)
    gen = torch.Generator().manual_seed(1)
    a = torch.randint(0, model.vocab_size, (45,), generator=gen).tolist()
    b = torch.randint(0, model.vocab_size, (30,), generator=gen).tolist()
    with torch.inference_mode():
        ref_a = target.hf_model(torch.tensor([a])).logits[0].float()
        ref_b = target.hf_model(torch.tensor([b])).logits[0].float()
    cpu = torch.device("cpu")
    # Step 1: a long prefill chunk (own attention call) in slot 2 beside a short one in slot 0.
    logits, _ = model.forward(build_packed_batch([(2, 0, a[:30]), (0, 0, b[:12])], list(range(42)), cpu))
    torch.testing.assert_close(logits[:30], ref_a[:30], atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(logits[30:], ref_b[:12], atol=LOGITS_ATOL, rtol=0)
    # Step 2: multi-token appends onto existing KV, different lengths per request.
    logits, _ = model.forward(build_packed_batch([(2, 30, a[30:37]), (0, 12, b[12:13])], list(range(8)), cpu))
    torch.testing.assert_close(logits[:7], ref_a[30:37], atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(logits[7:], ref_b[12:13], atol=LOGITS_ATOL, rtol=0)
    # Step 3: an append of 17 (long path) next to one of 8 (short path).
    logits, aux = model.forward(
        build_packed_batch([(0, 13, b[13:30]), (2, 37, a[37:45])], list(range(25)), cpu), (3, 7)
    )
    torch.testing.assert_close(logits[:17], ref_b[13:30], atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(logits[17:], ref_a[37:45], atol=LOGITS_ATOL, rtol=0)
    assert aux.shape == (25, 2 * model.hidden_size)


def test_staggered_greedy_batch_equals_transformers_generate(target, chat_prompts, hf_greedy):
    # A small step budget forces chunked prefill; staggered arrival mixes prefill and decode.
    engine = make_engine(target, num_slots=4, budget=24)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    outputs: dict[str, list[int]] = {}
    pending = list(enumerate(chat_prompts))
    mixed_steps = 0
    step = 0
    while pending or engine.has_work:
        if pending and step % 3 == 0:  # a new request every third step
            i, prompt = pending.pop(0)
            engine.add_request(Request(f"r{i}", prompt, params))
            outputs[f"r{i}"] = []
        stepped = engine.step()
        step += 1
        if stepped is None:
            continue
        outs, stats = stepped
        if stats.num_prefill_tokens and stats.num_scheduled_tokens > stats.num_prefill_tokens:
            mixed_steps += 1
        for out in outs:
            outputs[out.req_id].extend(out.new_token_ids)
    assert mixed_steps > 0, "arrivals never overlapped with decoding"
    for i, ref in enumerate(hf_greedy):
        assert outputs[f"r{i}"] == ref, f"prompt {i} diverged"


def test_seeded_sampling_same_alone_and_in_busy_batch(target, chat_prompts):
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    alone = make_engine(target).generate([chat_prompts[0]], params)[0]
    busy_params = [params] + [
        SamplingParams(max_tokens=16, temperature=1.0, seed=None) for _ in chat_prompts[1:4]
    ]
    busy = make_engine(target).generate(chat_prompts[:4], busy_params)[0]
    assert alone == busy
    other_seed = make_engine(target).generate(
        [chat_prompts[0]], SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=99)
    )[0]
    assert other_seed != alone  # the seed really drives the draw


def test_decode_in_slot_order_equals_the_padded_path(target):
    """Steady decode in slot order skips the query padding; it must give the same logits as the
    padded path (the same decodes packed in another order)."""
    model = TargetModel(target.hf_model, num_slots=3, max_model_len=64)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, model.vocab_size, (n,), generator=gen).tolist() for n in (9, 5, 7)]
    cpu = torch.device("cpu")
    with torch.inference_mode():
        for slot, p in enumerate(prompts):
            model.forward(build_packed_batch([(slot, 0, p[:-1])], [], cpu))
        in_order = [(slot, len(p) - 1, p[-1:]) for slot, p in enumerate(prompts)]
        dense = build_packed_batch(in_order, [0, 1, 2], cpu)
        shuffled = build_packed_batch([in_order[i] for i in (2, 0, 1)], [0, 1, 2], cpu)
        assert dense.small[0].dense and not shuffled.small[0].dense
        logits_dense, _ = model.forward(dense)
        logits_padded, _ = model.forward(shuffled)  # rewrites the same KV entries
    torch.testing.assert_close(logits_dense, logits_padded[[1, 2, 0]], atol=1e-5, rtol=0)


def test_many_short_queries_take_the_matmul_attention_and_match_transformers(target):
    """4 slots x 4 appended tokens pass MATMUL_ATTENTION_MIN_ROWS: the verification shape under
    load. Its logits must match transformers like the SDPA paths do."""
    slots, new = 4, 4
    assert slots * new >= MATMUL_ATTENTION_MIN_ROWS
    model = TargetModel(target.hf_model, num_slots=slots, max_model_len=64)
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, model.vocab_size, (n + new,), generator=gen).tolist() for n in (11, 6, 20, 9)]
    cpu = torch.device("cpu")
    with torch.inference_mode():
        refs = [target.hf_model(torch.tensor([s])).logits[0, -new:].float() for s in seqs]
        for slot, s in enumerate(seqs):
            model.forward(build_packed_batch([(slot, 0, s[:-new])], [], cpu))
        appends = [(slot, len(s) - new, s[-new:]) for slot, s in enumerate(seqs)]
        logits, _ = model.forward(build_packed_batch(appends, list(range(slots * new)), cpu))
    torch.testing.assert_close(logits, torch.cat(refs), atol=LOGITS_ATOL, rtol=0)


def test_mixed_verify_lengths_are_grouped_and_match_transformers(target):
    """Twelve decodes and one 8-token verification in the last slot: the verification gets a
    group of its own over a gathered copy of its KV row instead of padding every decode to 8
    queries; the logits must not change."""
    lengths = [1] * 12 + [8]
    model = TargetModel(target.hf_model, num_slots=len(lengths), max_model_len=64)
    gen = torch.Generator().manual_seed(5)
    seqs = [
        torch.randint(0, model.vocab_size, (5 + i + n,), generator=gen).tolist()
        for i, n in enumerate(lengths)
    ]
    cpu = torch.device("cpu")
    with torch.inference_mode():
        refs = [
            target.hf_model(torch.tensor([s])).logits[0, -n:].float() for s, n in zip(seqs, lengths)
        ]
        for slot, (s, n) in enumerate(zip(seqs, lengths)):
            model.forward(build_packed_batch([(slot, 0, s[:-n])], [], cpu))
        appends = [(slot, len(s) - n, s[-n:]) for slot, (s, n) in enumerate(zip(seqs, lengths))]
        batch = build_packed_batch(appends, list(range(sum(lengths))), cpu)
        assert [(g.query_max, g.gather_slots is not None) for g in batch.small] == [
            (1, False),
            (8, True),
        ]
        logits, _ = model.forward(batch)
    torch.testing.assert_close(logits, torch.cat(refs), atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize(("heads", "kv_heads"), [(9, 3), (4, 4)])
def test_grouped_query_attention_equals_sdpa(heads, kv_heads):
    gen = torch.Generator().manual_seed(4)
    b, m, length, d = 3, 5, 12, 16
    q = torch.randn(b, heads, m, d, generator=gen)
    k, v = (torch.randn(b, kv_heads, length, d, generator=gen) for _ in range(2))
    allowed = torch.rand(b, 1, m, length, generator=gen) > 0.3
    allowed[..., 0] = True  # every row sees at least one key
    mask = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=0.25, enable_gqa=heads != kv_heads
    )
    got = grouped_query_attention(q, k, v, mask, 0.25)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_frozen_linear_in_bfloat16_is_bit_identical_to_f_linear(rows):
    """The blocked-layout GEMM is a faster path to the very same numbers."""
    from scheduler.linear import FrozenLinear

    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(96, 64, generator=gen).to(torch.bfloat16)
    bias = torch.randn(96, generator=gen).to(torch.bfloat16)
    x = torch.randn(rows, 64, generator=gen).to(torch.bfloat16)
    for b in (None, bias):
        linear = FrozenLinear(weight, b)
        assert linear.blocked == torch.backends.mkldnn.is_available()
        assert torch.equal(linear(x), torch.nn.functional.linear(x, weight, b))


def test_frozen_copy_computes_the_same_and_leaves_the_original_alone():
    from scheduler.linear import FrozenLinearModule, frozen_copy, shared_frozen_linear

    torch.manual_seed(4)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 96), torch.nn.SiLU(), torch.nn.Sequential(torch.nn.Linear(96, 32))
    ).to(torch.bfloat16)
    keys = list(net.state_dict())
    frozen = frozen_copy(net)
    x = torch.randn(5, 64).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(frozen(x), net(x))
    assert isinstance(frozen[0], FrozenLinearModule) and isinstance(frozen[2][0], FrozenLinearModule)
    assert isinstance(net[0], torch.nn.Linear) and list(net.state_dict()) == keys
    # One blocked copy per weight tensor, however many callers ask for it.
    assert shared_frozen_linear(net[0].weight) is shared_frozen_linear(net[0].weight)
