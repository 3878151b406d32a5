"""Grammar-constrained decoding: one llguidance matcher per structured request.

A request's `StructuredOutput` (plain data) is compiled here, inside the engine; equal
constraints share one compiled matcher, which each request copies (a copy costs microseconds,
a compile milliseconds). The batcher drives a request's matcher through a step:

    num_valid(drafts)   how many drafts the grammar accepts: the speculator cuts the draft at
                        the first rejected token, before the target verifies it
    masks(drafts)       token bitmasks for the anchor and after each draft, [k+1, words]:
                        the matcher consumes the drafts to reach each position's state
    commit(accepted, tokens)
                        verification kept `accepted` drafts: roll back the rejected ones and
                        consume the bonus/recovered token; is_terminated says the grammar ended

The bitmask is llguidance's: bit t % 32 of word t // 32 set means token t is allowed. It is
numpy here; the runner turns it into a logits mask (scheduler/sampling.py). Masks are timed
(`GrammarManager.stats`) because they are CPU work on the engine thread every constrained step.

No torch here (llguidance and numpy only): the batcher, in the pure scheduler core, owns it.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import llguidance
import numpy as np

from scheduler.request import StructuredOutput

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions  # a TypedDict of the type stubs only

# Compact JSON with json.dumps' separators: a small model under a flexible-whitespace grammar
# can emit newlines forever; one fixed layout also lets greedy runs be compared token for token.
JSON_OPTIONS: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
_MAX_COMPILED = 256  # compiled grammars kept (least recently used dropped first)


class GrammarError(ValueError):
    """The constraint cannot be compiled; the message is safe to show the client."""


def grammar_source(so: StructuredOutput) -> str:
    """The llguidance grammar text for a constraint (not yet checked)."""
    if so.kind == "json_schema":
        return str(llguidance.LLMatcher.grammar_from_json_schema(so.spec, overrides=JSON_OPTIONS))
    if so.kind == "json_object":
        return str(llguidance.LLMatcher.grammar_from_json_schema(
            '{"type": "object"}', overrides=JSON_OPTIONS))
    if so.kind == "regex":
        return str(llguidance.LLMatcher.grammar_from_regex(so.spec))
    if so.kind == "choice":
        choices = json.loads(so.spec)
        if not choices or not all(isinstance(c, str) and c for c in choices):
            raise GrammarError("choice needs a list of non-empty strings")
        return str(llguidance.grammar_from("choice", choices))  # type: ignore[arg-type]
    return str(llguidance.grammar_from("grammar", so.spec))  # Lark, or GBNF converted to Lark


@lru_cache(maxsize=1024)
def check_structured(so: StructuredOutput) -> str | None:
    """Why a constraint cannot be compiled (None: it can). Needs no tokenizer, so the HTTP edge
    calls it to answer 400 before the request reaches the engine."""
    try:
        source = grammar_source(so)
    except (ValueError, TypeError) as exc:
        return str(exc) or "invalid constraint"
    error = llguidance.LLMatcher.validate_grammar(source)
    return _first_line(error) if error else None


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0][:300] if message.strip() else "invalid grammar"


@dataclass
class MaskStats:
    """Cost of the token masks, cumulative: CPU time on the engine thread per constrained step."""

    num_steps: int = 0  # steps that computed at least one mask
    num_masks: int = 0  # mask rows (one per verify position of a constrained request)
    mask_time_s: float = 0.0  # time spent computing them, draft consumption included
    last_step_time_s: float = 0.0  # the most recent constrained step


class GrammarManager:
    """Compiled grammars (cached by constraint) and each structured request's matcher."""

    def __init__(self, tokenizer: Any, eos_token_ids: Iterable[int]) -> None:
        self._hf_tokenizer = tokenizer
        self._eos = sorted(eos_token_ids)
        self._ll_tokenizer: Any = None  # built on first use: ~1 s for a 50k vocabulary
        self._compiled: OrderedDict[StructuredOutput, llguidance.LLMatcher] = OrderedDict()
        self._matchers: dict[str, llguidance.LLMatcher] = {}
        self._ahead: dict[str, int] = {}  # drafts consumed for masks, not yet verified
        self._failed: set[str] = set()  # matchers that failed this step
        self.stats = MaskStats()

    @property
    def num_words(self) -> int:
        """int32 words per bitmask row."""
        return (self._tokenizer().vocab_size + 31) // 32

    def _tokenizer(self) -> Any:
        if self._ll_tokenizer is None:
            from llguidance.hf import from_tokenizer

            self._ll_tokenizer = from_tokenizer(self._hf_tokenizer, eos_token=self._eos or None)
        return self._ll_tokenizer

    def _compile(self, so: StructuredOutput) -> llguidance.LLMatcher:
        template = self._compiled.get(so)
        if template is not None:
            self._compiled.move_to_end(so)
            return template
        try:
            source = grammar_source(so)
        except (ValueError, TypeError) as exc:
            raise GrammarError(str(exc) or "invalid constraint") from None
        template = llguidance.LLMatcher(self._tokenizer(), source, log_level=0)
        if template.is_error():
            raise GrammarError(_first_line(template.get_error()))
        self._compiled[so] = template
        if len(self._compiled) > _MAX_COMPILED:
            self._compiled.popitem(last=False)
        return template

    # -- request lifecycle ----------------------------------------------------------------
    def add(self, req_id: str, so: StructuredOutput) -> None:
        self._matchers[req_id] = self._compile(so).deep_copy()
        self._ahead[req_id] = 0

    def release(self, req_id: str) -> None:
        self._matchers.pop(req_id, None)
        self._ahead.pop(req_id, None)
        self._failed.discard(req_id)

    def __contains__(self, req_id: object) -> bool:
        return req_id in self._matchers

    def __len__(self) -> int:
        return len(self._matchers)

    # -- one step -------------------------------------------------------------------------
    def num_valid(self, req_id: str, draft_ids: Sequence[int]) -> int:
        """Length of the longest prefix of the drafts that the grammar accepts."""
        if not draft_ids:
            return 0
        return int(self._matchers[req_id].validate_tokens(list(draft_ids)))

    def step_masks(self, items: Sequence[tuple[str, Sequence[int]]]) -> list[np.ndarray | None]:
        """`masks` for each (req_id, draft_ids) of one step, timed as one step.

        A request whose matcher fails gets None (no mask) and fails at `commit`, so one broken
        grammar ends its own request, not the step.
        """
        t0 = time.perf_counter()
        out: list[np.ndarray | None] = []
        for req_id, drafts in items:
            try:
                out.append(self.masks(req_id, drafts))
            except Exception:  # noqa: BLE001 - isolate this request
                self._failed.add(req_id)
                out.append(None)
        elapsed = time.perf_counter() - t0
        self.stats.num_steps += 1
        self.stats.num_masks += sum(len(rows) for rows in out if rows is not None)
        self.stats.mask_time_s += elapsed
        self.stats.last_step_time_s = elapsed
        return out

    def masks(self, req_id: str, draft_ids: Sequence[int]) -> np.ndarray:
        """Bitmasks [len(draft_ids) + 1, words]: row j is what may follow the j-th draft.

        Leaves the matcher advanced past the drafts until `commit` rolls back the rejected ones.
        The drafts must be grammar-valid (cut by `num_valid` first).
        """
        matcher = self._matchers[req_id]
        if self._ahead[req_id]:
            raise RuntimeError("masks() twice in one step")
        rows = np.empty((len(draft_ids) + 1, self.num_words), dtype=np.int32)
        matcher.unsafe_compute_mask_ptr(rows[0].ctypes.data, rows[0].nbytes)
        for j, token in enumerate(draft_ids, start=1):
            if not matcher.consume_token(int(token)):
                raise RuntimeError("a draft the grammar rejects reached verification")
            self._ahead[req_id] = j
            matcher.unsafe_compute_mask_ptr(rows[j].ctypes.data, rows[j].nbytes)
        return rows

    def commit(self, req_id: str, num_accepted: int, token_ids: Sequence[int]) -> None:
        """Verification kept `num_accepted` drafts and emitted `token_ids` (those drafts, then
        the bonus/recovered token): roll back the rejected drafts, consume the rest."""
        if req_id in self._failed:
            raise RuntimeError("the grammar matcher failed")
        matcher = self._matchers[req_id]
        ahead = self._ahead[req_id]
        if ahead > num_accepted and not matcher.rollback(ahead - num_accepted):
            raise RuntimeError("grammar rollback failed")
        self._ahead[req_id] = 0
        # One at a time: llguidance's consume_tokens refuses EOS once the grammar is complete,
        # consume_token accepts it (EOS is what a complete grammar allows).
        for token in token_ids[min(ahead, num_accepted):]:
            if not matcher.consume_token(int(token)):
                raise RuntimeError("the grammar rejected a sampled token")

    def is_terminated(self, req_id: str) -> bool:
        """The grammar is complete and allows nothing more (not even whitespace)."""
        return bool(self._matchers[req_id].is_stopped())
