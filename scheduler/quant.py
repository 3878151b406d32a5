"""The GGUF file's own quantized weights, multiplied by torch's group-wise int4 CPU kernel.

llama.cpp reads a Q4_1 linear at 20 bytes per 32 weights; a bf16 copy reads 64. To read what
the file holds, each quantized linear of the target becomes an `Int4Linear`:

    Q4_1 block (32 weights):  w = d * q + m,    q in 0..15
    Q4_0 block:               w = d * (q - 8)
    torch's int4 kernel:      w = (q - 8) * scale + zero   (per group of 32 along the input)

so Q4_1 maps onto it exactly with scale = d, zero = m + 8d (Q4_0: scale = d, zero = 0).

A Q8_0 matrix (w = d * q, q an int8; the embedded model's tied embedding / LM head) has no
group-wise int8 kernel in torch. `Q8Linear` splits each int8 into two 4-bit planes,
q = 16 * hi + lo with hi in -8..7 and lo in 0..15, and multiplies [x, x] by [W_hi | W_lo] in
one int4 call: W_hi has scale 16d and zero 0, W_lo scale d and zero 8d. In float32 every
dequantised weight is exact; it reads 1 byte per weight (plus scales) instead of bf16's 2.

With float32 activations the scales are float32 and the products equal the de-quantised
float32 model's up to summation order (a test holds them to it); with bfloat16 activations
the kernel wants bfloat16 scales, which round d to 8 bits of mantissa.

`native=True` (bfloat16 activations, `--int4-kernel`) multiplies both formats through
scheduler/kernels/q4_linear.cpp instead: activations rounded to two int8 digits per block of
32 and integer dot products, the file's d and m kept in float16 as the file has them.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scheduler import kernels
from scheduler.gguf_blocks import (
    GROUP,
    LAYER_LINEARS,
    GGUFWeightsError,
    QuantTensor,
    quantize_q8_0,
    read_gguf_linears,
)
from scheduler.linear import FrozenLinear, LayerProjections, shared_frozen_linear

log = logging.getLogger(__name__)

# The CPU int4 kernel packs rows in blocks of 64: packed matrices (and their scales) whose row
# counts are multiples of it can be concatenated and sliced by rows without repacking.
PACK_ROWS = 64


_in_prompt_chunk = threading.local()


@contextmanager
def prompt_chunk_products() -> Iterator[None]:
    """Within: `Int4Linear`s multiply through their prompt product (`_prompt_product`) where
    they have one. For prompt chunks only (the eager path of scheduler/compiled.py): the
    decode kernels cost a pass over the weights per four rows (aten: a 256-row chunk cost 2.3x
    the dense product) or a pass of the block scales per row (native; docs/benchmarks.md).
    Decodes and verifications stay on the int4 kernel, in the compiled graph, whatever the
    step's shape: a token gets the same bits there whether it is verified among drafts or
    not."""
    before = getattr(_in_prompt_chunk, "on", False)
    _in_prompt_chunk.on = True
    try:
        yield
    finally:
        _in_prompt_chunk.on = before


def prompt_chunk_layer(layer: LayerProjections) -> LayerProjections:
    """A layer's products as prompt chunks multiply them, for the compiled prompt graph
    (scheduler/compiled.py), where `prompt_chunk_products` cannot switch them: each
    `Int4Linear` with a prompt product replaced by it, every other product as it is."""
    chunk = copy.copy(layer)
    for name in ("qkv", "o", "gate_up", "down"):
        product = getattr(layer, name)
        prompt = product._prompt_product() if isinstance(product, Int4Linear) else None
        if prompt is not None:
            setattr(chunk, name, prompt)
    return chunk


def has_int4_kernel() -> bool:
    aten = torch.ops.aten
    return hasattr(aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        aten, "_convert_weight_to_int4pack_for_cpu"
    )


NATIVE_TILE = 16  # outputs per vector of scheduler/kernels/q4_linear.cpp


def _by_tile(v: torch.Tensor, blocks: int) -> torch.Tensor:
    """[out, blocks] per-block values reordered tile by tile: each block's 16 outputs together."""
    out = v.shape[0]
    return v.view(out // NATIVE_TILE, NATIVE_TILE, blocks).transpose(1, 2).reshape(out, blocks)


def pack_native(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(qs, [d; m]) in q4_linear.cpp's layout (its header): per tile of 16 outputs and block
    of 32, 4 runs of 64 bytes whose byte 4i + t holds output i's weight 8j + t (low nibble) and
    8j + 4 + t (high) for run j; d and m per tile and block for the 16 outputs, float16."""
    out, inp = q.shape
    if group != 32 or out % NATIVE_TILE or inp % group:
        raise ValueError("the native int4 kernel needs groups of 32 and outputs in 16s")
    tiles, blocks = out // NATIVE_TILE, inp // group
    # weight index within a block: 8j + 4h + t (run j, nibble h, byte t)
    w = q.view(tiles, NATIVE_TILE, blocks, 4, 2, 4).permute(0, 2, 3, 1, 5, 4)
    qs = (w[..., 0] | (w[..., 1] << 4)).reshape(out, inp // 2).contiguous()
    d_m = torch.stack([_by_tile(scale, blocks), _by_tile(zero - 8 * scale, blocks)])
    return qs, d_m.to(torch.float16)


def pack_native_q8(
    q: torch.Tensor, scale: torch.Tensor, group: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qs, d, c) in q4_linear.cpp's Q8_0 layout: per tile of 16 outputs and block of 32, 8 runs
    of 64 bytes whose byte 4i + t is output i's weight 4k + t for run k; d float16 and c (each
    block's sum of q times 128 * 128 + 128, which takes the activations' offsets back out)
    int32 per tile and block for the 16 outputs."""
    out, inp = q.shape
    if group != 32 or out % NATIVE_TILE or inp % group:
        raise ValueError("the native int8 kernel needs groups of 32 and outputs in 16s")
    tiles, blocks = out // NATIVE_TILE, inp // group
    qs = q.view(tiles, NATIVE_TILE, blocks, 8, 4).permute(0, 2, 3, 1, 4).reshape(out, inp)
    sums = q.view(out, blocks, group).sum(-1, dtype=torch.int32) * (128 * 128 + 128)
    d = _by_tile(scale, blocks).to(torch.float16)
    return qs.contiguous(), d, _by_tile(sums, blocks).contiguous()


class Int4Linear(nn.Module):
    """y = x W^T + b with W in torch's CPU int4 layout, group-wise scale and zero; or
    (`native`) in scheduler/kernels/q4_linear.cpp's layout (`pack_native`), multiplied there."""

    packed: torch.Tensor  # buffers, declared so type checkers see tensors
    scales_zeros: torch.Tensor
    # Rows the kernel multiplies per dequantisation of the weights (aten's int4pack_mm_kernel_,
    # BLOCK_M = 4; the native kernel's tile path pads a call to groups of 8): a step's time
    # climbs in stairs of this many rows (scheduler/profiler.py).
    kernel_rows = 4

    def __init__(
        self,
        q: torch.Tensor,  # [out, in] uint8 in 0..15
        scale: torch.Tensor,  # [out, in / group]
        zero: torch.Tensor,  # [out, in / group]
        group: int,
        bias: torch.Tensor | None,
        act_dtype: torch.dtype,
        native: bool = False,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group = group
        self.act_dtype = act_dtype
        self.native = native
        if native:
            packed, scales_zeros = pack_native(q, scale, zero, group)
            # Where the tile unit serves, from 16 rows on: 16 decodes and one verified draft
            # took 37.1 ms against 33.4 for the 16 alone, and 24 rows 40.1 ms (a profile that
            # did not know the stairs priced that draft at 0.8 ms; docs/benchmarks.md).
            self.kernel_rows = kernels.row_quantum()
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
            # The kernel's layout: [in / group, out, 2] in the activation dtype.
            scales_zeros = torch.stack([scale, zero], -1).transpose(0, 1).to(act_dtype)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_zeros", scales_zeros.contiguous())
        self.bias = None if bias is None else bias.to(act_dtype)
        # The same matrix dense, for prompt chunks (see prompt_chunk_products), or None; at the
        # first chunk it moves into `_prompt_linear` (see _prompt_product).
        self.prompt_weight: torch.Tensor | None = None
        self._prompt_linear: FrozenLinear | TiledPromptProduct | None = None

    def _prompt_product(self) -> FrozenLinear | TiledPromptProduct | None:
        """What prompt chunks multiply through (bias included), or None (the int4 kernel):
        the dense copy the loader gave it, in the layout the CPU multiplies fastest; without
        one, where the CPU has bfloat16 tiles (AMX-BF16), a native linear's own blocks
        dequantised tile by tile into them (`TiledPromptProduct`). The loader decides which by
        keeping a copy or not (`gguf_modules`). The blocked copy is made at the first prompt
        chunk, after fusion has concatenated the plain copies, which it then lets go: oneDNN's
        blocked bf16 layout runs a layer's products 1.45x faster than aten's plain one for a
        32-row chunk and 1.2x for 127 rows (aten re-blocks the weight on every call;
        docs/benchmarks.md)."""
        if self._prompt_linear is None:
            if self.prompt_weight is not None:
                self._prompt_linear = FrozenLinear(self.prompt_weight, self.bias)
                self.prompt_weight = None
            elif tiled_prompt_products(self.native, self.act_dtype):
                self._prompt_linear = TiledPromptProduct(self)
        return self._prompt_linear

    @classmethod
    def concat(cls, parts: list[Int4Linear]) -> Int4Linear | None:
        """One linear whose outputs are the parts' outputs side by side (None: the packing's
        row blocks do not line up, so the parts cannot share one matrix)."""
        first = parts[0]
        same = all(
            (p.group, p.act_dtype, p.native) == (first.group, first.act_dtype, first.native)
            for p in parts
        )
        quantum = NATIVE_TILE if first.native else PACK_ROWS
        aligned = not any(p.out_features % quantum for p in parts[:-1])
        if not same or not aligned:
            return None
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.out_features = sum(p.out_features for p in parts)
        fused.in_features, fused.group, fused.act_dtype, fused.native = (
            first.in_features,
            first.group,
            first.act_dtype,
            first.native,
        )
        fused.kernel_rows = first.kernel_rows
        fused.register_buffer("packed", torch.cat([p.packed for p in parts]))
        # The output rows are dimension 1 of both layouts' scales.
        fused.register_buffer("scales_zeros", torch.cat([p.scales_zeros for p in parts], 1))
        has_bias = all(p.bias is not None for p in parts)
        fused.bias = torch.cat([p.bias for p in parts]) if has_bias else None  # type: ignore[misc]
        dense = [p.prompt_weight for p in parts]
        has_dense = all(w is not None for w in dense)
        fused.prompt_weight = torch.cat(dense) if has_dense else None  # type: ignore[arg-type]
        fused._prompt_linear = None
        start = 0
        for p in parts:  # the parts read the fused copies from now on: weights held once
            p.packed = fused.packed[start : start + p.out_features]
            # Prompt chunks multiply the fused matrix; a part's dense copy would hold the
            # weights' memory a second time once the fused one is blocked (_prompt_product).
            p.prompt_weight = None
            start += p.out_features
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self.act_dtype)
        # The compiled graph (decodes, verifications) always multiplies int4, so it never reads
        # the flag: a traced read puts a guard on it, which the first prompt chunk after
        # warm-up broke, recompiling the step (~11 s) in the middle of serving.
        in_chunk = not torch.compiler.is_compiling() and getattr(_in_prompt_chunk, "on", False)
        prompt = self._prompt_product() if in_chunk else None
        if prompt is not None:  # it adds the bias itself
            return prompt(x2).view(*shape[:-1], self.out_features)
        if self.native:
            d, m = self.scales_zeros
            y = torch.ops.dspark_kernels.q4_linear(x2, self.packed, d, m)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2, self.packed, self.group, self.scales_zeros
            )
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)


