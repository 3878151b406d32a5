"""The one place drafter names appear: name -> factory(target, checkpoint, k) -> Proposer.

Model drafters are imported lazily so `--speculative ngram` never loads their code.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scheduler.drafter import Proposer

# factory(target_hf_model, checkpoint_path_or_None, num_speculative_tokens) -> Proposer
Factory = Callable[[Any, "str | None", int], "Proposer"]


def _ngram(target: Any, checkpoint: str | None, k: int) -> Proposer:
    from drafts.ngram import NgramProposer

    return NgramProposer(k)


def _lazy(module: str) -> Factory:
    def factory(target: Any, checkpoint: str | None, k: int) -> Proposer:
        return importlib.import_module(module).load_proposer(target, checkpoint, k)

    return factory


_REGISTRY: dict[str, Factory] = {
    "ngram": _ngram,
    "eagle3": _lazy("drafts.eagle3"),
    "dflash": _lazy("drafts.dflash"),
    "dspark": _lazy("drafts.dspark"),
    "deepspec": _lazy("drafts.deepspec"),  # a DeepSpec release; needs --draft-checkpoint
}


def available() -> list[str]:
    return ["none", *_REGISTRY]


def register(name: str, factory: Factory) -> None:
    """Add a drafter (plug-ins, test doubles)."""
    _REGISTRY[name] = factory


def build_proposer(name: str, target: Any, checkpoint: str | None, k: int) -> Proposer | None:
    if name == "none" or k == 0:
        return None
    if name not in _REGISTRY:
        raise ValueError(f"unknown drafter {name!r}; choose one of {', '.join(available())}")
    return _REGISTRY[name](target, checkpoint, k)
