"""Request bodies, SSE parsing and per-request timing records, shared by every load generator.

No Locust import here: importing locust monkey-patches the whole process with gevent, so the pure
parts live apart and can be unit-tested (and reused by any asyncio client) without it.

Definitions follow vLLM's benchmark so figures are comparable:
    TTFT = first content chunk - request sent
    E2E  = last byte - request sent
    TPOT = (last content chunk - first content chunk) / (output_tokens - 1), per request;
           per-user speed = 1 / TPOT
    ITL  = gaps between content chunks (bursty under speculation: one chunk may carry several
           tokens, which is why comparisons use TPOT and token counts from the usage chunk)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from loadtest.prompts import Prompt

SPEC_KEYS = ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "mean_acceptance_length")
# Other spellings of the same counters (dspark-serve uses vLLM's names in the response).
SPEC_ALIASES = {
    "num_spec_steps": "num_drafts",
    "num_accepted_draft_tokens": "num_accepted_tokens",
}


@dataclass(frozen=True, slots=True)
class RequestOptions:
    endpoint: str = "chat"  # chat | completions
    model: str = ""  # empty: leave `model` out, the server uses its served model
    max_tokens: int = 128
    temperature: float = 0.0
    ignore_eos: bool = False  # vLLM-style extension: fix the output length across configurations
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"


def build_body(prompt: Prompt, opts: RequestOptions) -> dict[str, Any]:
    body: dict[str, Any] = {
        "max_tokens": opts.max_tokens,
        "temperature": opts.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if opts.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt.chat}]
    elif opts.endpoint == "completions":
        body["prompt"] = prompt.completion
    else:
        raise ValueError(f"unknown endpoint kind {opts.endpoint!r}")
    if opts.model:
        body["model"] = opts.model
    if opts.ignore_eos:
        body["ignore_eos"] = True
    body.update(opts.extra)
    return body


def find_spec_stats(obj: Any, depth: int = 0) -> dict[str, float] | None:
    """The per-request speculation counters, wherever the server put them, under SPEC_KEYS names.

    Known places first (`metrics.speculative_decoding`, top-level `speculative_decoding` or
    `spec`), then any nested object that carries one of the counters.
    """
    if not isinstance(obj, dict) or depth > 4:
        return None
    metrics = obj.get("metrics")
    candidates = [
        metrics.get("speculative_decoding") if isinstance(metrics, dict) else None,
        obj.get("speculative_decoding"),
        obj.get("spec"),
        obj,
    ]
    for c in candidates:
        if not isinstance(c, dict):
            continue
        found: dict[str, float] = {}
        for k, v in c.items():
            name = SPEC_ALIASES.get(str(k), str(k))
            if name in SPEC_KEYS and isinstance(v, (int, float)):
                found[name] = float(v)
        if any(k != "mean_acceptance_length" for k in found):
            return found
    for v in obj.values():
        found_nested = find_spec_stats(v, depth + 1)
        if found_nested:
            return found_nested
    return None


def sse_payloads(lines: Iterable[bytes | str]) -> Iterable[str | None]:
    """`data:` payloads of an SSE stream, in order; yields None for `[DONE]` and stops there."""
    for raw in lines:
        line = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        line = line.strip()
        if not line.startswith("data:"):
            continue  # blank separators, comments (":"), event/id fields
        payload = line[5:].strip()
        if payload == "[DONE]":
            yield None
            return
        yield payload


@dataclass(slots=True)
class StreamRecord:
    """Timing of one streamed request. Times are seconds on the caller's monotonic clock."""

    pid: str
    category: str
    t_start: float
    t_sched: float | None = None  # when the open-loop schedule wanted it sent
    t_end: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # content chunks only
    chunk_chars: list[int] = field(default_factory=list)
    output_tokens: int | None = None  # from the usage chunk
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    spec: dict[str, float] | None = None
    error: str | None = None
    saw_done: bool = False

    # -- feeding ---------------------------------------------------------------------------
    def feed(self, payload: str | None, now: float) -> None:
        """One SSE payload received at `now` (None = `[DONE]`)."""
        if payload is None:
            self.saw_done = True
            return
        try:
            obj = json.loads(payload)
        except json.JSONDecodeError:
            self.error = f"bad SSE payload: {payload[:80]!r}"
            return
        if not isinstance(obj, dict):
            return
        if "error" in obj:
            err = obj["error"]
            self.error = str(err.get("message", err) if isinstance(err, dict) else err)
            return
        text = ""
        for choice in obj.get("choices") or []:
            delta = choice.get("delta")
            piece = delta.get("content") if isinstance(delta, dict) else choice.get("text")
            text += piece or ""
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        if text:
            self.chunk_times.append(now)
            self.chunk_chars.append(len(text))
        usage = obj.get("usage")
        if isinstance(usage, dict):
            if isinstance(usage.get("completion_tokens"), int):
                self.output_tokens = usage["completion_tokens"]
            if isinstance(usage.get("prompt_tokens"), int):
                self.prompt_tokens = usage["prompt_tokens"]
        spec = find_spec_stats(obj)
        if spec:
            self.spec = spec

    def finish(self, now: float) -> None:
        self.t_end = now
        if self.error is None and not self.chunk_times:
            self.error = "stream ended without content"

    # -- derived ---------------------------------------------------------------------------
    @property
    def ok(self) -> bool:
        return self.error is None and self.t_end is not None and bool(self.chunk_times)

    @property
    def n_tokens(self) -> int:
        """Output tokens: the usage chunk's count, else one per content chunk (a lower bound)."""
        return self.output_tokens if self.output_tokens is not None else len(self.chunk_times)

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.t_start if self.chunk_times else None

    @property
    def e2e(self) -> float | None:
        return None if self.t_end is None else self.t_end - self.t_start

    @property
    def tpot(self) -> float | None:
        # Decode time runs from the first to the last content chunk, not to the final usage
        # chunk: the trailing bookkeeping chunks are not token generation.
        if len(self.chunk_times) < 1 or self.n_tokens < 2:
            return None
        return (self.chunk_times[-1] - self.chunk_times[0]) / (self.n_tokens - 1)

    @property
    def itl(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]

    @property
    def lag(self) -> float:
        """How late the request left against its open-loop slot (0 in closed loop)."""
        return 0.0 if self.t_sched is None else max(0.0, self.t_start - self.t_sched)

    def to_json(self, t0: float) -> dict[str, Any]:
        """Plain dict with times relative to `t0` (test start), rounded to microseconds."""
        d = asdict(self)

        def rel(t: float | None) -> float | None:
            return None if t is None else round(t - t0, 6)

        d["t_start"] = rel(self.t_start)
        d["t_sched"] = rel(self.t_sched)
        d["t_end"] = rel(self.t_end)
        d["chunk_times"] = [round(t - self.t_start, 6) for t in self.chunk_times]  # from start
        d["n_tokens"] = self.n_tokens
        d["ok"] = self.ok
        return d


