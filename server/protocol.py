"""OpenAI request bodies (pydantic, the HTTP edge only) and their mapping to SamplingParams.

Policy: a field we do not implement is never silently ignored. Unknown fields fail validation
(`extra="forbid"`, 400 naming the field); known OpenAI fields we do not support are accepted
only at their "off" value (e.g. `audio: null`, `logit_bias: {}`) and otherwise get a 400 that
names them. Fields that only label a request (user, metadata, ...) are accepted and have no
effect. Extra fields beyond OpenAI follow vLLM's names (top_k, min_p, min_tokens,
structured_outputs, ...).

Structured output: `response_format` (json_object, json_schema) and vLLM's
`structured_outputs` (json, regex, choice, grammar, json_object) become one
`StructuredOutput` (`constraint()`); tools and tool_choice live in server/tools.py.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from scheduler.request import StructuredOutput
from server.errors import bad_request
from server.tools import AssistantToolCall, NamedToolChoice, Tool, ToolPlan, closed

MAX_STOP_STRINGS = 16
MAX_N = 16
INT64_MAX = 2**63 - 1

Stop = str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None


def _off(value: Any) -> bool:
    """Whether an unsupported field is at a value that asks for nothing."""
    return value is None or value == [] or value == {} or value is False


# Unsupported OpenAI fields -> predicate for values that are acceptable (ask for nothing).
_CHAT_UNSUPPORTED: dict[str, Any] = {
    "functions": _off,  # the deprecated forms of tools and tool_choice
    "function_call": lambda v: _off(v) or v == "none",
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
    continuous_usage_stats: bool = False  # vLLM: with include_usage, usage on every chunk


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: exactly one constraint."""

    model_config = ConfigDict(extra="forbid", strict=True)
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = Field(None, min_length=1)
    choice: list[Annotated[str, Field(min_length=1)]] | None = Field(None, min_length=1)
    grammar: str | None = Field(None, min_length=1)
    json_object: bool | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [v for v in (self.json_, self.regex, self.choice, self.grammar, self.json_object)
                 if v is not None and v is not False]
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar, json_object")
        return self

    def constraint(self) -> StructuredOutput:
        if self.json_ is not None:
            schema = self.json_ if isinstance(self.json_, str) else json.dumps(self.json_)
            return StructuredOutput("json_schema", schema)
        if self.regex is not None:
            return StructuredOutput("regex", self.regex)
        if self.choice is not None:
            return StructuredOutput("choice", json.dumps(self.choice))
        if self.grammar is not None:
            return StructuredOutput("grammar", self.grammar)
        return StructuredOutput("json_object")


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # the output always follows the schema, strict or not


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only then")
        return self

    def constraint(self) -> StructuredOutput | None:
        if self.type == "json_object":
            return StructuredOutput("json_object")
        if self.type == "json_schema":
            assert self.json_schema is not None
            schema = self.json_schema.schema_ or {"type": "object"}  # OpenAI's default
            return StructuredOutput("json_schema", json.dumps(closed(schema)))
        return None


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
    # vLLM's extras with a meaning here.
    min_tokens: int = Field(0, ge=0)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputs | None = None

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
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None  # a participant label; no effect
    tool_calls: list[AssistantToolCall] | None = None  # assistant: the calls it made
    tool_call_id: str | None = None  # tool: the call this message answers

    @model_validator(mode="after")
    def _fields_for_role(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (it may be null only for assistant tool calls)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("tool messages need tool_call_id, and only they have one")
        return self

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
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
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
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # false: at most one call
    # Accepted, no effect (labels / hints that do not change output).
    metadata: dict[str, str] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    service_tier: Literal["auto", "default"] | None = None
    # Known but unsupported: accepted only at their "off" value (checked before validation).
    functions: Any = None
    function_call: Any = None
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

    @model_validator(mode="after")
    def _one_constraint(self) -> ChatCompletionRequest:
        # APIErrors (not ValueErrors) escape pydantic, so the 400 names the field.
        try:
            plan = self.tool_plan()
        except ValueError as exc:
            raise bad_request(str(exc), param="tool_choice") from None
        from_format = self.response_format is not None and self.response_format.type != "text"
        sources = [plan is not None and plan.constraint() is not None, from_format,
                   self.structured_outputs is not None]
        if sum(sources) > 1:
            raise bad_request("response_format, structured_outputs and a required tool call "
                              "each constrain the output; give only one",
                              param="response_format" if from_format else "structured_outputs")
        return self

    def tool_plan(self) -> ToolPlan | None:
        """What the request asks of tools; None when no tool may be called."""
        return ToolPlan.from_request(self.tools, self.tool_choice, self.parallel_tool_calls)

    def constraint(self) -> StructuredOutput | None:
        plan = self.tool_plan()
        if plan is not None and plan.constraint() is not None:
            return plan.constraint()
        if self.response_format is not None and self.response_format.constraint() is not None:
            return self.response_format.constraint()
        return self.structured_outputs.constraint() if self.structured_outputs else None

    def constraint_param(self) -> str:
        """The field a 400 about the constraint names."""
        if self.structured_outputs is not None:
            return "structured_outputs"
        return "response_format" if self.response_format is not None else "tools"

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

    def tool_plan(self) -> ToolPlan | None:
        return None

    def constraint(self) -> StructuredOutput | None:
        return self.structured_outputs.constraint() if self.structured_outputs else None

    def constraint_param(self) -> str:
        return "structured_outputs"

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: text prompts or token-id prompts."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]
