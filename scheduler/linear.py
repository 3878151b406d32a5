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
from collections.abc import Callable, Sequence
from typing import Any

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
            if torch.compiler.is_compiling():  # inductor lowers oneDNN linears only when frozen
                return blocked_linear(x, self.weight, self.bias)
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


@torch.library.custom_op("dspark::blocked_linear", mutates_args=())
def blocked_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The oneDNN product as an op a compiled graph calls as it is."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@blocked_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


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


# How a frozen weight becomes a product: (weight, bias) -> a callable x -> x W^T + b.
# FrozenLinear, or scheduler.quant.q8_product where a drafter multiplies through the int8 kernel.
Product = Callable[[torch.Tensor, torch.Tensor | None], Callable[[torch.Tensor], torch.Tensor]]


class FrozenLinearModule(nn.Module):
    """Drop-in for an nn.Linear at inference; holds only the frozen copy."""

    def __init__(self, linear: nn.Linear, product: Product = FrozenLinear) -> None:
        super().__init__()
        self.linear = product(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def frozen_copy(
    module: nn.Module, leave_out: Sequence[nn.ModuleList] = (), product: Product = FrozenLinear
) -> nn.Module:
    """A copy of `module` for inference with every nn.Linear frozen (the original is left as
    it is, so it can still be trained or saved). Lists in `leave_out` are copied empty: parts
    that the caller serves some other way, whose weights need not be copied and laid out.
    `product` makes each linear's frozen product."""
    out = copy.deepcopy(module, {id(m): nn.ModuleList() for m in leave_out})
    _freeze_children(out, product)
    return out


def _freeze_children(module: nn.Module, product: Product) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, FrozenLinearModule(child, product))
        else:
            _freeze_children(child, product)


def _has_onednn_linear() -> bool:
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


class LayerProjections:
    """A decoder layer's projections as four products: q/k/v fused, o, gate/up fused, down.

    Fusing gives fewer, larger GEMVs per layer. Dense weights become FrozenLinears over one
    concatenated tensor; the transformers modules' weights are re-pointed at slices of it, so
    the fusion copies nothing and the transformers forward keeps working on the same weights.
    Quantized modules (scheduler/quant.py) are concatenated by their own `concat`.
    """

    def __init__(self, layer: Any) -> None:  # a transformers decoder layer
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv, self.qkv_sizes = fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o, _ = fuse_linears([attn.o_proj])
        self.gate_up, self.gate_up_sizes = fuse_linears([mlp.gate_proj, mlp.up_proj])
        self.down, _ = fuse_linears([mlp.down_proj])


# First module of a fused group -> (the group's module ids, what fuse_linears made of them).
_fused: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], Any]] = (
    weakref.WeakKeyDictionary()
)


def fuse_linears(
    modules: list[nn.Module],
) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[int]]:
    """One product computing the modules' outputs side by side, and each one's width.

    Made once per group of modules: a second model over the same weights (benchmarks and tests
    build several engines on one loaded model) gets the same product. Fusing again would find
    the parts already re-pointed at the first fusion, and a quantized part has handed its dense
    prompt copy to the fused module (scheduler/quant.py): the second fusion had none, and its
    prompt chunks ran on int4 weights, other bits and 2x slower than the first engine's."""
    key = tuple(id(m) for m in modules)
    made = _fused.get(modules[0])
    if made is not None and made[0] == key:
        return made[1]
    result = _fuse(modules)
    _fused[modules[0]] = (key, result)
    return result


def _fuse(
    modules: list[nn.Module],
) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[int]]:
    sizes = [int(m.out_features) for m in modules]  # type: ignore[arg-type]
    if all(isinstance(m, nn.Linear) for m in modules):
        weight, bias = _fuse_dense(modules)  # type: ignore[arg-type]
        return FrozenLinear(weight, bias), sizes
    concat = getattr(type(modules[0]), "concat", None)
    if len(modules) == 1:
        return modules[0], sizes
    if concat is not None and all(type(m) is type(modules[0]) for m in modules):
        fused = concat(modules)
        if fused is not None:
            return fused, sizes
    return (lambda x: torch.cat([m(x) for m in modules], -1)), sizes


def _fuse_dense(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    if len(linears) == 1:
        return linears[0].weight.data, linears[0].bias
    weight = torch.cat([lin.weight.data for lin in linears])
    has_bias = all(lin.bias is not None for lin in linears)
    bias = torch.cat([lin.bias.data for lin in linears]) if has_bias else None  # type: ignore[union-attr]
    start = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight.data = weight[start : start + n]
        if bias is not None:
            lin.bias.data = bias[start : start + n]  # type: ignore[union-attr]
        start += n
    return weight, bias
