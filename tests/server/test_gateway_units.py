"""Unit tests of the gateway's pure parts: detokenizer, stop strings, protocol, settings."""

from __future__ import annotations

from dataclasses import fields

import pytest
from gateway_harness import fake_tokenizer
from pydantic import ValidationError

from scheduler.build import drafter_names
from scheduler.config import EngineConfig
from scheduler.request import FinishReason, RequestOutput
from server.choices import ChoiceState, _held_back, usage
from server.errors import APIError
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.settings import ServerSettings, build_parser, parse_settings
from server.tokenizer import REPLACEMENT, ChatTokenizer, IncrementalDetokenizer

TEXT = "Hi 🚀 東京 café — done"


@pytest.fixture(scope="module")
def tok() -> ChatTokenizer:
    return ChatTokenizer(fake_tokenizer())


def test_fake_tokenizer_splits_multibyte_characters(tok: ChatTokenizer) -> None:
    # The premise of the detokenizer tests: one token per byte, so 🚀 is four tokens.
    assert len(tok.encode("🚀")) == 4
    assert tok.decode(tok.encode("🚀")[:2]) == REPLACEMENT or REPLACEMENT in tok.decode(
        tok.encode("🚀")[:2]
    )


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_incremental_detokenizer_never_emits_partial_characters(tok: ChatTokenizer, chunk: int) -> None:
    ids = tok.encode(TEXT)
    detok = IncrementalDetokenizer(tok, prompt_ids=tok.encode("prompt"))
    deltas = []
    for i in range(0, len(ids), chunk):
        deltas.append(detok.push(ids[i : i + chunk]))
    deltas.append(detok.flush())
    assert all(REPLACEMENT not in d for d in deltas)
    assert "".join(deltas) == TEXT == tok.decode(ids) == detok.text


def test_detokenizer_flush_releases_a_truly_invalid_tail(tok: ChatTokenizer) -> None:
    ids = tok.encode("ok🚀")[:-1]  # the model stopped mid-character
    detok = IncrementalDetokenizer(tok)
    assert detok.push(ids[:2]) == "ok"
    assert detok.push(ids[2:]) == ""  # held: it might still become a character
    assert detok.flush() == tok.decode(ids)[2:]
    assert detok.text == tok.decode(ids)


def test_held_back_is_longest_suffix_that_starts_a_stop_string() -> None:
    assert _held_back("hello wor", ["world"]) == 3
    assert _held_back("hello", ["xyz"]) == 0
    assert _held_back("abcab", ["abcx", "bx"]) == 2  # "ab" could become "abcx"
    assert _held_back("a", ["a"]) == 0  # a full match is cut, never held


def _outputs(tok: ChatTokenizer, text: str, per_step: int, req_id: str = "r") -> list[RequestOutput]:
    ids = tok.encode(text)
    outs = []
    for i in range(0, len(ids), per_step):
        last = i + per_step >= len(ids)
        outs.append(RequestOutput(req_id, ids[i : i + per_step],
                                  FinishReason.LENGTH if last else None,
                                  num_prompt_tokens=3, num_output_tokens=min(i + per_step, len(ids))))
    return outs


@pytest.mark.parametrize("per_step", [1, 2, 4, 7])
def test_stop_string_across_token_boundaries_never_leaks(tok: ChatTokenizer, per_step: int) -> None:
    choice = ChoiceState(0, "r", tok, [1, 2, 3], stops=["STOP", "東京"])
    shown = ""
    for out in _outputs(tok, "abc 🚀 x東京 after STOP more", per_step):
        delta = choice.add(out)
        shown += delta.text
        assert "東" not in shown  # not even the first character of the stop string
        if choice.finished:
            break
    assert shown == "abc 🚀 x" == choice.text
    assert choice.finish_reason == "stop" and choice.hit_stop_string


def test_stop_string_absent_keeps_full_text_and_engine_reason(tok: ChatTokenizer) -> None:
    choice = ChoiceState(0, "r", tok, [1], stops=["zzz"])
    shown = "".join(choice.add(o).text for o in _outputs(tok, "no stop here z", 3))
    assert shown == "no stop here z" and choice.finish_reason == "length"


def test_error_output_marks_choice_failed(tok: ChatTokenizer) -> None:
    choice = ChoiceState(0, "r", tok, [1])
    delta = choice.add(RequestOutput("r", [], FinishReason.ERROR, error="boom"))
    assert delta.error == "boom" and choice.finished


