"""The OpenAI API through the official SDK (sync and async, streaming and not) on a real server.

The fake engine's output is known in advance (scheduler.fake.FAKE_TEXT, byte tokens, then EOS),
so texts, finish reasons and token counts are checked exactly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import openai
import pytest
from gateway_harness import Running, fake_app, fake_text_script, fake_tokenizer, scripted_app, serve

from scheduler.fake import FAKE_TEXT
from scheduler.request import Request
from server.tokenizer import REPLACEMENT

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}]


def prompt_len(messages: list[dict[str, str]]) -> int:
    tok = fake_tokenizer()
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return len(tok.encode(text, add_special_tokens=False))


def sdk(server: Running) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0)


def async_sdk(server: Running) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0)


def test_models_list_and_retrieve(fake_server: Running) -> None:
    client = sdk(fake_server)
    models = client.models.list().data
    assert [m.id for m in models] == [fake_server.state.model_name]
    assert client.models.retrieve(models[0].id).id == models[0].id
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_chat_non_streaming(fake_server: Running) -> None:
    resp = sdk(fake_server).chat.completions.create(
        model=fake_server.state.model_name, messages=MSGS, max_tokens=20)  # type: ignore[arg-type]
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == FAKE_TEXT[:20]
    assert choice.finish_reason == "length"
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (prompt_len(MSGS), 20)
    assert resp.usage.total_tokens == prompt_len(MSGS) + 20
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion"


def test_chat_runs_to_eos_with_multibyte_text(fake_server: Running) -> None:
    resp = sdk(fake_server).chat.completions.create(model="fake", messages=MSGS)  # type: ignore[arg-type]
    assert resp.choices[0].message.content == FAKE_TEXT  # ends in "Café, 東京, 🚀."
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None
    assert resp.usage.completion_tokens == len(FAKE_TEXT.encode()) + 1  # bytes + EOS


def test_chat_streaming_shape_and_usage(fake_server: Running) -> None:
    stream = sdk(fake_server).chat.completions.create(
        model="fake", messages=MSGS, stream=True, stream_options={"include_usage": True},  # type: ignore[arg-type]
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert all(REPLACEMENT not in d for d in deltas)  # no half characters mid-stream
    assert "".join(deltas) == FAKE_TEXT
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(FAKE_TEXT.encode()) + 1
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_raw_sse_framing_ends_with_done(fake_server: Running) -> None:
    body = {"messages": MSGS, "stream": True, "max_tokens": 3}
    with httpx.stream("POST", fake_server.url("/v1/chat/completions"), json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


def test_async_sdk_streaming_and_not(fake_server: Running) -> None:
    async def run() -> tuple[str, str]:
        client = async_sdk(fake_server)
        full = await client.chat.completions.create(model="fake", messages=MSGS, max_tokens=30)  # type: ignore[arg-type]
        stream = await client.chat.completions.create(
            model="fake", messages=MSGS, max_tokens=30, stream=True)  # type: ignore[arg-type]
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        return full.choices[0].message.content or "", text

    full, streamed = asyncio.run(run())
    assert full == streamed == FAKE_TEXT[:30]


def test_n_choices_streaming_and_not(fake_server: Running) -> None:
    client = sdk(fake_server)
    resp = client.chat.completions.create(model="fake", messages=MSGS, n=3, max_tokens=8)  # type: ignore[arg-type]
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert all(c.message.content == FAKE_TEXT[:8] for c in resp.choices)
    assert resp.usage is not None and resp.usage.completion_tokens == 24
    assert resp.usage.prompt_tokens == prompt_len(MSGS)  # the prompt is counted once
    texts = {0: "", 1: "", 2: ""}
    for chunk in client.chat.completions.create(
        model="fake", messages=MSGS, n=3, max_tokens=8, stream=True  # type: ignore[arg-type]
    ):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == {i: FAKE_TEXT[:8] for i in range(3)}


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings(fake_server: Running, stream: bool) -> None:
    before = fake_server.metric("dspark_request_success_total", finished_reason="stop")
    client = sdk(fake_server)
    kwargs = {"model": "fake", "messages": MSGS, "stop": ["target", "zzz"]}
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kwargs))  # type: ignore[call-overload]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    else:
        resp = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
        text, reason = resp.choices[0].message.content, resp.choices[0].finish_reason
    assert text == FAKE_TEXT[: FAKE_TEXT.index("target")]
    assert reason == "stop"
    after = fake_server.metric("dspark_request_success_total", finished_reason="stop")
    assert after == before + 1  # the gateway's abort on a stop string counts as "stop"


def test_completions_prompts_n_echo(fake_server: Running) -> None:
    client = sdk(fake_server)
    resp = client.completions.create(model="fake", prompt=["one", "two"], n=2, max_tokens=4)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert all(c.text == FAKE_TEXT[:4] for c in resp.choices)
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (6, 16)
    echo = client.completions.create(model="fake", prompt="Echo: ", max_tokens=3, echo=True)
    assert echo.choices[0].text == "Echo: " + FAKE_TEXT[:3]
    ids = fake_tokenizer().encode("abc", add_special_tokens=False)
    by_ids = client.completions.create(model="fake", prompt=ids, max_tokens=3)
    assert by_ids.choices[0].text == FAKE_TEXT[:3] and by_ids.object == "text_completion"
    streamed = "".join(
        c.choices[0].text for c in client.completions.create(
            model="fake", prompt="x", max_tokens=12, stream=True) if c.choices
    )
    assert streamed == FAKE_TEXT[:12]


def test_32_concurrent_streams_complete_with_correct_usage(fake_server: Running) -> None:
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, int, int]:
        stream = await client.chat.completions.create(
            model="fake", messages=[{"role": "user", "content": f"request {i}"}],
            max_tokens=10 + i, stream=True, stream_options={"include_usage": True},
        )
        text, usage = "", None
        async for c in stream:
            if c.choices:
                text += c.choices[0].delta.content or ""
            if c.usage is not None:
                usage = c.usage
        assert usage is not None
        return text, usage.completion_tokens, usage.prompt_tokens

    async def run() -> list[tuple[str, int, int]]:
        client = async_sdk(fake_server)
        return await asyncio.gather(*(one(client, i) for i in range(32)))

    results = asyncio.run(run())
    for i, (text, completion, prompt) in enumerate(results):
        assert text == FAKE_TEXT[: 10 + i]
        assert completion == 10 + i
        assert prompt == prompt_len([{"role": "user", "content": f"request {i}"}])


@pytest.fixture(scope="module")
def recording_server() -> Iterator[tuple[Running, list[Request]]]:
    """Scripted engine that records the engine requests and reports speculation stats."""
    seen: list[Request] = []
    script = fake_text_script(fake_tokenizer())

    def record(req: Request) -> list[int]:
        seen.append(req)
        return script(req)

    with serve(scripted_app(record, tokens_per_step=3, spec=True)) as running:
        yield running, seen


def test_sampling_fields_reach_the_engine(recording_server: tuple[Running, list[Request]]) -> None:
    server, seen = recording_server
    seen.clear()
    sdk(server).chat.completions.create(
        model="scripted", messages=MSGS, n=2, seed=41, temperature=0.7, top_p=0.9, max_tokens=6,  # type: ignore[arg-type]
        presence_penalty=0.5, frequency_penalty=0.25,
        extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "speculative": False,
                    "stop_token_ids": [7]},
    )
    params = sorted((r.params for r in seen), key=lambda p: p.seed or 0)
    assert [p.seed for p in params] == [41, 42]  # seed + i per choice
    p = params[0]
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens) == (0.7, 0.9, 5, 0.1, 6)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, 0.25, 1.1)
    assert p.speculative is False and p.stop_token_ids == (7,)


def test_speculation_metrics_extra_field(recording_server: tuple[Running, list[Request]]) -> None:
    server, _ = recording_server
    body = {"messages": MSGS, "max_tokens": 9}
    resp = httpx.post(server.url("/v1/chat/completions"), json=body).json()
    spec = resp["metrics"]["speculative_decoding"]
    # Three tokens per step: 3 verification rounds, 2 drafts each, all accepted.
    assert spec == {"num_spec_steps": 3, "num_draft_tokens": 6, "num_accepted_draft_tokens": 6,
                    "draft_acceptance_rate": 1.0, "mean_acceptance_length": 3.0}
    with httpx.stream("POST", server.url("/v1/chat/completions"),
                      json={**body, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: {")]
    assert '"speculative_decoding"' in lines[-1] and '"finish_reason":"length"' in lines[-1]


def test_speculation_metrics_and_opt_out_with_the_ngram_drafter() -> None:
    with serve(fake_app(step_s=0.0, speculative="ngram", num_speculative_tokens=4)) as server:
        # The prompt repeats the fake model's text, so n-gram drafts find continuations.
        body = {"messages": [{"role": "user", "content": FAKE_TEXT[:100]}], "max_tokens": 60,
                "temperature": 0}
        resp = httpx.post(server.url("/v1/chat/completions"), json=body).json()
        assert resp["choices"][0]["message"]["content"] == FAKE_TEXT[:60]  # lossless
        spec = resp["metrics"]["speculative_decoding"]
        assert spec["num_spec_steps"] > 0
        assert 0 < spec["num_accepted_draft_tokens"] <= spec["num_draft_tokens"]
        assert spec["mean_acceptance_length"] == pytest.approx(
            1 + spec["num_accepted_draft_tokens"] / spec["num_spec_steps"])
        assert server.metric("dspark_spec_decode_num_draft_tokens_total") >= spec["num_draft_tokens"]
        plain = httpx.post(server.url("/v1/chat/completions"), json={**body, "speculative": False})
        assert plain.json()["choices"][0]["message"]["content"] == FAKE_TEXT[:60]
        assert "metrics" not in plain.json()  # this request was decoded without drafting
