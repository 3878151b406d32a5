"""The decode step as one torch.compile graph (inductor's CPU backend).

Eager, a batch-1 step of the embedded model is ~1,000 small ops: norms, RoPE, casts, KV writes
and attention, each paying PyTorch's dispatch. Here every step whose requests bring at most
SMALL_QUERY_MAX tokens (decode, draft verification, the tail of a prompt) runs as one graph
from token ids to logits: inductor fuses the elementwise work into a few C++ loops around the
weight products, which stay the same kernels (the int4 kernel, or the dense linear). Longer
prompt chunks run as a second graph of the same code over the products prompts multiply (an
int4 layer's blocks in bfloat16 tiles, or its dense copy: quant.py's `_prompt_product`), where
the C++ attention serves; else eager.

The KV cache is read, never written, inside the graph (a graph that mutates its input has to
copy it): each position's key is taken from the cache below a request's start and from the
step's own new keys from there on, and attention reduces over positions in order. The graph
returns the new keys and values of every layer and one indexed write per cache stores them
after it. Attention reads the cache in place through the requests' slot indices, nothing
gathered or copied: in a C++ kernel built for the CPU (scheduler/kernels; `--attention auto`
takes it wherever it builds), else in inductor's loops over the same formula, which cost about
5x the time of reading the cached bytes (docs/benchmarks.md).

Every tensor of the graph is laid out by the step's packed rows (tokens), and every row
attends on its own: no row is computed for padding. (The first version laid the step out as
[requests, longest query]: 16 decodes beside one 8-token verification then ran 128 rows through
the weight products and attention instead of 23.)

Shapes are dynamic (rows N, cached span L, logits rows M), N unbacked, so one graph serves
every step shape: a one-token decode runs the very kernels a verification does (the int4
kernels compute each row alike whatever the other rows; oneDNN's dense products do for 2-31
rows, so a lone dense row gets an inert second one, `pad_lone_row`). The
graph is compiled at start-up (scheduler/build.py warms it up) and kept in inductor's on-disk
cache (`enable_disk_cache`): a restart reloads it.
"""

from __future__ import annotations

import itertools
import logging
import os
import types
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from scheduler.linear import FrozenLinear, LayerProjections

if TYPE_CHECKING:
    from scheduler.model import PackedBatch, TargetModel

log = logging.getLogger(__name__)

# The attended span is rounded up to a multiple of this: never 0 or 1 (sizes the compiler would
# specialise on), and whole 16-lane float vectors in the reductions.
SPAN_QUANTUM = 16


