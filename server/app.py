"""FastAPI application: lifespan (load -> warm up -> serve -> drain) and guards.

The HTTP listener comes up at once; the model loads in the background so `/health` (liveness)
answers 200 during a long load while `/ready` and `/v1/*` answer 503 until the engine runs and
one warm-up generation went through it. The engine runs in its own process
(`server/engine_process.py`, what `python -m server` starts) or on a thread of this one; the app
sees both through `EngineThreadLike`. A monitor task watches it: if it dies, `/health` turns
503, every pending request gets an error, and `on_fatal` is called (`python -m server` then
stops uvicorn and exits non-zero so an orchestrator restarts it).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scheduler.request import SamplingParams
from server.engine_client import AsyncEngineClient, EngineThreadLike, OnStep, ThreadFactory
from server.engine_process import EngineProcess
from server.errors import (
    APIError,
    error_response,
    install_error_handlers,
    log_refusal,
    overloaded,
)
from server.metrics import Metrics
from server.routes import router
from server.settings import ServerSettings
from server.state import AppState
from server.tokenizer import ChatTokenizer

log = logging.getLogger(__name__)

MONITOR_INTERVAL_S = 0.2
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


def default_thread_factory(engine: Any, on_step: OnStep) -> EngineThreadLike:
    """An engine process already runs its loop and only needs the callback; an LLMEngine built
    in this process gets a thread of its own."""
    if isinstance(engine, EngineProcess):
        return engine.attach(on_step)
    from scheduler.engine import EngineThread

    return EngineThread(engine, on_step)


def create_app(
    settings: ServerSettings,
    engine_factory: Callable[[], Any],
    *,
    thread_factory: ThreadFactory | None = None,
    on_fatal: Callable[[str], None] | None = None,
) -> FastAPI:
    """`engine_factory` builds (or returns) an LLMEngine, or launches an EngineProcess; it runs
    in a worker thread."""
    engine_config = settings.engine
    metrics = Metrics(
        settings.served_model_name or engine_config.model,
        max_model_len=engine_config.max_model_len,
        max_spec_tokens=max(engine_config.num_speculative_tokens, 1),
    )
    state = AppState(
        settings, metrics, engine_factory, thread_factory or default_thread_factory, on_fatal
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.create_task(_load_and_watch(state))
        try:
            yield
        finally:
            loader.cancel()
            await asyncio.gather(loader, return_exceptions=True)
            if state.client is not None:
                # uvicorn already waited for open responses (the drain); cut what is left.
                await state.client.shutdown(timeout_s=min(settings.drain_timeout_s, 5.0))

    app = FastAPI(
        title="dspark-serve",
        summary="OpenAI-compatible LLM serving with speculative decoding",
        version="0.1.0",
        lifespan=lifespan,
        strict_content_type=False,  # `curl -d '{...}'` without a JSON content type still works
    )
    app.state.dspark = state
    install_error_handlers(app, metrics.reject)
    app.include_router(router)
    app.add_middleware(GuardMiddleware, state=state)  # type: ignore[arg-type]
    return app


async def _load_and_watch(state: AppState) -> None:
    s = state.settings
    try:
        engine = await asyncio.to_thread(state.engine_factory)
        state.tokenizer = ChatTokenizer(engine.tokenizer)
        state.model_name = s.served_model_name or engine.model_name
        state.max_model_len = int(engine.max_model_len)
        state.structured_output = bool(engine.structured_output)
        state.metrics.model_name = state.model_name
        client = AsyncEngineClient(
            engine,
            state.metrics,
            state.thread_factory,
            max_running=engine.num_kv_slots,
            max_queue=s.max_queue,
        )
        client.start()
        state.client = client
        if s.warmup:
            await _warmup(state, client)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.exception("model load or warm-up failed")
        _die(state, f"startup failed: {type(exc).__name__}")
        return
    state.ready = True
    log.info("ready: serving %s (max_model_len %d)", state.model_name, state.max_model_len)
    while client.is_alive:
        await asyncio.sleep(MONITOR_INTERVAL_S)
        th = client.thread
        state.metrics.set_queue(th.num_running, th.num_waiting)
    err = client.thread.error
    if err is None:
        return  # a clean shutdown stopped the thread
    log.error("engine died: %r", err)
    client.fail_all("the engine stopped unexpectedly")
    _die(state, "engine died")


async def _warmup(state: AppState, client: AsyncEngineClient) -> None:
    assert state.tokenizer is not None
    ids = state.tokenizer.encode("Hello") or [0]
    group = client.submit(
        [("warmup-0", ids, SamplingParams(max_tokens=2, temperature=0.0))],
        time.monotonic(),
        observe=False,
    )
    async for _, out in group:
        if out.error:
            raise RuntimeError("warm-up generation failed")


def _die(state: AppState, reason: str) -> None:
    state.ready = False
    state.fatal = reason
    if state.on_fatal is not None:
        state.on_fatal(reason)


class GuardMiddleware:
    """API-key check on /v1/*, a full-server check and the body size limit, before any parsing.

    They run ahead of FastAPI so an unauthenticated, oversized or surplus request costs no JSON
    parse (requests with n > 1 are checked again, exactly, once their body is known).
    The key is compared with hmac.compare_digest (constant time for equal lengths).
    """

    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app = app
        self.state = state
        key = state.settings.api_key
        self._expected = f"Bearer {key}".encode() if key else None
        self._limit = state.settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        path: str = scope["path"]
        if self._expected is not None and (path == "/v1" or path.startswith("/v1/")):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                self.state.metrics.reject("auth")
                err = APIError(401, "invalid or missing API key", code="invalid_api_key")
                await self._refuse(err, scope, receive, send)
                return
        client = self.state.client
        if path in GENERATION_PATHS and client is not None and not client.has_room(1):
            # Full: refuse before reading or parsing the body, the cheapest possible answer.
            err = overloaded(f"the server is at capacity ({client.capacity} requests); retry later")
            self.state.metrics.reject("queue_full")
            await self._refuse(err, scope, receive, send)
            return
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self._limit:
            self.state.metrics.reject("body_too_large")
            err = APIError(413, "request body too large", code="request_too_large")
            await self._refuse(err, scope, receive, send)
            return
        await self.app(scope, self._limited(receive), send)

    @staticmethod
    async def _refuse(err: APIError, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer a refusal made before FastAPI, logged like the ones made inside it."""
        log_refusal(scope["method"], scope["path"], err)
        await error_response(err)(scope, receive, send)

    def _limited(self, receive: Receive) -> Receive:
        """Count streamed (chunked) bodies too; FastAPI turns the exception into a 413."""
        seen = 0
        limit = self._limit

        async def wrapped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413)
            return message

        return wrapped
