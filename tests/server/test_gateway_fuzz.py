"""Bad input: schema-driven fuzzing (schemathesis, from the app's own OpenAPI) and hand cases.

The bar: never a 5xx, never a hang (every call has a timeout), and the server keeps serving.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from gateway_harness import Running, fake_app, fake_settings, serve
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.generation import GenerationMode

from server.app import create_app

SETTINGS = fake_settings(max_body_bytes=256 * 1024, max_model_len=256)
TIMEOUT = httpx.Timeout(15.0)


def _schema() -> Any:
    config = SchemathesisConfig()
    config.projects.default.generation.update(
        modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], database="none",
    )
    # The schema only: building the app does not load an engine (that happens at startup).
    spec = create_app(SETTINGS, lambda: None).openapi()
    return schemathesis.openapi.from_dict(spec, config=config)


schema = _schema()


@pytest.fixture(scope="module")
def target() -> Iterator[Running]:
    app = fake_app(SETTINGS, step_s=0.0)
    with serve(app) as running:
        yield running


def still_serving(server: Running) -> None:
    r = httpx.post(server.url("/v1/chat/completions"), timeout=TIMEOUT,
                   json={"messages": [{"role": "user", "content": "ok?"}], "max_tokens": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_schema_fuzz_never_5xx(case: Any, target: Running) -> None:
    response = case.call(base_url=target.base_url, timeout=15)
    case.validate_response(response, checks=[not_a_server_error])


def test_still_serving_after_schema_fuzz(target: Running) -> None:
    still_serving(target)
    assert target.state.client is not None
    assert target.state.client.num_in_flight == 0  # nothing leaked


MSG = [{"role": "user", "content": "hi"}]
BAD_BODIES: list[tuple[str, bytes | dict[str, Any] | list[Any] | str | None]] = [
    ("empty body", b""),
    ("whitespace", b"   \n"),
    ("null", b"null"),
    ("number", b"42"),
    ("string", b'"messages"'),
    ("array", b"[1, 2, 3]"),
    ("truncated", b'{"messages": [{"role": "user", "content": "x"'),
    ("invalid utf-8", b'{"messages": [{"role": "user", "content": "\xff\xfe\xfd"}]}'),
    ("lone surrogate", b'{"messages": [{"role": "user", "content": "\\ud800"}]}'),
    ("nan temperature", b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}'),
    ("infinite top_p", b'{"messages": [{"role": "user", "content": "x"}], "top_p": Infinity}'),
    ("deep nesting", b"[" * 50_000 + b"]" * 50_000),
    ("deep object", b'{"a":' * 5_000 + b"1" + b"}" * 5_000),
    ("messages wrong type", {"messages": {"role": "user"}}),
    ("message wrong type", {"messages": [42]}),
    ("content wrong type", {"messages": [{"role": "user", "content": {"text": 1}}]}),
    ("role unknown", {"messages": [{"role": "wizard", "content": "x"}]}),
    ("negative max_tokens", {"messages": MSG, "max_tokens": -5}),
    ("zero max_tokens", {"messages": MSG, "max_tokens": 0}),
    ("huge max_tokens", {"messages": MSG, "max_tokens": 2**70}),
    ("float max_tokens", {"messages": MSG, "max_tokens": 3.5}),
    ("string max_tokens", {"messages": MSG, "max_tokens": "10"}),
    ("large n", {"messages": MSG, "n": 10_000}),
    ("negative n", {"messages": MSG, "n": -1}),
    ("huge seed", {"messages": MSG, "seed": 2**80}),
    ("bool as n", {"messages": MSG, "n": True, "max_tokens": 2}),
    ("many stops", {"messages": MSG, "stop": ["a"] * 1000}),
    ("huge stop", {"messages": MSG, "stop": "x" * 100_000}),
    ("huge logprobs", {"messages": MSG, "logprobs": True, "top_logprobs": 10**9}),
    ("nested content parts", {"messages": [{"role": "user", "content": [[[[{"type": "text"}]]]]}]}),
    ("null model", {"model": None, "messages": MSG, "max_tokens": 2}),
    ("unicode soup", {"messages": [{"role": "user", "content": "\u202e\u200b\U0001f680\x00東京"}],
                      "max_tokens": 4}),
    ("huge prompt within the body limit", {"messages": [{"role": "user", "content": "x" * 200_000}]}),
    ("token ids out of vocabulary", None),
]


@pytest.mark.parametrize("name,body", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_hand_fuzz_cases(target: Running, name: str, body: Any) -> None:
    url = target.url("/v1/chat/completions")
    headers = {"Content-Type": "application/json"}
    if body is None:  # completions with token ids past the vocabulary
        r = httpx.post(target.url("/v1/completions"), json={"prompt": [10**9, 5]}, timeout=TIMEOUT)
    elif isinstance(body, bytes):
        r = httpx.post(url, content=body, headers=headers, timeout=TIMEOUT)
    else:
        r = httpx.post(url, json=body, timeout=TIMEOUT)
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        err = r.json()["error"]
        assert err["type"] and err["message"] and "Traceback" not in r.text
    still_serving(target)


def test_completions_hand_cases(target: Running) -> None:
    url = target.url("/v1/completions")
    for body in ({"prompt": []}, {"prompt": [[]]}, {"prompt": ""}, {"prompt": [-1]},
                 {"prompt": ["a"] * 1000}, {"prompt": "x", "best_of": 3},
                 {"prompt": "x", "logprobs": 99}, {"prompt": {"a": 1}}, {"prompt": "x", "echo": "yes"}):
        r = httpx.post(url, json=body, timeout=TIMEOUT)
        assert 400 <= r.status_code < 500, (body, r.text)
    still_serving(target)
