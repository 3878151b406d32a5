"""Shapes, masks and proposer behaviour of the three drafts on a tiny random target."""

from __future__ import annotations

import pytest
import torch

from drafts.common import config_from_target, evenly_spaced_layers, target_parts
from drafts.dspark import BlockOutput, DSparkModel
from drafts.eagle3 import Eagle3Model
from drafts.offline import speculative_generate, target_generate
from drafts.proposer import make_proposer
from drafts.train.losses import block_losses, sample_anchors, ttt_losses
from scheduler.request import SamplingParams


def _dspark(target, **kw) -> DSparkModel:  # type: ignore[no-untyped-def]
    cfg = config_from_target(
        target.config,
        "dspark",
        num_layers=2,
        markov_rank=8,
        confidence_head=True,
        aux_layer_ids=[0, 1, 2],
        mask_token_id=3,
        **kw,
    )
    return DSparkModel(cfg)


def test_evenly_spaced_layers_match_deepspec_rule() -> None:
    assert evenly_spaced_layers(36, 5) == [1, 9, 17, 25, 33]  # DeepSpec's Qwen3-4B/8B choice
    assert evenly_spaced_layers(40, 5) == [1, 10, 19, 28, 37]
    assert max(evenly_spaced_layers(30, 5)) == 27


def test_dspark_train_forward_shapes_and_losses(tiny_target) -> None:  # type: ignore[no-untyped-def]
    model = _dspark(tiny_target)
    ids = torch.randint(4, 96, (2, 20))
    mask = torch.zeros(2, 20, dtype=torch.long)
    mask[:, 6:] = 1
    feats = torch.randn(2, 20, 3 * 32)
    anchors, keep = sample_anchors(mask, torch.tensor([20, 20]), 5)
    assert bool(((anchors >= 6) | ~keep).all())
    out = model.train_forward(target_parts(tiny_target), ids, feats, anchors, keep)
    assert out.logits.shape == (2, 5, 7, 96)
    assert out.conf_logits is not None and out.conf_logits.shape == (2, 5, 7)
    logits = torch.randn(2, 20, 96)
    res = block_losses(out, ids, mask, logits, anchors, keep, 0.1, 0.9, 1.0)
    assert {"ce", "tv", "conf", "loss"} <= set(res)
    assert 0.0 <= float(res["tv"]) <= 2.0
    res["loss"].backward()
    assert model.fc.weight.grad is not None and model.markov_w1.weight.grad is not None  # type: ignore[union-attr]


@pytest.mark.parametrize("shift", [0, 1])
def test_tv_reads_the_targets_distribution_of_each_slots_label(shift: int) -> None:
    """Slot j of anchor p predicts token p + j + 1, whose target distribution is the target's
    logit row at p + j: a draft that copies exactly those rows has no TV, one off by a
    position has."""
    b, s, g, v = 2, 24, 7, 50
    ids = torch.randint(0, v, (b, s))
    mask = torch.zeros(b, s, dtype=torch.long)
    mask[:, 4:] = 1
    target = torch.randn(b, s, v) * 3
    anchors, keep = sample_anchors(mask, torch.tensor([s, s]), 6)
    rows = (anchors[:, :, None] + torch.arange(g) + shift).clamp(max=s - 1)
    copied = target.gather(1, rows.view(b, -1, 1).expand(-1, -1, v)).view(b, -1, g, v)
    res = block_losses(BlockOutput(copied, None), ids, mask, target, anchors, keep, 0.1, 0.9, 0.0)
    assert (float(res["tv"]) < 1e-5) == (shift == 0)


