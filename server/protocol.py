"""OpenAI request bodies (pydantic, the HTTP edge only) and their mapping to SamplingParams.

Policy: a field we do not implement is never silently ignored. Unknown fields fail validation
(`extra="forbid"`, 400 naming the field); known OpenAI fields we do not support are accepted
only at their "off" value (e.g. `tools: []`, `response_format: {"type": "text"}`) and otherwise
get a 400 that names them. Fields that only label a request (user, metadata, ...) are accepted
and have no effect. Extra fields beyond OpenAI follow vLLM's names (top_k, min_p, ...).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.errors import bad_request

MAX_STOP_STRINGS = 16
MAX_N = 16
INT64_MAX = 2**63 - 1

Stop = str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None


def _off(value: Any) -> bool:
    """Whether an unsupported field is at a value that asks for nothing."""
    return value is None or value == [] or value == {} or value is False


# Unsupported OpenAI fields -> predicate for values that are acceptable (ask for nothing).
_CHAT_UNSUPPORTED: dict[str, Any] = {
    "tools": _off,
    "functions": _off,
    "function_call": lambda v: _off(v) or v == "none",
    "tool_choice": lambda v: _off(v) or v == "none",
    "response_format": lambda v: _off(v) or (isinstance(v, dict) and v.get("type") == "text"),
    "audio": _off,
    "modalities": lambda v: _off(v) or v == ["text"],
    "prediction": _off,
    "logit_bias": _off,
    "reasoning_effort": _off,
    "verbosity": _off,
    "web_search_options": _off,
    "store": _off,
}
_COMPLETION_UNSUPPORTED: dict[str, Any] = {
    "logit_bias": _off,
    "suffix": lambda v: v is None or v == "",
    "best_of": lambda v: v is None or v == 1,
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


def _check_unicode(value: Any, depth: int = 0) -> None:
    """JSON may carry lone surrogates ("\\ud800"); they cannot be tokenized or sent back."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise bad_request("the request contains invalid Unicode (a lone surrogate)",
                              code="invalid_unicode") from None
    elif depth < 8 and isinstance(value, dict):
        for k, v in value.items():
            _check_unicode(k, depth + 1)
            _check_unicode(v, depth + 1)
    elif depth < 8 and isinstance(value, list):
        for v in value:
            _check_unicode(v, depth + 1)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        _check_unicode(data)
        return data

    model: str | None = None  # optional, as in vLLM: defaults to the served model
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=-INT64_MAX - 1, le=INT64_MAX)
    stop: Stop = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    user: str | None = None  # an end-user label; no effect
    # Extra (vLLM-compatible) sampling fields.
    top_k: int = Field(0, ge=-1)  # 0 or -1: disabled
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, max_length=64)
    # Extra: per-request opt-out of speculative decoding (output is identical either way).
    speculative: bool = True

    @field_validator("stop")
    @classmethod
    def _stop_nonempty(cls, v: Stop) -> Stop:
        items = [v] if isinstance(v, str) else (v or [])
        for s in items:
            if not s or len(s) > 256:
                raise ValueError("stop strings must be 1..256 characters")
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _Body:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @field_validator("content", mode="before")
    @classmethod
    def _only_text_parts(cls, v: Any) -> Any:
        # A clearer message than pydantic's union error for image/audio/file parts.
        if isinstance(v, list):
            for part in v:
                if isinstance(part, dict) and part.get("type") not in (None, "text"):
                    raise ValueError(f"content part type {part.get('type')!r} is not supported")
        return v

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


def _unsupported(data: Any, table: dict[str, Any]) -> Any:
    # An APIError (not a ValueError) escapes pydantic, so the 400 can name the field in `param`.
    if isinstance(data, dict):
        for name, ok in table.items():
            if name in data and not ok(data[name]):
                raise bad_request(
                    f"{name} is not supported by this server", param=name, code="unsupported_parameter"
                )
    return data


class ChatCompletionRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # Accepted, no effect (labels / hints that do not change output).
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    service_tier: Literal["auto", "default"] | None = None
    # Known but unsupported: accepted only at their "off" value (checked before validation).
    tools: Any = None
    functions: Any = None
    function_call: Any = None
    tool_choice: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    logit_bias: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    store: Any = None

    @model_validator(mode="before")
    @classmethod
    def _reject_unsupported(cls, data: Any) -> Any:
        return _unsupported(data, _CHAT_UNSUPPORTED)

    @model_validator(mode="after")
    def _logprob_fields(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        both = self.max_tokens is not None and self.max_completion_tokens is not None
        if both and self.max_tokens != self.max_completion_tokens:
                raise ValueError("max_tokens and max_completion_tokens disagree")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


Prompt = (
    str
    | Annotated[list[str], Field(min_length=1, max_length=64)]
    | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
    | Annotated[
        list[Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]],
        Field(min_length=1, max_length=64),
    ]
)


class CompletionRequest(_Body):
    prompt: Prompt
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    logit_bias: Any = None
    suffix: Any = None
    best_of: Any = None

    @model_validator(mode="before")
    @classmethod
    def _reject_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("echo") is True and data.get("logprobs") is not None:
            # OpenAI would add the prompt tokens' logprobs; the engine does not compute them.
            raise bad_request("echo together with logprobs (prompt logprobs) is not supported",
                              param="logprobs", code="unsupported_parameter")
        return _unsupported(data, _COMPLETION_UNSUPPORTED)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def num_logprobs(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: text prompts or token-id prompts."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]
