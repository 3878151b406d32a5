"""Tool calls: the request's tools in the prompt, the constraint that makes calls valid, and
the calls parsed back out of the text (whole, or while streaming).

    tool_choice         prompt                  output constrained to              parsed as
    none (or no tools)  no tools                nothing                            content
    auto                tools                   nothing                            content and/or
                                                                                   <tool_call> blocks
    required            tools                   a JSON list of {"name", "arguments"}  that list
    {"function": name}  tools                   that function's parameters schema  one call

Tools reach the model through its chat template when the template renders them; a template
that ignores `tools` (SmolLM2's) gets them as a system message in the Hermes layout that
small instruct models are trained on, and the same layout carries earlier calls and their
results through the conversation. `required` and a named function are grammar-constrained
(scheduler/grammar.py), so even a small model emits calls that parse and match the schema.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from scheduler.request import StructuredOutput

CALL_START, CALL_END = "<tool_call>", "</tool_call>"
_CALL_BLOCK = re.compile(re.escape(CALL_START) + r"\s*(.*?)\s*(?:" + re.escape(CALL_END) + r"|$)",
                         re.DOTALL)
_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


# --- request models -------------------------------------------------------------------------


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # calls always follow the schema when they are constrained


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    function: FunctionDefinition


class _FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    function: _FunctionName


class _CalledFunction(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    arguments: str


class AssistantToolCall(BaseModel):
    """A call in an earlier assistant message of the conversation."""

    model_config = ConfigDict(extra="forbid", strict=True)
    id: str
    type: Literal["function"]
    function: _CalledFunction


# --- the plan for one request ---------------------------------------------------------------


@dataclass(frozen=True)
class ToolPlan:
    functions: list[dict[str, Any]]  # OpenAI function definitions (name, description, parameters)
    mode: Literal["auto", "required", "named"]
    name: str | None = None  # the function a named tool_choice forces
    parallel: bool = True  # false: at most one call

    @classmethod
    def from_request(
        cls,
        tools: Sequence[Tool] | None,
        choice: str | NamedToolChoice | None,
        parallel: bool | None,
    ) -> ToolPlan | None:
        asks_for_a_call = choice in ("auto", "required") or isinstance(choice, NamedToolChoice)
        if asks_for_a_call and not tools:
            raise ValueError("tool_choice needs tools")
        if not tools or choice == "none":
            return None
        functions = [t.function.model_dump(exclude_none=True) for t in tools]
        if isinstance(choice, NamedToolChoice):
            name = choice.function.name
            if name not in {f["name"] for f in functions}:
                raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
            return cls(functions, "named", name, parallel is not False)
        return cls(functions, "required" if choice == "required" else "auto", None,
                   parallel is not False)

    def parameters(self, name: str) -> dict[str, Any]:
        for f in self.functions:
            if f["name"] == name:
                return f.get("parameters") or _EMPTY_PARAMETERS
        raise KeyError(name)

    def constraint(self) -> StructuredOutput | None:
        if self.mode == "named":
            assert self.name is not None
            return StructuredOutput("json_schema", json.dumps(closed(self.parameters(self.name))))
        if self.mode == "required":
            calls = [
                {
                    "type": "object",
                    "properties": {"name": {"type": "string", "enum": [f["name"]]},
                                   "arguments": closed(self.parameters(f["name"]))},
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
                for f in self.functions
            ]
            schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
            if not self.parallel:
                schema["maxItems"] = 1
            return StructuredOutput("json_schema", json.dumps(schema))
        return None

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """Generated text -> (content, OpenAI tool_calls); no calls: the text is the content."""
        if self.mode == "named":
            assert self.name is not None
            if not _is_json(text):
                return text, []
            return None, [_call(self.name, text)]
        if self.mode == "required":
            try:
                items = json.loads(text)
            except ValueError:
                return text, []
            calls = [_call(i["name"], _dump(i["arguments"])) for i in items if self._valid(i)]
            return (None, calls) if calls and len(calls) == len(items) else (text, [])
        start = text.find(CALL_START)
        if start < 0:
            return text, []
        calls = []
        for block in _CALL_BLOCK.findall(text[start:]):
            try:
                item = json.loads(block)
            except ValueError:
                return text, []
            args = item.get("arguments", item.get("parameters")) if isinstance(item, dict) else None
            if not (isinstance(item, dict) and self._known(item.get("name")) and
                    isinstance(args, dict)):
                return text, []
            calls.append(_call(item["name"], _dump(args)))
        if not self.parallel:
            calls = calls[:1]
        content = text[:start].strip()
        return (content or None), calls

    def _known(self, name: Any) -> bool:
        return isinstance(name, str) and any(f["name"] == name for f in self.functions)

    def _valid(self, item: Any) -> bool:
        return isinstance(item, dict) and self._known(item.get("name")) and "arguments" in item


def closed(schema: Any) -> Any:
    """The schema with `additionalProperties: false` wherever an object lists its properties
    and says nothing about others (OpenAI's strict mode requires it). Every output stays valid
    under the original schema; a small model just cannot wander off into invented keys."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) if k in _SUBSCHEMA_KEYS else v for k, v in schema.items()}
    for k in ("properties", "$defs", "definitions"):
        if isinstance(schema.get(k), dict):
            out[k] = {name: closed(sub) for name, sub in schema[k].items()}
    if isinstance(schema.get("properties"), dict) and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


_SUBSCHEMA_KEYS = frozenset({"items", "anyOf", "oneOf", "allOf", "not", "prefixItems"})


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


# --- prompts --------------------------------------------------------------------------------


def system_prompt(functions: list[dict[str, Any]]) -> str:
    """The tools for a chat template that does not render them (Hermes layout)."""
    listed = "\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False)
                       for f in functions)
    return (
        "You are a function calling AI model. You are provided with function signatures within "
        "<tools></tools> XML tags. You may call one or more functions to assist with the user "
        "query. Don't make assumptions about what values to plug into functions.\n"
        f"<tools>\n{listed}\n</tools>\n"
        "For each function call return a json object with function name and arguments within "
        f"{CALL_START}{CALL_END} XML tags as follows:\n"
        f'{CALL_START}\n{{"name": <function-name>, "arguments": <args-dict>}}\n{CALL_END}'
    )


