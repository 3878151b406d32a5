"""DFlash baseline as DeepSpec ships it: the DSpark backbone (KV-injected target features,
anchor-as-first-slot block of `block_size`, bidirectional within the block) without the Markov
and confidence heads, trained with CE only (dspark.md §3.2)."""

from __future__ import annotations

from typing import Any

from torch import nn

from drafts.common import DraftConfig, config_from_target
from drafts.dspark import DSparkModel


def dflash_config(target_config: Any, num_layers: int = 2, **kw: Any) -> DraftConfig:
    return config_from_target(
        target_config, "dflash", num_layers=num_layers, markov_rank=0, confidence_head=False, **kw
    )


def build(cfg: DraftConfig) -> DSparkModel:
    if cfg.markov_rank or cfg.confidence_head:
        raise ValueError("a DFlash draft has no Markov or confidence head")
    return DSparkModel(cfg)


def load_proposer(target: nn.Module, checkpoint: str | None, num_speculative_tokens: int):  # type: ignore[no-untyped-def]
    """Engine entry point: the DFlash drafter (shipped default when checkpoint is None)."""
    from drafts.checkpoint import load_draft, shipped_path
    from drafts.proposer import make_proposer

    model = load_draft(checkpoint or shipped_path("dflash"))
    return make_proposer(model, target, num_speculative_tokens)
