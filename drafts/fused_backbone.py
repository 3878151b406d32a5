"""The DSpark/DFlash backbone as the engine runs it: the same weights and the same arithmetic as
`DSparkModel.backbone` and `ctx_kv`, in fewer, larger products.

On the CPU a draft call is a few dozen products of 7 rows and a few hundred small ops, so its
time goes to the number of calls rather than to the bytes of weights: per layer the model's
modules make five projections (q, k, v, gate, up) where two fused ones do, compute the RoPE
tables twice (for q and for k) where one table per call does, and copy the context keys and
values three-fold (`repeat_interleave` to the query heads) where grouped-query SDPA reads them
as they are. A DSpark draft of 7 tokens took 3.95 ms through the modules and takes 3.23 ms
here on the embedded model; a `propose` call in the engine 5.96 ms and 4.69 ms
(docs/benchmarks.md).

Training keeps the modules (autograd, checkpoints); this class only reads their weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from drafts.common import DecoderLayer, DraftConfig, apply_rope, rope_cos_sin
from scheduler.linear import FrozenLinear, Product


class _Layer:
    """One decoder layer's products, fused: q/k/v for the block, k/v for the context."""

    def __init__(self, layer: DecoderLayer, product: Product) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        q, k, v = attn.q_proj.weight.data, attn.k_proj.weight.data, attn.v_proj.weight.data
        self.qkv = product(torch.cat([q, k, v]), None)
        self.kv = product(torch.cat([k, v]), None)
        self.o = product(attn.o_proj.weight.data, None)
        self.gate_up = product(torch.cat([mlp.gate_proj.weight.data, mlp.up_proj.weight.data]), None)
        self.down = product(mlp.down_proj.weight.data, None)
        self.input_norm = layer.input_layernorm
        self.post_norm = layer.post_attention_layernorm
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm


class FusedBackbone:
    """`backbone` and `ctx_kv` of a DSparkModel (module docstring); `product` makes each
    fused weight's product (scheduler.linear.Product)."""

    def __init__(
        self,
        layers: list[DecoderLayer],
        final_norm: nn.Module,
        cfg: DraftConfig,
        product: Product = FrozenLinear,
    ) -> None:
        self.layers = [_Layer(layer, product) for layer in layers]
        self.norm = final_norm
        self.heads, self.kv_heads, self.head_dim = (
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        )
        self.intermediate = cfg.intermediate_size
        self.theta = cfg.rope_theta

    def _rope(self, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """One RoPE table [B, T, hd] per call, in the activations' dtype (`apply_rope` then
        casts nothing)."""
        cos, sin = rope_cos_sin(pos, self.head_dim, self.theta)
        return cos.to(dtype), sin.to(dtype)

    def ctx_kv(self, ctx: torch.Tensor, pos: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Roped context keys and values per layer, [B, kv, T, hd], from fused features ctx
        [B, T, d] at positions pos [B, T]."""
        b, t, _ = ctx.shape
        cos, sin = self._rope(pos, ctx.dtype)
        out = []
        for layer in self.layers:
            kv = layer.kv(ctx).view(b, t, 2 * self.kv_heads, self.head_dim).transpose(1, 2)
            k, v = kv.split(self.kv_heads, 1)
            if layer.k_norm is not None:
                k = layer.k_norm(k)
            out.append((apply_rope(k, cos, sin), v))
        return out

    def __call__(
        self,
        x: torch.Tensor,
        pos: torch.Tensor,
        ctx_kv: list[tuple[torch.Tensor, torch.Tensor]],
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Block embeddings x [B, Q, d] at positions pos [B, Q] over each layer's context K/V;
        mask: bool [B, 1, Q, C + Q] (True: attend) or None. Returns the normed hidden states."""
        b, q_len, _ = x.shape
        heads, kv_heads, hd = self.heads, self.kv_heads, self.head_dim
        cos, sin = self._rope(pos, x.dtype)
        h = x
        for layer, (k_ctx, v_ctx) in zip(self.layers, ctx_kv, strict=True):
            qkv = layer.qkv(layer.input_norm(h)).view(b, q_len, heads + 2 * kv_heads, hd)
            q, k, v = qkv.transpose(1, 2).split([heads, kv_heads, kv_heads], 1)  # [B, n, Q, hd]
            if layer.q_norm is not None:
                q = layer.q_norm(q)
            if layer.k_norm is not None:
                k = layer.k_norm(k)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            out = F.scaled_dot_product_attention(
                q, torch.cat([k_ctx, k], 2), torch.cat([v_ctx, v], 2), attn_mask=mask,
                enable_gqa=True,
            )
            h = h + layer.o(out.transpose(1, 2).reshape(b, q_len, heads * hd))
            gate, up = layer.gate_up(layer.post_norm(h)).split(self.intermediate, -1)
            h = h + layer.down(F.silu(gate) * up)
        return self.norm(h)