class TiledPromptProduct:
    """A native `Int4Linear`'s product for prompt chunks through
    scheduler/kernels/q4_prompt.cpp: its Q4_1 blocks dequantised to bfloat16 a tile of outputs
    at a time (the dense copy's values) and multiplied in the CPU's bfloat16 tiles, reading
    the weights at a quarter of the dense copy's bytes. Reads the linear's buffers, holds
    nothing of its own."""

    def __init__(self, linear: Int4Linear) -> None:
        self.linear = linear

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lin = self.linear
        d, m = lin.scales_zeros
        y = torch.ops.dspark_kernels.q4_bf16_linear(x, lin.packed, d, m)
        return y if lin.bias is None else y + lin.bias


def tiled_prompt_products(native: bool, act_dtype: torch.dtype) -> bool:
    """Whether native int4 linears multiply prompt chunks in the CPU's bfloat16 tiles here
    (and so keep no dense copy)."""
    return native and act_dtype == torch.bfloat16 and kernels.prompt_tiles()


class Q8Linear(nn.Module):
    """A Q8_0 matrix (w = d * q per group of 32) as two int4 planes in one int4 product, or
    (`native`) through scheduler/kernels/q4_linear.cpp's q8_linear on its own int8 blocks.

    `weight` (optional) is a dense copy of the same matrix kept for readers that need a plain
    tensor (a drafter sharing the target's LM head); the product never reads it.
    """

    def __init__(
        self,
        q: torch.Tensor,  # [out, in] int8
        scale: torch.Tensor,  # [out, in / group]
        group: int,
        act_dtype: torch.dtype,
        weight: torch.Tensor | None = None,
        native: bool = False,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.weight = weight
        self.bias = None
        self.native = native
        if native:  # scheduler/kernels/q4_linear.cpp's q8_linear, on the file's own blocks
            qs, d, c = pack_native_q8(q, scale, group)
            self.register_buffer("qs", qs)
            self.register_buffer("d", d)
            self.register_buffer("c", c)
            return
        q16 = q.to(torch.int16)
        hi, lo = q16 >> 4, q16 & 15  # q = 16 * hi + lo
        planes = torch.cat([hi + 8, lo], 1).to(torch.uint8)
        zeros = torch.zeros_like(scale)
        self.plane = Int4Linear(
            planes,
            torch.cat([16 * scale, scale], 1),
            torch.cat([zeros, 8 * scale], 1),
            group,
            None,
            act_dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native:
            shape = x.shape
            y = torch.ops.dspark_kernels.q8_linear(
                x.reshape(-1, self.in_features), self.qs, self.d, self.c
            )
            return y.view(*shape[:-1], self.out_features)
        return self.plane(torch.cat([x, x], -1))


def q8_product(weight: torch.Tensor, bias: torch.Tensor | None) -> Callable[[torch.Tensor], Any]:
    """A drafter's frozen product through q4_linear.cpp's Q8_0 kernel (the target's LM head's
    format): its bf16 weight as Q8_0 (`gguf_blocks.quantize_q8_0`), half the bytes. A draft call runs after
    the target's step has pushed its weights out of the CPU's caches, so reading them is much of
    its time: a DSpark draft of the embedded model 6.9 -> 5.4 ms, tau the same to three places
    (docs/benchmarks.md). Biased products and shapes the kernel does not take (outputs not in
    16s, inputs not in blocks of 32) stay `FrozenLinear`."""
    out, inp = weight.shape
    if bias is not None or out % NATIVE_TILE or inp % GROUP:
        return FrozenLinear(weight, bias)
    qt = quantize_q8_0(weight)
    return Q8Linear(qt.q, qt.scale, GROUP, weight.dtype, native=True)


def serves_native_kernels(model: nn.Module) -> bool:
    """Whether the model's quantized products run through scheduler/kernels/q4_linear.cpp."""
    return any(isinstance(m, (Int4Linear, Q8Linear)) and m.native for m in model.modules())


def _module(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    *parents, name = path.split(".")
    for p in parents:
        root = getattr(root, p)
    return root, name


def apply_gguf_weights(
    hf_model: nn.Module, path: Path, act_dtype: torch.dtype, head: str = "auto"
) -> int:
    """Replace the model's linears (and LM head) by the file's quantized weights, in place;
    returns the number of matrices replaced."""
    modules = gguf_modules(hf_model, path, act_dtype, head)
    install(hf_model, modules)
    return len(modules)


def gguf_modules(
    hf_model: nn.Module,
    path: Path,
    act_dtype: torch.dtype,
    head: str = "auto",
    native: bool = False,
) -> dict[str, nn.Module]:
    """The file's quantized matrices as modules for the model's linears, by module path.

    The dense weights loaded with the model are checked against the de-quantised file (a
    wrong row order or file would be caught here, not in the output). A Q8_0 LM head is
    served as `Q8Linear` (`head="q8"`), kept dense (`"dense"`), or whichever of the two a
    start-up measurement finds faster (`"auto"`). `native`: the int4 linears and the Q8_0 head
    multiply through scheduler/kernels/q4_linear.cpp (which must be loaded). Every int4 linear
    also keeps the loaded dense matrix for prompt chunks (`prompt_chunk_products`), the
    weights' memory again in the activation dtype, for prefill products 2.1-2.4x faster;
    except native ones where the CPU has bfloat16 tiles, which multiply prompt chunks from
    their own blocks (`TiledPromptProduct`).
    """
    if not has_int4_kernel():
        raise GGUFWeightsError("this torch has no CPU int4 kernel")
    tensors, _ = read_gguf_linears(path, hf_model.config)  # type: ignore[arg-type]
    # The first layer's projections (q and k are the ones whose rows llama.cpp reorders) and
    # the head are checked against the loaded weights; the rest share their reading.
    checked = {"lm_head", *(f"model.layers.0.{p}" for p in LAYER_LINEARS.values())}
    modules: dict[str, nn.Module] = {}
    for key, qt in tensors.items():
        dense = _dense(hf_model, key)
        if dense.weight.shape != qt.q.shape:
            raise GGUFWeightsError(f"{key}: the file's shape {tuple(qt.q.shape)} does not match")
        if qt.bits == 4:
            assert qt.zero is not None
            new: nn.Module = Int4Linear(
                qt.q, qt.scale, qt.zero, GROUP, dense.bias, act_dtype, native=native
            )
            if not tiled_prompt_products(native, act_dtype):
                new.prompt_weight = dense.weight.detach().to(act_dtype)
        else:
            if head == "dense":
                continue
            new = Q8Linear(qt.q, qt.scale, GROUP, act_dtype, weight=dense.weight, native=native)
            if head == "auto" and not _faster_than_dense(new, dense):
                log.info("%s: the dense product measured faster than the Q8_0 one", key)
                continue
        if key in checked:
            _check_close(key, qt, dense.weight)
        modules[key] = new
    return modules


def install(hf_model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Put the quantized modules in place of the dense linears (whose weights are dropped,
    except the embedding, which drafters and the LM head's `weight` still read)."""
    for key, module in modules.items():
        parent, name = _module(hf_model, key)
        setattr(parent, name, module)
    log.info("serving %d matrices from the GGUF file's own quantized blocks", len(modules))


def int4_products_faster(hf_model: nn.Module, modules: dict[str, nn.Module]) -> bool:
    """The model's own layer products (one token, and eight: a decode and a verification),
    through the int4 kernel against the dense weights the engine would otherwise multiply.
    All layers in turn, as a step reads them: a single matrix could sit in the CPU's cache,
    which the whole model does not."""
    import time

    pairs = [
        (module, FrozenLinear(_dense(hf_model, key).weight, _dense(hf_model, key).bias))
        for key, module in modules.items()
        if isinstance(module, Int4Linear)
    ]
    dtype = next(hf_model.parameters()).dtype

    def best(which: int, rows: int) -> float:
        xs = [torch.randn(rows, pair[1].weight.shape[-1], dtype=dtype) for pair in pairs]
        times = []
        for _ in range(4):  # the first pass warms up
            t = time.perf_counter()
            for pair, x in zip(pairs, xs):
                pair[which](x)
            times.append(time.perf_counter() - t)
        return min(times[1:])

    with torch.inference_mode():
        int4_s = best(0, 1) + best(0, 8)
        dense_s = best(1, 1) + best(1, 8)
    log.info(
        "start-up measurement of the layer products: int4 %.2f ms, dense %.2f ms",
        int4_s * 1e3,
        dense_s * 1e3,
    )
    return int4_s < dense_s


def _dense(hf_model: nn.Module, key: str) -> nn.Linear:
    parent, name = _module(hf_model, key)
    dense = getattr(parent, name)
    if not isinstance(dense, nn.Linear):
        raise GGUFWeightsError(f"{key} is not a linear layer of this model")
    return dense


def _faster_than_dense(quant: nn.Module, dense: nn.Linear) -> bool:
    """Decode and verification sized products (1 and 8 rows), best of several."""
    import time

    frozen = shared_frozen_linear(dense.weight, dense.bias)  # the copy the engine would use

    def best(fn: Any, x: torch.Tensor) -> float:
        fn(x)
        times = []
        for _ in range(7):
            t = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t)
        return min(times)

    xs = [torch.randn(rows, dense.in_features, dtype=dense.weight.dtype) for rows in (1, 8)]
    with torch.inference_mode():
        quant_s = sum(best(quant, x) for x in xs)
        dense_s = sum(best(frozen, x) for x in xs)
    return quant_s < dense_s


def _check_close(key: str, qt: QuantTensor, dense: torch.Tensor) -> None:
    """The first rows only: a full check would de-quantise the whole model once more."""
    rows = slice(0, min(64, dense.shape[0]))
    got = qt.dequantize(rows)
    want = dense[rows].float()
    tol = 1e-6 if dense.dtype == torch.float32 else 1e-2
    if not torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max())):
        raise GGUFWeightsError(f"{key}: the file's weights differ from the loaded model's")