def record_from_json(d: Mapping[str, Any]) -> StreamRecord:
    """Inverse of `StreamRecord.to_json` with t0 = 0."""
    start = float(d["t_start"])
    return StreamRecord(
        pid=d["pid"],
        category=d["category"],
        t_start=start,
        t_sched=d.get("t_sched"),
        t_end=d.get("t_end"),
        chunk_times=[start + t for t in d.get("chunk_times", [])],
        chunk_chars=list(d.get("chunk_chars", [])),
        output_tokens=d.get("output_tokens"),
        prompt_tokens=d.get("prompt_tokens"),
        finish_reason=d.get("finish_reason"),
        spec=d.get("spec"),
        error=d.get("error"),
        saw_done=bool(d.get("saw_done")),
    )


def token_times(rec: StreamRecord) -> list[tuple[float, float]]:
    """(time, tokens) per content chunk, splitting the usage count over chunks by characters.

    Used to count tokens generated inside a measurement window. The split is approximate per
    chunk but sums exactly to the request's token count.
    """
    if not rec.chunk_times:
        return []
    total_chars = sum(rec.chunk_chars)
    n = rec.n_tokens
    if total_chars <= 0:
        share = [1.0 / len(rec.chunk_times)] * len(rec.chunk_times)
    else:
        share = [c / total_chars for c in rec.chunk_chars]
    return [(t, n * s) for t, s in zip(rec.chunk_times, share)]