def test_block_queries_do_not_see_the_future(tiny_target) -> None:  # type: ignore[no-untyped-def]
    """Changing context at or after an anchor must not change that block's logits."""
    model = _dspark(tiny_target).eval()
    parts = target_parts(tiny_target)
    ids = torch.randint(4, 96, (1, 16))
    feats = torch.randn(1, 16, 96)
    anchors, keep = torch.tensor([[8]]), torch.tensor([[True]])
    a = model.train_forward(parts, ids, feats, anchors, keep).logits
    feats2 = feats.clone()
    feats2[:, 8:] = torch.randn(1, 8, 96)
    ids2 = ids.clone()
    ids2[:, 9:] = torch.randint(4, 96, (1, 7))
    b = model.train_forward(parts, ids2, feats2, anchors, keep)
    # slot 0's previous token is the anchor itself; later Markov biases use the (teacher) ids
    assert torch.allclose(a[..., 0, :], b.logits[..., 0, :], atol=1e-5)


def test_block_attention_equals_one_dense_masked_attention(tiny_target) -> None:  # type: ignore[no-untyped-def]
    """The two-table joint softmax is the dense [N*g, S + N*g] masked attention it replaces."""
    from drafts.dspark import block_attention

    model = _dspark(tiny_target).eval()
    attn = model.decoder_layers()[0].self_attn
    b, s, n, g = 2, 12, 3, model.cfg.block_size
    ctx = torch.randn(b, s, 32)
    x = torch.randn(b, n * g, 32)
    anchors = torch.tensor([[3, 6, 10], [2, 5, 9]])
    keep = torch.tensor([[True, True, True], [True, False, True]])
    pos = (anchors[:, :, None] + torch.arange(g)).reshape(b, n * g)
    kv = attn.kv(ctx, torch.arange(s).expand(b, s))
    ctx_ok = (torch.arange(s)[None, None, :] < anchors[:, :, None]) & keep[:, :, None]
    dense_ctx = ctx_ok[:, :, None, :].expand(b, n, g, s).reshape(b, n * g, s)
    blk = torch.arange(n).repeat_interleave(g)
    own = (blk[:, None] == blk[None, :]).expand(b, n * g, n * g)
    dense = attn(x, pos, kv, torch.cat([dense_ctx, own], dim=2)[:, None])
    split = block_attention(attn, x, pos, kv, ctx_ok, g)
    assert torch.allclose(split, dense, atol=1e-5)


def test_vocab_restricted_logits_are_rows_of_the_full_ones(tiny_target) -> None:  # type: ignore[no-untyped-def]
    model = _dspark(tiny_target)
    ids = torch.randint(4, 96, (1, 16))
    anchors, keep = torch.tensor([[5, 9]]), torch.ones(1, 2, dtype=torch.bool)
    vocab = torch.tensor([2, 7, 30, 50, 95])
    with torch.no_grad():
        model.markov_w2.weight.normal_()  # type: ignore[union-attr]
    parts = target_parts(tiny_target)
    feats = torch.randn(1, 16, 96)
    full = model.train_forward(parts, ids, feats, anchors, keep).logits
    part = model.train_forward(parts, ids, feats, anchors, keep, vocab=vocab).logits
    assert torch.allclose(part, full[..., vocab], atol=1e-5)


def test_eagle3_ttt_loss_and_backward(tiny_target) -> None:  # type: ignore[no-untyped-def]
    cfg = config_from_target(tiny_target.config, "eagle3", aux_layer_ids=[0, 1, 2])
    model = Eagle3Model(cfg)
    ids = torch.randint(4, 96, (2, 24))
    mask = torch.zeros(2, 24, dtype=torch.long)
    mask[:, 5:] = 1
    res = ttt_losses(
        model,
        target_parts(tiny_target),
        ids,
        mask,
        torch.randn(2, 24, 96),
        torch.randn(2, 24, 96),
        6,
    )
    assert all(f"ce{k}" in res for k in range(7))
    res["loss"].backward()
    assert model.fc.weight.grad is not None


