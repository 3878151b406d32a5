"""Layers and helpers shared by the EAGLE-3, DFlash and DSpark drafts.

Parameter names follow the HF Llama/Qwen3 decoder layout (self_attn.q_proj, mlp.gate_proj, ...)
so that DeepSpec checkpoints map onto these modules by name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from scheduler.linear import shared_frozen_linear


@dataclass(frozen=True)
class StsTable:
    """Calibration of the DSpark confidence head, per draft position k:
    c_k = sigmoid(z_k / T_k + b_k).

    The paper's Sequential Temperature Scaling fits T_k alone. A temperature only stretches
    the logits about zero, so it cannot fix a head whose confidences are off by a constant;
    the offset b_k (Platt scaling) can, and keeps the ranking, as temperature scaling does.
    Positions past the table use T = 1, b = 0 (the raw head).
    """

    temperatures: tuple[float, ...] = ()
    offsets: tuple[float, ...] = ()  # empty: all 0, temperature-only STS

    def __bool__(self) -> bool:
        return bool(self.temperatures)

    def apply(self, conf_logits: torch.Tensor) -> torch.Tensor:
        """[..., gamma] raw head logits -> calibrated per-position confidences."""
        g = conf_logits.shape[-1]
        temps = [self.temperatures[k] if k < len(self.temperatures) else 1.0 for k in range(g)]
        offs = [self.offsets[k] if k < len(self.offsets) else 0.0 for k in range(g)]
        t = conf_logits.new_tensor(temps)
        return torch.sigmoid(conf_logits / t + conf_logits.new_tensor(offs))


@dataclass
class DraftConfig:
    """Shape of a draft; the embedding/LM head dims must match the target's."""

    method: str  # "eagle3" | "dflash" | "dspark"
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    num_layers: int
    aux_layer_ids: list[int]
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    block_size: int = 7  # gamma: draft tokens per round (DSpark/DFlash block, EAGLE-3 TTT length)
    mask_token_id: int = 0  # DSpark/DFlash filler for slots 2..gamma
    markov_rank: int = 0  # DSpark sequential head rank; 0 = none (DFlash)
    confidence_head: bool = False
    qk_norm: bool = False  # Qwen3 per-head q/k RMSNorm
    # STS table of the confidence head (StsTable), one entry per position, fitted on sampled
    # (temperature 1) rollouts; empty: uncalibrated.
    sts_temperatures: list[float] = field(default_factory=list)
    sts_offsets: list[float] = field(default_factory=list)
    # The same fitted on greedy (temperature 0) rollouts; empty: use the sampled table.
    sts_temperatures_greedy: list[float] = field(default_factory=list)
    sts_offsets_greedy: list[float] = field(default_factory=list)
    # Size of the draft vocabulary (a `draft_vocab` buffer of target token ids the drafter may
    # propose; see drafts.vocab); 0: the target's whole vocabulary.
    draft_vocab_size: int = 0
    target_name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def sts_for(self, temperature: float) -> StsTable:
        """The STS table for a sampling temperature (acceptance differs between greedy and sampling)."""
        if temperature <= 0 and self.sts_temperatures_greedy:
            return StsTable(tuple(self.sts_temperatures_greedy), tuple(self.sts_offsets_greedy))
        return StsTable(tuple(self.sts_temperatures), tuple(self.sts_offsets))

    def set_sts(self, temperature: float, table: StsTable) -> None:
        if temperature <= 0:
            self.sts_temperatures_greedy = list(table.temperatures)
            self.sts_offsets_greedy = list(table.offsets)
        else:
            self.sts_temperatures = list(table.temperatures)
            self.sts_offsets = list(table.offsets)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DraftConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def config_from_target(target_config: Any, method: str, **kw: Any) -> DraftConfig:
    """A draft config copying the target's width, heads and RoPE (as DeepSpec's draft configs do)."""
    n = int(target_config.num_hidden_layers)
    default_ids = evenly_spaced_layers(n, 5)
    rope = getattr(target_config, "rope_parameters", None) or {}
    theta = float(rope.get("rope_theta", getattr(target_config, "rope_theta", 10000.0)))
    base: dict[str, Any] = dict(  # noqa: C408 - mirrors the DraftConfig field list
        method=method,
        hidden_size=int(target_config.hidden_size),
        intermediate_size=int(target_config.intermediate_size),
        num_attention_heads=int(target_config.num_attention_heads),
        num_key_value_heads=int(target_config.num_key_value_heads),
        head_dim=int(
            getattr(target_config, "head_dim", None)
            or target_config.hidden_size // target_config.num_attention_heads
        ),
        vocab_size=int(target_config.vocab_size),
        num_layers=1,
        aux_layer_ids=default_ids,
        rope_theta=theta,
        rms_norm_eps=float(target_config.rms_norm_eps),
        # only the folder name: a local path would leak the training machine's layout
        target_name=Path(str(getattr(target_config, "name_or_path", ""))).name,
    )
    base.update(kw)
    return DraftConfig(**base)  # type: ignore[arg-type]


