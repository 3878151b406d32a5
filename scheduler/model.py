"""The target's forward pass over the packed tokens of a whole step, with a static KV cache.

The weights and the per-layer modules (projections, norms, MLP, rotary embedding) are the
transformers model's own, so any Llama-family architecture (Llama, Qwen2 with qkv bias, Qwen3
with q/k norms, Mistral, SmolLM2) runs unchanged. What this file owns is the part transformers
cannot do for us: one forward over a step whose requests each bring a different number of new
tokens at different positions, writing into and reading from one KV row per request.

Layouts:
    packed activations        [T, hidden]              T = tokens scheduled this step
    k_cache, v_cache (each)   [layers, slots, kv_heads, max_model_len, head_dim]

The eager step (`forward_eager`) pads attention only where it is cheap. Requests with few new
tokens (decode, verification) are attended in groups of consecutive query lengths, each padded
to its longest, with the cut chosen at least cost (_group_by_query_length; figures from
`benchmarks/attention.py` in docs/benchmarks.md). A group attends over the view
`cache[:, :span]`, or over a gathered copy of its own rows when it owns few of those slots.
Long prefill chunks are attended one by one against their own cache row. Projections and the
MLP run on the packed tokens, and the LM head only on the rows that need logits. With
`StepOptions.compile`, short-query requests run as one compiled graph instead
(scheduler/compiled.py), and prefill chunks a second graph of the same rule, or, where attention
has no C++ kernel, the eager path.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from scheduler.attention import AdditiveMasks, Widened, grouped_query_attention, rotate_half, sdpa
from scheduler.linear import LayerProjections, shared_frozen_linear

if TYPE_CHECKING:
    from scheduler.compiled import CompiledStep

# Requests with at most this many query tokens are attended in padded groups (SmallGroup).
SMALL_QUERY_MAX = 16
# On CPU a short-query group of several slots is attended with batched matmuls
# (grouped_query_attention) once it has this many padded query rows: SDPA's flash kernel tiles
# every (slot, head) pair on its own, and over many short queries that costs more than the
# arithmetic; a lone request keeps SDPA, where the two are even (docs/benchmarks.md).
MATMUL_ATTENTION_MIN_ROWS = 8
# Cost model of _group_by_query_length, fitted to whole-step times of the embedded model on CPU
# (units: one query row against one key): per attended entry, reading its keys and values
# costs about 1.5 query rows; per call, ~40 us of fixed cost is ~800 units.
ATTN_ENTRY_ROWS = 1.5
ATTN_CALL_COST = 800.0


# A short query: (slot, start position, number of tokens, first row in the packed batch).
_Span = tuple[int, int, int, int]


@dataclass
class SmallGroup:
    """Short-query requests of similar query length attended together in one padded call.

    The call's batch has one entry per attended KV row: either the slots 0..num_entries-1 of
    the cache (a view; entries of slots outside the group only see position 0) or, when
    `gather_slots` is set, copies of just the group's own slots.
    """

    rows: torch.Tensor  # [n] rows of the packed batch that belong to the group
    entry_idx: torch.Tensor  # [n] batch entry of each row (its slot, or its gathered index)
    query_idx: torch.Tensor  # [n] index of each row within its request's query
    num_entries: int
    gather_slots: torch.Tensor | None  # [num_entries] slots to copy; None: the view
    query_max: int
    kv_max: int
    mask: torch.Tensor  # [num_entries, 1, query_max, kv_max] bool, True = may attend
    # The packed rows already are the padded query layout: every row of the step is in the
    # group, slots 0..num_entries-1 in order, each with query_max rows (steady decode).
    dense: bool


@dataclass
class LongQuery:
    """One prefill chunk attended on its own."""

    row_start: int  # first row in the packed batch
    num_rows: int
    slot: int
    start_pos: int  # position of the first query token
    mask: torch.Tensor  # [num_rows, start_pos + num_rows] bool causal-with-offset


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_ids: torch.Tensor  # [T] int64
    logits_rows: torch.Tensor  # [N] rows whose logits are needed
    # Every request's (slot, start position, number of tokens, first row), in packed order.
    requests: list[_Span]

    @cached_property
    def _attention_layout(self) -> tuple[list[SmallGroup], list[LongQuery]]:
        """The eager step's attention groups, made at its first read: the compiled step never
        reads them, and building them took ~0.1 ms a step."""
        device = self.input_ids.device
        short = [r for r in self.requests if r[2] <= SMALL_QUERY_MAX]
        long: list[LongQuery] = []
        for slot, start, n, row0 in self.requests:
            if n > SMALL_QUERY_MAX:
                q_pos = torch.arange(start, start + n)[:, None]
                mask = torch.arange(start + n)[None, :] <= q_pos
                long.append(LongQuery(row0, n, slot, start, mask.to(device)))
        groups = _group_by_query_length(short)
        whole_step = not long and len(groups) == 1
        return [_small_group(spans, device, whole_step) for spans in groups], long

    @property
    def small(self) -> list[SmallGroup]:
        return self._attention_layout[0]

    @property
    def long(self) -> list[LongQuery]:
        return self._attention_layout[1]


def attention_shape(cfg: Any) -> tuple[int, int, int]:
    """(query heads, key/value heads, head size) of a transformers config."""
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return heads, kv_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // heads


@dataclass(frozen=True)
class StepOptions:
    """EngineConfig's --compile-step, --kv-dtype and --attention, resolved (scheduler/build.py)."""

    compile: bool = False  # short-query steps through scheduler/compiled.py's graph
    kv_dtype: torch.dtype | None = None  # None: the attention dtype
    # The compiled step attends through scheduler/kernels (built and loaded by build.py)
    # rather than inductor's loops.
    native_attention: bool = False


