"""Load DeepSpec's released DSpark/DFlash checkpoint layout (deepseek-ai/DeepSpec, `Qwen3DSparkModel`).

A DeepSpec draft folder holds a `config.json` that is a deep copy of the target's Qwen3 config plus
the draft fields (`num_hidden_layers`, `block_size`, `mask_token_id`, `target_layer_ids`,
`markov_rank`, `markov_head_type`, `enable_confidence_head`, `confidence_head_with_markov`, ...),
and safetensors weights named

    fc.weight, hidden_norm.weight, norm.weight,
    layers.{i}.self_attn.{q,k,v,o}_proj.weight, layers.{i}.self_attn.{q,k}_norm.weight,
    layers.{i}.{input,post_attention}_layernorm.weight, layers.{i}.mlp.{gate,up,down}_proj.weight,
    markov_head.markov_w1.weight, markov_head.markov_w2.weight, confidence_head.proj.{weight,bias},
    embed_tokens.weight, lm_head.weight   (frozen copies of the target's; not used here)

Served as `--speculative deepspec --draft-checkpoint FOLDER`; in code,
`drafts.registry.build_proposer("deepspec", qwen3_target, "path/to/dspark_qwen3_4b_block7", 7)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from drafts.common import DraftConfig
from drafts.dspark import DSparkModel
from drafts.proposer import make_proposer
from scheduler.drafter import Proposer

_FROZEN = ("embed_tokens.weight", "lm_head.weight")


def config_from_deepspec(cfg: dict[str, Any]) -> DraftConfig:
    arch = (cfg.get("architectures") or ["Qwen3DSparkModel"])[0]
    if "Qwen3" not in arch:
        raise ValueError(f"only the Qwen3 DeepSpec layout is supported, got {arch}")
    head_type = str(cfg.get("markov_head_type", "vanilla")).lower()
    rank = int(cfg.get("markov_rank", 0))
    if rank > 0 and head_type != "vanilla":
        raise ValueError(f"markov_head_type={head_type!r} is not supported (only 'vanilla')")
    conf = bool(cfg.get("enable_confidence_head", False))
    if conf and rank > 0 and not cfg.get("confidence_head_with_markov", True):
        raise ValueError("a confidence head without the Markov features is not supported")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = float(cfg.get("rope_theta", rope.get("rope_theta", 1_000_000.0)))
    hidden = int(cfg["hidden_size"])
    return DraftConfig(
        method="dspark" if rank > 0 or conf else "dflash",
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_attention_heads=int(cfg["num_attention_heads"]),
        num_key_value_heads=int(cfg["num_key_value_heads"]),
        head_dim=int(cfg.get("head_dim") or hidden // int(cfg["num_attention_heads"])),
        vocab_size=int(cfg["vocab_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        aux_layer_ids=[int(i) for i in cfg["target_layer_ids"]],
        rope_theta=theta,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        block_size=int(cfg.get("block_size", 7)),
        mask_token_id=int(cfg["mask_token_id"]),
        markov_rank=rank,
        confidence_head=conf,
        qk_norm=True,
        target_name=str(cfg.get("_name_or_path", "")),
        extra={"source": "deepspec", "architectures": [arch]},
    )


def rename(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DeepSpec parameter names -> this package's module names (frozen embedding/head dropped)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k in _FROZEN:
            continue
        k = k.removeprefix("model.")
        k = k.replace("markov_head.markov_w1.", "markov_w1.").replace(
            "markov_head.markov_w2.", "markov_w2."
        )
        k = k.replace("confidence_head.proj.", "confidence.")
        out[k] = v
    return out


def load_deepspec(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> DSparkModel:
    path = Path(path)
    cfg = config_from_deepspec(json.loads((path / "config.json").read_text(encoding="utf-8")))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    model = DSparkModel(cfg)
    missing, unexpected = model.load_state_dict(rename(state), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"DeepSpec checkpoint {path} does not match: missing={missing} unexpected={unexpected}"
        )
    return model.to(device=device, dtype=dtype).eval()


def check_target(model: DSparkModel, target: Any) -> None:
    tc = target.config
    if int(tc.hidden_size) != model.cfg.hidden_size or int(tc.vocab_size) != model.cfg.vocab_size:
        raise ValueError(
            "the DeepSpec draft was trained for a different target (hidden size / vocabulary)"
        )
    if max(model.cfg.aux_layer_ids) >= int(tc.num_hidden_layers) - 1:
        raise ValueError("target_layer_ids must not include the target's last layer")


def load_deepspec_proposer(target: nn.Module, checkpoint: str | None, k: int) -> Proposer:
    """`--speculative deepspec`: a DeepSpec DSpark/DFlash checkpoint folder (required; there is
    no shipped one) for this target."""
    if checkpoint is None:
        raise ValueError("the DeepSpec loader needs a checkpoint folder (--draft-checkpoint)")
    model = load_deepspec(checkpoint)
    check_target(model, target)
    return make_proposer(model, target, k)
