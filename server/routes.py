"""HTTP endpoints. Thin: check readiness and model, admit, tokenize, submit, hand to serving.

Order of checks on /v1 generation routes (cheapest first, and admission before tokenizing so an
overloaded server spends nothing on requests it will refuse): auth and body size (middleware)
-> JSON + schema (FastAPI) -> ready -> model -> admission (429) -> tokenize -> context length.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from scheduler.grammar import check_structured
from scheduler.request import SamplingParams, StructuredOutput
from server.choices import ChoiceState
from server.errors import APIError, bad_request, overloaded, unavailable
from server.metrics import CONTENT_TYPE
from server.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from server.serving import Job, collect, stream
from server.state import AppState
from server.streaming import ClientDisconnected, SSEResponse, race_disconnect

log = logging.getLogger(__name__)
router = APIRouter()

# Prompts longer than this are tokenized in a worker thread so the event loop keeps streaming.
_INLINE_TOKENIZE_CHARS = 8192
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"description": desc}
    for code, desc in [
        (400, "invalid request"), (401, "missing or wrong API key"), (404, "unknown model"),
        (413, "body too large"), (429, "queue full (Retry-After)"), (500, "engine error"),
        (503, "not ready or engine down (Retry-After)"),
    ]
}


def _state(request: Request) -> AppState:
    return request.app.state.dspark  # type: ignore[no-any-return]


# --- probes and metadata ------------------------------------------------------------------


@router.get("/health")
async def health(request: Request) -> Response:
    st = _state(request)
    if st.fatal is not None:
        return JSONResponse({"status": "unhealthy", "reason": st.fatal}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(request: Request) -> Response:
    st = _state(request)
    if not st.ready or st.client is None or not st.client.is_alive:
        status = "unhealthy" if st.fatal else "loading"
        return JSONResponse({"status": status}, status_code=503)
    return JSONResponse({"status": "ready", "model": st.model_name})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE)


def _model_card(st: AppState) -> dict[str, Any]:
    return {
        "id": st.model_name,
        "object": "model",
        "created": st.created,
        "owned_by": "dspark-serve",
        "max_model_len": st.max_model_len,
    }


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    st = _require_ready(_state(request))
    return {"object": "list", "data": [_model_card(st)]}


@router.get("/v1/models/{model:path}", responses=_ERROR_RESPONSES)
async def get_model(model: str, request: Request) -> dict[str, Any]:
    st = _require_ready(_state(request))
    _check_model(st, model)
    return _model_card(st)


# --- generation ---------------------------------------------------------------------------


@router.post("/v1/chat/completions", responses=_ERROR_RESPONSES)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    arrival = time.monotonic()
    st = _prepare(request, body)
    messages = [_template_message(m) for m in body.messages]
    tool_plan = body.tool_plan()
    functions = tool_plan.functions if tool_plan is not None else None
    assert st.tokenizer is not None
    tokenizer = st.tokenizer
    size = sum(len(m["content"] or "") for m in messages)
    job = await _submit(
        st, body, arrival, chat=True, prefix="chatcmpl",
        encode=lambda: [tokenizer.encode_chat(messages, functions)], size=size, param="messages",
    )
    if st.settings.log_prompts:
        log.info("request %s messages=%r", job.response_id, messages)
    return await _respond(request, job, body.stream)


@router.post("/v1/completions", responses=_ERROR_RESPONSES)
async def completions(body: CompletionRequest, request: Request) -> Response:
    arrival = time.monotonic()
    prompts = body.prompts()
    st = _prepare(request, body)
    assert st.tokenizer is not None
    tokenizer = st.tokenizer

    def encode() -> list[list[int]]:
        return [tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]

    size = sum(len(p) for p in prompts)
    job = await _submit(
        st, body, arrival, chat=False, prefix="cmpl", encode=encode, size=size, param="prompt",
    )
    if st.settings.log_prompts:
        log.info("request %s prompt=%r", job.response_id, prompts)
    return await _respond(request, job, body.stream)


# --- helpers ------------------------------------------------------------------------------


def _template_message(m: ChatMessage) -> dict[str, Any]:
    """A message as chat templates take it: text content, plus tool calls or the call id."""
    out: dict[str, Any] = {"role": m.role, "content": m.text()}
    if m.tool_calls:
        out["content"] = m.text() if m.content is not None else None
        out["tool_calls"] = [c.model_dump() for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def _constraint(
    st: AppState, body: ChatCompletionRequest | CompletionRequest
) -> StructuredOutput | None:
    """The request's output constraint, checked: a 400 naming the field if it cannot compile,
    or if this engine cannot constrain its output at all (the fake model)."""
    constraint = body.constraint()
    if constraint is None:
        return None
    error = check_structured(constraint)
    if error is not None:
        raise bad_request(f"the output constraint cannot be compiled: {error}",
                          param=body.constraint_param())
    if not st.structured_output:
        raise bad_request("this server's engine cannot constrain its output",
                          param=body.constraint_param())
    return constraint


def _require_ready(st: AppState) -> AppState:
    if st.fatal is not None or (st.client is not None and not st.client.is_alive):
        raise unavailable("the engine is not running", code="engine_unavailable", reason="engine_down")
    if not st.ready or st.client is None or st.tokenizer is None:
        raise unavailable("the model is still loading", code="model_loading", reason="loading")
    return st


def _check_model(st: AppState, model: str | None) -> None:
    if model is not None and model != st.model_name:
        raise APIError(
            404,
            f"the model {model!r} does not exist; this server serves {st.model_name!r}",
            param="model",
            code="model_not_found",
            reason="model_not_found",
        )


def _prepare(request: Request, body: ChatCompletionRequest | CompletionRequest) -> AppState:
    st = _require_ready(_state(request))
    _check_model(st, body.model)
    return st


async def _submit(
    st: AppState,
    body: ChatCompletionRequest | CompletionRequest,
    arrival: float,
    *,
    chat: bool,
    prefix: str,
    encode: Any,
    size: int,
    param: str,
) -> Job:
    assert st.client is not None and st.tokenizer is not None
    client, tokenizer = st.client, st.tokenizer
    n = body.n
    num_prompts = 1 if chat else len(body.prompts())  # type: ignore[union-attr]
    total = n * num_prompts
    constraint = _constraint(st, body)
    if not client.try_reserve(total):
        raise overloaded(f"the server is at capacity ({client.capacity} requests); retry later")
    try:
        if size > _INLINE_TOKENIZE_CHARS:
            prompt_ids_list: list[list[int]] = await asyncio.to_thread(encode)
        else:
            prompt_ids_list = encode()
        stops = body.stop_list()
        requested = body.requested_max_tokens()
        items: list[tuple[str, list[int], SamplingParams]] = []
        choices: list[ChoiceState] = []
        response_id = f"{prefix}-{uuid.uuid4().hex}"
        for p, prompt_ids in enumerate(prompt_ids_list):
            max_tokens = _check_length(st, prompt_ids, requested, param)
            _check_token_ids(st, prompt_ids, param)
            for i in range(n):
                index = p * n + i
                req_id = f"{response_id}-{index}"
                params = _sampling_params(body, max_tokens, i, constraint)
                items.append((req_id, prompt_ids, params))
                choices.append(ChoiceState(
                    index, req_id, tokenizer, prompt_ids, stops,
                    include_stop_str=body.include_stop_str_in_output,
                    min_tokens=body.min_tokens, skip_special_tokens=body.skip_special_tokens,
                    eos_token_ids=tokenizer.eos_token_ids,
                ))
        if not client.is_alive:
            raise unavailable("the engine is not running", code="engine_unavailable", reason="engine_down")
        group = client.submit(items, arrival)
    finally:
        client.release(total)
    echo = None
    if not chat and body.echo:  # type: ignore[union-attr]
        echo = [tokenizer.decode(prompt_ids_list[c.index // n]) for c in choices]
    options = body.stream_options
    include_usage = bool(options and options.include_usage)
    return Job(
        chat=chat,
        response_id=response_id,
        model=st.model_name,
        group=group,
        choices=choices,
        prompt_counts=[len(p) for p in prompt_ids_list],
        logprobs=body.num_logprobs(),
        include_usage=include_usage,
        continuous_usage=include_usage and bool(options and options.continuous_usage_stats),
        echo=echo,
        tools=body.tool_plan(),
    )


def _check_length(st: AppState, prompt_ids: list[int], requested: int | None, param: str) -> int:
    limit = st.max_model_len
    if not prompt_ids:
        raise bad_request("the prompt is empty", param=param)
    room = limit - len(prompt_ids)
    if (requested is None and room < 1) or (requested is not None and requested > room):
        asked = len(prompt_ids) + (requested or 1)
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{asked} tokens ({len(prompt_ids)} in the {param}, {requested or 1} in the "
            "completion). Please reduce the length of the prompt or the completion.",
            param=param,
            code="context_length_exceeded",
            reason="context_length",
        )
    return requested if requested is not None else room


def _check_token_ids(st: AppState, prompt_ids: list[int], param: str) -> None:
    vocab = st.tokenizer.vocab_size if st.tokenizer else None
    if vocab is not None and max(prompt_ids) >= vocab:
        raise bad_request(f"token id out of range (vocabulary size {vocab})", param=param)


def _sampling_params(
    body: ChatCompletionRequest | CompletionRequest,
    max_tokens: int,
    seed_offset: int,
    constraint: StructuredOutput | None,
) -> SamplingParams:
    seed = None if body.seed is None else _wrap_seed(body.seed + seed_offset)
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=max(body.top_k, 0),
            min_p=body.min_p,
            seed=seed,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty,
            stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=body.ignore_eos,
            logprobs=body.num_logprobs(),
            speculative=body.speculative,
            min_tokens=body.min_tokens,
            structured=constraint,
        )
    except ValueError as exc:
        raise bad_request(str(exc)) from None


def _wrap_seed(seed: int) -> int:
    """Keep seed + i inside int64 (seed may be the maximum)."""
    return (seed + 2**63) % 2**64 - 2**63


async def _respond(request: Request, job: Job, streaming: bool) -> Response:
    if streaming:
        return SSEResponse(stream(job), on_close=job.group.close)
    try:
        body = await race_disconnect(request.receive, collect(job))
    except ClientDisconnected:
        return Response(status_code=499)  # nobody reads it; the engine requests are aborted
    finally:
        job.group.close()
    return JSONResponse(body)
