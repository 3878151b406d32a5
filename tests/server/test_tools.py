"""Tool calls without a model: plans, constraints, parsing, streaming, prompts."""

from __future__ import annotations

import json

import jsonschema
import pytest
from pydantic import ValidationError

from scheduler.grammar import check_structured
from server.errors import APIError
from server.protocol import ChatCompletionRequest
from server.tools import CALL_START, ToolCallStream, ToolPlan, closed, plain_messages

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}  # no parameters
MSGS = [{"role": "user", "content": "Weather in Paris?"}]


def plan(tool_choice, tools=(WEATHER, TIME), **extra) -> ToolPlan | None:
    body = {"messages": MSGS, "tools": list(tools), "tool_choice": tool_choice, **extra}
    return ChatCompletionRequest.model_validate(body).tool_plan()


def test_tool_choice_modes() -> None:
    assert plan("none") is None
    assert plan("auto").mode == "auto" and plan(None).mode == "auto"  # type: ignore[union-attr]
    assert plan("auto").constraint() is None  # type: ignore[union-attr]
    named = plan({"type": "function", "function": {"name": "get_weather"}})
    assert named is not None and named.mode == "named" and named.name == "get_weather"
    with pytest.raises(APIError, match="not among the tools") as e:
        plan({"type": "function", "function": {"name": "nope"}})
    assert e.value.param == "tool_choice"
    with pytest.raises(APIError, match="needs tools"):
        ChatCompletionRequest.model_validate({"messages": MSGS, "tool_choice": "required"})
    with pytest.raises(APIError, match="only one") as e:
        plan("required", response_format={"type": "json_object"})
    assert e.value.param == "response_format"
    with pytest.raises(ValidationError):  # a tool must be a function with a name
        ChatCompletionRequest.model_validate({"messages": MSGS, "tools": [{"type": "function"}]})


def test_required_constraint_accepts_exactly_the_calls() -> None:
    p = plan("required", parallel_tool_calls=False)
    assert p is not None
    constraint = p.constraint()
    assert constraint is not None and check_structured(constraint) is None
    schema = json.loads(constraint.spec)
    jsonschema.validate([{"name": "get_weather", "arguments": {"city": "Paris"}}], schema)
    jsonschema.validate([{"name": "get_time", "arguments": {}}], schema)
    for bad in ([], [{"name": "get_weather", "arguments": {"town": "x"}}],
                [{"name": "rm_rf", "arguments": {}}],
                [{"name": "get_time", "arguments": {}}] * 2):  # parallel_tool_calls false
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_parse_required_named_and_auto() -> None:
    required = plan("required")
    assert required is not None
    content, calls = required.parse('[{"name": "get_weather", "arguments": {"city": "Oslo"}}]')
    assert content is None and len(calls) == 1
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"
    assert required.parse('[{"name": "get_weather", "argu')[1] == []  # cut by max_tokens

    named = plan({"type": "function", "function": {"name": "get_weather"}})
    assert named is not None
    assert named.parse('{"city": "Rome"}')[1][0]["function"]["arguments"] == '{"city": "Rome"}'

    auto = plan("auto")
    assert auto is not None
    assert auto.parse("It is sunny.") == ("It is sunny.", [])
    text = (f'Let me check.\n{CALL_START}\n{{"name": "get_weather", "arguments": {{"city": "Paris"}}}}'
            f"\n</tool_call>\n{CALL_START}\n{{\"name\": \"get_time\", \"arguments\": {{}}}}")
    content, calls = auto.parse(text)
    assert content == "Let me check."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert auto.parse(f'{CALL_START}{{"name": "unknown", "arguments": {{}}}}')[1] == []


def stream_all(p: ToolPlan, pieces: list[str]) -> tuple[str, list[dict]]:
    s = ToolCallStream(p)
    content, entries = "", []
    for i, piece in enumerate(pieces):
        c, e = s.push(piece, final=i == len(pieces) - 1)
        content += c
        entries += e
    return content, entries


def test_streamed_calls_match_the_whole_text() -> None:
    named = plan({"type": "function", "function": {"name": "get_weather"}})
    assert named is not None
    content, entries = stream_all(named, ['{"ci', 'ty": ', '"Paris"}'])
    assert content == "" and entries[0]["function"]["name"] == "get_weather"
    assert "".join(e["function"]["arguments"] for e in entries) == '{"city": "Paris"}'
    assert all(e["index"] == 0 for e in entries) and "id" in entries[0]

    auto = plan("auto")
    assert auto is not None
    pieces = ["Sure", ". <tool", '_call>{"name": "get_time", ', '"arguments": {}}</tool_call>']
    content, entries = stream_all(auto, pieces)
    assert content == "Sure. " and len(entries) == 1  # the marker prefix was held back
    assert entries[0]["function"] == {"name": "get_time", "arguments": "{}"}
    assert stream_all(auto, ["Sunny", " <tool", "s and rain"]) == ("Sunny <tools and rain", [])


def test_closed_schema_forbids_invented_keys_only() -> None:
    schema = closed(WEATHER["function"]["parameters"])
    jsonschema.validate({"city": "Paris"}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"city": "Paris", "mood": "sunny"}, schema)
    given = {"type": "object", "properties": {}, "additionalProperties": True}
    assert closed(given) == given


def test_plain_messages_carry_tools_calls_and_results() -> None:
    history = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "18 C", "tool_call_id": "c1"},
    ]
    out = plain_messages(history, [WEATHER["function"]])
    assert out[0]["role"] == "system" and '"get_weather"' in out[0]["content"]
    assert CALL_START in out[2]["content"] and '"city": "Paris"' in out[2]["content"]
    assert out[3] == {"role": "tool", "content": "18 C"}
    assert all(isinstance(m["content"], str) for m in out)
