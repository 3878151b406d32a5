"""Test-double drafters: an adversarial random one and an oracle that knows the answer.

Both vary the number of drafts per request (0..gamma, by request id), so batches mix
different verify lengths, and both can propose from a real distribution so the sampling path
(rejection sampling with q) is exercised as well as the greedy one.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch

from scheduler.draft_gate import DraftGate
from scheduler.drafter import DraftProposal, DraftRequest, Proposer
from scheduler.sampling import process_logits
from scheduler.speculator import Speculator
from scheduler.verify_policy import FixedLength, VerifyPolicy


def make_speculator(
    proposer: Proposer, policy: VerifyPolicy | None = None, gate: DraftGate | None = None
) -> Speculator:
    """A Speculator without an online estimator or a profile to keep current, so the tests see
    exactly the confidences and costs they script. Default policy: verify every proposed draft."""
    return Speculator(proposer, policy or FixedLength(proposer.max_draft_tokens), gate=gate)


def _k_for(req: DraftRequest, gamma: int) -> int:
    return min(req.num_draft_tokens, zlib.crc32(req.req_id.encode()) % (gamma + 1))


class RandomProposer:
    """Drafts uniformly random tokens (greedy) or samples a random distribution q (sampling)."""

    aux_layer_ids: tuple[int, ...] = ()

    def __init__(self, vocab_size: int, gamma: int = 7, seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self.max_draft_tokens = gamma
        self.gen = torch.Generator().manual_seed(seed)

    def propose(self, requests: Sequence[DraftRequest]) -> DraftProposal:
        ids, probs = [], []
        for r in requests:
            k = _k_for(r, self.max_draft_tokens)
            if r.params.is_greedy:
                ids.append(torch.randint(0, self.vocab_size, (k,), generator=self.gen).tolist())
                probs.append(None)
                continue
            logits = torch.randn(k, self.vocab_size, generator=self.gen) * 3
            q = process_logits(logits, r.params) if k else torch.zeros(0, self.vocab_size)
            ids.append([int(torch.multinomial(row, 1, generator=self.gen)) for row in q])
            probs.append(q)
        return DraftProposal(ids, probs)

    def observe(self, req_id: str, start_pos: int, hidden: object) -> None:
        pass

    def release(self, req_id: str) -> None:
        pass


class OracleProposer:
    """Proposes the reference continuation (known per prompt); every few tokens it lies."""

    aux_layer_ids: tuple[int, ...] = ()

    def __init__(self, references: dict[tuple[int, ...], list[int]], gamma: int = 7) -> None:
        self.references = references  # prompt ids -> reference output ids
        self.max_draft_tokens = gamma
        self.calls = 0

    def propose(self, requests: Sequence[DraftRequest]) -> DraftProposal:
        out = []
        for r in requests:
            tokens = list(r.token_ids)
            prompt, ref = next(
                (p, ref) for p, ref in self.references.items() if tuple(tokens[: len(p)]) == p
            )
            done = len(tokens) - len(prompt)
            draft = ref[done : done + _k_for(r, self.max_draft_tokens)]
            self.calls += 1
            if draft and self.calls % 5 == 0:
                draft[-1] = (draft[-1] + 1) % 1000  # an occasional wrong guess
            out.append(draft)
        return DraftProposal(out)

    def observe(self, req_id: str, start_pos: int, hidden: object) -> None:
        pass

    def release(self, req_id: str) -> None:
        pass
