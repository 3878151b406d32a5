"""Per-choice output processing: detokenize, apply stop strings, format logprobs.

One `ChoiceState` per engine request (a response with n choices has n of them). Stop strings are
the gateway's job (the engine only knows token ids): the text is searched after every engine
output, cut before the stop string, and the engine request is aborted. While streaming, the
longest tail of the text that could still grow into a stop string is held back, so a stop
string split across tokens never leaks. vLLM's extras: `include_stop_str_in_output` keeps the
stop string, `min_tokens` ignores stop strings in the text of its first outputs, and
`skip_special_tokens=False` keeps special tokens in the text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from scheduler.request import FinishReason, RequestOutput, SpecStats, TokenLogprob
from server.tokenizer import ChatTokenizer, IncrementalDetokenizer


@dataclass(slots=True)
class ChoiceDelta:
    """What one engine output adds to one choice."""

    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None  # OpenAI value: stop | length | abort; None while running
    error: str | None = None  # set when the engine failed this request


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


@dataclass
class ChoiceState:
    index: int
    req_id: str
    tokenizer: ChatTokenizer
    prompt_ids: list[int]
    stops: list[str] = field(default_factory=list)
    include_stop_str: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    # Tokens that end a request (EOS); when kept as text (skip_special_tokens false) the one
    # that ended it is still not shown, as in vLLM, unless include_stop_str asks for it.
    eos_token_ids: frozenset[int] = frozenset()
    detok: IncrementalDetokenizer = field(init=False)
    text: str = ""  # final text so far (stop strings already cut)
    sent: int = 0  # characters of `text` already handed out
    finish_reason: str | None = None
    error: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # of the prompt, read from the engine's prefix cache
    num_output_tokens: int = 0
    spec: SpecStats | None = None
    hit_stop_string: bool = False
    _searched: int = 0  # text before this index cannot contain the start of a stop match

    def __post_init__(self) -> None:
        self.detok = IncrementalDetokenizer(self.tokenizer, self.prompt_ids, self.skip_special_tokens)
        self.num_prompt_tokens = len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def add(self, out: RequestOutput) -> ChoiceDelta:
        """Fold in one engine output; returns the text that may be shown now."""
        if self.finished:  # a stop string already ended it; later outputs are the abort echo
            return ChoiceDelta("", [], None)
        self.num_output_tokens = out.num_output_tokens or (
            self.num_output_tokens + len(out.new_token_ids)
        )
        if out.num_prompt_tokens:
            self.num_prompt_tokens = out.num_prompt_tokens
        self.num_cached_tokens = max(self.num_cached_tokens, out.num_cached_tokens)
        if out.spec is not None:
            self.spec = out.spec
        new_ids = out.new_token_ids
        if (out.finish_reason is FinishReason.STOP and new_ids and new_ids[-1] in self.eos_token_ids
                and not self.skip_special_tokens and not self.include_stop_str):
            new_ids = new_ids[:-1]
        new = self.detok.push(new_ids)
        if out.finished:
            new += self.detok.flush()
        self.text += new
        logprobs = list(out.logprobs or [])
        if self.stops and self.num_output_tokens < self.min_tokens:
            self._searched = len(self.text)  # stop strings count only after min_tokens
        elif self.stops and self._cut_at_stop():
            return self._emit(logprobs, final=True)
        if out.finish_reason is FinishReason.ERROR:
            self.error = out.error or "the request failed inside the engine"
            return ChoiceDelta("", [], None, error=self.error)
        if out.finished:
            self.finish_reason = out.finish_reason.value if out.finish_reason else "stop"
        return self._emit(logprobs, final=out.finished)

    def _cut_at_stop(self) -> bool:
        longest = max(len(s) for s in self.stops)
        start = max(0, self._searched - longest + 1)
        found = ((self.text.find(s, start), s) for s in self.stops)
        hits = [(i, len(s)) for i, s in found if i >= 0]
        self._searched = len(self.text)
        if not hits:
            return False
        at, length = min(hits)
        self.text = self.text[: at + length if self.include_stop_str else at]
        self.finish_reason = "stop"
        self.hit_stop_string = True
        return True

    def _emit(self, logprobs: list[TokenLogprob], final: bool) -> ChoiceDelta:
        end = len(self.text)
        if not final and self.stops:
            end -= _held_back(self.text, self.stops)
        end = max(end, self.sent)
        delta = self.text[self.sent : end]
        self.sent = end
        return ChoiceDelta(delta, logprobs, self.finish_reason if final else None)

    # --- logprob formatting -------------------------------------------------------------

    def chat_logprobs(self, items: list[TokenLogprob]) -> list[dict[str, Any]]:
        return [
            {
                **self._token_entry(lp.token_id, lp.logprob),
                "top_logprobs": [self._token_entry(t, v) for t, v in lp.top],
            }
            for lp in items
        ]

    def _token_entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.tokenizer.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def completion_logprobs(self, items: list[TokenLogprob], offset: int) -> dict[str, Any]:
        tokens, values, tops, offsets = [], [], [], []
        for lp in items:
            text = self.tokenizer.token_text(lp.token_id)
            tokens.append(text)
            values.append(lp.logprob)
            tops.append({self.tokenizer.token_text(t): v for t, v in lp.top})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def usage(choices: list[ChoiceState], prompt_counts: list[int]) -> dict[str, Any]:
    """OpenAI usage: each distinct prompt counted once, every choice's output counted; and, as
    OpenAI reports it, how many prompt tokens came from the prefix cache (per distinct prompt,
    the fewest any of its choices read)."""
    prompt = sum(prompt_counts)
    completion = sum(c.num_output_tokens for c in choices)
    cached: dict[tuple[int, ...], int] = {}
    for c in choices:
        key = tuple(c.prompt_ids)
        cached[key] = min(cached.get(key, c.num_cached_tokens), c.num_cached_tokens)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(cached.values())},
    }


def spec_metrics(choices: list[ChoiceState]) -> dict[str, Any] | None:
    """The extra `metrics.speculative_decoding` object (vLLM's names), summed over choices."""
    stats = [c.spec for c in choices if c.spec is not None]
    if not stats:
        return None
    drafts = sum(s.num_drafts for s in stats)
    draft_tokens = sum(s.num_draft_tokens for s in stats)
    accepted = sum(s.num_accepted_tokens for s in stats)
    return {
        "speculative_decoding": {
            "num_spec_steps": drafts,
            "num_draft_tokens": draft_tokens,
            "num_accepted_draft_tokens": accepted,
            "draft_acceptance_rate": accepted / draft_tokens if draft_tokens else 0.0,
            "mean_acceptance_length": 1.0 + accepted / drafts if drafts else 1.0,
        }
    }