def enable_disk_cache(cache_dir: Path) -> None:
    """Point inductor's caches (compiled kernels, FX graphs) at our cache folder, unless the
    user chose a folder for them. Importing inductor's config already sets the variable to
    torch's own default (a temporary folder), so that value counts as unset."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir as torch_default

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or current == torch_default():
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir / "inductor")


class CompiledStep:
    """Runs eligible steps of `model` through the compiled graph (`accepts`, `__call__`)."""

    def __init__(
        self,
        model: TargetModel,
        max_query: int,
        build_batch: Callable[
            [list[tuple[int, int, list[int]]], list[int], torch.device], PackedBatch
        ],
    ) -> None:
        import torch._dynamo
        import torch.fx.experimental._config as fx_config

        self.model = model
        self.max_query = max_query
        self.build_batch = build_batch  # scheduler.model.build_packed_batch
        # oneDNN multiplies a lone row with another kernel than 2-31 rows, whose sums round
        # differently (the down projection's 1,536 inputs: logits 0.125 apart), so a token
        # decoded alone and the same token verified among drafts got different bits and
        # greedy outputs parted. A one-row step of dense products runs with a second, inert
        # row (~10 % on the embedded model's dense one-row step); the int4 kernels compute
        # each row alike, and a second row would cost them a whole row's products.
        self.pad_lone_row = isinstance(model.fused[0].down, FrozenLinear)
        # Without this, a dimension that is 1 in some step (one logits row, a cached span)
        # would get a graph of its own.
        fx_config.backed_size_oblivious = True
        # One graph per set of auxiliary layers a drafter reads; a few dozen is plenty.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
        # The step's shape guards in C++: evaluated in Python they cost ~70 us a step.
        torch._dynamo.config.enable_cpp_symbolic_shape_guards = True
        # Dynamo keeps compiled graphs per code object, behind guards on everything the code
        # reads. The model is frozen while it serves, so its thousand-odd guards (~1 ms a step)
        # are dropped; in exchange each model gets a code object of its own, so that two
        # models (a test's eager twin, a benchmark's other format) never share a graph.
        instance = next(_instances)
        self._graph = _compile(self, CompiledStep._step, f"compiled_step_{instance}")
        # Prompt chunks (more than max_query tokens) run as a second graph of the same rule
        # over the products prompt chunks multiply (quant.py's `_prompt_product`): fused, a
        # 125-token prompt's prefill took ~20 % less time than eager (docs/benchmarks.md).
        # Only with the C++ attention: inductor's loops over every (row, position) pair are
        # no match for SDPA on a chunk of hundreds of rows.
        self.prompt_graph = None
        if model.native_attention:
            from scheduler.quant import prompt_chunk_layer

            self.prompt_layers = [prompt_chunk_layer(layer) for layer in model.fused]
            self.prompt_graph = _compile(
                self, CompiledStep._prompt_step, f"compiled_prompt_step_{instance}"
            )

    def accepts(self, batch: PackedBatch) -> bool:
        """Whether every request of the step runs in the graph."""
        return all(n <= self.max_query for _, _, n, _ in batch.requests)

    def __call__(
        self, batch: PackedBatch, aux_layer_ids: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.accepts(batch):
            return self._run(batch, aux_layer_ids)
        if all(n > self.max_query for _, _, n, _ in batch.requests):
            return self._prompt_chunks(batch, aux_layer_ids)
        return self._split(batch, aux_layer_ids)

    def _prompt_chunks(
        self, batch: PackedBatch, aux_layer_ids: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Long queries (prompt chunks) through the prompt graph, or eager without one; int4
        linears through their prompt products either way (quant.py's `_prompt_product`): the
        decode kernels cost more per row than a product made for many rows."""
        if self.prompt_graph is not None:
            return self._run(batch, aux_layer_ids, self.prompt_graph)
        from scheduler.quant import prompt_chunk_products

        with prompt_chunk_products():
            return self.model.forward_eager(batch, aux_layer_ids)

    def _split(
        self, batch: PackedBatch, aux_layer_ids: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prefill chunks through `_prompt_chunks`, the step's short queries through the step's
        graph. A decode next to a prefill chunk then runs the kernels it runs in any other
        step: the same numbers, so greedy output does not depend on what else was scheduled."""
        ids = batch.input_ids.tolist()
        wanted = set(batch.logits_rows.tolist())
        parts: list[tuple[list[tuple[int, int, list[int]]], list[int], list[int]]] = [
            ([], [], []),
            ([], [], []),
        ]  # per part: queries, its logits rows, the packed rows they come from
        for slot, start, n, row0 in batch.requests:
            queries, logits_rows, rows = parts[n > self.max_query]
            logits_rows.extend(len(rows) + r for r in range(n) if row0 + r in wanted)
            queries.append((slot, start, ids[row0 : row0 + n]))
            rows.extend(range(row0, row0 + n))
        dev = batch.input_ids.device
        out_rows = {r: i for i, r in enumerate(batch.logits_rows.tolist())}
        logits: torch.Tensor | None = None
        aux: torch.Tensor | None = None
        for run, (queries, logits_rows, rows) in zip((self._run, self._prompt_chunks), parts):
            part_logits, part_aux = run(self.build_batch(queries, logits_rows, dev), aux_layer_ids)
            if logits is None:
                logits = part_logits.new_empty(len(out_rows), part_logits.shape[1])
            logits[[out_rows[rows[r]] for r in logits_rows]] = part_logits
            if part_aux is not None:
                if aux is None:
                    aux = part_aux.new_empty(len(ids), part_aux.shape[1])
                aux[rows] = part_aux
        assert logits is not None
        return logits, aux

    def _run(
        self, batch: PackedBatch, aux_layer_ids: tuple[int, ...], graph: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        m = self.model
        rows = batch.input_ids.shape[0]
        pad = self.pad_lone_row and rows == 1
        logits, new_k, new_v, aux = (graph or self._graph)(
            *_graph_inputs(batch, m.k_cache.shape[3], pad), aux_layer_ids
        )
        # new_k: [rows, layers, KV, D] in the packed rows' order -> one write per cache.
        m.k_cache[:, batch.slot_ids, :, batch.positions] = new_k[:rows]
        m.v_cache[:, batch.slot_ids, :, batch.positions] = new_v[:rows]
        return logits, aux[:rows] if aux is not None else None

    def _step(
        self,
        rows: torch.Tensor,  # [N, 5] int64 per packed row (see _graph_inputs)
        span: torch.Tensor,  # [L] positions attended (only its length is read)
        head_rows: torch.Tensor,  # [M] rows that need logits
        aux_layer_ids: tuple[int, ...],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return self._forward(self.model.fused, rows, span, head_rows, aux_layer_ids)

    def _prompt_step(
        self,
        rows: torch.Tensor,
        span: torch.Tensor,
        head_rows: torch.Tensor,
        aux_layer_ids: tuple[int, ...],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return self._forward(self.prompt_layers, rows, span, head_rows, aux_layer_ids)

    def _forward(
        self,
        products: list[LayerProjections],
        rows: torch.Tensor,
        span: torch.Tensor,
        head_rows: torch.Tensor,
        aux_layer_ids: tuple[int, ...],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        m = self.model
        input_ids, positions = rows[:, 0], rows[:, 1]
        N, L = rows.shape[0], span.shape[0]
        H, KV, D = m.num_heads, m.num_kv_heads, m.head_dim
        G = H // KV
        h = m.decoder.embed_tokens(input_ids)  # [N, hidden]
        cos, sin = m.decoder.rotary_emb(h, positions[None])
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]
        # Every row attends on its own: keys by absolute position, the cache below its
        # request's start, the step's own new keys from there on. One reduction over positions
        # in order, whatever the step's shape, so a token verified among drafts gets the bits
        # it would get decoded alone.
        attend = _native_attention(m, rows) if m.native_attention else _looped_attention(m, rows, L)
        new_k, new_v, aux = [], [], []
        for i, (layer, fused) in enumerate(zip(m.layers, products)):
            q, k, v = m.project_qkv(layer, fused, layer.input_layernorm(h), cos, sin)
            qg = _stored(q.view(N, KV, G, D) * m.scale)
            # The step's own keys as the cache will hold them (rounded to its dtype), so a key
            # is the same number whether it is read back from the cache or straight from here.
            k_new = _stored(k.to(m.kv_dtype))  # [N, KV, D]
            v_new = _stored(v.to(m.kv_dtype))
            o = attend(i, qg, k_new, v_new)  # [N, KV, G, D] float32
            h = h + fused.o(o.reshape(N, H * D).to(h.dtype))
            h = m.mlp(layer, fused, h)
            new_k.append(k_new)
            new_v.append(v_new)
            if i in aux_layer_ids:
                aux.append(h)
        logits, aux_hidden = m.logits_and_aux(h, head_rows, aux, aux_layer_ids)
        return logits, torch.stack(new_k, 1), torch.stack(new_v, 1), aux_hidden


# attend(layer, q [N, KV, G, D], new keys, new values [N, KV, D]) -> [N, KV, G, D] float32
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _native_attention(m: TargetModel, rows: torch.Tensor) -> Attend:
    """The attention rule in C++ (scheduler/kernels/row_attention.cpp): each row reads its
    request's keys and values once for the query heads that share them."""

    def attend(layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor:
        return torch.ops.dspark_kernels.row_attention(
            q, k_new, v_new, m.k_cache[layer], m.v_cache[layer], rows
        )

    return attend


def _looped_attention(m: TargetModel, rows: torch.Tensor, L: int) -> Attend:
    """The attention rule as tensor formulas that inductor turns into loops over the cache."""
    _, positions, row_slot, row_start, row_first = rows.unbind(1)
    N = rows.shape[0]
    rel = torch.arange(L, device=rows.device)[None, :] - row_start[:, None]  # [N, L]
    query_idx = positions - row_start  # [N] the row's place in its request's query
    from_own = (rel >= 0)[:, None, :, None]  # [N, 1, L, 1]
    # The new key at position start + r sits in packed row first + r (clamped where masked).
    own_rows = row_first[:, None] + torch.minimum(rel.clamp(min=0), query_idx[:, None])
    # Row j of a request (position start + j) attends positions <= start + j.
    mask = torch.zeros(N, L, device=rows.device).masked_fill(
        rel > query_idx[:, None], float("-inf")
    )[:, None, None, :]  # [N, 1, 1, L]

    def attend(layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor:
        # [N, KV, L, D]; indexing inside inductor's loops reads the cache in place.
        keys = torch.where(
            from_own, k_new[own_rows].transpose(1, 2), m.k_cache[layer][row_slot][:, :, :L]
        )
        values = torch.where(
            from_own, v_new[own_rows].transpose(1, 2), m.v_cache[layer][row_slot][:, :, :L]
        )
        # Products as broadcast multiply-sums: loops over the cache, no gathered copy.
        scores = (q[:, :, :, None] * keys[:, :, None]).sum(-1).float() + mask  # [N, KV, G, L]
        probs = torch.softmax(scores, -1)
        return (probs[..., None] * values[:, :, None].float()).sum(-2)  # [N, KV, G, D]

    return attend


_instances = itertools.count()


def _compile(owner: CompiledStep, method: Callable[..., Any], name: str) -> Any:
    """`method` bound to `owner` and compiled under a code object of its own (see __init__)."""
    code = method.__code__.replace(co_name=name)
    bound = types.MethodType(types.FunctionType(code, method.__globals__), owner)
    return torch.compile(
        bound,
        fullgraph=True,
        options={
            # Hundreds of input size/stride checks a step (~0.5 ms); the inputs are ours.
            "size_asserts": False,
            # Kernels launched from generated C++ rather than Python: ~0.6 ms less a step.
            "cpp_wrapper": True,
            "guard_filter_fn": _skip_guards_on_the_model,
        },
    )


def _stored(x: torch.Tensor) -> torch.Tensor:
    """`x` written to memory once: inductor inlines cheap elementwise producers into their
    consumers' loops, and RoPE (two transcendentals an element) recomputed for every key
    position made long-context decode 3x slower. as_strided needs a stored tensor, so
    inductor stores it."""
    x = x.contiguous()  # as_strided reads storage: a view's offset and strides must not leak in
    return x.as_strided(x.size(), x.stride())


def _skip_guards_on_the_model(entries: list[Any]) -> list[bool]:
    return [e.name != "self" and not e.name.startswith("self.") for e in entries]


# One tensor for every per-row input: the row count is then one unbacked size. With a tensor
# each, a one-token step compiled a graph of its own (its sizes equal to 1 and to each other),
# whose kernels differ from the general graph's: a decode and a verification of the same
# token then disagreed in the last bits. Columns: token id, position, and the request's cache
# row, start position and first packed row.


def _graph_inputs(
    batch: PackedBatch, max_len: int, pad: bool = False
) -> tuple[torch.Tensor, ...]:
    """The packed step as graph inputs: per row its token, position, and its request's cache
    row, start position and first packed row; the attended span; the logits rows. `pad` adds
    an inert last row (token 0 at position 0, attending only itself; no logits, not stored)."""
    reqs = batch.requests
    dev = batch.input_ids.device
    last = max(start + n for _, start, n, _ in reqs)
    span = max(SPAN_QUANTUM, -(-last // SPAN_QUANTUM) * SPAN_QUANTUM)
    span = min(span, max_len)
    per_request = torch.tensor([(slot, start, row0) for slot, start, _, row0 in reqs], device=dev)
    counts = torch.tensor([n for _, _, n, _ in reqs], device=dev)
    # Built here, in inference mode: dynamo guards on how a tensor was created, and batches
    # built outside inference mode (profiling, benchmarks) would compile anew.
    rows = torch.cat(
        [batch.input_ids[:, None], batch.positions[:, None],
         per_request.repeat_interleave(counts, 0)], 1,
    )
    if pad:
        n, slot = rows.shape[0], reqs[0][0]
        rows = torch.cat([rows, torch.tensor([[0, 0, slot, 0, n]], device=dev)])
    head_rows = batch.logits_rows.clone()
    span_t = torch.empty(span, dtype=torch.int8, device=dev)
    # Rows unbacked: a size the compiler may not guard on, so a step of one token runs the
    # same graph (the same kernels, the same numbers per row) as any other.
    torch._dynamo.decorators.mark_unbacked(rows, 0)
    for t in (span_t, head_rows):
        torch._dynamo.maybe_mark_dynamic(t, 0)
    return rows, span_t, head_rows
