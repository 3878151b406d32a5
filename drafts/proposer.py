"""Engine-facing proposers for the trained drafts (the scheduler.drafter.Proposer protocol).

Per request the proposer keeps the draft's own KV cache of committed context. Target features
arrive through observe() (possibly several chunks between two propose() calls); they are folded
into the cache lazily in propose(), where the committed token ids are known.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from drafts.checkpoint import draft_config, load_draft
from drafts.common import DraftConfig, FrozenTargetParts, target_parts
from drafts.dspark import DSparkModel
from drafts.eagle3 import Eagle3Model
from drafts.fused_backbone import FusedBackbone
from drafts.registry import get, resolve
from drafts.vocab import DraftHead
from scheduler.drafter import DraftProposal, DraftRequest, Proposer
from scheduler.linear import FrozenLinear, Product, frozen_copy
from scheduler.quant import q8_product, serves_native_kernels
from scheduler.sampling import process_logits, sample_rows


@dataclass
class _State:
    pending: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer [1, kv, C, hd]
    ctx_len: int = 0  # positions folded into kv
    last_out: torch.Tensor | None = None  # EAGLE-3: draft output of the newest committed entry
    generator: torch.Generator | None = None


# A request that can draft this step: (its index in the batch, request, state, tokens to draft).
_Ready = tuple[int, DraftRequest, _State, int]


def _crop(
    kv: list[tuple[torch.Tensor, torch.Tensor]], n: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(k[:, :, :n], v[:, :, :n]) for k, v in kv]


def _append(
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None, new: list[tuple[torch.Tensor, torch.Tensor]]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if kv is None:
        return new
    return [
        (torch.cat([k, nk], 2), torch.cat([v, nv], 2))
        for (k, v), (nk, nv) in zip(kv, new, strict=True)
    ]


class _FeatureProposer:
    """Shared request bookkeeping and the batch loop; subclasses fold features into their draft
    cache (_absorb) and draft a ready batch (_draft_batch)."""

    def __init__(
        self,
        model: nn.Module,
        parts: FrozenTargetParts,
        head: DraftHead,
        num_speculative_tokens: int,
        leave_out: Sequence[nn.ModuleList] = (),
        product: Product = FrozenLinear,
    ) -> None:
        # The drafter only runs forward: fastest weight layout (leave_out: served otherwise).
        self.model = frozen_copy(model, leave_out, product)
        self.parts = parts
        self.head = head
        self.cfg = cast(DraftConfig, model.cfg)
        self.aux_layer_ids: tuple[int, ...] = tuple(self.cfg.aux_layer_ids)
        self.max_draft_tokens = min(num_speculative_tokens, self.cfg.block_size)
        self.states: dict[str, _State] = {}
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype

    def observe(self, req_id: str, start_pos: int, hidden: torch.Tensor) -> None:
        st = self.states.get(req_id)
        if st is None:
            st = self.states[req_id] = _State()
        if start_pos < st.ctx_len:  # the engine re-sent positions (e.g. recompute): roll back
            st.ctx_len = start_pos
            st.kv = _crop(st.kv, start_pos) if st.kv is not None else None
            st.last_out = None
        if st.pending and st.pending[-1][0] >= start_pos:  # re-sent: drop what it replaces
            st.pending = [(s, h) for s, h in st.pending if s < start_pos]
        if hidden.dtype != self.dtype or hidden.device != self.device:
            hidden = hidden.to(self.device, self.dtype)
        st.pending.append((start_pos, hidden))  # the runner's inference tensors: no graph

    def release(self, req_id: str) -> None:
        self.states.pop(req_id, None)

    def _take_pending(self, st: _State, upto: int) -> tuple[int, torch.Tensor | None]:
        """Contiguous pending features from st.ctx_len up to position `upto` (exclusive)."""
        st.pending.sort(key=lambda x: x[0])
        chunks, pos = [], st.ctx_len
        for s, h in st.pending:
            if s + h.shape[0] <= pos:
                continue
            if s > pos:
                break
            take = h[pos - s : upto - s]
            if take.shape[0]:
                chunks.append(take)
                pos += take.shape[0]
            if pos >= upto:
                break
        st.pending = [(s, h) for s, h in st.pending if s + h.shape[0] > pos]
        return st.ctx_len, (torch.cat(chunks) if chunks else None)

    def _sample(
        self, logits: torch.Tensor, req: DraftRequest, st: _State
    ) -> tuple[int, torch.Tensor | None]:
        p = req.params
        if p.temperature <= 0:
            return int(logits.argmax()), None
        probs = process_logits(logits[None], p)  # the filters the target's sampler applies
        if st.generator is None and p.seed is not None:
            st.generator = torch.Generator(device=logits.device).manual_seed(p.seed)
        return int(sample_rows(probs, st.generator)), probs[0]

    @torch.no_grad()
    def propose(self, requests: Sequence[DraftRequest]) -> DraftProposal:
        """All requests' drafts from batched draft forwards and batched LM-head products, so the
        weights are read once per forward rather than once per request; contexts of different
        lengths are right-padded and masked."""
        n = len(requests)
        ids: list[list[int]] = [[] for _ in range(n)]
        probs: list[torch.Tensor | None] = [None] * n
        confs: list[list[float] | None] = [None] * n
        ready = []
        for i, req in enumerate(requests):
            st = self.states.setdefault(req.req_id, _State())
            k = max(0, min(req.num_draft_tokens, self.max_draft_tokens))
            # No features for the whole context yet (e.g. mid-prefill): propose nothing.
            if k > 0 and self._absorb(req, st):
                ready.append((i, req, st, k))
        if ready:
            self._draft_batch(ready, ids, probs, confs)
        has_conf = any(c is not None for c in confs)
        return DraftProposal(ids, probs, [c or [] for c in confs] if has_conf else None)

    def _absorb(self, req: DraftRequest, st: _State) -> bool:
        """Fold pending features into the request's draft cache; True when it covers the context."""
        raise NotImplementedError

    def _draft_batch(
        self,
        ready: list[_Ready],
        ids: list[list[int]],
        probs: list[torch.Tensor | None],
        confs: list[list[float] | None],
    ) -> None:
        """Fill ids/probs/confs at index i for each ready (i, request, state, k)."""
        raise NotImplementedError

    def _sample_step(
        self,
        logits: torch.Tensor,
        ready: list[_Ready],
        step: int,
        dists: dict[int, list[torch.Tensor]],
    ) -> torch.Tensor:
        """[b, V_draft] logits of one draft position -> [b] target token ids: argmax, or a draw
        for sampling requests (their distributions, over the draft vocabulary, go to dists[row])."""
        nxt = logits.argmax(-1)
        for r, dist in dists.items():
            _, req, st, k = ready[r]
            if step < k:  # never draw past a request's k: its seeded generator must not drift
                tok, q = self._sample(logits[r], req, st)
                nxt[r] = tok
                dist.append(cast(torch.Tensor, q))
        return self.head.token_ids(nxt)

    def _write_drafts(
        self,
        ready: list[_Ready],
        toks: list[torch.Tensor],
        dists: dict[int, list[torch.Tensor]],
        ids: list[list[int]],
        probs: list[torch.Tensor | None],
    ) -> None:
        """Per-position [b] token tensors -> each request's first k drafts, and for sampling
        requests the distributions they were drawn from, over the full vocabulary."""
        tok_t = torch.stack(toks, 1).tolist()
        for r, (i, _, _, k) in enumerate(ready):
            ids[i] = tok_t[r][:k]
            if r in dists:
                probs[i] = self.head.full(torch.stack(dists[r]).float())

    def _padded_context(
        self, states: list[_State]
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None]:
        """Per-layer context K/V stacked to [b, kv, C_max, hd], and [b, C_max] True where a key
        is real (None when nothing is padded)."""
        lens = [st.ctx_len for st in states]
        if len(states) == 1:
            return cast(list, states[0].kv), None  # nothing to pad: every key is visible
        c_max = max(lens)
        kv = []
        for layer in range(len(cast(list, states[0].kv))):
            ks = [cast(list, st.kv)[layer][0][0] for st in states]
            vs = [cast(list, st.kv)[layer][1][0] for st in states]
            kv.append((_stack_padded(ks, c_max), _stack_padded(vs, c_max)))
        ctx_ok = (
            torch.arange(c_max, device=self.device)[None, :]
            < torch.tensor(lens, device=self.device)[:, None]
        )
        return kv, ctx_ok


