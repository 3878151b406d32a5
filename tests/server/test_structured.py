"""vLLM's request extensions on the fake engine (known output), and structured output and tool
calls on the embedded model (the session's `real_server`)."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from gateway_harness import Running

from scheduler.fake import FAKE_TEXT

MSGS = [{"role": "user", "content": "Say something."}]


def chat(server: Running, **body: Any) -> httpx.Response:
    return httpx.post(server.url("/v1/chat/completions"), json={"messages": MSGS, **body},
                      timeout=120)


def events(server: Running, **body: Any) -> list[dict[str, Any]]:
    out = []
    with httpx.stream("POST", server.url("/v1/chat/completions"), timeout=120,
                      json={"messages": MSGS, "stream": True, **body}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[6:]))
    return out


def text_of(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


# --- vLLM's extensions (fake engine) ---------------------------------------------------------


def test_continuous_usage_stats_put_usage_on_every_chunk(fake_server: Running) -> None:
    chunks = events(fake_server, max_tokens=12,
                    stream_options={"include_usage": True, "continuous_usage_stats": True})
    assert all(c["usage"] is not None for c in chunks)
    completion = [c["usage"]["completion_tokens"] for c in chunks]
    assert completion == sorted(completion) and completion[0] == 0 and completion[-1] == 12
    assert chunks[-1]["choices"] == []
    # Without include_usage the flag adds nothing, as in vLLM.
    plain = events(fake_server, max_tokens=4, stream_options={"continuous_usage_stats": True})
    assert all("usage" not in c for c in plain)


def test_include_stop_str_in_output(fake_server: Running) -> None:
    assert text_of(chat(fake_server, stop=["drafts"])) == "Speculative decoding "
    kept = text_of(chat(fake_server, stop=["drafts"], include_stop_str_in_output=True))
    assert kept == "Speculative decoding drafts"
    streamed = events(fake_server, stop=["drafts"], include_stop_str_in_output=True)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in streamed) == kept


def test_min_tokens_defers_stop_strings(fake_server: Running) -> None:
    assert text_of(chat(fake_server, stop=["e"])) == "Sp"
    # Byte tokens: the first 10 outputs are "Speculativ"; an "e" only counts after them.
    assert text_of(chat(fake_server, stop=["e"], min_tokens=10)) == "Speculativ"
    r = chat(fake_server, max_tokens=4, min_tokens=5)
    assert r.status_code == 400 and "min_tokens" in r.json()["error"]["message"]


def test_skip_special_tokens(fake_server: Running) -> None:
    # Past its text the fake model repeats EOS; ignore_eos keeps them in the output.
    n = len(FAKE_TEXT.encode()) + 3
    skipped = text_of(chat(fake_server, max_tokens=n, ignore_eos=True))
    kept = text_of(chat(fake_server, max_tokens=n, ignore_eos=True, skip_special_tokens=False))
    assert skipped == FAKE_TEXT and kept == FAKE_TEXT + "<|im_end|>" * 3
    # The EOS that ends a request is not text, either way (vLLM's rule).
    assert text_of(chat(fake_server, skip_special_tokens=False)) == FAKE_TEXT


@pytest.mark.parametrize("body,param", [
    ({"structured_outputs": {"regex": "[0-9"}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}},
     "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
])
def test_constraints_that_cannot_work_are_400(fake_server: Running, body: dict, param: str) -> None:
    r = chat(fake_server, **body)
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["param"] or "").startswith(param)


def test_an_engine_without_grammar_masks_refuses_constraints_with_400(fake_server: Running) -> None:
    """The fake model's runner applies no grammar masks: a valid constraint is a client error
    naming the field (the schema fuzzer once drew this and got a 500), and the server serves on."""
    r = chat(fake_server, structured_outputs={"choice": ["yes", "no"]})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "structured_outputs" and "cannot constrain" in error["message"]
    assert error["type"] == "invalid_request_error"
    assert chat(fake_server).status_code == 200


# --- structured output and tools on the embedded model ---------------------------------------

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"]}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris?"}]
MODEL = "SmolLM2-135M-Instruct"


def sdk(server: Running) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url("/v1"), api_key="x", max_retries=0)


def test_json_schema_output_validates_streaming_or_not(real_server: Running) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    messages = [{"role": "user", "content": "Invent a person; answer in JSON."}]
    r = sdk(real_server).chat.completions.create(
        model=MODEL, messages=messages, response_format=fmt, temperature=0, max_tokens=40)  # type: ignore[arg-type]
    whole = r.choices[0].message.content or ""
    jsonschema.validate(json.loads(whole), {**PERSON, "additionalProperties": False})
    assert r.choices[0].finish_reason == "stop"
    stream = sdk(real_server).chat.completions.create(
        model=MODEL, messages=messages, response_format=fmt, temperature=0, max_tokens=40,  # type: ignore[arg-type]
        stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == whole


def test_regex_choice_and_logprobs_under_a_grammar(real_server: Running) -> None:
    r = chat(real_server, structured_outputs={"regex": r"[0-9]{3}-[0-9]{4}"}, max_tokens=12,
             temperature=0.9, seed=3)
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", text_of(r))
    r = chat(real_server, structured_outputs={"choice": ["yes", "no"]}, max_tokens=5,
             logprobs=True, top_logprobs=5)
    assert text_of(r) in ("yes", "no")
    first = r.json()["choices"][0]["logprobs"]["content"][0]
    # Forbidden tokens are reported at vLLM's floor, never as -inf (which JSON cannot carry).
    assert all(t["logprob"] >= -9999.0 for t in first["top_logprobs"])
    allowed = [t for t in first["top_logprobs"] if t["logprob"] > -9999.0]
    assert allowed and all("yes".startswith(t["token"]) or "no".startswith(t["token"])
                           for t in allowed)


def test_required_and_named_tool_calls(real_server: Running) -> None:
    client = sdk(real_server)
    r = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=[WEATHER],  # type: ignore[arg-type,list-item]
                                       tool_choice="required", temperature=0, max_tokens=40)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert set(json.loads(call.function.arguments)) == {"city"}  # type: ignore[union-attr]
    stream = client.chat.completions.create(
        model=MODEL, messages=ASK_WEATHER, tools=[WEATHER], temperature=0, max_tokens=40,  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, stream=True)
    args, names, finish = "", [], None
    for c in stream:
        for tc in c.choices[0].delta.tool_calls or []:
            names += [tc.function.name] if tc.function and tc.function.name else []
            args += tc.function.arguments or "" if tc.function else ""
        finish = c.choices[0].finish_reason or finish
    assert names == ["get_weather"] and finish == "tool_calls"
    assert set(json.loads(args)) == {"city"}
