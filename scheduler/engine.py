"""The engine loop: schedule -> speculator.attach -> one target forward + verify -> update ->
record -> emit.

`LLMEngine.step()` is synchronous and single-threaded; `EngineThread` runs it on its own thread
behind a thread-safe inbox so the HTTP server's event loop never blocks on torch.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from scheduler.batching import ContinuousBatcher, FaultHook
from scheduler.plan import StepPlan, StepResult
from scheduler.request import FinishReason, Request, RequestOutput, SamplingParams
from scheduler.speculator import SpeculationStep, Speculator
from scheduler.stats import StepStats

if TYPE_CHECKING:
    from scheduler.runner import ModelRunner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    """What the front end needs to know about the target: its name, tokenizer and stop ids."""

    name: str
    tokenizer: Any  # a transformers tokenizer (chat template, incremental detokenizing)
    eos_token_ids: frozenset[int]


class LLMEngine:
    def __init__(
        self,
        runner: ModelRunner,
        batcher: ContinuousBatcher,
        model: ServedModel,
        speculator: Speculator | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runner = runner
        self.batcher = batcher
        self.model = model
        self.speculator = speculator
        self.clock = clock
        if getattr(runner, "applies_token_masks", False):
            from scheduler.grammar import GrammarManager

            batcher.grammars = GrammarManager(model.tokenizer, model.eos_token_ids)

    @property
    def model_name(self) -> str:
        return self.model.name

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.batcher.max_model_len

    @property
    def num_kv_slots(self) -> int:
        """Requests the engine keeps resident at once."""
        return self.batcher.kv.num_slots

    @property
    def fault_hook(self) -> FaultHook | None:
        return self.batcher.fault_hook

    @fault_hook.setter
    def fault_hook(self, hook: FaultHook | None) -> None:
        self.batcher.fault_hook = hook

    @property
    def has_work(self) -> bool:
        return self.batcher.has_work

    def add_request(self, req: Request) -> RequestOutput | None:
        if not req.eos_token_ids:
            req.eos_token_ids = self.model.eos_token_ids
        if not req.arrival_s:
            req.arrival_s = self.clock()
        return self.batcher.add(req)

    def abort(self, req_id: str) -> RequestOutput | None:
        out = self.batcher.abort(req_id)
        if out is not None:
            self._release(req_id)
        return out

    def step(self) -> tuple[list[RequestOutput], StepStats] | None:
        t0 = self.clock()
        plan = self.batcher.schedule()
        if plan.is_empty:
            return None
        spec = SpeculationStep()
        if self.speculator is not None:
            spec = self.speculator.attach(plan, self.batcher)
        masks = self.batcher.token_masks(plan)  # after drafting: one mask per verify position
        if masks is None:
            result = self.runner.execute(plan)
        else:  # only runners that apply token masks get structured requests (see __init__)
            result = self.runner.execute(plan, masks)  # type: ignore[call-arg]
        outputs = self.batcher.update(plan, result)
        step_time_s = self.clock() - t0
        if self.speculator is not None:
            self.speculator.record(plan, result, spec, step_time_s)
        for out in outputs:
            if out.finished:
                self._release(out.req_id)
        return outputs, self._stats(plan, result, spec, step_time_s)

    def _release(self, req_id: str) -> None:
        self.runner.release(req_id)
        if self.speculator is not None:
            self.speculator.release(req_id)

    def _stats(
        self, plan: StepPlan, result: StepResult, spec: SpeculationStep, step_time_s: float
    ) -> StepStats:
        kv = self.batcher.kv
        return StepStats(
            step_time_s=step_time_s,
            forward_time_s=result.forward_time_s,
            draft_time_s=spec.draft_time_s,
            num_running=len(self.batcher.running),
            num_waiting=len(self.batcher.waiting),
            num_scheduled_requests=len(plan.scheduled),
            num_scheduled_tokens=plan.num_tokens,
            # Every new token is prompt work except the anchor of a request that samples.
            num_prefill_tokens=sum(s.num_new_tokens - s.samples for s in plan.scheduled),
            num_kv_slots_used=kv.num_used,
            num_kv_slots_total=kv.num_slots,
            num_drafts=spec.num_drafts,
            num_draft_tokens=spec.num_draft_tokens,
            num_draft_tokens_proposed=spec.num_proposed,
            draft_skipped=spec.skipped,
            num_accepted_tokens=spec.num_accepted,
            accepted_per_position=spec.accepted_per_position,
            verify_lengths=spec.verify_lengths,
            predicted_per_position=spec.predicted_per_position,
            realised_per_position=spec.realised_per_position,
            count_per_position=spec.count_per_position,
            profile=self.speculator.profile_table() if self.speculator is not None else [],
        )

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[list[int]]:
        """Offline batch generation (tests, benchmarks, draft training data): output ids."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        outputs: dict[str, list[int]] = {}
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            req_id = f"offline-{id(self)}-{i}"
            outputs[req_id] = []
            done = self.add_request(Request(req_id, list(prompt), p))
            if done is not None:
                outputs[req_id].extend(done.new_token_ids)
        while self.has_work:
            stepped = self.step()
            for out in stepped[0] if stepped else []:
                outputs[out.req_id].extend(out.new_token_ids)
        return list(outputs.values())


