"""Engine configuration: one frozen dataclass, built once by server/settings.py (or tests)."""

from __future__ import annotations

from dataclasses import dataclass

# The embedded default model (see scheduler/loader.py); defined here so that reading the
# configuration never imports torch.
DEFAULT_MODEL = "embedded:smollm2-135m-instruct"


@dataclass(frozen=True)
class EngineConfig:
    model: str = DEFAULT_MODEL  # HF folder, .gguf file, hub id (online only), or "fake"
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    max_num_seqs: int = 16  # KV slots = requests resident at once
    max_model_len: int = 2048  # prompt + output tokens per request
    max_num_batched_tokens: int = 512  # token budget of one step (prefill chunks + decode + drafts)
    speculative: str = "none"  # drafter name in drafts/registry.py
    num_speculative_tokens: int = 7  # gamma: tokens drafted per request per step
    verify_policy: str = "fixed"  # none | fixed | dspark | dspark-production
    draft_checkpoint: str | None = None  # None: the drafter's shipped default
    cache_dir: str | None = None  # converted-model cache; None: $DSPARK_CACHE_DIR or ~/.cache
    seed: int = 0  # seeds requests that bring no seed of their own
    profile_on_start: bool = True  # measure the throughput profile before serving

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs (one token each)")
        if self.num_speculative_tokens < 0:
            raise ValueError("num_speculative_tokens must be >= 0")
