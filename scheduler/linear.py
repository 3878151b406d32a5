"""Frozen linear layers for inference, in the weight layout the device multiplies fastest.

On CPU in bfloat16 that is oneDNN's blocked layout. aten's bf16 matmul re-blocks a plain weight
on every call; on the embedded model the blocked copy runs the target's decode GEMVs about 1.4x
faster and a drafter's 7-row LM-head product about 5x faster, with bit-identical results (a
test checks this). Every other device and dtype multiplies the plain weight in place.

Blocked weights have no autograd: these are for no-grad inference only.
"""

from __future__ import annotations

import copy
import weakref

import torch
import torch.nn.functional as F
from torch import nn


class FrozenLinear:
    """`F.linear` with a fixed weight, kept in the fastest layout (a blocked copy when that
    pays: the plain weight stays wherever else it is referenced, so that costs its bytes once
    more)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.bias = None if bias is None else bias.data
        self.out_features = weight.shape[0]
        self.blocked = (
            weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and _has_onednn_linear()
        )
        self.weight = (
            torch.ops.mkldnn._reorder_linear_weight(weight.data, None)
            if self.blocked
            else weight.data
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.blocked:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


_shared: dict[int, FrozenLinear] = {}


def shared_frozen_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> FrozenLinear:
    """One FrozenLinear per weight tensor, so the engine and a drafter that both multiply the
    target's LM head share a single blocked copy (56 MB for the embedded model)."""
    key = id(weight)
    lin = _shared.get(key)
    if lin is None:
        lin = _shared[key] = FrozenLinear(weight, bias)
        weakref.finalize(weight, _shared.pop, key, None)  # ids are reused after collection
    return lin


class FrozenLinearModule(nn.Module):
    """Drop-in for an nn.Linear at inference; holds only the frozen copy."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = FrozenLinear(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` for inference with every nn.Linear frozen (the original is left as
    it is, so it can still be trained or saved)."""
    out = copy.deepcopy(module)
    _freeze_children(out)
    return out


def _freeze_children(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, FrozenLinearModule(child))
        else:
            _freeze_children(child)


def _has_onednn_linear() -> bool:
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )
