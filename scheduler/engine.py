"""The engine loop: schedule -> speculator.attach -> one target forward + verify -> update ->
record -> emit.

`LLMEngine.step()` is synchronous and single-threaded; `EngineLoop` drives it from an inbox of
commands (add, abort, drain), on a thread of the HTTP process (`EngineThread`) or in the engine
process (server/engine_core.py), so the HTTP server's event loop never blocks on torch.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from scheduler.batching import ContinuousBatcher, FaultHook
from scheduler.plan import StepPlan, StepResult
from scheduler.request import FinishReason, Request, RequestOutput, SamplingParams
from scheduler.speculator import SpeculationStep, Speculator
from scheduler.stats import StepStats

if TYPE_CHECKING:
    from scheduler.runner import ModelRunner

log = logging.getLogger(__name__)

# The throughput profile and the drafters' index sizes reach the step stats at most this often:
# gauges that move slowly, whose reading cost the engine ~45 us a step at 16 streams (the
# suffix index sums its requests' sizes) and whose setting cost the HTTP process 37 of the 84 us
# it spends on a step's metrics (27 profile points, embedded model).
GAUGE_INTERVAL_S = 1.0


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
        self._gauges_at = -math.inf  # when the stats last carried the slow gauges
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
    def structured_output(self) -> bool:
        """Whether the runner applies grammar masks (else constrained requests are refused)."""
        return self.batcher.grammars is not None

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
        t_mask = self.clock()
        masks = self.batcher.token_masks(plan)  # after drafting: one mask per verify position
        mask_time_s = self.clock() - t_mask if masks is not None else 0.0
        if masks is None:
            result = self.runner.execute(plan)
        else:  # only runners that apply token masks get structured requests (see __init__)
            result = self.runner.execute(plan, masks)  # type: ignore[call-arg]
        outputs = self.batcher.update(plan, result)
        for slot, blocks in self.batcher.take_finished_blocks():
            self.runner.store_blocks(slot, blocks)  # type: ignore[attr-defined]
        self.batcher.blocks_stored()
        step_time_s = self.clock() - t0
        if self.speculator is not None:
            self.speculator.record(plan, result, spec, step_time_s)
        for out in outputs:
            if out.finished:
                self._release(out.req_id)
        stats = self._stats(plan, result, spec, step_time_s)
        stats.mask_time_s = mask_time_s
        return outputs, stats

    def _release(self, req_id: str) -> None:
        self.runner.release(req_id)
        if self.speculator is not None:
            self.speculator.release(req_id)

    def _stats(
        self, plan: StepPlan, result: StepResult, spec: SpeculationStep, step_time_s: float
    ) -> StepStats:
        kv = self.batcher.kv
        profile, memory = [], {}
        now = self.clock()
        if self.speculator is not None and now - self._gauges_at >= GAUGE_INTERVAL_S:
            self._gauges_at = now
            profile, memory = self.speculator.profile_table(), self.speculator.memory()
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
            profile_explored=spec.explored,
            num_admitted=spec.num_admitted,
            num_admitted_feeding_drafter=spec.num_admitted_feeding_drafter,
            num_accepted_tokens=spec.num_accepted,
            accepted_per_position=spec.accepted_per_position,
            verify_lengths=spec.verify_lengths,
            predicted_per_position=spec.predicted_per_position,
            realised_per_position=spec.realised_per_position,
            count_per_position=spec.count_per_position,
            profile=profile,
            drafters=spec.per_drafter,
            draft_memory=memory,
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
    """Stats for a delivery without a step (aborts, refusals): no work, the queue as it is."""
    batcher = engine.batcher
    return StepStats(0.0, 0.0, 0.0, len(batcher.running), len(batcher.waiting), 0, 0, 0,
                     batcher.kv.num_used, batcher.kv.num_slots)


OnStep = Callable[[list[RequestOutput], StepStats], None]
# What reaches the loop: ("add", Request), ("abort", req_id) or ("drain", timeout_s).
Command = tuple[str, Any]


class Inbox(Protocol):
    def get(self, timeout_s: float) -> Command | None:
        """The next command, waiting up to timeout_s for one (0: do not wait); None if none came."""
        ...


class QueueInbox:
    """An in-process inbox: any thread puts, the engine loop gets."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Command] = queue.SimpleQueue()

    def put(self, command: Command) -> None:
        self._queue.put(command)

    def get(self, timeout_s: float) -> Command | None:
        try:
            return self._queue.get(timeout=timeout_s) if timeout_s > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None


