"""A small OpenAI-style streaming server that simulates a batched speculative engine.

Used to test the load-test tools without the real model. Timing is simulated with asyncio
sleeps, so the numbers are known in advance:

- one engine step costs `step_base_ms + step_per_token_ms * tokens_through_target`;
- a new request's first step prefills its prompt (`prefill_per_token_ms` per prompt token) and
  emits its first token;
- a decoding request verifies `1 + spec_k` tokens per step and emits `1 + a` tokens, where `a`
  (accepted drafts) is truncated-geometric with per-position acceptance `accept_prob`;
- at most `max_num_seqs` requests run; the rest queue (so the server saturates).

Each step's tokens go out as one SSE chunk (as a real speculative server does), then a usage
chunk carrying `metrics.speculative_decoding`, then `[DONE]`.

    python tests/loadtest/loadtest_stub.py --port 8123 --spec-k 3 --accept-prob 0.8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse


@dataclass
class SimConfig:
    step_base_ms: float = 20.0
    step_per_token_ms: float = 1.0
    prefill_per_token_ms: float = 0.1
    max_num_seqs: int = 16
    spec_k: int = 0
    accept_prob: float = 0.7
    warmup_s: float = 0.3
    seed: int = 0


@dataclass(eq=False)
class SimRequest:
    prompt_tokens: int
    max_tokens: int
    out: asyncio.Queue[list[int] | None] = field(default_factory=asyncio.Queue)
    emitted: int = 0
    prefilled: bool = False
    drafts: int = 0
    draft_tokens: int = 0
    accepted: int = 0


class SimEngine:
    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.wake = asyncio.Event()
        self.generation_tokens = 0
        self.counters = {"drafts": 0, "draft_tokens": 0, "accepted": 0}

    def submit(self, req: SimRequest) -> None:
        self.waiting.append(req)
        self.wake.set()

    def _accepted(self) -> int:
        a = 0
        while a < self.cfg.spec_k and self.rng.random() < self.cfg.accept_prob:
            a += 1
        return a

    async def run(self) -> None:
        while True:
            if not self.running and not self.waiting:
                self.wake.clear()
                await self.wake.wait()
            while self.waiting and len(self.running) < self.cfg.max_num_seqs:
                self.running.append(self.waiting.popleft())
            tokens = 0
            prefill_ms = 0.0
            gains: list[tuple[SimRequest, int]] = []
            for r in self.running:
                if not r.prefilled:
                    prefill_ms += r.prompt_tokens * self.cfg.prefill_per_token_ms
                    tokens += 1
                    gains.append((r, 1))
                    continue
                k = min(self.cfg.spec_k, r.max_tokens - r.emitted - 1)
                tokens += 1 + k
                a = 0
                if k > 0:
                    a = min(self._accepted(), k)
                    r.drafts += 1
                    r.draft_tokens += k
                    r.accepted += a
                gains.append((r, 1 + a))
            step_ms = self.cfg.step_base_ms + self.cfg.step_per_token_ms * tokens + prefill_ms
            await asyncio.sleep(step_ms / 1e3)
            for r, n in gains:
                r.prefilled = True
                n = min(n, r.max_tokens - r.emitted)
                r.out.put_nowait(list(range(r.emitted, r.emitted + n)))
                r.emitted += n
                self.generation_tokens += n
                if r.emitted >= r.max_tokens:
                    self.counters["drafts"] += r.drafts
                    self.counters["draft_tokens"] += r.draft_tokens
                    self.counters["accepted"] += r.accepted
                    r.out.put_nowait(None)
                    self.running.remove(r)


def make_app(cfg: SimConfig) -> FastAPI:
    engine = SimEngine(cfg)
    started = time.monotonic()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(engine.run())
        yield
        task.cancel()

    app = FastAPI(lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        ok = time.monotonic() - started >= cfg.warmup_s
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        c = engine.counters
        lines = [
            f"dspark_generation_tokens_total {engine.generation_tokens}",
            f"dspark_spec_decode_num_drafts_total {c['drafts']}",
            f"dspark_spec_decode_num_draft_tokens_total {c['draft_tokens']}",
            f"dspark_spec_decode_num_accepted_tokens_total {c['accepted']}",
            f"dspark_num_requests_running {len(engine.running)}",
            f"dspark_num_requests_waiting {len(engine.waiting)}",
        ]
        return PlainTextResponse("\n".join(lines) + "\n")

    async def _generate(body: dict[str, Any], chat: bool) -> StreamingResponse | JSONResponse:
        text = json.dumps(body.get("messages") if chat else body.get("prompt"))
        req = SimRequest(
            prompt_tokens=max(1, len(text) // 4), max_tokens=int(body.get("max_tokens", 16))
        )
        if not body.get("stream"):
            return JSONResponse({"error": {"message": "stub streams only"}}, status_code=400)
        engine.submit(req)
        rid = f"stub-{uuid.uuid4().hex[:8]}"
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None = None) -> str:
            if chat:
                delta = {} if text is None else {"content": text}
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish}
            return "data: " + json.dumps({"id": rid, "object": kind, "choices": [choice]}) + "\n\n"

        async def events() -> AsyncIterator[str]:
            if chat:
                yield (
                    "data: "
                    + json.dumps(
                        {
                            "id": rid,
                            "object": kind,
                            "choices": [
                                {"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}
                            ],
                        }
                    )
                    + "\n\n"
                )
            while (toks := await req.out.get()) is not None:
                yield chunk("".join(f" w{t}" for t in toks))
            yield chunk(None, "length")
            spec = {
                "num_drafts": req.drafts,
                "num_draft_tokens": req.draft_tokens,
                "num_accepted_tokens": req.accepted,
                "mean_acceptance_length": 1 + req.accepted / req.drafts if req.drafts else 1.0,
            }
            usage = {
                "prompt_tokens": req.prompt_tokens,
                "completion_tokens": req.emitted,
                "total_tokens": req.prompt_tokens + req.emitted,
            }
            yield (
                "data: "
                + json.dumps(
                    {
                        "id": rid,
                        "object": kind,
                        "choices": [],
                        "usage": usage,
                        "metrics": {"speculative_decoding": spec},
                    }
                )
                + "\n\n"
            )
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await _generate(await request.json(), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await _generate(await request.json(), chat=False)

    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    for name, value in vars(SimConfig()).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    a = p.parse_args(argv)
    cfg = SimConfig(**{k: getattr(a, k) for k in vars(SimConfig())})
    uvicorn.run(make_app(cfg), host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
