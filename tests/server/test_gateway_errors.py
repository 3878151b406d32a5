"""Every error case over raw HTTP: status, OpenAI error shape, headers, and no internals leaked."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from gateway_harness import (
    FAKE_SETTINGS,
    Running,
    fake_app,
    fake_engine_factory,
    fake_settings,
    serve,
    wait_until,
)

from server.app import create_app

MSGS = [{"role": "user", "content": "hi"}]
KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None,
                        param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    for leak in ("Traceback", 'File "', ".py", "/home", "/usr", "site-packages"):
        assert leak not in r.text
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    return err  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def guarded() -> Iterator[Running]:
    """API key set, 4 KiB body limit, 2 slots and no queue, slow steps (so requests overlap)."""
    settings = fake_settings(api_key=KEY, max_body_bytes=4096, max_num_seqs=2,
                       max_queue=0)
    app = fake_app(settings, step_s=0.02)
    with serve(app) as running:
        yield running


def post(server: Running, body: Any, path: str = "/v1/chat/completions", **kw: Any) -> httpx.Response:
    headers = {**AUTH, **kw.pop("headers", {})}
    if isinstance(body, (bytes, str)):
        return httpx.post(server.url(path), content=body, headers=headers, **kw)
    return httpx.post(server.url(path), json=body, headers=headers, **kw)


def test_malformed_json_is_400(guarded: Running) -> None:
    r = post(guarded, b'{"messages": [', headers={"Content-Type": "application/json"})
    assert_openai_error(r, 400)
    assert "JSON" in r.json()["error"]["message"]


def test_validation_errors_are_400_and_name_the_field(guarded: Running) -> None:
    assert_openai_error(post(guarded, {"messages": "nope"}), 400, param="messages")
    assert_openai_error(post(guarded, {"messages": MSGS, "n": 0}), 400, param="n")
    assert_openai_error(post(guarded, {"messages": MSGS, "temperature": "hot"}), 400,
                        param="temperature")
    assert_openai_error(post(guarded, {"messages": MSGS, "bogus": 1}), 400, param="bogus")
    assert_openai_error(post(guarded, {"messages": MSGS, "max_tokens": -1}), 400, param="max_tokens")
    assert_openai_error(post(guarded, {}), 400)


@pytest.mark.parametrize("field,value", [
    ("functions", [{"name": "f"}]),  # the deprecated form of tools
    ("function_call", "auto"),
    ("audio", {"voice": "x"}),
    ("logit_bias", {"1": 5}),
])
def test_unsupported_fields_are_400_naming_them(guarded: Running, field: str, value: Any) -> None:
    err = assert_openai_error(post(guarded, {"messages": MSGS, field: value}), 400, param=field,
                              code="unsupported_parameter")
    assert field in err["message"]


def test_every_4xx_is_logged_with_its_reason_and_never_the_prompt(
    guarded: Running, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "my-secret-prompt-text"
    with caplog.at_level(logging.INFO, logger="server.errors"):
        post(guarded, {"messages": [{"role": "user", "content": secret}], "bogus": 1})
        post(guarded, {"messages": [{"role": "user", "content": secret}], "audio": {"v": 1}})
        post(guarded, {"messages": MSGS, "model": "gpt-9"})
        # refused by the guard in front of FastAPI: no key, a body over the limit
        post(guarded, {"messages": [{"role": "user", "content": secret}]}, headers={"Authorization": ""})
        post(guarded, {"messages": [{"role": "user", "content": secret * 500}]})
    lines = [r.getMessage() for r in caplog.records if r.name == "server.errors"]
    assert any("-> 400" in line and "bogus" in line for line in lines), lines
    assert any("POST /v1/chat/completions -> 401 invalid_api_key" in line for line in lines), lines
    assert any("-> 413 request_too_large" in line for line in lines), lines
    assert any("-> 400" in line and "audio is not supported" in line for line in lines), lines
    assert any("-> 404" in line and "model_not_found" in line for line in lines), lines
    assert not any(secret in line for line in lines)


def test_unknown_model_is_404(guarded: Running) -> None:
    err = assert_openai_error(post(guarded, {"model": "gpt-9", "messages": MSGS}), 404,
                              code="model_not_found", param="model")
    assert "gpt-9" in err["message"]


def test_context_length_exceeded(guarded: Running) -> None:
    r = post(guarded, {"messages": MSGS, "max_tokens": 10_000})
    assert_openai_error(r, 400, code="context_length_exceeded", param="messages")
    long_prompt = [{"role": "user", "content": "x" * 600}]  # > max_model_len (512) byte tokens
    assert_openai_error(post(guarded, {"messages": long_prompt}), 400, code="context_length_exceeded")
    r = post(guarded, {"prompt": "x" * 600}, path="/v1/completions")
    assert_openai_error(r, 400, code="context_length_exceeded", param="prompt")


def test_api_key_required_on_v1_only(guarded: Running) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(guarded.url("/v1/chat/completions"), json={"messages": MSGS}, headers=headers)
        assert_openai_error(r, 401, code="invalid_api_key")
    assert_openai_error(httpx.get(guarded.url("/v1/models")), 401)
    assert post(guarded, {"messages": MSGS, "max_tokens": 2}).status_code == 200
    # Probes and metrics stay open (documented policy: keep them on a private network).
    assert httpx.get(guarded.url("/health")).status_code == 200
    assert httpx.get(guarded.url("/metrics")).status_code == 200
    assert guarded.metric("dspark_request_rejected_total", reason="auth") >= 4
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=guarded.url("/v1"), api_key="wrong", max_retries=0).models.list()


def test_body_too_large_is_413(guarded: Running) -> None:
    big = {"messages": [{"role": "user", "content": "x" * 10_000}]}
    assert_openai_error(post(guarded, big), 413, code="request_too_large")

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        yield json.dumps(big).encode()[:3000]
        yield json.dumps(big).encode()[3000:]

    r = httpx.post(guarded.url("/v1/chat/completions"), content=chunked(),
                   headers={**AUTH, "Content-Type": "application/json"})
    assert_openai_error(r, 413, code="request_too_large")
    assert guarded.metric("dspark_request_rejected_total", reason="body_too_large") >= 2


def test_queue_full_is_429_with_retry_after(
    guarded: Running, caplog: pytest.LogCaptureFixture
) -> None:
    # Two slots, no queue: two long streams fill the server, the third is refused at once.
    body = {"messages": MSGS, "stream": True, "max_tokens": 100}
    before = guarded.metric("dspark_request_rejected_total", reason="queue_full")
    url = guarded.url("/v1/chat/completions")
    with (
        httpx.Client(headers=AUTH, timeout=30) as c1,
        httpx.Client(headers=AUTH, timeout=30) as c2,
        c1.stream("POST", url, json=body) as s1,
        c2.stream("POST", url, json=body) as s2,
    ):
        lines1, lines2 = s1.iter_lines(), s2.iter_lines()  # keep them: closing ends the stream
        next(lines1)
        next(lines2)
        with caplog.at_level(logging.INFO, logger="server.errors"):
            r = post(guarded, {"messages": MSGS, "max_tokens": 5})
        assert_openai_error(r, 429, code="queue_full")
        assert "-> 429 queue_full" in caplog.text
        assert r.headers["Retry-After"] == "1"
        r = post(guarded, {"prompt": "x", "n": 2}, path="/v1/completions")
        assert_openai_error(r, 429)
    assert guarded.metric("dspark_request_rejected_total", reason="queue_full") == before + 2
    # Capacity comes back once the streams are gone.
    wait_until(lambda: post(guarded, {"messages": MSGS, "max_tokens": 2}).status_code == 200,
               what="capacity after the streams closed")


def test_unknown_route_and_method_use_the_error_shape(guarded: Running) -> None:
    assert_openai_error(httpx.get(guarded.url("/v1/nothing"), headers=AUTH), 404)
    assert_openai_error(httpx.get(guarded.url("/v1/chat/completions"), headers=AUTH), 405)


def test_not_ready_while_loading() -> None:
    release = threading.Event()
    build = fake_engine_factory()

    def slow_factory() -> Any:
        release.wait(30)
        return build()

    app = create_app(FAKE_SETTINGS, slow_factory)
    with serve(app, wait_ready=False) as running:
        assert httpx.get(running.url("/health")).status_code == 200  # alive while loading
        assert httpx.get(running.url("/ready")).status_code == 503
        r = httpx.post(running.url("/v1/chat/completions"), json={"messages": MSGS})
        assert_openai_error(r, 503, code="model_loading")
        assert r.headers["Retry-After"] == "1"
        release.set()
        wait_until(lambda: httpx.get(running.url("/ready")).status_code == 200, what="ready")
        r = httpx.post(running.url("/v1/chat/completions"), json={"messages": MSGS, "max_tokens": 2})
        assert r.status_code == 200
