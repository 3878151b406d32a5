"""Reading a GGUF file's quantized matrices (Q4_0, Q4_1, Q8_0) into per-group integer terms.

Each matrix becomes a `QuantTensor` in the terms of torch's int4 CPU kernel, w = (q - 8) *
scale + zero per group of 32 along the input (see scheduler/quant.py), keyed by the
transformers module it replaces. llama.cpp's converter interleaves the rows of q and k for
Llama (its rotary layout); transformers undoes that on load, and so does this.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

GROUP = 32  # every GGUF legacy quant (Q4_0, Q4_1, Q8_0) has blocks of 32 weights

# GGUF tensor names of a Llama-family block -> the transformers module path within a layer.
LAYER_LINEARS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# llama.cpp's converter interleaves the rows of q and k for these architectures (its rotary
# layout); transformers undoes it on load, and so must we.
PERMUTED_QK_ARCHS = {"llama"}
SUPPORTED_ARCHS = {"llama", "qwen2", "qwen3"}


@dataclass
class QuantTensor:
    """One GGUF matrix as (q, scale, zero) per group of 32, in the int4 kernel's terms
    (`bits` 4), or as (q int8, d) for Q8_0 (`bits` 8, zero unused)."""

    bits: int
    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None

    def dequantize(self, rows: slice = slice(None)) -> torch.Tensor:
        """The float32 weights [out, in] the block format stands for."""
        q, scale = self.q[rows].float(), self.scale[rows]
        out, groups = q.shape[0], scale.shape[1]
        if self.bits == 8:
            w = q.view(out, groups, -1) * scale[..., None]
        else:
            assert self.zero is not None
            w = (q.view(out, groups, -1) - 8) * scale[..., None] + self.zero[rows][..., None]
        return w.view(out, -1)


def quantize_q4_1(weight: torch.Tensor, group: int = GROUP) -> QuantTensor:
    """Round a dense [out, in] matrix to Q4_1 (llama.cpp's rule: per group, d = (max - min)
    / 15, m = min); serves models without a GGUF file and builds test models."""
    w = weight.detach().float().reshape(weight.shape[0], -1, group)
    low, high = w.amin(-1), w.amax(-1)
    d = (high - low) / 15
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = ((w - low[..., None]) * inv[..., None]).round().clamp(0, 15).to(torch.uint8)
    return QuantTensor(4, q.reshape(weight.shape), d, low + 8 * d)


def quantize_q8_0(weight: torch.Tensor, group: int = GROUP) -> QuantTensor:
    """Round a dense [out, in] matrix to Q8_0 (per group, d = max |w| / 127, rounded to float16
    first as the format stores it, so that d * q is what a kernel multiplies; q = round(w / d));
    serves a trained draft's weights beside the native kernels (`quant.q8_product`)."""
    w = weight.detach().float().reshape(weight.shape[0], -1, group)
    d = (w.abs().amax(-1) / 127).half().float()
    q = torch.round(w / d.clamp(min=torch.finfo(torch.float16).tiny)[..., None])
    return QuantTensor(8, q.clamp(-127, 127).to(torch.int8).reshape(weight.shape), d, None)


def _halves(blocks: np.ndarray, offset: int) -> np.ndarray:
    return (
        np.ascontiguousarray(blocks[..., offset : offset + 2])
        .view(np.float16)[..., 0]
        .astype(np.float32)
    )


def parse_blocks(data: np.ndarray, type_name: str, in_features: int) -> QuantTensor | None:
    """data: the GGUF tensor's raw bytes, one row per output feature. None: not a format
    the int4 kernel serves (the dense weights are used for it)."""
    rows, nb = data.shape[0], in_features // GROUP
    if type_name == "Q4_1":
        blocks = data.reshape(rows, nb, 20)
        d, m, qs = _halves(blocks, 0), _halves(blocks, 2), blocks[..., 4:]
        zero = m + 8 * d
    elif type_name == "Q4_0":
        blocks = data.reshape(rows, nb, 18)
        d, qs = _halves(blocks, 0), blocks[..., 2:]
        zero = np.zeros_like(d)
    elif type_name == "Q8_0":
        blocks = data.reshape(rows, nb, 34)
        q8 = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(rows, in_features)
        return QuantTensor(
            8, torch.from_numpy(q8.copy()), torch.from_numpy(_halves(blocks, 0)), None
        )
    else:
        return None
    # Element j of a block is the low nibble of byte j, element j + 16 its high nibble.
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, in_features)
    return QuantTensor(4, torch.from_numpy(q.copy()), torch.from_numpy(d), torch.from_numpy(zero))


def _unpermute_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row interleave (transformers' reverse_permute_weights)."""
    dim = t.shape[0] // n_head // 2
    return t.reshape(n_head, dim, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def _unpermute(qt: QuantTensor, n_head: int) -> QuantTensor:
    zero = None if qt.zero is None else _unpermute_rows(qt.zero, n_head)
    return QuantTensor(
        qt.bits, _unpermute_rows(qt.q, n_head), _unpermute_rows(qt.scale, n_head), zero
    )


class GGUFWeightsError(ValueError):
    """The GGUF file cannot be served through the int4 kernel for this model."""


def read_gguf_linears(path: Path, config: Any) -> tuple[dict[str, QuantTensor], str]:
    """{transformers parameter path (without `.weight`): QuantTensor} for every layer linear
    and the LM head that the file stores in a kernel-served format; and the file's arch."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    field = reader.fields["general.architecture"]
    arch = bytes(field.parts[field.data[0]]).decode()
    if arch not in SUPPORTED_ARCHS:
        raise GGUFWeightsError(f"architecture {arch!r} is not served from its GGUF weights")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    out: dict[str, QuantTensor] = {}
    for t in reader.tensors:
        parts = t.name.split(".")
        if parts[-1] != "weight":
            continue
        if t.name in ("output.weight", "token_embd.weight"):
            key = "lm_head"
        elif parts[0] == "blk" and parts[2] in LAYER_LINEARS:
            key = f"model.layers.{parts[1]}.{LAYER_LINEARS[parts[2]]}"
        else:
            continue
        if key == "lm_head" and "lm_head" in out and t.name == "token_embd.weight":
            continue  # an untied file's own output matrix wins over the embedding
        qt = parse_blocks(np.asarray(t.data), t.tensor_type.name, int(t.shape[0]))
        if qt is None:
            continue
        if arch in PERMUTED_QK_ARCHS and parts[-2] in ("attn_q", "attn_k"):
            qt = _unpermute(qt, heads if parts[-2] == "attn_q" else kv_heads)
        out[key] = qt
    if not any(k.startswith("model.layers.") for k in out):
        raise GGUFWeightsError(f"{path.name} has no Q4_0/Q4_1/Q8_0 layer weights")
    return out, arch