def empty_stats(engine: LLMEngine) -> StepStats:
    kv = engine.batcher.kv
    return StepStats(0.0, 0.0, 0.0, 0, 0, 0, 0, 0, kv.num_used, kv.num_slots)


OnStep = Callable[[list[RequestOutput], StepStats], None]


class EngineThread:
    """Runs LLMEngine.step() in a loop on a daemon thread; add/abort are thread-safe."""

    def __init__(self, engine: LLMEngine, on_step: OnStep, idle_wait_s: float = 0.05) -> None:
        self.engine = engine
        self.on_step = on_step
        self.idle_wait_s = idle_wait_s
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.error: BaseException | None = None

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    @property
    def num_running(self) -> int:
        return len(self.engine.batcher.running)

    @property
    def num_waiting(self) -> int:
        return len(self.engine.batcher.waiting)

    def start(self) -> None:
        self._thread.start()

    def add_request(self, req: Request) -> None:
        self._inbox.put(("add", req))

    def abort(self, req_id: str) -> None:
        self._inbox.put(("abort", req_id))

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Let running requests finish for up to timeout_s, then abort the rest and stop."""
        self._inbox.put(("drain", time.monotonic() + timeout_s))
        self._thread.join(timeout_s + 5.0)

    def _run(self) -> None:
        drain_deadline: float | None = None
        try:
            while True:
                outputs: list[RequestOutput] = []
                block = not self.engine.has_work and drain_deadline is None
                drain_deadline = self._drain_inbox(outputs, block, drain_deadline)
                if drain_deadline is not None and (
                    not self.engine.has_work or time.monotonic() > drain_deadline
                ):
                    outputs.extend(self._abort_all())
                    if outputs:
                        self.on_step(outputs, empty_stats(self.engine))
                    return
                stepped = self.engine.step() if self.engine.has_work else None
                if stepped is not None:
                    outputs.extend(stepped[0])
                    self.on_step(outputs, stepped[1])
                elif outputs:
                    self.on_step(outputs, empty_stats(self.engine))
        except BaseException as exc:
            log.exception("engine thread died")
            self.error = exc
            try:
                self.on_step(self.engine.batcher.fail_all("engine failure"), empty_stats(self.engine))
            except Exception:
                log.exception("could not report the engine failure to clients")

    def _drain_inbox(
        self, outputs: list[RequestOutput], block: bool, drain_deadline: float | None
    ) -> float | None:
        try:
            item = self._inbox.get(timeout=self.idle_wait_s) if block else self._inbox.get_nowait()
        except queue.Empty:
            return drain_deadline
        while True:
            kind, payload = item
            if kind == "add":
                # Shutting down: new work is refused (finished as aborted) right away.
                refused = self._refuse(payload) if drain_deadline is not None else None
                done = refused or self.engine.add_request(payload)
                if done is not None:
                    outputs.append(done)
            elif kind == "abort":
                aborted = self.engine.abort(payload)
                if aborted is not None:
                    outputs.append(aborted)
            elif kind == "drain":
                drain_deadline = payload
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return drain_deadline

    def _refuse(self, req: Request) -> RequestOutput:
        req.finish_reason = FinishReason.ABORT
        return RequestOutput(req.req_id, [], FinishReason.ABORT, num_prompt_tokens=len(req.prompt_ids))

    def _abort_all(self) -> list[RequestOutput]:
        ids = [r.req_id for r in [*self.engine.batcher.running, *self.engine.batcher.waiting]]
        return [out for i in ids if (out := self.engine.abort(i)) is not None]

