"""Server settings: the only place the command line and the environment are read.

Every flag has an environment twin, `DSPARK_<FLAG>` (dashes -> underscores, upper case); an
explicit flag wins over the environment, which wins over the default. `--help` lists both.
The engine's flags are not listed here: they are the fields of `EngineConfig`, with their
defaults and help texts, so that one configuration is defined once.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

from scheduler.config import EngineConfig

ENV_PREFIX = "DSPARK_"


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None  # None: the name the engine reports
    max_queue: int = 64  # requests waiting for a slot beyond max_num_seqs; more get 429
    api_key: str | None = None
    max_body_bytes: int = 2 * 1024 * 1024
    drain_timeout_s: float = 30.0
    log_level: str = "info"
    log_prompts: bool = False  # prompts and outputs never reach the log unless this is set
    warmup: bool = True
    engine_process: bool = True  # the engine core in its own process (False: a thread of this one)
    threads: int = 0  # torch intra-op threads of the engine; 0: torch's default
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError("port must be in 1..65535")
        if self.max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be >= 1024")
        if self.api_key == "":
            raise ValueError("api_key must not be empty (unset it to disable authentication)")
        if self.threads < 0:
            raise ValueError("threads must be >= 0 (0: torch's default)")


_SERVER_HELP = {
    "host": "interface to bind",
    "port": "TCP port",
    "served_model_name": "name clients send as `model` (default: the model's own name)",
    "max_queue": "requests allowed to wait for a slot; beyond it: 429 with Retry-After",
    "api_key": "require `Authorization: Bearer <key>` on /v1/*",
    "max_body_bytes": "largest request body accepted; beyond it: 413",
    "drain_timeout_s": "on SIGTERM, how long running requests may finish before they are cut",
    "log_level": "debug | info | warning | error",
    "log_prompts": "log prompts and outputs (off by default: they may be confidential)",
    "warmup": "run one short generation before reporting ready",
    "engine_process": "run the engine core in its own process, out of the HTTP process's way "
    "(--no-engine-process: on a thread of the HTTP process, a second OpenMP team: on a small "
    "CPU each step is several times slower)",
    "threads": "torch intra-op threads of the engine (0: torch's default, one per physical "
    "core; the HTTP process runs no torch threads of its own)",
}


def _server_fields() -> list[Field[Any]]:
    return [f for f in fields(ServerSettings) if f.name != "engine"]


def _help(f: Field[Any]) -> str:
    if f.name in _SERVER_HELP:
        return _SERVER_HELP[f.name]
    text: str = f.metadata["help"]
    if f.name == "speculative":
        # The registry is read only here, when a parser is built: no drafter module is loaded.
        from scheduler.build import drafter_names

        text += f": {' | '.join(drafter_names())}"
    return text


def _parse_bool(text: str) -> bool:
    v = text.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def add_flag(group: Any, f: Field[Any], env: Mapping[str, str]) -> None:
    """One dataclass field as a flag with its DSPARK_ environment twin (help from _SERVER_HELP
    or the field's metadata); other commands (server/cluster.py) add their own fields this way."""
    flag = "--" + f.name.replace("_", "-")
    env_name = ENV_PREFIX + f.name.upper()
    default: Any = f.default
    assert default is not MISSING, f"{f.name} needs a default to become a flag"
    kind: Callable[[str], Any] = type(default) if default is not None else str
    if env_name in env:
        default = _parse_bool(env[env_name]) if kind is bool else kind(env[env_name])
    # Never echo the API key (it may come from the environment) into --help output.
    shown = "***" if f.name == "api_key" and default else default
    default_text = "" if shown is None else f" (default: {shown})"
    help_text = f"{_help(f)}{default_text} [env: {env_name}]"
    if kind is bool:
        group.add_argument(flag, default=default, action=argparse.BooleanOptionalAction,
                           help=help_text)
    else:
        group.add_argument(flag, default=default, type=kind, help=help_text)


def build_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    env = os.environ if env is None else env
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="OpenAI-compatible LLM server with speculative decoding.",
    )
    server = parser.add_argument_group("server")
    for f in _server_fields():
        add_flag(server, f, env)
    engine = parser.add_argument_group("engine (scheduler/config.py EngineConfig)")
    for f in fields(EngineConfig):
        add_flag(engine, f, env)
    return parser


def parse_settings(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> ServerSettings:
    return settings_from_values(vars(build_parser(env).parse_args(argv)))


def settings_from_values(values: dict[str, Any]) -> ServerSettings:
    """The settings from a parsed `build_parser` namespace (as a dict, consumed)."""
    engine = EngineConfig(**{f.name: values.pop(f.name) for f in fields(EngineConfig)})
    return ServerSettings(**values, engine=engine)
