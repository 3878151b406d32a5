"""Engine-facing proposers for the trained drafts (the drafts.base.Proposer protocol).

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

from drafts.base import DraftProposal, DraftRequest
from drafts.common import DraftConfig, FrozenTargetParts, filtered_probs, sample_from, target_parts
from drafts.dspark import DSparkModel, sts_apply
from drafts.eagle3 import Eagle3Model


@dataclass
class _State:
    pending: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer [1, kv, C, hd]
    ctx_len: int = 0  # positions folded into kv
    last_out: torch.Tensor | None = None  # EAGLE-3: draft output of the newest committed entry
    generator: torch.Generator | None = None


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
    """Shared request bookkeeping; subclasses implement _draft() for one request."""

    def __init__(
        self, model: nn.Module, parts: FrozenTargetParts, num_speculative_tokens: int
    ) -> None:
        self.model = model
        self.parts = parts
        self.cfg = cast(DraftConfig, model.cfg)
        self.aux_layer_ids: tuple[int, ...] = tuple(self.cfg.aux_layer_ids)
        self.max_draft_tokens = min(num_speculative_tokens, self.cfg.block_size)
        self.states: dict[str, _State] = {}
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype

    def observe(self, req_id: str, start_pos: int, hidden: torch.Tensor) -> None:
        st = self.states.setdefault(req_id, _State())
        if start_pos < st.ctx_len:  # the engine re-sent positions (e.g. recompute): roll back
            st.ctx_len = start_pos
            st.kv = _crop(st.kv, start_pos) if st.kv is not None else None
            st.last_out = None
        st.pending = [(s, h) for s, h in st.pending if s < start_pos]
        st.pending.append((start_pos, hidden.detach().to(self.device, self.dtype)))

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
        probs = filtered_probs(logits[None], p.temperature, p.top_k, p.top_p, p.min_p)
        if st.generator is None and p.seed is not None:
            st.generator = torch.Generator(device=logits.device).manual_seed(p.seed)
        return int(sample_from(probs, st.generator)), probs[0]

    @torch.no_grad()
    def propose(self, requests: Sequence[DraftRequest]) -> DraftProposal:
        ids, probs, confs = [], [], []
        for req in requests:
            st = self.states.setdefault(req.req_id, _State())
            k = max(0, min(req.num_draft_tokens, self.max_draft_tokens))
            toks, prb, conf = self._draft(req, st, k) if k > 0 else ([], [], None)
            ids.append(toks)
            greedy = req.params.temperature <= 0 or not toks
            probs.append(None if greedy else torch.stack(prb).float())  # type: ignore[arg-type]
            confs.append(conf)
        has_conf = any(c is not None for c in confs)
        return DraftProposal(ids, probs, [c or [] for c in confs] if has_conf else None)

    def _draft(
        self, req: DraftRequest, st: _State, k: int
    ) -> tuple[list[int], list[torch.Tensor | None], list[float] | None]:
        raise NotImplementedError


class DSparkProposer(_FeatureProposer):
    """DSpark (and DFlash when the model has no Markov/confidence head)."""

    model: DSparkModel

    def __init__(
        self, model: DSparkModel, parts: FrozenTargetParts, num_speculative_tokens: int
    ) -> None:
        super().__init__(model, parts, num_speculative_tokens)
        self.last_conf_logits: dict[str, list[float]] = {}  # raw head outputs, for calibration

    def _absorb(self, st: _State, anchor_pos: int) -> bool:
        start, feats = self._take_pending(st, anchor_pos)
        if feats is not None:
            pos = torch.arange(start, start + feats.shape[0], device=self.device)[None]
            st.kv = _append(st.kv, self.model.ctx_kv(self.model.context(feats[None]), pos))
            st.ctx_len = start + feats.shape[0]
        return st.ctx_len == anchor_pos and st.kv is not None

    def _draft(
        self, req: DraftRequest, st: _State, k: int
    ) -> tuple[list[int], list[torch.Tensor | None], list[float] | None]:
        m, g = self.model, self.cfg.block_size
        anchor_pos = len(req.token_ids) - 1
        if not self._absorb(st, anchor_pos):
            return [], [], None  # features of the context are missing: propose nothing
        block = torch.full((1, g), self.cfg.mask_token_id, dtype=torch.long, device=self.device)
        block[0, 0] = int(req.token_ids[-1])
        pos = torch.arange(anchor_pos, anchor_pos + g, device=self.device)[None]
        h = m.backbone(self.parts.embed(block), pos, st.kv or [], None)[0]
        base = self.parts.logits(h).float()
        prev = int(req.token_ids[-1])
        toks: list[int] = []
        prb: list[torch.Tensor | None] = []
        prev_ids = []
        for j in range(k):
            prev_ids.append(prev)
            logits = base[j]
            bias = m.markov_bias(torch.tensor([prev], device=self.device))
            if bias is not None:
                logits = logits + bias[0].float()
            prev, q = self._sample(logits, req, st)
            toks.append(prev)
            prb.append(q)
        z = m.conf_logits(h[:k], torch.tensor(prev_ids, device=self.device))
        if z is None:
            return toks, prb, None
        self.last_conf_logits[req.req_id] = z.float().tolist()
        return toks, prb, sts_apply(z.float(), self.cfg.sts_for(req.params.temperature)).tolist()


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

    def _draft(
        self, req: DraftRequest, st: _State, k: int
    ) -> tuple[list[int], list[torch.Tensor | None], list[float] | None]:
        if not self._absorb(req, st):
            return [], [], None
        assert st.kv is not None and st.last_out is not None
        m = self.model
        out, prefix = st.last_out, st.kv[0]
        anchor_pos = len(req.token_ids) - 1
        toks: list[int] = []
        prb: list[torch.Tensor | None] = []
        for j in range(k):
            logits = self.parts.logits(m.norm(out)[0, 0]).float()
            tok, q = self._sample(logits, req, st)
            toks.append(tok)
            prb.append(q)
            if j == k - 1:
                break
            pos = torch.tensor([[anchor_pos + j]], device=self.device)
            emb = self.parts.embed(torch.tensor([[tok]], device=self.device))
            out, kv = m.step(emb, out, pos, prefix, None)
            prefix = (torch.cat([prefix[0], kv[0]], 2), torch.cat([prefix[1], kv[1]], 2))
        return toks, prb, None


def make_proposer(model: nn.Module, target: Any, num_speculative_tokens: int) -> _FeatureProposer:
    emb = target.get_input_embeddings().weight
    model = model.to(device=emb.device, dtype=emb.dtype).eval()
    parts = target_parts(target)
    if isinstance(model, Eagle3Model):
        return Eagle3Proposer(model, parts, num_speculative_tokens)
    assert isinstance(model, DSparkModel)
    return DSparkProposer(model, parts, num_speculative_tokens)