def test_usage_reports_the_prompt_tokens_read_from_the_prefix_cache(tok: ChatTokenizer) -> None:
    """OpenAI's `prompt_tokens_details.cached_tokens`: per distinct prompt, the fewest any of
    its choices read (the prompt is counted once)."""
    a0, a1, b = ChoiceState(0, "a0", tok, [1, 2, 3]), ChoiceState(1, "a1", tok, [1, 2, 3]), ChoiceState(2, "b", tok, [4, 5])
    a0.num_cached_tokens, a1.num_cached_tokens, b.num_cached_tokens = 16, 8, 0
    out = usage([a0, a1, b], [3, 2])
    assert out["prompt_tokens"] == 5
    assert out["prompt_tokens_details"] == {"cached_tokens": 8}


def test_chat_request_rejects_unsupported_fields_by_name() -> None:
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(APIError) as e:
        ChatCompletionRequest.model_validate({"messages": msgs, "functions": [{"name": "f"}]})
    assert e.value.param == "functions" and e.value.status == 400
    with pytest.raises(APIError) as e:
        ChatCompletionRequest.model_validate({"messages": msgs, "audio": {"voice": "x"}})
    assert e.value.param == "audio"
    # "Off" values of unsupported fields are fine.
    ChatCompletionRequest.model_validate(
        {"messages": msgs, "functions": [], "response_format": {"type": "text"}, "tool_choice": "none"})


def test_chat_request_validation() -> None:
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    req = ChatCompletionRequest.model_validate({"messages": msgs, "max_completion_tokens": 5})
    assert req.messages[0].text() == "ab" and req.requested_max_tokens() == 5
    bad = [
        {"messages": []},
        {"messages": msgs, "unknown_field": 1},
        {"messages": msgs, "n": 0},
        {"messages": msgs, "temperature": -1},
        {"messages": msgs, "max_tokens": -3},
        {"messages": msgs, "top_logprobs": 3},  # needs logprobs
        {"messages": msgs, "stream_options": {"include_usage": True}},  # needs stream
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        {"messages": [{"role": "tool", "content": "x"}]},
        {"messages": msgs, "stop": ""},
    ]
    for body in bad:
        with pytest.raises(ValidationError):
            ChatCompletionRequest.model_validate(body)


def test_completion_prompt_forms() -> None:
    assert CompletionRequest.model_validate({"prompt": "a"}).prompts() == ["a"]
    assert CompletionRequest.model_validate({"prompt": ["a", "b"]}).prompts() == ["a", "b"]
    assert CompletionRequest.model_validate({"prompt": [1, 2]}).prompts() == [[1, 2]]
    assert CompletionRequest.model_validate({"prompt": [[1], [2, 3]]}).prompts() == [[1], [2, 3]]
    with pytest.raises(APIError):
        CompletionRequest.model_validate({"prompt": "a", "suffix": "b"})


def test_settings_flags_env_and_engine_config() -> None:
    env = {"DSPARK_PORT": "9001", "DSPARK_API_KEY": "k", "DSPARK_LOG_PROMPTS": "true",
           "DSPARK_MAX_NUM_SEQS": "3", "DSPARK_PROFILE_ON_START": "false"}
    s = parse_settings(["--max-queue", "5", "--speculative", "eagle3", "--num-speculative-tokens",
                        "3", "--verify-policy", "fixed", "--draft-checkpoint", "ck.safetensors"], env)
    assert (s.port, s.api_key, s.log_prompts, s.max_queue) == (9001, "k", True, 5)
    assert parse_settings(["--port", "9002"], env).port == 9002  # the flag beats the environment
    cfg = s.engine
    assert (cfg.speculative, cfg.num_speculative_tokens, cfg.verify_policy, cfg.draft_checkpoint) == (
        "eagle3", 3, "fixed", "ck.safetensors")
    assert (cfg.max_num_seqs, cfg.profile_on_start) == (3, False)  # engine fields have env twins
    assert parse_settings(["--max-num-seqs", "2"], env).engine.max_num_seqs == 2
    with pytest.raises(ValueError):
        ServerSettings(api_key="")


def test_engine_flags_are_the_engine_config_fields() -> None:
    """Every EngineConfig field is a flag whose default is the field's own: one default, one home."""
    assert parse_settings([], env={}).engine == EngineConfig()
    flags = {a.dest: a for a in build_parser(env={})._actions}
    for f in fields(EngineConfig):
        assert flags[f.name].default == f.default, f.name
        assert f.metadata["help"] in flags[f.name].help
    # The drafter names in --speculative's help come from the registry.
    assert all(name in flags["speculative"].help for name in drafter_names())
    with pytest.raises(ValueError):  # EngineConfig still validates what the flags produce
        parse_settings(["--max-num-seqs", "8", "--max-num-batched-tokens", "4"], env={})