def evenly_spaced_layers(num_layers: int, count: int) -> list[int]:
    """DFlash's rule: `count` layers evenly spaced from layer 1 to L-3 (never the last layer)."""
    lo, hi = 1, num_layers - 3
    if count == 1:
        return [lo]
    return [round(lo + i * (hi - lo) / (count - 1)) for i in range(count)]


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [..., head_dim] for integer positions (HF Llama convention)."""
    inv = 1.0 / (
        theta
        ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    )
    ang = positions.to(torch.float32).unsqueeze(-1) * inv
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, hd]; cos/sin: [B, T, hd] or [T, hd]."""
    if cos.dim() == 2:
        cos, sin = cos[None, None], sin[None, None]
    else:
        cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos.to(x.dtype)) + (rot * sin.to(x.dtype))


class Attention(nn.Module):
    """GQA attention whose keys/values may be prefixed with externally supplied K/V."""

    def __init__(self, cfg: DraftConfig, in_dim: int | None = None) -> None:
        super().__init__()
        d_in = in_dim or cfg.hidden_size
        self.h, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.theta = cfg.rope_theta
        self.q_proj = nn.Linear(d_in, self.h * self.hd, bias=False)
        self.k_proj = nn.Linear(d_in, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(d_in, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.h * self.hd, cfg.hidden_size, bias=False)
        self.q_norm = nn.RMSNorm(self.hd, eps=cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(self.hd, eps=cfg.rms_norm_eps) if cfg.qk_norm else None

    def kv(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Roped keys and values [B, kv, T, hd] for inputs x [B, T, d_in] at positions pos."""
        b, t, _ = x.shape
        k = self.k_proj(x).view(b, t, self.n_kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.hd).transpose(1, 2)
        if self.k_norm is not None:
            k = self.k_norm(k)
        cos, sin = rope_cos_sin(pos, self.hd, self.theta)
        return apply_rope(k, cos, sin), v

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor,
        prefix_kv: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """x: [B, Q, d_in]. Keys = [prefix_kv ; own]; mask: bool [B or 1, 1, Q, K_total] (True = attend)."""
        b, q_len, _ = x.shape
        q = self.q_proj(x).view(b, q_len, self.h, self.hd).transpose(1, 2)
        if self.q_norm is not None:
            q = self.q_norm(q)
        cos, sin = rope_cos_sin(pos, self.hd, self.theta)
        q = apply_rope(q, cos, sin)
        k, v = self.kv(x, pos)
        if prefix_kv is not None:
            k = torch.cat([prefix_kv[0], k], dim=2)
            v = torch.cat([prefix_kv[1], v], dim=2)
        rep = self.h // self.n_kv
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, q_len, self.h * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: DraftConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block; attention input may be wider than d (EAGLE-3 feeds [emb; hidden])."""

    def __init__(self, cfg: DraftConfig, attn_in: int | None = None) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, attn_in)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def mlp_block(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.mlp(self.post_attention_layernorm(h))


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)


class FrozenTargetParts(nn.Module):
    """The target's embedding and LM head, shared by reference (never saved with the draft).

    `act_dtype`: dtype of the activations the draft runs in. Training runs the frozen parts in
    bf16 (3x faster matmuls on AVX512-BF16 CPUs) while the draft itself stays fp32."""

    _embed: nn.Module
    _lm_head: nn.Module

    def __init__(
        self, embed: nn.Module, lm_head: nn.Module, act_dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        # Stored outside the module tree so state_dict()/parameters() never include them.
        object.__setattr__(self, "_embed", embed)
        object.__setattr__(self, "_lm_head", lm_head)
        self.act_dtype = act_dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        e: torch.Tensor = self._embed(ids)
        return e if self.act_dtype is None else e.to(self.act_dtype)

    def logits(self, h: torch.Tensor, vocab: torch.Tensor | None = None) -> torch.Tensor:
        """Logits in the LM head's dtype (callers upcast before softmax); over the rows of
        `vocab` (a draft vocabulary, training only) when given."""
        weight = cast(torch.Tensor, self._lm_head.weight)
        bias = cast(torch.Tensor | None, self._lm_head.bias)
        if torch.is_grad_enabled():  # training: the module, so gradients reach h
            if vocab is not None:
                return F.linear(
                    h.to(weight.dtype), weight[vocab], None if bias is None else bias[vocab]
                )
            out: torch.Tensor = self._lm_head(h.to(weight.dtype))
            return out
        if vocab is not None:
            raise ValueError("inference reads a draft vocabulary through drafts.vocab.DraftHead")
        # Inference: the same blocked copy of the head the engine multiplies (no second copy).
        return shared_frozen_linear(weight, bias)(h.to(weight.dtype))


def target_parts(target: Any, act_dtype: torch.dtype | None = None) -> FrozenTargetParts:
    return FrozenTargetParts(
        target.get_input_embeddings(), target.get_output_embeddings(), act_dtype
    )

