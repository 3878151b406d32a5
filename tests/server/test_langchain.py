"""LangChain's ChatOpenAI against the embedded model: invoke, stream, structured output with a
pydantic model, and tool calls, as its users write them."""

from __future__ import annotations

import json

import pytest
from gateway_harness import Running
from pydantic import BaseModel, Field

langchain_openai = pytest.importorskip("langchain_openai")

TOPICS = [
    "the Eiffel Tower", "a golden retriever", "the planet Mars", "a violin", "the river Nile",
    "a bicycle", "the Moon", "a lighthouse", "an apple tree", "the city of Tokyo",
    "a chess game", "the Sahara desert", "a volcano", "a submarine", "the Great Wall",
    "a rainbow", "a honeybee", "a piano", "the Amazon forest", "a snowflake",
]
CITIES = [
    "Paris", "Berlin", "Madrid", "Rome", "Lisbon", "Vienna", "Prague", "Oslo", "Dublin",
    "Athens", "Warsaw", "Budapest", "Helsinki", "Stockholm", "Brussels", "Amsterdam", "Zurich",
    "Copenhagen", "Tokyo", "Cairo",
]


class Fact(BaseModel):
    """One short fact about a subject."""

    subject: str = Field(description="what the fact is about", max_length=40)
    fact: str = Field(description="the fact, one short sentence", max_length=80)
    confidence: int = Field(description="how sure, 1 to 10", ge=1, le=10)


class GetWeather(BaseModel):
    """Get the current weather in a city."""

    city: str = Field(description="the city", max_length=30)


@pytest.fixture(scope="module")
def llm(real_server: Running):  # type: ignore[no-untyped-def]
    return langchain_openai.ChatOpenAI(
        base_url=real_server.url("/v1"), api_key="unused", model=real_server.state.model_name,
        temperature=0, max_tokens=80, max_retries=0, timeout=300,
    )


def test_invoke_and_stream(llm) -> None:  # type: ignore[no-untyped-def]
    reply = llm.invoke("What is the capital of France? One word.")
    streamed = "".join(str(chunk.content) for chunk in llm.stream(
        "What is the capital of France? One word."))
    assert reply.content and streamed == reply.content


def test_structured_output_with_a_pydantic_model_on_20_prompts(llm) -> None:  # type: ignore[no-untyped-def]
    structured = llm.with_structured_output(Fact)
    prompts = [f"Tell me one fact about {topic}." for topic in TOPICS]
    answers = structured.batch(prompts, config={"max_concurrency": 8})
    assert len(answers) == 20
    assert all(isinstance(a, Fact) and a.subject and a.fact for a in answers)


def test_required_tool_calls_parse_on_20_prompts(llm) -> None:  # type: ignore[no-untyped-def]
    bound = llm.bind_tools([GetWeather], tool_choice="required")
    replies = bound.batch([f"What is the weather in {city} today?" for city in CITIES],
                          config={"max_concurrency": 8})
    for reply in replies:
        assert reply.tool_calls, reply
        call = reply.tool_calls[0]
        assert call["name"] == "GetWeather"
        GetWeather.model_validate(call["args"])
        assert reply.response_metadata["finish_reason"] == "tool_calls"


def test_tool_call_round_trip_and_streamed_call(llm) -> None:  # type: ignore[no-untyped-def]
    from langchain_core.messages import HumanMessage, ToolMessage

    bound = llm.bind_tools([GetWeather], tool_choice="GetWeather")
    question = HumanMessage("What is the weather in Oslo?")
    call_msg = bound.invoke([question])
    call = call_msg.tool_calls[0]
    # The tool's answer goes back in the conversation; the model answers in text.
    result = ToolMessage(json.dumps({"temperature_c": 4, "sky": "cloudy"}), tool_call_id=call["id"])
    final = llm.bind_tools([GetWeather]).invoke([question, call_msg, result])
    assert isinstance(final.content, str) and final.content
    chunks = list(bound.stream([question]))
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged = merged + chunk
    assert merged.tool_calls and merged.tool_calls[0]["name"] == "GetWeather"
    GetWeather.model_validate(merged.tool_calls[0]["args"])