def _sampling_rows(
    ready: list[_Ready],
) -> dict[int, list[torch.Tensor]]:
    """Rows of the ready batch that sample (not greedy), each with an empty distribution list."""
    return {r: [] for r, (_, req, _, _) in enumerate(ready) if req.params.temperature > 0}


def _attend_mask(ctx_ok: torch.Tensor | None, queries: int, own_keys: int) -> torch.Tensor | None:
    """[b, 1, queries, C_max + own_keys]: real context keys plus every key of the draft itself."""
    if ctx_ok is None:
        return None
    own = ctx_ok.new_ones(ctx_ok.shape[0], own_keys)
    return torch.cat([ctx_ok, own], 1)[:, None, None, :].expand(-1, -1, queries, -1)


class DSparkProposer(_FeatureProposer):
    """DSpark (and DFlash when the model has no Markov/confidence head)."""

    model: DSparkModel

    def __init__(
        self,
        model: DSparkModel,
        parts: FrozenTargetParts,
        head: DraftHead,
        num_speculative_tokens: int,
        product: Product = FrozenLinear,
    ) -> None:
        # The fused backbone serves the layers: a frozen copy of them would hold their weights
        # a second time.
        super().__init__(
            model, parts, head, num_speculative_tokens, leave_out=[model.layers], product=product
        )
        self.backbone = FusedBackbone(model.decoder_layers(), self.model.norm, self.cfg, product)
        self.last_conf_logits: dict[str, list[float]] = {}  # raw head outputs, for calibration

    def _absorb(self, req: DraftRequest, st: _State) -> bool:
        anchor_pos = len(req.token_ids) - 1
        start, feats = self._take_pending(st, anchor_pos)
        if feats is not None:
            pos = torch.arange(start, start + feats.shape[0], device=self.device)[None]
            st.kv = _append(st.kv, self.backbone.ctx_kv(self.model.context(feats[None]), pos))
            st.ctx_len = start + feats.shape[0]
        return st.ctx_len == anchor_pos and st.kv is not None

    def _draft_batch(
        self,
        ready: list[_Ready],
        ids: list[list[int]],
        probs: list[torch.Tensor | None],
        confs: list[list[float] | None],
    ) -> None:
        m, g, dev = self.model, self.cfg.block_size, self.device
        b = len(ready)
        anchors = torch.tensor([st.ctx_len for _, _, st, _ in ready], device=dev)
        block = torch.full((b, g), self.cfg.mask_token_id, dtype=torch.long, device=dev)
        block[:, 0] = torch.tensor([int(req.token_ids[-1]) for _, req, _, _ in ready], device=dev)
        pos = anchors[:, None] + torch.arange(g, device=dev)
        kv, ctx_ok = self._padded_context([st for _, _, st, _ in ready])
        h = self.backbone(self.parts.embed(block), pos, kv, _attend_mask(ctx_ok, g, g))  # [b, g, d]
        k_max = max(k for *_, k in ready)
        base = self.head.logits(h[:, :k_max])  # [b, k_max, V_draft]
        prev = block[:, 0]
        prev_ids, toks = [], []
        dists: dict[int, list[torch.Tensor]] = _sampling_rows(ready)
        for j in range(k_max):
            prev_ids.append(prev)
            logits = base[:, j]
            bias = self.head.markov_bias(m, prev)  # the Markov head: from the token just drafted
            if bias is not None:
                logits = logits + bias.float()
            nxt = self._sample_step(logits, ready, j, dists)
            toks.append(nxt)
            prev = nxt
        self._write_drafts(ready, toks, dists, ids, probs)
        z = m.conf_logits(h[:, :k_max], torch.stack(prev_ids, 1))
        if z is None:  # DFlash: no confidence head
            return
        for r, (i, req, _, k) in enumerate(ready):
            self.last_conf_logits[req.req_id] = z[r, :k].float().tolist()
            table = self.cfg.sts_for(req.params.temperature)
            confs[i] = table.apply(z[r, :k].float()).tolist()


