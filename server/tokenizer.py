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

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self.hf.encode(text, add_special_tokens=False))

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=True))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.hf.decode(list(ids), skip_special_tokens=True))

    def token_text(self, token_id: int) -> str:
        """One token's text, for logprobs (a partial UTF-8 piece decodes to U+FFFD)."""
        return str(self.hf.decode([token_id], skip_special_tokens=False))


class IncrementalDetokenizer:
    """Output token ids in, stable text deltas out. `text` always equals what was emitted."""

    def __init__(self, tokenizer: ChatTokenizer, prompt_ids: Sequence[int] = ()) -> None:
        self._tok = tokenizer
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
        prefix_text = self._tok.decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._tok.decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT):
            return ""  # nothing new, or the tail is an incomplete character: wait for more
        delta = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """The request finished: release held-back text so `text` equals the full decode."""
        full = self._tok.decode(self.output_ids)
        if full.startswith(self.text):
            delta = full[len(self.text) :]
        else:  # window decoding disagreed with a full decode (should not happen); keep streamed
            delta = ""
        self.text += delta
        self._prefix_offset = self._read_offset = len(self._ids)
        return delta
