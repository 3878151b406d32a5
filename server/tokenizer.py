"""Prompt encoding (chat template) and incremental detokenization for streaming.

`ChatTokenizer` adapts any HF-like tokenizer (the engine's: a transformers tokenizer, or the fake
engine's byte-level one) to the three calls the gateway needs.

`IncrementalDetokenizer` turns a growing list of token ids into text deltas without ever
emitting half a UTF-8 character: byte-level BPE splits an emoji or a CJK character over several
tokens, and decoding a prefix of them yields U+FFFD. The standard fix (TGI, vLLM, mini-sglang)
decodes a short window twice, before and after the new tokens, and holds the delta back while it
ends in U+FFFD. The window starts a few tokens back so tokenizers that drop a leading space at a
decode boundary (SentencePiece) still join words correctly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from server.tools import plain_messages

REPLACEMENT = "\ufffd"
_CONTEXT_TOKENS = 5  # prompt tokens kept as decode context (vLLM uses the same number)


class HFLikeTokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


class ChatTokenizer:
    """What the gateway needs from a tokenizer: chat prompts, text prompts, decoding."""

    def __init__(self, hf: Any) -> None:
        self.hf = hf
        vocab = getattr(hf, "vocab_size", None)
        self.vocab_size: int | None = len(hf) if hasattr(hf, "__len__") else vocab
        eos = getattr(hf, "eos_token_id", None)
        self.eos_token_ids: frozenset[int] = frozenset({eos} if isinstance(eos, int) else ())

    @property
    def renders_tools(self) -> bool:
        """Whether the chat template itself renders `tools` (and tool calls and results)."""
        template = getattr(self.hf, "chat_template", None)
        return isinstance(template, str) and "tools" in template and "tool_calls" in template

    def encode_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """tools: OpenAI function definitions the model may call (None: none)."""
        if self.renders_tools:
            kwargs = {"tools": [{"type": "function", "function": f} for f in tools]} if tools else {}
            text = self.hf.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False, **kwargs)
        else:
            text = self.hf.apply_chat_template(
                plain_messages(messages, tools), add_generation_prompt=True, tokenize=False)
        return list(self.hf.encode(text, add_special_tokens=False))

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=True))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def token_text(self, token_id: int) -> str:
        """One token's text, for logprobs (a partial UTF-8 piece decodes to U+FFFD)."""
        return str(self.hf.decode([token_id], skip_special_tokens=False))


class IncrementalDetokenizer:
    """Output token ids in, stable text deltas out. `text` always equals what was emitted."""

    def __init__(
        self, tokenizer: ChatTokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ) -> None:
        self._tok = tokenizer
        self._skip_special = skip_special_tokens
        context = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._ids: list[int] = context  # decode context + output ids
        self._num_context = len(context)
        # Invariant: ids[prefix_offset:read_offset] decodes to text already emitted; ids after
        # read_offset have not produced (complete) text yet.
        self._prefix_offset = 0
        self._read_offset = len(context)
        self.text = ""

    @property
    def output_ids(self) -> list[int]:
        return self._ids[self._num_context :]

    def push(self, token_ids: Sequence[int]) -> str:
        """Add tokens; return the newly complete text (maybe empty while a character is split)."""
        if not token_ids:
            return ""
        self._ids.extend(token_ids)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT):
            return ""  # nothing new, or the tail is an incomplete character: wait for more
        delta = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self.text += delta
        return delta

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids, self._skip_special)

    def flush(self) -> str:
        """The request finished: release held-back text so `text` equals the full decode."""
        full = self._decode(self.output_ids)
        if full.startswith(self.text):
            delta = full[len(self.text) :]
        else:  # window decoding disagreed with a full decode (should not happen); keep streamed
            delta = ""
        self.text += delta
        self._prefix_offset = self._read_offset = len(self._ids)
        return delta