class EngineLoop:
    """drain the inbox -> step -> on_step(outputs, stats), until a drain has finished.

    One loop for both homes of the engine: `EngineThread` runs it on a thread of the HTTP
    process, the engine process (server/engine_core.py) on its main thread with an inbox fed
    by a socket. (Step it from the thread that built the engine where you can: a second
    thread runs torch's parallel regions in a second OpenMP team, and on a small CPU each
    step is then several times slower; see server/engine_core.py.) Every step that did work, or any command that finished a request, makes
    exactly one on_step call, so each step's stats reach the exporter once.
    """

    def __init__(
        self, engine: LLMEngine, inbox: Inbox, on_step: OnStep, idle_wait_s: float = 0.05
    ) -> None:
        self.engine = engine
        self.inbox = inbox
        self.on_step = on_step
        self.idle_wait_s = idle_wait_s

    def run(self) -> BaseException | None:
        """None after a drain; else the exception that stopped the loop, once every request
        has been given an ERROR output."""
        drain_deadline: float | None = None
        try:
            while True:
                outputs: list[RequestOutput] = []
                idle = not self.engine.has_work and drain_deadline is None
                drain_deadline = self._drain_inbox(outputs, idle, drain_deadline)
                if drain_deadline is not None and (
                    not self.engine.has_work or time.monotonic() > drain_deadline
                ):
                    outputs.extend(self._abort_all())
                    if outputs:
                        self.on_step(outputs, empty_stats(self.engine))
                    return None
                stepped = self.engine.step() if self.engine.has_work else None
                if stepped is not None:
                    outputs.extend(stepped[0])
                    self.on_step(outputs, stepped[1])
                elif outputs:
                    self.on_step(outputs, empty_stats(self.engine))
        except BaseException as exc:
            log.exception("engine loop died")
            try:
                self.on_step(self.engine.batcher.fail_all("engine failure"), empty_stats(self.engine))
            except Exception:
                log.exception("could not report the engine failure to clients")
            return exc

    def _drain_inbox(
        self, outputs: list[RequestOutput], idle: bool, drain_deadline: float | None
    ) -> float | None:
        command = self.inbox.get(self.idle_wait_s if idle else 0.0)
        while command is not None:
            kind, payload = command
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
            elif kind == "drain" and drain_deadline is None:
                drain_deadline = time.monotonic() + payload
            command = self.inbox.get(0.0)
        return drain_deadline

    def _refuse(self, req: Request) -> RequestOutput:
        req.finish_reason = FinishReason.ABORT
        return RequestOutput(req.req_id, [], FinishReason.ABORT, num_prompt_tokens=len(req.prompt_ids))

    def _abort_all(self) -> list[RequestOutput]:
        ids = [r.req_id for r in [*self.engine.batcher.running, *self.engine.batcher.waiting]]
        return [out for i in ids if (out := self.engine.abort(i)) is not None]


class EngineThread:
    """Runs the EngineLoop on a daemon thread of this process; add/abort are thread-safe."""

    def __init__(self, engine: LLMEngine, on_step: OnStep, idle_wait_s: float = 0.05) -> None:
        self.engine = engine
        self._inbox = QueueInbox()
        self._loop = EngineLoop(engine, self._inbox, on_step, idle_wait_s)
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
        self._inbox.put(("drain", timeout_s))
        self._thread.join(timeout_s + 5.0)

    def _run(self) -> None:
        self.error = self._loop.run()