def _stack_padded(tensors: list[torch.Tensor], length: int) -> torch.Tensor:
    """[kv, C_i, hd] tensors -> [b, kv, length, hd], zero-padded along C."""
    out = tensors[0].new_zeros(len(tensors), tensors[0].shape[0], length, tensors[0].shape[2])
    for i, t in enumerate(tensors):
        out[i, :, : t.shape[1]] = t
    return out


class Eagle3Proposer(_FeatureProposer):
    model: Eagle3Model

    def _absorb(self, req: DraftRequest, st: _State) -> bool:
        """Fold entries j (feature of j paired with token j+1) for every j before the anchor."""
        anchor_pos = len(req.token_ids) - 1
        start, feats = self._take_pending(st, anchor_pos)
        if feats is not None:
            n = feats.shape[0]
            tok = torch.tensor([list(req.token_ids[start + 1 : start + 1 + n])], device=self.device)
            pos = torch.arange(start, start + n, device=self.device)[None]
            c = st.ctx_len
            mask = torch.ones((n, c + n), dtype=torch.bool, device=self.device)
            mask[:, c:] = torch.tril(mask[:, c:])
            prefix = st.kv[0] if st.kv is not None else None
            out, kv = self.model.step(
                self.parts.embed(tok), self.model.fc(feats[None]), pos, prefix, mask[None, None]
            )
            st.kv = _append(st.kv, [kv])
            st.ctx_len = start + n
            st.last_out = out[:, -1:]
        return st.ctx_len == anchor_pos and st.last_out is not None

    def _draft_batch(
        self,
        ready: list[_Ready],
        ids: list[list[int]],
        probs: list[torch.Tensor | None],
        confs: list[list[float] | None],
    ) -> None:
        """The chains of all requests advance together: each draft position is one draft-layer
        pass and one LM-head product for the whole batch."""
        m, dev = self.model, self.device
        states = [st for _, _, st, _ in ready]
        (prefix,), ctx_ok = self._padded_context(states)
        out = torch.cat([cast(torch.Tensor, st.last_out) for st in states])  # [b, 1, d]
        anchors = torch.tensor([len(req.token_ids) - 1 for _, req, _, _ in ready], device=dev)
        k_max = max(k for *_, k in ready)
        dists = _sampling_rows(ready)
        toks = []
        for j in range(k_max):
            logits = self.head.logits(m.norm(out[:, 0]))  # [b, V_draft]
            nxt = self._sample_step(logits, ready, j, dists)
            toks.append(nxt)
            if j == k_max - 1:
                break
            out, kv = m.step(
                self.parts.embed(nxt[:, None]),
                out,
                (anchors + j)[:, None],
                prefix,
                _attend_mask(ctx_ok, 1, j + 1),
            )
            prefix = (torch.cat([prefix[0], kv[0]], 2), torch.cat([prefix[1], kv[1]], 2))
        self._write_drafts(ready, toks, dists, ids, probs)