def plain_messages(messages: list[dict[str, Any]], functions: list[dict[str, Any]] | None
                   ) -> list[dict[str, Any]]:
    """Messages for a template without tool support: the tools in the system message, earlier
    calls as <tool_call> blocks, tool results as `tool` turns. Every content is a string."""
    out = []
    for m in messages:
        content = m.get("content") or ""
        for call in m.get("tool_calls") or []:
            f = call["function"]
            block = json.dumps({"name": f["name"], "arguments": _loads_or_text(f["arguments"])},
                               ensure_ascii=False)
            content += f"{CALL_START}\n{block}\n{CALL_END}"
        out.append({"role": m["role"], "content": content})
    if functions:
        tools_text = system_prompt(functions)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {"role": out[0]["role"], "content": out[0]["content"] + "\n\n" + tools_text}
        else:
            out.insert(0, {"role": "system", "content": tools_text})
    return out


def _loads_or_text(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


# --- streaming ------------------------------------------------------------------------------


@dataclass
class ToolCallStream:
    """One choice's streamed text -> content deltas and `delta.tool_calls` entries.

    A named function streams its arguments as they come; `required` and `auto` hold what may
    be a call until the choice ends, then send each call whole (auto streams the content before
    the first <tool_call>, holding back a tail that could be the start of one).
    """

    plan: ToolPlan
    text: str = ""
    sent: int = 0  # characters of text already sent as content or arguments
    num_calls: int = 0
    _call_id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def push(self, delta: str, final: bool) -> tuple[str, list[dict[str, Any]]]:
        """Add streamed text; returns (content delta, tool_call delta entries)."""
        self.text += delta
        if self.plan.mode == "named":
            return "", self._named(final)
        if self.plan.mode == "required":
            return self._finish("") if final else ("", [])
        marker = self.text.find(CALL_START)
        if marker < 0:
            end = len(self.text) if final else len(self.text) - _partial_marker(self.text)
            return self._content(end), []
        content = self._content(marker)
        return self._finish(content) if final else (content, [])

    def _content(self, end: int) -> str:
        end = max(end, self.sent)
        out = self.text[self.sent:end]
        self.sent = end
        return out

    def _finish(self, content: str) -> tuple[str, list[dict[str, Any]]]:
        """The choice ended: send the held calls, or the held text as content if none parse."""
        _, calls = self.plan.parse(self.text)
        if not calls:
            return content + self._content(len(self.text)), []
        self.sent = len(self.text)
        self.num_calls = len(calls)
        return content, [{"index": i, **c} for i, c in enumerate(calls)]

    def _named(self, final: bool) -> list[dict[str, Any]]:
        args = self.text[self.sent:]
        self.sent = len(self.text)
        if self.num_calls == 0 and (args or final):
            self.num_calls = 1
            assert self.plan.name is not None
            return [{"index": 0, "id": self._call_id, "type": "function",
                     "function": {"name": self.plan.name, "arguments": args}}]
        return [{"index": 0, "function": {"arguments": args}}] if args else []


def _partial_marker(text: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of the call marker."""
    for k in range(min(len(CALL_START) - 1, len(text)), 0, -1):
        if text.endswith(CALL_START[:k]):
            return k
    return 0
