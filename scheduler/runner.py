"""StepPlan -> one target forward -> lossless verification -> StepResult.

The only place where a step's plan becomes tensors. For each scheduled request the packed
query is its new committed tokens followed by its draft tokens; a sampling request needs
logits at the anchor (its last committed token) and at every draft, i.e. 1 + k rows.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import torch

from scheduler.model import TargetModel, build_packed_batch
from scheduler.plan import RequestResult, ScheduledRequest, StepPlan, StepResult
from scheduler.sampling import top_logprobs, verify_draft


class ModelRunner(Protocol):
    """What the engine needs from a runner (TorchModelRunner here, FakeRunner in tests)."""

    aux_layer_ids: tuple[int, ...]

    def execute(self, plan: StepPlan) -> StepResult: ...

    def release(self, req_id: str) -> None: ...


class TorchModelRunner:
    def __init__(
        self,
        hf_model: Any,  # a transformers *ForCausalLM
        num_slots: int,
        max_model_len: int,
        aux_layer_ids: tuple[int, ...] = (),
        seed: int = 0,
    ) -> None:
        self.model = TargetModel(hf_model, num_slots, max_model_len)
        self.device = self.model.device
        self.aux_layer_ids = aux_layer_ids
        self._seed_source = torch.Generator().manual_seed(seed)
        self._generators: dict[str, torch.Generator] = {}

    def release(self, req_id: str) -> None:
        self._generators.pop(req_id, None)

    def _generator(self, s: ScheduledRequest) -> torch.Generator:
        g = self._generators.get(s.req.req_id)
        if g is None:
            seed = s.req.params.seed
            if seed is None:
                seed = int(torch.randint(0, 2**62, (), generator=self._seed_source))
            g = torch.Generator(device=self.device).manual_seed(seed)
            self._generators[s.req.req_id] = g
        return g

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        t0 = time.perf_counter()
        queries: list[tuple[int, int, list[int]]] = []
        logits_rows: list[int] = []
        row_starts: list[int] = []
        row = 0
        for s in plan.scheduled:
            ids = s.input_ids()
            assert s.req.slot is not None, "scheduled requests own a KV slot"
            queries.append((s.req.slot, s.start_pos, ids))
            row_starts.append(row)
            if s.samples:
                anchor = row + s.num_new_tokens - 1
                logits_rows.extend(range(anchor, anchor + 1 + len(s.draft_ids)))
            row += len(ids)
        batch = build_packed_batch(queries, logits_rows, self.device)
        logits, aux = self.model.forward(batch, self.aux_layer_ids)

        results: list[RequestResult] = []
        aux_hidden: list[torch.Tensor | None] = []
        first = 0
        for s, row0 in zip(plan.scheduled, row_starts):
            result = RequestResult()
            if s.samples:
                n = 1 + len(s.draft_ids)
                try:
                    result = self._verify(s, logits[first : first + n])
                except Exception as exc:  # noqa: BLE001 - fail this request, not the step
                    result = RequestResult(error=f"{type(exc).__name__} during sampling")
                first += n
            results.append(result)
            if aux is not None:
                # Features of the positions that now have valid KV: new tokens + accepted drafts.
                num_committed = s.num_new_tokens + result.num_accepted_drafts
                aux_hidden.append(aux[row0 : row0 + num_committed])
        forward_time_s = time.perf_counter() - t0
        return StepResult(results, forward_time_s, aux_hidden if aux is not None else None)

    def _verify(self, s: ScheduledRequest, logits: torch.Tensor) -> RequestResult:
        """logits: [1 + k, vocab] at the anchor and each draft position."""
        req, params = s.req, s.req.params
        generator = None if params.is_greedy else self._generator(s)
        accepted, tokens = verify_draft(
            logits, params, req.prompt_ids, req.output_counts, s.draft_ids, s.draft_probs, generator
        )
        logprobs = None
        if params.logprobs is not None:
            logprobs = top_logprobs(logits[: len(tokens)], tokens, params.logprobs)
        return RequestResult(tokens, accepted, logprobs)
