"""Draft checkpoints: `model.safetensors` (bf16 by default) + `config.json`.

Only the draft's own parameters are stored; the target's embedding and LM head are shared at load
time, so a checkpoint never carries the target's frozen weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from drafts.common import DraftConfig
from drafts.registry import get, resolve


def build_model(cfg: DraftConfig) -> nn.Module:
    """A fresh draft of the drafter `cfg.method` names (its spec's model class)."""
    model_class = get(cfg.method).model
    if model_class is None:
        raise ValueError(f"drafter {cfg.method!r} has no trained model")
    model: nn.Module = resolve(model_class)(cfg)
    if cfg.draft_vocab_size:  # filled in by load_state_dict
        model.register_buffer("draft_vocab", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
    return model


def set_draft_vocab(model: nn.Module, token_ids: torch.Tensor) -> None:
    """Store the draft vocabulary (sorted target token ids) with the draft's weights."""
    ids = token_ids.to(torch.long).unique()  # sorted, no repeats
    vocab_size = draft_config(model).vocab_size
    if ids.numel() == 0 or int(ids[0]) < 0 or int(ids[-1]) >= vocab_size:
        raise ValueError(
            f"draft vocabulary ids must lie in the target's vocabulary [0, {vocab_size})"
        )
    model.register_buffer("draft_vocab", ids)
    draft_config(model).draft_vocab_size = int(ids.numel())


def save_draft(
    model: nn.Module,
    out_dir: Path,
    dtype: torch.dtype = torch.bfloat16,
    extra: dict[str, Any] | None = None,
) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg: DraftConfig = model.cfg  # type: ignore[assignment]
    if extra:
        cfg.extra.update(extra)
    tensors = {
        k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous()
        for k, v in model.state_dict().items()  # token ids stay integers
    }
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(
        json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8"
    )
    return out_dir


def load_draft(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> nn.Module:
    path = Path(path)
    cfg = DraftConfig.from_dict(json.loads((path / "config.json").read_text(encoding="utf-8")))
    model = build_model(cfg)
    state = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match its config: missing={missing} unexpected={unexpected}"
        )
    return model.to(device=device, dtype=dtype).eval()


def draft_config(model: nn.Module) -> DraftConfig:
    """The DraftConfig a draft module carries (typed accessor)."""
    return cast(DraftConfig, model.cfg)