def draft_product(target: Any) -> Product:
    """How a draft multiplies its weights beside this target: through the int8 kernel where the
    target's products run through the native kernels (`q8_product`: half the bytes a draft
    call reads, tau unchanged; docs/benchmarks.md), else the dense frozen layout."""
    return q8_product if serves_native_kernels(target) else FrozenLinear


def make_proposer(model: nn.Module, target: Any, num_speculative_tokens: int) -> _FeatureProposer:
    """The engine proposer of a trained draft: the class its drafter's spec names."""
    proposer_class = get(draft_config(model).method).proposer_class
    if proposer_class is None:
        raise ValueError(f"drafter {draft_config(model).method!r} names no proposer class")
    emb = target.get_input_embeddings().weight
    model = model.to(device=emb.device, dtype=emb.dtype).eval()
    product = draft_product(target)
    head = DraftHead(model, target, product)
    proposer: _FeatureProposer = resolve(proposer_class)(
        model, target_parts(target), head, num_speculative_tokens, product=product
    )
    return proposer


def load_trained_proposer(target: Any, checkpoint: str | None, k: int) -> Proposer:
    """Serving entry of a draft trained by `drafts.train` (checkpoint: its saved folder)."""
    if checkpoint is None:
        raise ValueError("this drafter ships no checkpoint: pass --draft-checkpoint")
    return make_proposer(load_draft(checkpoint), target, k)
