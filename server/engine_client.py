"""Bridge between the asyncio gateway and the engine.

The engine is anything `EngineThreadLike`: `scheduler.engine.EngineThread` (the engine on a
thread of this process) or `server.engine_process.EngineProcess` (the engine core in its own
process; its reader thread stands in for the engine thread). Either calls `on_step(outputs,
stats)` once per step from its own thread; we hop to the event loop with
`call_soon_threadsafe` and route each output to the `RequestGroup` that owns it (one group per
HTTP request: n choices x prompts engine requests sharing one asyncio.Queue). Everything below
`_dispatch` runs on the event loop, so the routing table needs no lock.

A group's engine requests stay registered until the engine confirms them finished (also after
an abort): the in-flight count used for admission control is therefore exact, and a slot counts
as busy until the engine really freed it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from scheduler.request import FinishReason, Request, RequestOutput, SamplingParams
from scheduler.stats import StepStats
from server.metrics import Metrics, RequestTimer

log = logging.getLogger(__name__)

OnStep = Callable[[list[RequestOutput], StepStats], None]


class EngineThreadLike(Protocol):
    """What the gateway uses of an engine that runs beside the event loop (a thread or a
    process): add/abort never block, shutdown drains."""

    def start(self) -> None: ...

    def add_request(self, req: Request) -> None: ...

    def abort(self, req_id: str) -> None: ...

    def shutdown(self, timeout_s: float) -> None: ...

    @property
    def is_alive(self) -> bool: ...

    @property
    def error(self) -> BaseException | None: ...

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...


ThreadFactory = Callable[[Any, OnStep], EngineThreadLike]


@dataclass(slots=True)
class _Route:
    group: RequestGroup
    index: int
    timer: RequestTimer | None  # None: not observed in metrics (warm-up)
    stopped: bool = False  # the gateway ended it (stop string): its ABORT counts as "stop"


class RequestGroup:
    """The engine requests behind one HTTP request. Iterate for (index, output); close to abort."""

    def __init__(self, client: AsyncEngineClient, req_ids: list[str]) -> None:
        self._client = client
        self.req_ids = req_ids
        self._queue: asyncio.Queue[tuple[int, RequestOutput]] = asyncio.Queue()
        self._unfinished = set(req_ids)
        self._aborted: set[str] = set()
        self.closed = False

    def _put(self, index: int, out: RequestOutput) -> None:
        if out.finished:
            self._unfinished.discard(out.req_id)
        if not self.closed:
            self._queue.put_nowait((index, out))

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        remaining = len(self.req_ids)
        while remaining:
            index, out = await self._queue.get()
            if out.finished:
                remaining -= 1
            yield index, out

    def abort(self, req_id: str) -> None:
        """Stop one engine request (a stop string ended it); its final output still arrives."""
        if req_id in self._unfinished and req_id not in self._aborted:
            self._aborted.add(req_id)
            self._client.abort(req_id, stopped=True)

    def close(self) -> None:
        """Abort whatever is still running. Idempotent; safe after normal completion."""
        if self.closed:
            return
        self.closed = True
        for req_id in list(self._unfinished - self._aborted):
            self._client.abort(req_id)


class AsyncEngineClient:
    def __init__(
        self,
        engine: Any,
        metrics: Metrics,
        thread_factory: ThreadFactory,
        *,
        max_running: int,
        max_queue: int,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self._thread_factory = thread_factory
        self.capacity = max_running + max_queue
        self._reserved = 0  # admitted requests still being tokenized (not yet submitted)
        self._routes: dict[str, _Route] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: EngineThreadLike | None = None
        self.eos_token_ids = frozenset(getattr(engine, "eos_token_ids", ()) or ())

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = self._thread_factory(self.engine, self._on_step)
        self._thread.start()

    @property
    def thread(self) -> EngineThreadLike:
        assert self._thread is not None, "engine client not started"
        return self._thread

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive

    @property
    def num_in_flight(self) -> int:
        return len(self._routes)

    async def shutdown(self, timeout_s: float) -> None:
        if self._thread is None:
            return
        await asyncio.to_thread(self._thread.shutdown, timeout_s)
        for _ in range(3):  # let already-scheduled _dispatch callbacks deliver final outputs
            await asyncio.sleep(0)
        self.fail_all("the server is shutting down")

    # --- requests -------------------------------------------------------------------------

    def has_room(self, n: int) -> bool:
        return self.num_in_flight + self._reserved + n <= self.capacity

    def try_reserve(self, n: int) -> bool:
        """Admission control: claim n engine requests' worth of room, or refuse."""
        if not self.has_room(n):
            return False
        self._reserved += n
        return True

    def release(self, n: int) -> None:
        self._reserved -= n

    def submit(
        self,
        items: list[tuple[str, list[int], SamplingParams]],
        arrival: float,
        observe: bool = True,
    ) -> RequestGroup:
        """Hand engine requests to the engine thread; returns their group. Never awaits."""
        group = RequestGroup(self, [req_id for req_id, _, _ in items])
        thread = self.thread
        for index, (req_id, prompt_ids, params) in enumerate(items):
            timer = RequestTimer(self.metrics, arrival) if observe else None
            self._routes[req_id] = _Route(group, index, timer)
            thread.add_request(
                Request(req_id, prompt_ids, params, arrival_s=arrival, eos_token_ids=self.eos_token_ids)
            )
        return group

    def abort(self, req_id: str, stopped: bool = False) -> None:
        route = self._routes.get(req_id)
        if self._thread is not None and route is not None:
            route.stopped = route.stopped or stopped
            self._thread.abort(req_id)

    def fail_all(self, message: str) -> None:
        """Finish every registered request with an ERROR output (the engine can no longer)."""
        for req_id, route in list(self._routes.items()):
            out = RequestOutput(req_id, [], FinishReason.ERROR, error=message)
            self._deliver(req_id, route, out, time.monotonic())

    # --- engine thread -> event loop ------------------------------------------------------

    def _on_step(self, outputs: list[RequestOutput], stats: StepStats) -> None:
        """Runs on the engine thread: only hand the data over."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._dispatch, outputs, stats)
        except RuntimeError:  # the loop closed between the check and the call (shutdown)
            pass

    def _dispatch(self, outputs: list[RequestOutput], stats: StepStats) -> None:
        self.metrics.observe_step(stats)
        now = time.monotonic()
        for out in outputs:
            route = self._routes.get(out.req_id)
            if route is not None:
                self._deliver(out.req_id, route, out, now)

    def _deliver(self, req_id: str, route: _Route, out: RequestOutput, now: float) -> None:
        if route.timer is not None:
            route.timer.on_output(out, now, stopped=route.stopped)
        if out.finished:
            del self._routes[req_id]
        route.group._put(route.index, out)
