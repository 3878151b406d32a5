"""Every drafter in one table: name -> DrafterSpec.

A spec says all that serving (`--speculative NAME`), `drafts.train`, `drafts.train.evaluate` and the
load test need to know about a drafter. Adding one is its own module plus one `register` call
(or one entry in `_BUILTIN` below).

Nothing here imports torch: code is named by "module:attribute" strings resolved on use, so
`--speculative ngram` and the load test's list of names never load a model module.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scheduler.drafter import Proposer

SHIPPED_DIR = Path(__file__).resolve().parent / "checkpoints"

# A callable, or "package.module:attribute" naming one (imported only when used).
Ref = str | Callable[..., Any]


def resolve(ref: Ref) -> Any:
    """The object a Ref names."""
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class DrafterSpec:
    name: str
    description: str  # one line, for --help
    # (target_hf_model, checkpoint_path_or_None, num_speculative_tokens) -> Proposer. The
    # checkpoint is the shipped folder when the caller names none.
    build: Ref
    # Trained drafts only. model: an nn.Module class built from a DraftConfig (a checkpoint's
    # config.json names its spec by `method`); proposer_class: its engine proposer,
    # (model, frozen target parts, DraftHead, k) -> Proposer.
    model: Ref | None = None
    proposer_class: Ref | None = None
    # Drafts that `drafts.train` trains. draft_config: (target_config, TrainConfig,
    # mask_token_id) -> DraftConfig; loss: (model, parts, TrainBatch, TrainConfig, generator)
    # -> {"loss": scalar to minimise, other logged values}.
    draft_config: Ref | None = None
    loss: Ref | None = None
    shipped: str | None = None  # checkpoint folder under drafts/checkpoints/

    @property
    def trainable(self) -> bool:
        return self.draft_config is not None and self.loss is not None

    @property
    def shipped_checkpoint(self) -> Path | None:
        return SHIPPED_DIR / self.shipped if self.shipped else None


def _ngram(target: Any, checkpoint: str | None, k: int) -> Proposer:
    from drafts.ngram import NgramProposer

    return NgramProposer(k)


def _suffix(target: Any, checkpoint: str | None, k: int) -> Proposer:
    from drafts.suffix import SuffixProposer

    return SuffixProposer(k)


_TRAINED = "drafts.proposer:load_trained_proposer"
_DSPARK_MODEL, _DSPARK_PROPOSER = "drafts.dspark:DSparkModel", "drafts.proposer:DSparkProposer"

# In this order in --help, `drafts.train` and its results table.
_BUILTIN = (
    DrafterSpec(
        "suffix",
        "suffix lookup: most frequent continuation of the longest match in the request or in "
        "recent responses (no model)",
        _suffix,
    ),
    DrafterSpec(
        "ngram", "prompt lookup: the suffix drafter within the request, 2-4 token matches", _ngram
    ),
    DrafterSpec(
        "eagle3",
        "EAGLE-3 head: one layer over fused target features, drafting token by token",
        _TRAINED,
        model="drafts.eagle3:Eagle3Model",
        proposer_class="drafts.proposer:Eagle3Proposer",
        draft_config="drafts.train.losses:eagle3_config",
        loss="drafts.train.losses:eagle3_loss",
        shipped="eagle3",
    ),
    DrafterSpec(
        "dflash",
        "DFlash: a whole block drafted in one parallel pass",
        _TRAINED,
        model=_DSPARK_MODEL,
        proposer_class=_DSPARK_PROPOSER,
        draft_config="drafts.train.losses:dflash_config",
        loss="drafts.train.losses:dflash_loss",
        shipped="dflash",
    ),
    DrafterSpec(
        "dspark",
        "DSpark: DFlash plus a Markov head and per-token confidences",
        _TRAINED,
        model=_DSPARK_MODEL,
        proposer_class=_DSPARK_PROPOSER,
        draft_config="drafts.train.losses:dspark_config",
        loss="drafts.train.losses:dspark_loss",
        shipped="dspark",
    ),
    DrafterSpec(
        "deepspec",
        "a DeepSpec DSpark/DFlash release for a Qwen3 target (needs its checkpoint folder)",
        "drafts.deepspec:load_deepspec_proposer",
        model=_DSPARK_MODEL,
        proposer_class=_DSPARK_PROPOSER,
    ),
)
_REGISTRY: dict[str, DrafterSpec] = {spec.name: spec for spec in _BUILTIN}


def available() -> list[str]:
    return ["none", *_REGISTRY]


def trainable() -> list[str]:
    """Drafters `drafts.train` trains, in registry order."""
    return [name for name, spec in _REGISTRY.items() if spec.trainable]


def describe(names: list[str] | None = None) -> str:
    """One "name: description" line per drafter (default: all but "none"), for --help."""
    specs = [get(n) for n in names] if names is not None else list(_REGISTRY.values())
    return "\n".join(f"  {s.name}: {s.description}" for s in specs)


def get(name: str) -> DrafterSpec:
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown drafter {name!r}; choose one of {', '.join(available())}, or several "
            "joined by '+' (suffix+dspark)"
        )
    return _REGISTRY[name]


def split(name: str) -> list[str]:
    """The drafters of `--speculative NAME`: one, or several joined by '+' (a composite, in
    the order given: the cheap lookups first, so the model drafts only where they fall short).
    """
    names = [n.strip() for n in name.split("+")]
    if len(names) > 1 and ("none" in names or len(set(names)) < len(names)):
        raise ValueError(f"a composite drafter lists distinct drafters, not 'none': {name!r}")
    for n in names:
        if n != "none":
            get(n)
    return names


def register(spec: DrafterSpec) -> None:
    """Add a drafter (plug-ins, test doubles)."""
    if spec.name == "none" or spec.name in _REGISTRY:
        raise ValueError(f"a drafter named {spec.name!r} already exists")
    _REGISTRY[spec.name] = spec


def unregister(name: str) -> None:
    """Remove a drafter added by `register`."""
    if name in {spec.name for spec in _BUILTIN}:
        raise ValueError(f"{name!r} is built in")
    _REGISTRY.pop(name, None)


# `--speculative auto`: the composite where the shipped DSpark draft was trained for the
# served model (the embedded default), else the lookup drafter, which needs no weights.
AUTO = "auto"
AUTO_WITH_DRAFT = "suffix+dspark"
AUTO_WITHOUT_DRAFT = "ngram"


def resolve_auto(name: str, target: Any) -> str:
    """The drafters `auto` stands for with this target (other names pass unchanged)."""
    if name != AUTO:
        return name
    ckpt = get("dspark").shipped_checkpoint
    config = ckpt / "config.json" if ckpt is not None else None
    trained_for = (
        json.loads(config.read_text(encoding="utf-8")).get("target_name")
        if config is not None and config.is_file()
        else None
    )
    # The folder name the target was loaded from: how a draft's config names its target.
    served = Path(str(getattr(getattr(target, "config", None), "name_or_path", ""))).name
    return AUTO_WITH_DRAFT if trained_for and trained_for == served else AUTO_WITHOUT_DRAFT


def build_proposers(
    name: str, target: Any, checkpoint: str | None, k: int
) -> list[tuple[str, Proposer]]:
    """(name, proposer) per drafter of `--speculative NAME` ('+' joins several, `auto` picks);
    empty when nothing is drafted. A checkpoint goes to the drafter that has a model."""
    names = split(resolve_auto(name, target))
    if names == ["none"] or k == 0:
        return []
    out = []
    for n in names:
        ckpt = checkpoint if get(n).model is not None or len(names) == 1 else None
        proposer = build_proposer(n, target, ckpt, k)
        assert proposer is not None
        out.append((n, proposer))
    return out


def build_proposer(name: str, target: Any, checkpoint: str | None, k: int) -> Proposer | None:
    """The engine proposer for one drafter; None when nothing is drafted."""
    if name == "none" or k == 0:
        return None
    spec = get(name)
    path = checkpoint or spec.shipped_checkpoint
    builder: Callable[[Any, str | None, int], Proposer] = resolve(spec.build)
    return builder(target, str(path) if path else None, k)
