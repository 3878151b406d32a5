"""A scripted stand-in for scheduler.engine.EngineThread, for the few gateway cases the real
engines cannot produce on demand: exact token scripts with several tokens per step and known
speculation counters, and a record of the Request objects the gateway built.

It honours the engine seam (docs/structures.md): add/abort are thread-safe, on_step runs on the
engine thread after every step that did work, and every request gets exactly one finished output.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from scheduler.request import FinishReason, Request, RequestOutput, SpecStats
from scheduler.stats import StepStats

Script = Callable[[Request], list[int]]


class ScriptedEngine:
    """Engine attributes the gateway reads, plus the script each request's output follows."""

    def __init__(
        self,
        tokenizer: Any,
        script: Script,
        *,
        max_model_len: int = 256,
        num_slots: int = 4,
        step_s: float = 0.002,
        tokens_per_step: int = 1,
        spec: bool = False,
        model_name: str = "scripted",
    ) -> None:
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset({tokenizer.eos_token_id})
        self.num_kv_slots = num_slots
        self.structured_output = True  # the script stands in for a model that follows constraints
        self.script = script
        self.step_s = step_s
        self.tokens_per_step = tokens_per_step
        self.spec = spec
        self.fault_hook: Callable[[Request], None] | None = None


class _Live:
    def __init__(self, req: Request, tokens: list[int]) -> None:
        self.req = req
        self.tokens = tokens
        self.pos = 0
        self.spec = SpecStats()


class ScriptedThread:
    def __init__(self, engine: ScriptedEngine, on_step: Callable[..., None]) -> None:
        self.engine = engine
        self.on_step = on_step
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._running: dict[str, _Live] = {}
        self._waiting: deque[_Live] = deque()
        self._thread = threading.Thread(target=self._run, daemon=True, name="scripted-engine")
        self.error: BaseException | None = None

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        self._thread.start()

    def add_request(self, req: Request) -> None:
        self._inbox.put(("add", req))

    def abort(self, req_id: str) -> None:
        self._inbox.put(("abort", req_id))

    def shutdown(self, timeout_s: float) -> None:
        self._inbox.put(("stop", None))
        self._thread.join(timeout_s + 1)

    def _stats(self) -> StepStats:
        n = len(self._running)
        return StepStats(self.engine.step_s, self.engine.step_s, 0.0, n, len(self._waiting), n, n,
                         0, n, self.engine.num_kv_slots)

    def _finish(self, live: _Live, reason: FinishReason, error: str | None = None) -> RequestOutput:
        self._running.pop(live.req.req_id, None)
        return RequestOutput(live.req.req_id, [], reason, num_prompt_tokens=len(live.req.prompt_ids),
                             num_output_tokens=live.pos, error=error)

    def _run(self) -> None:
        try:
            while True:
                outputs: list[RequestOutput] = []
                idle = not self._running and not self._waiting
                try:
                    item = self._inbox.get(timeout=0.05) if idle else self._inbox.get_nowait()
                    while True:
                        kind, payload = item
                        if kind == "stop":
                            for live in [*self._running.values(), *self._waiting]:
                                outputs.append(self._finish(live, FinishReason.ABORT))
                            self._waiting.clear()
                            if outputs:
                                self.on_step(outputs, self._stats())
                            return
                        if kind == "add":
                            self._waiting.append(_Live(payload, self.engine.script(payload)))
                        else:
                            outputs.extend(self._abort(payload))
                        item = self._inbox.get_nowait()
                except queue.Empty:
                    pass
                while self._waiting and len(self._running) < self.engine.num_kv_slots:
                    live = self._waiting.popleft()
                    self._running[live.req.req_id] = live
                if self._running:
                    time.sleep(self.engine.step_s)
                    outputs.extend(self._step())
                if outputs:
                    self.on_step(outputs, self._stats())
        except BaseException as exc:  # noqa: BLE001 - report, as the real thread does
            self.error = exc
            lost = [*self._running.values(), *self._waiting]
            self.on_step([self._finish(x, FinishReason.ERROR, "engine failure") for x in lost],
                         self._stats())

    def _abort(self, req_id: str) -> list[RequestOutput]:
        for live in list(self._waiting):
            if live.req.req_id == req_id:
                self._waiting.remove(live)
                return [self._finish(live, FinishReason.ABORT)]
        live_or_none = self._running.get(req_id)
        return [self._finish(live_or_none, FinishReason.ABORT)] if live_or_none else []

    def _step(self) -> list[RequestOutput]:
        outs = []
        for live in list(self._running.values()):
            req = live.req
            try:
                if self.engine.fault_hook is not None:
                    self.engine.fault_hook(req)
            except Exception:  # noqa: BLE001 - one request fails, not the step
                outs.append(self._finish(live, FinishReason.ERROR, "internal error"))
                continue
            room = req.params.max_tokens - live.pos
            new = live.tokens[live.pos : live.pos + min(self.engine.tokens_per_step, room)]
            live.pos += len(new)
            reason = None
            if new and new[-1] in self.engine.eos_token_ids and not req.params.ignore_eos:
                reason = FinishReason.STOP
            elif live.pos >= req.params.max_tokens or live.pos >= len(live.tokens):
                reason = FinishReason.LENGTH
            if self.engine.spec and len(new) > 1:
                live.spec.num_drafts += 1
                live.spec.num_draft_tokens += self.engine.tokens_per_step - 1
                live.spec.num_accepted_tokens += len(new) - 1
            if reason is not None:
                self._running.pop(req.req_id)
            outs.append(RequestOutput(req.req_id, new, reason, num_prompt_tokens=len(req.prompt_ids),
                                      num_output_tokens=live.pos,
                                      spec=SpecStats(live.spec.num_drafts, live.spec.num_draft_tokens,
                                                     live.spec.num_accepted_tokens)
                                      if self.engine.spec else None))
        return outs