def test_proposers_return_what_they_sampled_and_stay_lossless(tiny_target) -> None:  # type: ignore[no-untyped-def]
    prompt = [1, 5, 9, 17, 33, 12, 7, 40]
    ref = target_generate(tiny_target, prompt, 20, {2})
    e3 = Eagle3Model(config_from_target(tiny_target.config, "eagle3", aux_layer_ids=[0, 1, 2]))
    for model in (_dspark(tiny_target), e3):
        prop = make_proposer(model, tiny_target, 7)
        assert prop.aux_layer_ids == (0, 1, 2) and prop.max_draft_tokens == 7
        res = speculative_generate(
            tiny_target, prop, prompt, SamplingParams(max_tokens=20, temperature=0), 7, {2}
        )
        assert res.output_ids == ref
        assert all(r.proposed == 7 for r in res.rounds)
        sampled = speculative_generate(
            tiny_target,
            prop,
            prompt,
            SamplingParams(max_tokens=12, temperature=1.0),
            7,
            {2},
            generator=torch.Generator().manual_seed(1),
        )
        assert len(sampled.output_ids) == 12 or sampled.output_ids[-1] == 2


def test_dspark_confidences_use_the_sts_table_of_the_sampling_mode(tiny_target) -> None:  # type: ignore[no-untyped-def]
    from scheduler.drafter import DraftRequest

    model = _dspark(tiny_target)
    model.cfg.sts_temperatures = [2.0] * 7
    model.cfg.sts_temperatures_greedy = [0.5] * 7
    prop = make_proposer(model, tiny_target, 7)
    prompt = [1, 5, 9, 17, 33, 12, 7, 40]
    out = tiny_target(input_ids=torch.tensor([prompt]), output_hidden_states=True)
    feats = torch.cat([out.hidden_states[i + 1][0] for i in (0, 1, 2)], -1)
    for temp, t_k in ((0.0, 0.5), (1.0, 2.0)):
        prop.observe("r", 0, feats[:-1])
        res = prop.propose([DraftRequest("r", tuple(prompt), SamplingParams(temperature=temp), 7)])
        z = torch.tensor(prop.last_conf_logits["r"])
        assert res.confidences is not None
        assert torch.allclose(torch.tensor(res.confidences[0]), torch.sigmoid(z / t_k), atol=1e-6)
        assert (res.probs is None or res.probs[0] is None) == (temp == 0)
        if temp > 0:
            assert res.probs is not None and res.probs[0] is not None
            assert torch.allclose(res.probs[0].sum(-1), torch.ones(7), atol=1e-5)
        prop.release("r")


@pytest.mark.parametrize("method", ["dspark", "eagle3"])
def test_drafts_a_batch_as_it_drafts_each_request_alone(tiny_target, method) -> None:  # type: ignore[no-untyped-def]
    """Padded batched forwards for the whole batch: same tokens, distributions and confidences
    as drafting each request on its own, for contexts of different lengths and different k."""
    from scheduler.drafter import DraftRequest

    model: torch.nn.Module
    if method == "dspark":
        model = _dspark(tiny_target)
        with torch.no_grad():  # a non-zero Markov head, so its sequential bias is exercised too
            model.markov_w2.weight.normal_(std=0.5)  # type: ignore[union-attr]
    else:
        torch.manual_seed(0)
        model = Eagle3Model(
            config_from_target(tiny_target.config, "eagle3", aux_layer_ids=[0, 1, 2])
        )
    prompts = [[1, 5, 9, 17, 33, 12, 7, 40], [1, 8, 8], [1, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39]]
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.0, seed=5),
        SamplingParams(temperature=0.7, top_k=20, seed=9),
    ]
    ks = [7, 3, 5]

    def proposer_with_context():  # type: ignore[no-untyped-def]
        prop = make_proposer(model, tiny_target, 7)
        for i, p in enumerate(prompts):
            out = tiny_target(input_ids=torch.tensor([p]), output_hidden_states=True)
            prop.observe(
                f"r{i}", 0, torch.cat([out.hidden_states[j + 1][0] for j in (0, 1, 2)], -1)[:-1]
            )
        return prop

    reqs = [DraftRequest(f"r{i}", tuple(p), params[i], ks[i]) for i, p in enumerate(prompts)]
    batched = proposer_with_context().propose(reqs)
    alone_prop = proposer_with_context()
    alone = [alone_prop.propose([r]) for r in reqs]
    assert (batched.confidences is not None) == (method == "dspark")
    for i, one in enumerate(alone):
        assert len(batched.token_ids[i]) == ks[i]
        assert batched.token_ids[i] == one.token_ids[0]
        if batched.confidences is not None:
            assert one.confidences is not None
            torch.testing.assert_close(
                torch.tensor(batched.confidences[i]),
                torch.tensor(one.confidences[0]),
                atol=1e-5,
                rtol=0,
            )
        if params[i].temperature > 0:
            assert batched.probs is not None and one.probs is not None
            torch.testing.assert_close(batched.probs[i], one.probs[0], atol=1e-5, rtol=0)
        else:
            assert batched.probs is None or batched.probs[i] is None


