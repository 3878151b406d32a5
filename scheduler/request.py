"""Per-request state: the one object that carries a request through the engine.

Counters, not phases (vLLM v1's rule): a request has `all_token_ids` (prompt + output) and
`num_computed_tokens` (how many of them already have KV in its slot). Each step the batcher
hands out tokens so that `num_computed_tokens` catches up with `num_tokens`; prefill, chunked
prefill, decode and verification of draft tokens are the same path with different counts.

Invariants:
    0 <= num_computed_tokens <= num_tokens
    all_token_ids[:num_prompt_tokens] == prompt_ids
Draft tokens never enter `all_token_ids`; they live in the step plan only, so a rejected draft
is rolled back simply by not advancing `num_computed_tokens` past the accepted tokens.

Pure Python: no torch, no asyncio.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

# What a StructuredOutput constrains the output to (its `spec` is the text in brackets).
STRUCTURED_KINDS = (
    "json_schema",  # a JSON document valid under a JSON schema (the schema as JSON text)
    "json_object",  # any JSON object (spec unused)
    "regex",  # text matching a regular expression
    "grammar",  # a Lark or GBNF context-free grammar
    "choice",  # exactly one of a list of strings (a JSON list)
)


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """A constraint on the output, as plain data: the engine compiles it (scheduler/grammar.py),
    so requests can cross a process boundary and equal constraints share one compiled grammar."""

    kind: str
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise ValueError(f"structured output kind must be one of {', '.join(STRUCTURED_KINDS)}")


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """What the client asked for. Validated at the HTTP edge and again here (cheap invariants)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k >= 0: chosen token plus top-k alternatives
    speculative: bool = True  # per-request opt-out of drafting
    min_tokens: int = 0  # EOS and stop_token_ids cannot be sampled before this many outputs
    structured: StructuredOutput | None = None  # grammar the output must follow

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0 <= self.min_p <= 1:
            raise ValueError("min_p must be in [0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError("logprobs must be >= 0")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError("min_tokens must be in [0, max_tokens]")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS or a stop token id (stop strings are the gateway's business)
    LENGTH = "length"  # max_tokens or max_model_len reached
    ABORT = "abort"  # client went away or gateway cut it (stop string)
    ERROR = "error"  # this request's processing raised; others are unaffected


@dataclass(slots=True)
class TokenLogprob:
    """Log-probability of one emitted token under the target's raw distribution."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), best first


@dataclass(slots=True)
class SpecStats:
    """Per-request speculation counters (cumulative over the request's life)."""

    num_drafts: int = 0  # verification rounds that had >= 1 draft token
    num_draft_tokens: int = 0  # draft tokens verified by the target
    num_accepted_tokens: int = 0  # of those, accepted

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens per verification round, bonus token included (the paper's tau)."""
        if self.num_drafts == 0:
            return 1.0
        return 1.0 + self.num_accepted_tokens / self.num_drafts


@dataclass(slots=True)
class RequestOutput:
    """What the engine posts back after a step: the tokens this request gained (maybe several)."""

    req_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # cumulative, after this output
    num_cached_tokens: int = 0  # prompt tokens read from the prefix cache, not computed
    spec: SpecStats | None = None  # cumulative, when the request was drafted for
    error: str | None = None  # set with FinishReason.ERROR; a message safe to show clients
    # Set on the finished output (engine clock, seconds): arrival -> first scheduled, and
    # first scheduled -> first token (the prefill). None when the request never ran.
    queue_time_s: float | None = None
    prefill_time_s: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class Request:
    """Engine-side state of one sequence. Owned by the engine thread only."""

    req_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_s: float = 0.0
    eos_token_ids: frozenset[int] = frozenset()

    all_token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    slot: int | None = None  # KV slot while resident
    finish_reason: FinishReason | None = None
    error: str | None = None
    spec: SpecStats = field(default_factory=SpecStats)
    # Token id -> count over output tokens, kept for penalties (empty when none apply).
    output_counts: dict[int, int] = field(default_factory=dict)
    first_scheduled_s: float | None = None
    first_token_s: float | None = None
    # Whether the runner hands this request's target features to a model drafter (DSpark,
    # EAGLE-3, DFlash), which may then draft for it. Decided once, when it is first scheduled
    # (Speculator._admit): a draft reads every position's features, and taking them in is a
    # cost on every token of the request's life. None: not decided (handed over).
    feeds_drafter: bool | None = None

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("prompt must contain at least one token")
        self.all_token_ids = list(self.prompt_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_ids) :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def remaining_tokens(self) -> int:
        return self.params.max_tokens - self.num_output_tokens

    def append_output(self, token_ids: list[int]) -> None:
        self.all_token_ids.extend(token_ids)
        if self.params.has_penalties:
            for t in token_ids:
                self.output_counts[t] = self.output_counts.get(t, 0) + 1
