"""A tiny random checkpoint in DeepSpec's Qwen3DSparkModel layout loads and serves a Qwen3 target."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import Qwen3Config, Qwen3ForCausalLM

from drafts import deepspec
from drafts.offline import speculative_generate, target_generate
from drafts.registry import build_proposer
from scheduler.request import SamplingParams


def _qwen3_target() -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=False,
        eos_token_id=2,
        rope_theta=1_000_000.0,
    )
    return Qwen3ForCausalLM(cfg).eval()


def _write_deepspec_checkpoint(
    folder: Path, target: Qwen3ForCausalLM, rank: int
) -> dict[str, torch.Tensor]:
    cfg = target.config.to_dict()
    cfg.update(
        architectures=["Qwen3DSparkModel"],
        num_target_layers=8,
        num_hidden_layers=2,
        block_size=7,
        tie_word_embeddings=False,
        layer_types=["full_attention"] * 2,
        mask_token_id=127,
        target_layer_ids=[1, 2, 3, 4, 5],
        num_anchors=512,
        enable_confidence_head=rank > 0,
        confidence_head_with_markov=True,
        markov_rank=rank,
        markov_head_type="vanilla",
    )
    d, hd, inter = 32, 8, 64
    g = torch.Generator().manual_seed(1)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.05

    state = {
        "fc.weight": r(d, 5 * d),
        "hidden_norm.weight": 1 + r(d),
        "norm.weight": 1 + r(d),
        "embed_tokens.weight": r(128, d),
        "lm_head.weight": r(128, d),
    }
    for i in range(2):
        p = f"layers.{i}."
        state.update(
            {
                p + "self_attn.q_proj.weight": r(4 * hd, d),
                p + "self_attn.k_proj.weight": r(2 * hd, d),
                p + "self_attn.v_proj.weight": r(2 * hd, d),
                p + "self_attn.o_proj.weight": r(d, 4 * hd),
                p + "self_attn.q_norm.weight": 1 + r(hd),
                p + "self_attn.k_norm.weight": 1 + r(hd),
                p + "input_layernorm.weight": 1 + r(d),
                p + "post_attention_layernorm.weight": 1 + r(d),
                p + "mlp.gate_proj.weight": r(inter, d),
                p + "mlp.up_proj.weight": r(inter, d),
                p + "mlp.down_proj.weight": r(d, inter),
            }
        )
    if rank:
        state.update(
            {
                "markov_head.markov_w1.weight": r(128, rank),
                "markov_head.markov_w2.weight": r(128, rank),
                "confidence_head.proj.weight": r(1, d + rank),
                "confidence_head.proj.bias": r(1),
            }
        )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(state, str(folder / "model.safetensors"))
    return state


@pytest.mark.parametrize("rank", [16, 0])
def test_deepspec_checkpoint_loads_and_is_lossless(tmp_path: Path, rank: int) -> None:
    target = _qwen3_target()
    state = _write_deepspec_checkpoint(tmp_path / "ckpt", target, rank)
    model = deepspec.load_deepspec(tmp_path / "ckpt")
    assert model.cfg.aux_layer_ids == [1, 2, 3, 4, 5] and model.cfg.qk_norm
    assert model.cfg.method == ("dspark" if rank else "dflash")
    assert torch.equal(
        model.layers[1].self_attn.k_norm.weight, state["layers.1.self_attn.k_norm.weight"]
    )
    own = model.state_dict()
    assert "embed_tokens.weight" not in own and "lm_head.weight" not in own
    if rank:
        assert torch.equal(own["markov_w2.weight"], state["markov_head.markov_w2.weight"])
        assert torch.equal(own["confidence.bias"], state["confidence_head.proj.bias"])
    prop = build_proposer("deepspec", target, str(tmp_path / "ckpt"), 7)
    prompt = [1, 7, 9, 30, 44, 5, 60]
    res = speculative_generate(
        target, prop, prompt, SamplingParams(max_tokens=16, temperature=0), 7, {2}
    )
    assert res.output_ids == target_generate(target, prompt, 16, {2})
    assert (res.rounds[0].conf_logits is not None) == bool(rank)


def test_deepspec_rejects_unsupported_heads(tmp_path: Path) -> None:
    target = _qwen3_target()
    _write_deepspec_checkpoint(tmp_path / "c", target, 16)
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["markov_head_type"] = "rnn"
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rnn"):
        deepspec.load_deepspec(tmp_path / "c")
