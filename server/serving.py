"""Turn a group of engine outputs into OpenAI responses: one JSON body, or SSE chunks.

Chat and text completions share everything except the shape of a choice, which `Shape`
supplies. Streaming follows OpenAI exactly: (chat) one role chunk per choice, content deltas,
a chunk with finish_reason, then (with stream_options.include_usage) a usage chunk with empty
choices, then `data: [DONE]`; with vLLM's continuous_usage_stats as well, every chunk carries
the usage so far. An engine failure mid-stream becomes a `data: {"error": ...}` event followed
by [DONE], as vLLM does; before any output it is an HTTP 500. With tools the text goes through
server/tools.py: `message.tool_calls` / `delta.tool_calls`, finish_reason `tool_calls`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from scheduler.request import TokenLogprob
from server.choices import ChoiceDelta, ChoiceState, spec_metrics, usage
from server.engine_client import RequestGroup
from server.errors import APIError, error_body
from server.streaming import DONE, sse
from server.tools import ToolCallStream, ToolPlan


@dataclass
class Job:
    """One HTTP generation request, after validation, tokenization and submission."""

    chat: bool
    response_id: str
    model: str
    group: RequestGroup
    choices: list[ChoiceState]
    prompt_counts: list[int]  # tokens of each distinct prompt (usage counts each once)
    logprobs: int | None
    include_usage: bool = False
    continuous_usage: bool = False  # usage on every chunk (needs include_usage)
    echo: list[str] | None = None  # completions with echo=True: prompt text per choice
    tools: ToolPlan | None = None  # chat with callable tools
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def object_name(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def done(self) -> bool:
        return all(c.finished for c in self.choices)


def _engine_error(message: str) -> APIError:
    return APIError(500, message, type_="server_error", code="engine_error")


async def _outputs(job: Job) -> AsyncIterator[tuple[ChoiceState, ChoiceDelta]]:
    """Each engine output folded into its choice; stops once every choice is finished."""
    async for index, out in job.group:
        choice = job.choices[index]
        delta = choice.add(out)
        if choice.hit_stop_string:
            job.group.abort(choice.req_id)  # the text is final; free the slot now
        yield choice, delta
        if job.done():
            return


# --- non-streaming ------------------------------------------------------------------------


async def collect(job: Job) -> dict[str, Any]:
    logprobs: dict[int, list[TokenLogprob]] = {c.index: [] for c in job.choices}
    async for choice, delta in _outputs(job):
        if delta.error is not None:
            raise _engine_error(delta.error)
        logprobs[choice.index].extend(delta.logprobs)
    body: dict[str, Any] = {
        "id": job.response_id,
        "object": job.object_name,
        "created": job.created,
        "model": job.model,
        "choices": [_full_choice(job, c, logprobs[c.index]) for c in job.choices],
        "usage": usage(job.choices, job.prompt_counts),
    }
    metrics = spec_metrics(job.choices)
    if metrics is not None:
        body["metrics"] = metrics
    return body


def _full_choice(job: Job, c: ChoiceState, lps: list[TokenLogprob]) -> dict[str, Any]:
    if job.chat:
        message: dict[str, Any] = {"role": "assistant", "content": c.text}
        finish_reason = c.finish_reason
        if job.tools is not None:
            content, calls = job.tools.parse(c.text)
            if calls:
                message = {"role": "assistant", "content": content, "tool_calls": calls}
                finish_reason = _tool_finish(finish_reason)
        return {
            "index": c.index,
            "message": message,
            "logprobs": {"content": c.chat_logprobs(lps)} if job.logprobs is not None else None,
            "finish_reason": finish_reason,
        }
    prefix = job.echo[c.index] if job.echo else ""
    return {
        "index": c.index,
        "text": prefix + c.text,
        "logprobs": c.completion_logprobs(lps, len(prefix)) if job.logprobs is not None else None,
        "finish_reason": c.finish_reason,
    }


# --- streaming ----------------------------------------------------------------------------


def _tool_finish(finish_reason: str | None) -> str | None:
    """A choice that ended in tool calls says so (a cut one keeps `length`)."""
    return "tool_calls" if finish_reason == "stop" else finish_reason


async def stream(job: Job) -> AsyncIterator[bytes]:
    object_name = job.object_name + (".chunk" if job.chat else "")
    head = {"id": job.response_id, "object": object_name, "created": job.created, "model": job.model}
    offsets = {c.index: 0 for c in job.choices}  # completion logprobs text_offset per choice
    tool_streams = (
        {c.index: ToolCallStream(job.tools) for c in job.choices} if job.tools is not None else {}
    )

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        tail: dict[str, Any] = {}
        if job.include_usage:
            tail["usage"] = usage(job.choices, job.prompt_counts) if job.continuous_usage else None
        return sse({**head, "choices": choices, **tail, **extra})

    if job.chat:
        for c in job.choices:
            delta = {"role": "assistant", "content": ""}
            yield chunk([{"index": c.index, "delta": delta, "logprobs": None, "finish_reason": None}])
    elif job.echo:
        for c in job.choices:
            text = job.echo[c.index]
            offsets[c.index] = len(text)
            yield chunk([{"index": c.index, "text": text, "logprobs": None, "finish_reason": None}])

    async for c, d in _outputs(job):
        if d.error is not None:
            yield sse(error_body(d.error, "server_error", None, "engine_error"))
            yield DONE
            return
        text, finish_reason = d.text, d.finish_reason
        calls: list[dict[str, Any]] = []
        if c.index in tool_streams:
            tool_stream = tool_streams[c.index]
            text, calls = tool_stream.push(d.text, final=d.finish_reason is not None)
            if tool_stream.num_calls:
                finish_reason = _tool_finish(finish_reason)
        wants_logprobs = bool(d.logprobs) and job.logprobs is not None
        if not text and not calls and finish_reason is None and not wants_logprobs:
            continue
        choice: dict[str, Any] = {"index": c.index}
        if job.chat:
            message: dict[str, Any] = {"content": text} if text else {}
            if calls:
                message["tool_calls"] = calls
            choice["delta"] = message
            lp = {"content": c.chat_logprobs(d.logprobs)} if job.logprobs is not None else None
        else:
            choice["text"] = d.text
            lp = (
                c.completion_logprobs(d.logprobs, offsets[c.index])
                if job.logprobs is not None
                else None
            )
            offsets[c.index] += len(d.text)
        choice["logprobs"] = lp
        choice["finish_reason"] = finish_reason
        extra: dict[str, Any] = {}
        if job.done():
            metrics = spec_metrics(job.choices)
            if metrics is not None:
                extra["metrics"] = metrics
        yield chunk([choice], **extra)

    if job.include_usage:
        yield sse({**head, "choices": [], "usage": usage(job.choices, job.prompt_counts)})
    yield DONE
