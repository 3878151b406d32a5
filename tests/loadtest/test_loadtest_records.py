"""SSE parsing, timing definitions and speculation-stat extraction (no network)."""

from __future__ import annotations

import json

import pytest

from loadtest.prompts import Prompt
from loadtest.records import (
    RequestOptions,
    StreamRecord,
    build_body,
    find_spec_stats,
    record_from_json,
    sse_payloads,
    token_times,
)

P = Prompt("x/1", "chat", "hello chat", "hello raw")


def chat_chunk(text: str | None, finish: str | None = None) -> str:
    delta = {"content": text} if text is not None else {}
    return json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


def feed_stream(events: list[tuple[float, str | None]], t_start: float = 10.0) -> StreamRecord:
    rec = StreamRecord("x/1", "chat", t_start=t_start)
    for t, payload in events:
        rec.feed(payload, t)
    rec.finish(events[-1][0])
    return rec


def test_sse_payloads_skips_noise_and_stops_at_done() -> None:
    lines: list[bytes | str] = [
        b": keep-alive",
        b"",
        b"event: message",
        b'data: {"a": 1}',
        b"",
        'data:{"b":2}',
        b"data: [DONE]",
        b'data: {"after": true}',
    ]
    assert list(sse_payloads(lines)) == ['{"a": 1}', '{"b":2}', None]


def test_ttft_tpot_itl_use_content_chunks_and_usage_tokens() -> None:
    # Role chunk at 10.05 (no content), tokens at 10.2 (1), 10.3 (3 tokens in one burst),
    # 10.5 (2), usage says 6 tokens; trailing usage chunk at 10.6 is not decode time.
    usage = json.dumps({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 6}})
    role = json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
    rec = feed_stream(
        [
            (10.05, role),
            (10.2, chat_chunk("a")),
            (10.3, chat_chunk("bcd")),
            (10.5, chat_chunk("ef")),
            (10.55, chat_chunk(None, "length")),
            (10.6, usage),
            (10.61, None),
        ]
    )
    assert rec.ok and rec.saw_done
    assert rec.ttft == pytest.approx(0.2)
    assert rec.e2e == pytest.approx(0.61)
    assert rec.n_tokens == 6 and rec.prompt_tokens == 7
    assert rec.tpot == pytest.approx((10.5 - 10.2) / 5)
    assert rec.itl == pytest.approx([0.1, 0.2])
    assert rec.finish_reason == "length"


def test_completions_text_and_fallback_token_count() -> None:
    rec = StreamRecord("x/1", "code", t_start=0.0)
    for i, t in enumerate((0.1, 0.2, 0.4)):
        rec.feed(json.dumps({"choices": [{"index": 0, "text": f"t{i}"}]}), t)
    rec.feed(None, 0.5)
    rec.finish(0.5)
    # No usage chunk: one token per content chunk is the best lower bound.
    assert rec.n_tokens == 3
    assert rec.tpot == pytest.approx(0.15)


def test_error_event_and_empty_stream_fail() -> None:
    rec = feed_stream([(1.0, json.dumps({"error": {"message": "queue full"}}))], t_start=0.5)
    assert not rec.ok and rec.error == "queue full"
    empty = StreamRecord("x/1", "chat", t_start=0.0)
    empty.finish(1.0)
    assert not empty.ok and empty.error == "stream ended without content"


@pytest.mark.parametrize(
    "obj",
    [
        {
            "metrics": {
                "speculative_decoding": {
                    "num_drafts": 4,
                    "num_draft_tokens": 12,
                    "num_accepted_tokens": 9,
                }
            }
        },
        {
            "speculative_decoding": {
                "num_drafts": 4,
                "num_draft_tokens": 12,
                "num_accepted_tokens": 9,
            }
        },
        {"spec": {"num_drafts": 4, "num_draft_tokens": 12, "num_accepted_tokens": 9}},
        {
            "usage": {
                "completion_tokens": 3,
                "x_spec": {"num_drafts": 4, "num_draft_tokens": 12, "num_accepted_tokens": 9},
            }
        },
    ],
)
def test_spec_stats_found_wherever_they_are(obj: dict) -> None:
    assert find_spec_stats(obj) == {
        "num_drafts": 4.0,
        "num_draft_tokens": 12.0,
        "num_accepted_tokens": 9.0,
    }


def test_spec_stats_vllm_names_are_normalised() -> None:
    # What dspark-serve sends on the last content chunk.
    obj = {
        "choices": [],
        "metrics": {
            "speculative_decoding": {
                "num_spec_steps": 5,
                "num_draft_tokens": 20,
                "num_accepted_draft_tokens": 11,
                "draft_acceptance_rate": 0.55,
                "mean_acceptance_length": 3.2,
            }
        },
    }
    assert find_spec_stats(obj) == {
        "num_drafts": 5.0,
        "num_draft_tokens": 20.0,
        "num_accepted_tokens": 11.0,
        "mean_acceptance_length": 3.2,
    }


def test_spec_stats_absent() -> None:
    assert find_spec_stats({"choices": [], "usage": {"completion_tokens": 3}}) is None


def test_token_times_split_by_characters_and_sum_exactly() -> None:
    rec = StreamRecord(
        "x/1",
        "chat",
        t_start=0.0,
        chunk_times=[1.0, 2.0],
        chunk_chars=[1, 3],
        output_tokens=8,
        t_end=2.0,
    )
    assert token_times(rec) == [(1.0, 2.0), (2.0, 6.0)]


def test_json_round_trip_keeps_derived_values() -> None:
    rec = StreamRecord(
        "x/1",
        "chat",
        t_start=105.0,
        t_sched=104.9,
        t_end=106.0,
        chunk_times=[105.25, 105.5, 105.75],
        chunk_chars=[1, 1, 1],
        output_tokens=3,
        saw_done=True,
    )
    back = record_from_json(json.loads(json.dumps(rec.to_json(t0=100.0))))
    assert back.t_start == pytest.approx(5.0) and back.t_sched == pytest.approx(4.9)
    assert back.ttft == pytest.approx(rec.ttft) and back.tpot == pytest.approx(rec.tpot)
    assert back.lag == pytest.approx(0.1)


def test_build_body_chat_and_completions() -> None:
    chat = build_body(P, RequestOptions(max_tokens=5, temperature=0.0, ignore_eos=True))
    assert chat["messages"] == [{"role": "user", "content": "hello chat"}]
    assert chat["stream"] is True and chat["stream_options"] == {"include_usage": True}
    assert chat["ignore_eos"] is True and chat["max_tokens"] == 5
    comp = build_body(P, RequestOptions(endpoint="completions"))
    assert comp["prompt"] == "hello raw" and "messages" not in comp and "ignore_eos" not in comp
    assert "model" not in comp  # the server falls back to its served model
    assert build_body(P, RequestOptions(model="m"))["model"] == "m"
    assert RequestOptions(endpoint="completions").path == "/v1/completions"
    with pytest.raises(ValueError):
        build_body(P, RequestOptions(endpoint="embeddings"))