@pytest.mark.parametrize("method", ["dspark", "eagle3"])
def test_proposers_serve_next_to_a_bf16_target(tiny_target, method) -> None:  # type: ignore[no-untyped-def]
    """The server's dtype auto picks bf16 on CPUs with bf16 matmuls: the draft then runs in
    bf16 too, and every product inside it must see one dtype."""
    import copy

    target = copy.deepcopy(tiny_target).to(torch.bfloat16)
    if method == "dspark":
        model = _dspark(target)
    else:
        model = Eagle3Model(config_from_target(target.config, "eagle3", aux_layer_ids=[0, 1, 2]))
    prompt = [1, 5, 9, 17, 33, 12, 7, 40]
    ref = target_generate(target, prompt, 12, {2})
    res = speculative_generate(
        target,
        make_proposer(model, target, 7),
        prompt,
        SamplingParams(max_tokens=12, temperature=0),
        7,
        {2},
    )
    assert res.output_ids == ref


@pytest.mark.parametrize("qk_norm", [False, True])
def test_the_fused_backbone_computes_what_the_modules_do(tiny_target, qk_norm) -> None:  # type: ignore[no-untyped-def]
    """The serving backbone (fused projections, one RoPE table, grouped-query SDPA) against
    the model's own: the context K/V, and the block's hidden states over a padded batch."""
    from drafts.fused_backbone import FusedBackbone

    torch.manual_seed(3)
    model = _dspark(tiny_target, qk_norm=qk_norm).eval()
    for layer in model.layers:  # non-trivial norms, so a skipped or misplaced one shows
        for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm, layer.input_layernorm):
            if norm is not None:
                torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    fused = FusedBackbone(model.decoder_layers(), model.norm, model.cfg)
    d, g = model.cfg.hidden_size, 5
    ctx = torch.randn(2, 9, d)
    ctx_pos = torch.arange(9).expand(2, 9)
    with torch.no_grad():
        want_kv, got_kv = model.ctx_kv(ctx, ctx_pos), fused.ctx_kv(ctx, ctx_pos)
        for (wk, wv), (gk, gv) in zip(want_kv, got_kv, strict=True):
            torch.testing.assert_close(gk, wk)
            torch.testing.assert_close(gv, wv)
        x = torch.randn(2, g, d)
        pos = torch.tensor([[9], [6]]) + torch.arange(g)
        ctx_ok = torch.arange(9)[None] < torch.tensor([[9], [6]])  # the second row is padded
        mask = torch.cat([ctx_ok, torch.ones(2, g, dtype=torch.bool)], 1)[:, None, None]
        mask = mask.expand(-1, -1, g, -1)
        want = model.backbone(x, pos, want_kv, mask)
        torch.testing.assert_close(fused(x, pos, got_kv, mask), want)
        torch.testing.assert_close(fused(x[:1], pos[:1], [(k[:1], v[:1]) for k, v in got_kv], None), want[:1])
