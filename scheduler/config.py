"""Engine configuration: one frozen dataclass, the one home of the engine's defaults.

`python -m server` turns every field into a flag (`--max-num-seqs`) with an environment twin
(`DSPARK_MAX_NUM_SEQS`), using each field's `help` metadata. `make serve`, the Docker images and
compose override none of these defaults (the images only point `cache_dir` at the model they
baked in), so every way of starting the server serves the same configuration unless a user
asks otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The embedded default model (see scheduler/loader.py); defined here so that reading the
# configuration never imports torch.
DEFAULT_MODEL = "embedded:smollm2-135m-instruct"


def _option(default: Any, help: str) -> Any:
    """A field with the help text its command-line flag shows."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class EngineConfig:
    model: str = _option(
        DEFAULT_MODEL, "HF folder, .gguf file, hub id (online only), embedded:NAME, 'fake' (tests)"
    )
    device: str = _option("auto", "auto | cpu | cuda")
    dtype: str = _option("auto", "auto | float32 | bfloat16 | float16")
    weights: str = _option(
        "auto",
        "auto | gguf | dense: a GGUF model's own quantized blocks through the int4 CPU kernel, "
        "or its de-quantised copy in --dtype (auto: gguf where it measures faster on CPU; "
        "never under a float32 dtype, the exactness reference)",
    )
    int4_kernel: str = _option(
        "auto",
        "auto | native | aten: the GGUF's Q4_1 linears and Q8_0 head times activations rounded "
        "to two int8 digits with integer dot products (a C++ kernel built for this CPU at the "
        "first start; needs AVX-512 VNNI and bfloat16), or torch's int4 kernel on the "
        "activations as they are and a dense head (auto: native where it builds); beside the "
        "native kernels a trained draft's weights multiply as Q8_0 through them too",
    )
    compile_step: str = _option(
        "auto",
        "auto | on | off: short-query steps as one torch.compile graph (auto: on CPU unless "
        "the dtype is float32); compiled at start-up, cached on disk under --cache-dir",
    )
    kv_dtype: str = _option(
        "auto",
        "auto | float32 | bfloat16: KV cache dtype (auto: bfloat16 under a compiled step with "
        "bfloat16 activations, which reads it at half the bytes; float32 otherwise on CPU)",
    )
    attention: str = _option(
        "auto",
        "auto | native | inductor: how the compiled step attends: a C++ kernel built for this "
        "CPU at start-up and cached under --cache-dir (needs a C++ compiler), or inductor's "
        "own loops (auto: native where it builds)",
    )
    max_num_seqs: int = _option(16, "requests decoded at once (KV slots)")
    max_model_len: int = _option(2048, "prompt + output tokens per request")
    max_num_batched_tokens: int = _option(
        512, "token budget of one engine step (prefill chunks + decode + drafts)"
    )
    prefix_cache_tokens: int = _option(
        4096,
        "tokens whose KV is kept for later requests that start the same way (automatic "
        "prefix caching: the chat template's system turn, shared instructions, a conversation's "
        "earlier prompts and answers), in blocks, least recently used out first; 0 turns it off",
    )
    speculative: str = _option(
        "auto",
        "drafter that proposes tokens for the target to verify; several joined by '+' "
        "(suffix+dspark) are a composite that keeps, per request and step, the draft worth "
        "the most; auto: suffix+dspark where the shipped DSpark draft was trained for the "
        "model (the embedded default), else ngram",
    )
    num_speculative_tokens: int = _option(7, "draft tokens proposed per request per step (gamma)")
    verify_policy: str = _option(
        "dspark", "how many drafts to verify: none | fixed | dspark | dspark-production"
    )
    draft_gate: bool = _option(
        True,
        "under the dspark policies, skip drafting on steps where recent drafted steps say it "
        "would not pay (probing now and then); --no-draft-gate drafts every step",
    )
    draft_checkpoint: str | None = _option(
        None, "draft head checkpoint (default: the drafter's shipped one)"
    )
    cache_dir: str | None = _option(
        None, "converted-model cache (default: $DSPARK_CACHE_DIR or ~/.cache/dspark-serve)"
    )
    seed: int = _option(0, "seed for requests that bring none")
    profile_on_start: bool = _option(
        True, "measure the throughput profile before serving (the dspark policies weigh it)"
    )

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs (one token each)")
        if self.prefix_cache_tokens < 0:
            raise ValueError("prefix_cache_tokens must be >= 0")
        if self.num_speculative_tokens < 0:
            raise ValueError("num_speculative_tokens must be >= 0")
        for name, allowed in (
            ("weights", ("auto", "gguf", "dense")),
            ("int4_kernel", ("auto", "native", "aten")),
            ("compile_step", ("auto", "on", "off")),
            ("kv_dtype", ("auto", "float32", "bfloat16")),
            ("attention", ("auto", "native", "inductor")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}")
