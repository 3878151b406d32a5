"""Server settings: the only place the command line and the environment are read.

Every flag has an environment twin, `DSPARK_<FLAG>` (dashes -> underscores, upper case); an
explicit flag wins over the environment, which wins over the default. `--help` lists both.
EngineConfig is imported lazily: it pulls in the model loader (torch), which the gateway
itself never needs.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scheduler.config import EngineConfig

ENV_PREFIX = "DSPARK_"


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    model: str | None = None  # None: the engine's default (the embedded SmolLM2)
    served_model_name: str | None = None  # None: the name the engine reports
    device: str = "auto"
    dtype: str = "auto"
    max_num_seqs: int = 16
    max_model_len: int = 2048
    max_num_batched_tokens: int = 512
    max_queue: int = 64  # requests waiting for a slot beyond max_num_seqs; more get 429
    api_key: str | None = None
    speculative: str = "none"
    num_speculative_tokens: int = 7
    verify_policy: str = "fixed"
    draft_checkpoint: str | None = None
    seed: int = 0
    cache_dir: str | None = None
    max_body_bytes: int = 2 * 1024 * 1024
    drain_timeout_s: float = 30.0
    log_level: str = "info"
    log_prompts: bool = False  # prompts and outputs never reach the log unless this is set
    warmup: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError("port must be in 1..65535")
        if self.max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be >= 1024")
        if self.api_key == "":
            raise ValueError("api_key must not be empty (unset it to disable authentication)")

    def engine_config(self) -> EngineConfig:
        from scheduler.config import EngineConfig

        kwargs: dict[str, Any] = {
            "device": self.device,
            "dtype": self.dtype,
            "max_num_seqs": self.max_num_seqs,
            "max_model_len": self.max_model_len,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "speculative": self.speculative,
            "num_speculative_tokens": self.num_speculative_tokens,
            "verify_policy": self.verify_policy,
            "draft_checkpoint": self.draft_checkpoint,
            "cache_dir": self.cache_dir,
            "seed": self.seed,
        }
        if self.model is not None:
            kwargs["model"] = self.model
        return EngineConfig(**kwargs)


_HELP = {
    "host": "interface to bind",
    "port": "TCP port",
    "model": "model: HF folder, .gguf file, 'fake' (tests) or the embedded default",
    "served_model_name": "name clients send as `model` (default: the model's own name)",
    "device": "auto | cpu | cuda",
    "dtype": "auto | float32 | bfloat16 | float16",
    "max_num_seqs": "requests decoded at once (KV slots)",
    "max_model_len": "prompt + output tokens per request",
    "max_num_batched_tokens": "token budget of one engine step",
    "max_queue": "requests allowed to wait for a slot; beyond it: 429 with Retry-After",
    "api_key": "require `Authorization: Bearer <key>` on /v1/*",
    "speculative": "drafter: none | ngram | eagle3 | dflash | dspark",
    "num_speculative_tokens": "draft tokens proposed per request per step",
    "verify_policy": "how many drafts to verify: none | fixed | dspark | dspark-production",
    "draft_checkpoint": "draft head checkpoint (default: the drafter's shipped one)",
    "seed": "seed for requests that bring none",
    "cache_dir": "converted-model cache (default: $DSPARK_CACHE_DIR or ~/.cache/dspark-serve)",
    "max_body_bytes": "largest request body accepted; beyond it: 413",
    "drain_timeout_s": "on SIGTERM, how long running requests may finish before they are cut",
    "log_level": "debug | info | warning | error",
    "log_prompts": "log prompts and outputs (off by default: they may be confidential)",
    "warmup": "run one short generation before reporting ready",
}


def _parse_bool(text: str) -> bool:
    v = text.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def build_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    env = os.environ if env is None else env
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="OpenAI-compatible LLM server with speculative decoding.",
    )
    for f in fields(ServerSettings):
        flag = "--" + f.name.replace("_", "-")
        env_name = ENV_PREFIX + f.name.upper()
        default: Any = f.default
        kind: Callable[[str], Any] = type(default) if default is not None else str
        if env_name in env:
            default = _parse_bool(env[env_name]) if kind is bool else kind(env[env_name])
        # Never echo the API key (it may come from the environment) into --help output.
        shown = "***" if f.name == "api_key" and default else default
        default_text = "" if shown is None else f" (default: {shown})"
        help_text = f"{_HELP[f.name]}{default_text} [env: {env_name}]"
        if kind is bool:
            parser.add_argument(flag, default=default, action=argparse.BooleanOptionalAction,
                                help=help_text)
        else:
            parser.add_argument(flag, default=default, type=kind, help=help_text)
    return parser


def parse_settings(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> ServerSettings:
    ns = build_parser(env).parse_args(argv)
    return ServerSettings(**vars(ns))