class TargetModel:
    """Wraps a transformers *ForCausalLM; owns the KV cache."""

    def __init__(
        self,
        hf_model: Any,  # a transformers *ForCausalLM
        num_slots: int,
        max_model_len: int,
        options: StepOptions | None = None,
    ) -> None:
        options = options or StepOptions()
        cfg = hf_model.config
        self.hf_model = hf_model
        self.decoder = hf_model.model
        self.layers = list(hf_model.model.layers)
        self.lm_head = hf_model.lm_head
        self.num_heads, self.num_kv_heads, self.head_dim = attention_shape(cfg)
        self.hidden_size = cfg.hidden_size
        self.vocab_size = cfg.vocab_size
        self.num_layers = len(self.layers)
        self.scale = float(getattr(self.layers[0].self_attn, "scaling", self.head_dim**-0.5))
        param = next(hf_model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.fused = [LayerProjections(layer) for layer in self.layers]
        # Rows the weight products take at a time: the throughput profile's stairs.
        self.row_quantum = int(getattr(self.fused[0].qkv, "kernel_rows", 1))
        # A quantized head (scheduler/quant.py) multiplies its own blocks; a dense one is frozen.
        self.head = (
            shared_frozen_linear(self.lm_head.weight, self.lm_head.bias)
            if isinstance(self.lm_head, torch.nn.Linear)
            else self.lm_head
        )
        # Eager CPU attention kernels are several times slower in bfloat16 than in float32
        # (benchmarks/step_kernels.py), so eager attention computes in float32 on CPU. The
        # cache may hold bfloat16 (options.kv_dtype): the compiled step reads it as such.
        self.attn_dtype = torch.float32 if self.device.type == "cpu" else self.dtype
        self.kv_dtype = options.kv_dtype or self.attn_dtype
        shape = (self.num_layers, num_slots, self.num_kv_heads, max_model_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        self.native_attention = options.native_attention
        self.compiled: CompiledStep | None = None
        if options.compile:
            from scheduler.compiled import CompiledStep

            self.compiled = CompiledStep(self, SMALL_QUERY_MAX, build_packed_batch)

    @torch.inference_mode()
    def forward(
        self, batch: PackedBatch, aux_layer_ids: tuple[int, ...] = ()
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (logits [N, vocab] float32 at batch.logits_rows, aux [T, m*hidden] or None)."""
        if self.compiled is not None:  # it runs prefill chunks too (eager or its own graph)
            return self.compiled(batch, aux_layer_ids)
        return self.forward_eager(batch, aux_layer_ids)

    def forward_eager(
        self, batch: PackedBatch, aux_layer_ids: tuple[int, ...] = ()
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.decoder.embed_tokens(batch.input_ids)  # [T, hidden]
        # SDPA on CPU is markedly faster with an additive mask than with a boolean one.
        masks = AdditiveMasks(batch, self.attn_dtype)
        cos, sin = self.decoder.rotary_emb(h, batch.positions[None])
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # [T, 1, head_dim]
        aux: list[torch.Tensor] = []
        for i, (layer, fused) in enumerate(zip(self.layers, self.fused)):
            q, k, v = self.project_qkv(layer, fused, layer.input_layernorm(h), cos, sin)
            out = self._attend(i, q, k, v, batch, masks)
            h = h + fused.o(out.view(h.shape[0], -1).to(h.dtype))
            h = self.mlp(layer, fused, h)
            if i in aux_layer_ids:
                aux.append(h)
        return self.logits_and_aux(h, batch.logits_rows, aux, aux_layer_ids)

    def logits_and_aux(
        self,
        h: torch.Tensor,
        logits_rows: torch.Tensor,
        aux: list[torch.Tensor],
        aux_layer_ids: tuple[int, ...],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.head(self.decoder.norm(h[logits_rows])).float()
        aux_hidden = None
        if aux_layer_ids:
            by_id = dict(zip([i for i in range(self.num_layers) if i in aux_layer_ids], aux))
            aux_hidden = torch.cat([by_id[i] for i in aux_layer_ids], dim=-1)
        return logits, aux_hidden

    def project_qkv(
        self,
        layer: Any,
        fused: LayerProjections,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normed hidden [T, hidden] -> q [T, H, D], k and v [T, KV, D] in the attention dtype,
        RoPE applied."""
        T, H, KV, D = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = fused.qkv(x)
        qk = qkv[:, : (H + KV) * D].view(T, H + KV, D)
        v = qkv[:, (H + KV) * D :].view(T, KV, D).to(self.attn_dtype)
        attn = layer.self_attn
        if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm before RoPE
            qk = torch.cat([attn.q_norm(qk[:, :H]), attn.k_norm(qk[:, H:])], 1)
        # RoPE on queries and keys at once (one set of elementwise ops, not two).
        qk = (qk * cos + rotate_half(qk) * sin).to(self.attn_dtype)
        return qk[:, :H], qk[:, H:], v

    def mlp(self, layer: Any, fused: LayerProjections, h: torch.Tensor) -> torch.Tensor:
        gate, up = fused.gate_up(layer.post_attention_layernorm(h)).split(fused.gate_up_sizes, -1)
        return h + fused.down(layer.mlp.act_fn(gate) * up)

    def _attend(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: PackedBatch,
        masks: AdditiveMasks,
    ) -> torch.Tensor:
        """Write the step's keys and values, attend: [T, H, D] in the attention dtype."""
        H, D = self.num_heads, self.head_dim
        k_stored, v_stored = self.k_cache[layer_idx], self.v_cache[layer_idx]
        k_stored[batch.slot_ids, :, batch.positions] = k.to(self.kv_dtype)
        v_stored[batch.slot_ids, :, batch.positions] = v.to(self.kv_dtype)
        k_cache: torch.Tensor | Widened = k_stored
        v_cache: torch.Tensor | Widened = v_stored
        if self.kv_dtype != self.attn_dtype:  # eager kernels read the attention dtype
            k_cache, v_cache = Widened(k_stored, self.attn_dtype), Widened(v_stored, self.attn_dtype)
        scale = self.scale
        gqa = H != self.num_kv_heads
        out = torch.empty_like(q)  # [T, heads, head_dim]
        for g, small_mask in zip(batch.small, masks.small):
            if g.dense:  # the packed rows already are the padded layout
                qp = q.view(g.num_entries, g.query_max, H, D)
            else:
                qp = q.new_zeros(g.num_entries, g.query_max, H, D)
                qp[g.entry_idx, g.query_idx] = q[g.rows]
            if g.gather_slots is None:
                keys, values = (
                    k_cache[: g.num_entries, :, : g.kv_max],
                    v_cache[: g.num_entries, :, : g.kv_max],
                )
            else:
                keys, values = (
                    k_cache[g.gather_slots, :, : g.kv_max],
                    v_cache[g.gather_slots, :, : g.kv_max],
                )
            attend = (
                grouped_query_attention
                if self.device.type == "cpu"
                and g.num_entries > 1
                and g.num_entries * g.query_max >= MATMUL_ATTENTION_MIN_ROWS
                else sdpa
            )
            # [entries, heads, query_max, head_dim]
            o = attend(qp.transpose(1, 2), keys, values, small_mask, scale)
            if g.dense:  # nothing to unpad and nothing else in the step: done
                return o.transpose(1, 2).reshape(q.shape)
            out[g.rows] = o.transpose(1, 2)[g.entry_idx, g.query_idx]
        for lq, long_mask in zip(batch.long, masks.long):
            rows = slice(lq.row_start, lq.row_start + lq.num_rows)
            kv_len = lq.start_pos + lq.num_rows
            o = F.scaled_dot_product_attention(
                q[rows].transpose(0, 1)[None],  # [1, heads, rows, head_dim]
                k_cache[lq.slot : lq.slot + 1, :, :kv_len],
                v_cache[lq.slot : lq.slot + 1, :, :kv_len],
                attn_mask=long_mask,
                scale=scale,
                enable_gqa=gqa,
            )
            out[rows] = o[0].transpose(0, 1)
        return out


def _group_by_query_length(
    spans: list[_Span],
) -> list[list[_Span]]:
    """Split short queries into attention groups of consecutive query lengths, at least cost.

    Padding every query to the step's longest makes one verification of 7 drafts cost 8 query
    rows in every slot; one call per length pays a call each. Exact minimum over the ways to
    cut the distinct lengths into runs, under a cost model in units of one query row against
    one key: a group attends kv_max keys for each of its entries, and an entry costs
    ATTN_ENTRY_ROWS rows (reading its keys and values) plus its padded query rows; one more
    when it is gathered rather than viewed (the copy); each call costs ATTN_CALL_COST.
    """
    lengths = sorted({n for _, _, n, _ in spans})
    by_length = {n: [s for s in spans if s[2] == n] for n in lengths}
    best: list[tuple[float, int]] = [(0.0, 0)]  # (cost of the first i lengths, start of last run)
    for j in range(1, len(lengths) + 1):
        options = []
        for i in range(j):
            members = [s for n in lengths[i:j] for s in by_length[n]]
            options.append((best[i][0] + _attention_cost(members)[0], i))
        best.append(min(options))
    groups, j = [], len(lengths)
    while j > 0:
        i = best[j][1]
        groups.append([s for s in spans if lengths[i] <= s[2] <= lengths[j - 1]])
        j = i
    return groups[::-1]


def _attention_cost(spans: list[_Span]) -> tuple[float, bool]:
    """Cost of attending `spans` in one call, in the units of _group_by_query_length, and
    whether copying just their KV rows is cheaper than viewing every slot up to the last."""
    query_max = max(n for _, _, n, _ in spans)
    kv_max = max(start + n for _, start, n, _ in spans)
    span_slots = max(slot for slot, _, _, _ in spans) + 1
    view = span_slots * (ATTN_ENTRY_ROWS + query_max)
    gather = len(spans) * (ATTN_ENTRY_ROWS + 1 + query_max)
    return kv_max * min(view, gather) + ATTN_CALL_COST, gather < view


def _small_group(spans: list[_Span], device: torch.device, whole_step: bool) -> SmallGroup:
    """spans: (slot, start_pos, num_rows, first row) of the requests attended together."""
    span_slots = max(slot for slot, _, _, _ in spans) + 1
    query_max = max(n for _, _, n, _ in spans)
    gather = _attention_cost(spans)[1]
    num_entries = len(spans) if gather else span_slots
    kv_max = max(start + n for _, start, n, _ in spans)
    # Unused (entry, query) cells may attend position 0 only, so no row is all -inf (NaN).
    mask = torch.zeros(num_entries, 1, query_max, kv_max, dtype=torch.bool)
    mask[:, :, :, 0] = True
    kv = torch.arange(kv_max)
    rows: list[int] = []
    entries: list[int] = []
    query_idx: list[int] = []
    for i, (slot, start, n, row0) in enumerate(spans):
        entry = i if gather else slot
        mask[entry, 0, :n] = kv[None, :] <= torch.arange(start, start + n)[:, None]
        rows.extend(range(row0, row0 + n))
        entries.extend([entry] * n)
        query_idx.extend(range(n))
    in_slot_order = [slot for slot, _, _, _ in spans] == list(range(span_slots))
    return SmallGroup(
        rows=torch.tensor(rows, device=device),
        entry_idx=torch.tensor(entries, device=device),
        query_idx=torch.tensor(query_idx, device=device),
        num_entries=num_entries,
        gather_slots=torch.tensor([s for s, _, _, _ in spans], device=device) if gather else None,
        query_max=query_max,
        kv_max=kv_max,
        mask=mask.to(device),
        dense=whole_step and in_slot_order and all(n == query_max for _, _, n, _ in spans),
    )


def build_packed_batch(
    queries: list[tuple[int, int, list[int]]],
    logits_rows: list[int],
    device: torch.device,
) -> PackedBatch:
    """queries: per request (slot, start_pos, token ids), in packed order."""
    input_ids: list[int] = []
    positions: list[int] = []
    slot_ids: list[int] = []
    requests: list[_Span] = []
    for slot, start, ids in queries:
        row0, n = len(input_ids), len(ids)
        input_ids.extend(ids)
        positions.extend(range(start, start + n))
        slot_ids.extend([slot] * n)
        requests.append((slot, start, n, row0))

    def longs(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return PackedBatch(
        input_ids=longs(input_ids),
        positions=longs(positions),
        slot_ids=longs(slot_ids),
        logits_rows=longs(logits_rows),
        requests=requests,
    )
