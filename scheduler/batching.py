"""Continuous batching: which requests run this step, with how many tokens each.

Pure Python (no torch, no asyncio, no I/O); tests drive it with hand-written StepResults.

The counter rule (vLLM v1): a request needs `num_tokens - num_computed_tokens` more tokens of
KV. `schedule()` hands out the step's token budget so requests catch up:

    1. running requests that are decoding (exactly one uncomputed token: the anchor) get 1 token
       each, first, so admitting new work never stalls a stream;
    2. running requests still prefilling get the next chunk of their prompt;
    3. waiting requests are admitted while a KV slot is free and budget remains, FIFO, their
       first chunk possibly partial (chunked prefill). With a prefix cache (`prefix`), an
       admitted prompt's stored start counts as computed: the runner copies it in.

Draft tokens are added afterwards by the engine (they need the proposer and the verify policy)
within whatever budget is left. Structured requests (`SamplingParams.structured`) also own a
grammar matcher here (`grammars`, set by the engine when its runner applies token masks), as
they own a KV slot: `num_valid_drafts` cuts their drafts, `token_masks` gives the runner the
allowed tokens at each verify position, and `update()` advances the matcher past what was
emitted (rolling back rejected drafts) and stops the request when its grammar is complete. `update()` applies the runner's result: advance
`num_computed_tokens` past the computed tokens and the *accepted* drafts only (that is the whole
KV rollback), append the new tokens, and stop on EOS, stop ids, max_tokens or max_model_len.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from scheduler.kv_slots import KVSlotManager
from scheduler.plan import RequestResult, ScheduledRequest, StepPlan, StepResult
from scheduler.prefix_cache import PrefixIndex
from scheduler.request import FinishReason, Request, RequestOutput, TokenLogprob

if TYPE_CHECKING:
    import numpy as np

    from scheduler.grammar import GrammarManager

FaultHook = Callable[[Request], None]


class ContinuousBatcher:
    def __init__(
        self,
        max_num_seqs: int,
        max_model_len: int,
        max_num_batched_tokens: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        self.kv = KVSlotManager(max_num_seqs, max_model_len)
        self.clock = clock
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # resident (own a KV slot), in admission order
        self.fault_hook: FaultHook | None = None  # test hook: raising fails that request only
        self.grammars: GrammarManager | None = None  # None: structured requests are refused
        self.prefix: PrefixIndex | None = None  # None: no prefix caching
        # Requests that finished in the last update, with the blocks of their text (prompt and
        # output) for the runner to store before their slots are reused: a conversation's
        # next turn starts with all of it (take_finished_blocks).
        self._finished_blocks: list[tuple[int, list[tuple[int, int]]]] = []

    # -- intake ---------------------------------------------------------------------------
    def add(self, req: Request) -> RequestOutput | None:
        """Queue a request; returns a finished output right away if it can never run."""
        if req.num_prompt_tokens >= self.max_model_len:
            req.finish_reason = FinishReason.LENGTH
            return self._output(req, [])
        if req.params.structured is not None:
            error = self._add_grammar(req)
            if error is not None:
                req.finish_reason, req.error = FinishReason.ERROR, error
                return self._output(req, [])
        self.waiting.append(req)
        return None

    def _add_grammar(self, req: Request) -> str | None:
        from scheduler.grammar import GrammarError

        if self.grammars is None:
            return "structured output is not supported by this engine"
        assert req.params.structured is not None
        try:
            self.grammars.add(req.req_id, req.params.structured)
        except GrammarError as exc:
            return f"invalid structured output constraint: {exc}"
        return None

    def abort(self, req_id: str) -> RequestOutput | None:
        for req in self.waiting:
            if req.req_id == req_id:
                self.waiting.remove(req)
                req.finish_reason = FinishReason.ABORT
                self._release(req)
                return self._output(req, [])
        for req in self.running:
            if req.req_id == req_id:
                req.finish_reason = FinishReason.ABORT
                self._release(req)
                return self._output(req, [])
        return None

    def fail_all(self, message: str) -> list[RequestOutput]:
        """The engine is going down: finish every request with an error."""
        outputs = []
        for req in [*self.running, *self.waiting]:
            req.finish_reason, req.error = FinishReason.ERROR, message
            if self.grammars is not None:
                self.grammars.release(req.req_id)
            outputs.append(self._output(req, []))
        self.running.clear()
        self.waiting.clear()
        return outputs

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # -- schedule -------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        prefilling: list[Request] = []
        for req in self.running:
            if req.num_uncomputed_tokens == 1 and budget > 0:
                scheduled.append(ScheduledRequest(req, 1))
                budget -= 1
            elif req.num_uncomputed_tokens > 1:
                prefilling.append(req)
        for req in prefilling:
            if budget == 0:
                break
            scheduled.append(self._prefill_chunk(req, budget))
            budget -= scheduled[-1].num_new_tokens
        while self.waiting and budget > 0:
            slot = self.kv.try_allocate()
            if slot is None:
                break  # requests wait for a free KV slot
            req = self.waiting.popleft()
            req.slot = slot
            req.first_scheduled_s = self.clock()
            self.running.append(req)
            prefix_ids = self.prefix.match(req.prompt_ids) if self.prefix is not None else []
            scheduled.append(self._prefill_chunk(req, budget, prefix_ids))
            budget -= scheduled[-1].num_new_tokens
        return StepPlan(scheduled)

    def _prefill_chunk(
        self, req: Request, budget: int, prefix_ids: list[int] | None = None
    ) -> ScheduledRequest:
        """The next chunk of a prompt (the first one after the stored blocks `prefix_ids`), and
        the prefix cache's claims on the blocks it completes."""
        num_prefix = 0
        if prefix_ids:
            assert self.prefix is not None
            num_prefix = len(prefix_ids) * self.prefix.block_size
            req.num_computed_tokens = req.num_cached_tokens = num_prefix
        s = ScheduledRequest(req, min(req.num_uncomputed_tokens, budget))
        s.prefix_block_ids, s.num_prefix_tokens = prefix_ids or [], num_prefix
        if self.prefix is not None and s.start_pos < req.num_prompt_tokens:
            s.save_blocks = self.prefix.claim(req.prompt_ids, s.start_pos + s.num_new_tokens)
        return s

    def max_draft_tokens(self, s: ScheduledRequest) -> int:
        """Most drafts worth verifying for a sampling request: room in max_tokens and the cache."""
        req = s.req
        room_in_output = req.remaining_tokens - 1  # the bonus token always comes on top
        room_in_cache = self.max_model_len - req.num_tokens
        return max(0, min(room_in_output, room_in_cache))

    def num_valid_drafts(self, req: Request, draft_ids: list[int]) -> int:
        """How many of the drafts (a prefix) the request's grammar allows; all without one."""
        if self.grammars is None or req.req_id not in self.grammars:
            return len(draft_ids)
        return self.grammars.num_valid(req.req_id, draft_ids)

    def token_masks(self, plan: StepPlan) -> list[np.ndarray | None] | None:
        """Per scheduled request, the grammar bitmask of each verify position ([1 + k, words],
        see scheduler/grammar.py) or None; None for the whole plan when nothing is constrained.
        Call once per step, after the drafts are attached."""
        grammars = self.grammars
        if grammars is None or not len(grammars):
            return None
        wanted = [
            i for i, s in enumerate(plan.scheduled) if s.samples and s.req.req_id in grammars
        ]
        if not wanted:
            return None
        rows = grammars.step_masks(
            [(plan.scheduled[i].req.req_id, plan.scheduled[i].draft_ids) for i in wanted]
        )
        masks: list[np.ndarray | None] = [None] * len(plan.scheduled)
        for i, r in zip(wanted, rows):
            masks[i] = r
        return masks

    # -- update ---------------------------------------------------------------------------
    def update(self, plan: StepPlan, result: StepResult) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        now = self.clock()
        for s, r in zip(plan.scheduled, result.results, strict=True):
            req = s.req
            if req.is_finished:  # aborted while the step ran
                continue
            try:
                if self.fault_hook is not None:
                    self.fault_hook(req)
                if r.error is not None:
                    raise RuntimeError(r.error)
                out = self._apply(s, r, now)
            except Exception:  # noqa: BLE001 - isolate one request's failure
                req.finish_reason = FinishReason.ERROR
                req.error = "internal error while processing this request"
                self._release(req)
                outputs.append(self._output(req, []))
                continue
            if out is not None:
                outputs.append(out)
        return outputs

    def _apply(self, s: ScheduledRequest, r: RequestResult, now: float) -> RequestOutput | None:
        req = s.req
        samples = s.samples  # read before the counters move
        req.num_computed_tokens += s.num_new_tokens + r.num_accepted_drafts
        if not samples:
            return None  # a prefill chunk: nothing to emit yet
        if s.draft_ids:
            req.spec.num_drafts += 1
            req.spec.num_draft_tokens += len(s.draft_ids)
            req.spec.num_accepted_tokens += r.num_accepted_drafts
        grammars = self.grammars
        if grammars is not None and req.req_id not in grammars:
            grammars = None
        if grammars is not None:
            grammars.commit(req.req_id, r.num_accepted_drafts, r.token_ids)
        emitted: list[int] = []
        for token in r.token_ids:
            emitted.append(token)
            req.append_output([token])
            reason = self._stop_reason(req, token)
            if reason is not None:
                req.finish_reason = reason
                break
        if grammars is not None and not req.is_finished and grammars.is_terminated(req.req_id):
            req.finish_reason = FinishReason.STOP  # the grammar is complete: nothing may follow
        if req.first_token_s is None and emitted:
            req.first_token_s = now
        logprobs = r.logprobs[: len(emitted)] if r.logprobs is not None else None
        if req.is_finished:
            if self.prefix is not None and req.slot is not None:
                claims = self.prefix.claim(req.all_token_ids, req.num_computed_tokens)
                self._finished_blocks.append((req.slot, claims))
            self._release(req)
        return self._output(req, emitted, logprobs)

    def take_finished_blocks(self) -> list[tuple[int, list[tuple[int, int]]]]:
        """(its freed slot, (block id, first position) to store) for each request
        the last update finished; the engine has the runner copy them out before the next
        schedule hands the slots out again, then calls blocks_stored()."""
        taken, self._finished_blocks = self._finished_blocks, []
        return taken

    def blocks_stored(self) -> None:
        """The runner stored every block claimed since the last call (the step's prefill chunks
        after its forward, finished requests' after update): match() may hand them out."""
        if self.prefix is not None:
            self.prefix.mark_ready()

    def _stop_reason(self, req: Request, token: int) -> FinishReason | None:
        # Before min_tokens the runner masks EOS and stop ids; a runner that cannot (the fake
        # one) still does not stop early.
        if req.num_output_tokens > req.params.min_tokens:  # its output index reached min_tokens
            if token in req.params.stop_token_ids:
                return FinishReason.STOP
            if not req.params.ignore_eos and token in req.eos_token_ids:
                return FinishReason.STOP
        if req.num_output_tokens >= req.params.max_tokens or req.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    # -- helpers --------------------------------------------------------------------------
    def _release(self, req: Request) -> None:
        if self.grammars is not None:
            self.grammars.release(req.req_id)
        if req.slot is not None:
            self.kv.free(req.slot)
            req.slot = None
        if req in self.running:
            self.running.remove(req)

    def _output(
        self, req: Request, new_ids: list[int], logprobs: list[TokenLogprob] | None = None
    ) -> RequestOutput:
        out = RequestOutput(
            req_id=req.req_id,
            new_token_ids=new_ids,
            finish_reason=req.finish_reason,
            logprobs=logprobs,
            num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=req.num_output_tokens,
            num_cached_tokens=req.num_cached_tokens,
            spec=req.spec if req.spec.num_drafts else None,
            error=req.error,
        )
        if req.is_finished and req.first_scheduled_s is not None:
            out.queue_time_s = req.first_scheduled_s - req.arrival_s
            if req.first_token_s is not None:
                out.prefill_time_s = req.first_token_s - req.first_scheduled_s
        return out
