"""A client that goes away frees its engine slot within a step: streaming, non-streaming, queued.

Three ways to hang up (serving anchors 3.7): closing the SDK stream, a read timeout on a
non-streaming call, and a raw socket close.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from gateway_harness import Running, fake_app, fake_settings, serve, wait_until

STEP_S = 0.05
MSGS = [{"role": "user", "content": "talk"}]


# ignore_eos: the fake model's text ends after ~190 tokens; past it, it keeps emitting.
LONG = {"max_tokens": 900, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def slow() -> Iterator[Running]:
    """Four slots, 50 ms steps: requests with ignore_eos run until someone stops them."""
    settings = fake_settings(max_num_seqs=4, max_model_len=2048)
    with serve(fake_app(settings, step_s=STEP_S)) as running:
        yield running


def idle(server: Running) -> bool:
    return (server.state.client is not None and server.state.client.num_in_flight == 0
            and server.metric("dspark_num_requests_running") == 0
            and server.metric("dspark_num_requests_waiting") == 0)


def aborted(server: Running) -> float:
    return server.metric("dspark_request_success_total", finished_reason="abort")


def test_sdk_stream_close_frees_slots_and_they_are_reused(slow: Running) -> None:
    client = openai.OpenAI(base_url=slow.url("/v1"), api_key="x", max_retries=0)
    before = aborted(slow)
    streams = [client.chat.completions.create(model="fake", messages=MSGS, stream=True,  # type: ignore[arg-type]
                                              **LONG) for _ in range(4)]
    for s in streams:
        for _, chunk in zip(range(3), s):  # a few chunks: the request is running
            assert chunk.id
    assert slow.metric("dspark_num_requests_running") == 4
    t0 = time.monotonic()
    for s in streams:
        s.close()
    wait_until(lambda: idle(slow), 5, "slots freed")
    assert time.monotonic() - t0 < 1.0  # a handful of 50 ms steps, not the 45 s the rest would take
    assert aborted(slow) == before + 4
    # The freed slots serve new requests to completion.
    for s in [client.chat.completions.create(model="fake", messages=MSGS, max_tokens=5)  # type: ignore[arg-type]
              for _ in range(4)]:
        assert s.choices[0].finish_reason == "length" and s.usage and s.usage.completion_tokens == 5


def test_non_streaming_client_timeout_aborts(slow: Running) -> None:
    before = aborted(slow)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(slow.url("/v1/chat/completions"), json={"messages": MSGS, "max_tokens": 900, "ignore_eos": True},
                   timeout=httpx.Timeout(5.0, read=0.3))
    wait_until(lambda: idle(slow), 5, "non-streaming request aborted")
    assert aborted(slow) == before + 1


def test_raw_socket_close_mid_stream(slow: Running) -> None:
    before = aborted(slow)
    host, port = slow.base_url.removeprefix("http://").split(":")
    body = json.dumps({"messages": MSGS, "max_tokens": 900, "stream": True,
                       "ignore_eos": True}).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert b"200 OK" in sock.recv(4096)
        wait_until(lambda: slow.metric("dspark_num_requests_running") == 1, 5, "running")
    wait_until(lambda: idle(slow), 5, "socket close noticed")
    assert aborted(slow) == before + 1


def test_queued_request_is_dropped_when_its_client_leaves(slow: Running) -> None:
    client = openai.OpenAI(base_url=slow.url("/v1"), api_key="x", max_retries=0)
    streams = [client.chat.completions.create(model="fake", messages=MSGS, stream=True,  # type: ignore[arg-type]
                                              **LONG) for _ in range(4)]
    for s in streams:
        next(iter(s))
    # A fifth request waits for a slot; its client gives up while it is queued.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(slow.url("/v1/chat/completions"), json={"messages": MSGS, "max_tokens": 5},
                   timeout=httpx.Timeout(5.0, read=0.3))
    wait_until(lambda: slow.state.client is not None and slow.state.client.num_in_flight == 4, 5,
               "queued request dropped while the slots stay busy")
    assert slow.metric("dspark_num_requests_running") == 4
    for s in streams:
        s.close()
    wait_until(lambda: idle(slow), 5, "all freed")
