"""StepPlan -> one target forward -> lossless verification -> StepResult.

The only place where a step's plan becomes tensors. For each scheduled request the packed
query is its new committed tokens followed by its draft tokens; a sampling request needs
logits at the anchor (its last committed token) and at every draft, i.e. 1 + k rows.
Structured requests bring a grammar bitmask per row (`token_masks`, from the batcher); with
min_tokens the stop tokens are refused too; both mask the logits before verification.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Protocol

import torch

from scheduler.model import StepOptions, TargetModel, build_packed_batch
from scheduler.plan import RequestResult, ScheduledRequest, StepPlan, StepResult
from scheduler.prefix_store import PrefixStore
from scheduler.sampling import (
    mask_logits,
    refuse_stop_tokens,
    top_logprobs,
    unpack_bitmask,
    verify_draft,
)

if TYPE_CHECKING:
    import numpy as np

class ModelRunner(Protocol):
    """What the engine needs from a runner (TorchModelRunner here, FakeRunner in tests).

    A runner that sets `applies_token_masks` takes `token_masks` in execute(); the engine
    serves structured requests only with such a runner.
    """

    aux_layer_ids: tuple[int, ...]

    def execute(self, plan: StepPlan) -> StepResult: ...

    def release(self, req_id: str) -> None: ...


class TorchModelRunner:
    applies_token_masks = True

    def __init__(
        self,
        hf_model: Any,  # a transformers *ForCausalLM
        num_slots: int,
        max_model_len: int,
        aux_layer_ids: tuple[int, ...] = (),
        seed: int = 0,
        step_options: StepOptions | None = None,  # --compile-step, --kv-dtype (build.py)
    ) -> None:
        self.model = TargetModel(hf_model, num_slots, max_model_len, step_options)
        self.device = self.model.device
        self.aux_layer_ids = aux_layer_ids
        self._seed_source = torch.Generator().manual_seed(seed)
        self._generators: dict[str, torch.Generator] = {}
        self.prefix: PrefixStore | None = None  # set by enable_prefix_cache

    def enable_prefix_cache(self, num_blocks: int, block_size: int) -> PrefixStore:
        """Store prompt blocks for the batcher's PrefixIndex of the same shape."""
        feature_dim = len(self.aux_layer_ids) * self.model.hidden_size
        self.prefix = PrefixStore(self.model, num_blocks, block_size, feature_dim)
        return self.prefix

    def release(self, req_id: str) -> None:
        self._generators.pop(req_id, None)

    def store_blocks(self, slot: int, blocks: list[tuple[int, int]]) -> None:
        """Store a request's claimed blocks from its slot: those a prefill chunk completed
        (`save_blocks`), or a finished request's (ContinuousBatcher.take_finished_blocks)
        before any step reuses the slot."""
        assert self.prefix is not None
        self.prefix.save(slot, blocks)

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
    def execute(
        self, plan: StepPlan, token_masks: list[np.ndarray | None] | None = None
    ) -> StepResult:
        """token_masks: per scheduled request, its grammar bitmask [1 + k, words] or None."""
        t0 = time.perf_counter()
        queries: list[tuple[int, int, list[int]]] = []
        logits_rows: list[int] = []
        row_starts: list[int] = []
        row = 0
        prefix_features: dict[int, torch.Tensor | None] = {}
        for i, s in enumerate(plan.scheduled):
            ids = s.input_ids()
            assert s.req.slot is not None, "scheduled requests own a KV slot"
            if s.prefix_block_ids:
                assert self.prefix is not None, "prefix hits come from a runner that stores them"
                prefix_features[i] = self.prefix.load(s.req.slot, s.prefix_block_ids)
            queries.append((s.req.slot, s.start_pos, ids))
            row_starts.append(row)
            if s.samples:
                anchor = row + s.num_new_tokens - 1
                logits_rows.extend(range(anchor, anchor + 1 + len(s.draft_ids)))
            row += len(ids)
        batch = build_packed_batch(queries, logits_rows, self.device)
        logits, aux = self.model.forward(batch, self.aux_layer_ids)
        if aux is not None and self.prefix is not None:
            # Every row, like the KV cache: a block serves later requests, which may draft.
            self.prefix.write_features(batch, aux)

        results: list[RequestResult] = []
        aux_hidden: list[torch.Tensor | None] = []
        first = 0
        for i, (s, row0) in enumerate(zip(plan.scheduled, row_starts)):
            result = RequestResult()
            if s.samples:
                n = 1 + len(s.draft_ids)
                bitmask = token_masks[i] if token_masks is not None else None
                try:
                    result = self._verify(s, logits[first : first + n], bitmask)
                except Exception as exc:  # noqa: BLE001 - fail this request, not the step
                    result = RequestResult(error=f"{type(exc).__name__} during sampling")
                first += n
            results.append(result)
            if aux is not None:
                # Handed to the drafter only where it may draft for the request: the features
                # of the positions that now have valid KV (new tokens + accepted drafts).
                hidden = None
                if s.req.feeds_drafter is not False:
                    hidden = aux[row0 : row0 + s.num_new_tokens + result.num_accepted_drafts]
                    loaded = prefix_features.get(i)
                    if loaded is not None:
                        hidden = torch.cat([loaded, hidden])
                aux_hidden.append(hidden)
        for s in plan.scheduled:  # the prompt blocks this step's chunks completed
            if s.save_blocks:
                assert s.req.slot is not None
                self.store_blocks(s.req.slot, s.save_blocks)
        forward_time_s = time.perf_counter() - t0
        return StepResult(results, forward_time_s, aux_hidden if aux is not None else None)

    def _verify(
        self, s: ScheduledRequest, logits: torch.Tensor, bitmask: np.ndarray | None
    ) -> RequestResult:
        """logits: [1 + k, vocab] at the anchor and each draft position."""
        req, params = s.req, s.req.params
        # Masked once: verification samples from it, logprobs report it (as vLLM does).
        logits = mask_logits(logits, self._allowed(s, logits.shape, bitmask))
        generator = None if params.is_greedy else self._generator(s)
        accepted, tokens = verify_draft(
            logits, params, req.prompt_ids, req.output_counts, s.draft_ids, s.draft_probs, generator
        )
        logprobs = None
        if params.logprobs is not None:
            logprobs = top_logprobs(logits[: len(tokens)], tokens, params.logprobs)
        return RequestResult(tokens, accepted, logprobs)

    def _allowed(
        self, s: ScheduledRequest, shape: torch.Size, bitmask: np.ndarray | None
    ) -> torch.Tensor | None:
        """[1 + k, vocab] bool: the grammar's tokens, less stop tokens before min_tokens."""
        req, params = s.req, s.req.params
        needs_min_tokens = req.num_output_tokens < params.min_tokens
        if bitmask is None and not needs_min_tokens:
            return None
        if bitmask is not None:
            allowed = unpack_bitmask(torch.from_numpy(bitmask), shape[-1]).to(self.device)
        else:
            allowed = torch.ones(shape, dtype=torch.bool, device=self.device)
        if needs_min_tokens:
            stop_ids = set(params.stop_token_ids)
            if not params.ignore_eos:
                stop_ids |= req.eos_token_ids
            allowed = refuse_stop_tokens(allowed, params, req.num_output_tokens, sorted(stop_ids))
        return allowed
