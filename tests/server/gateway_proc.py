"""The fake engine with injectable faults, for tests across the engine process boundary.

    GATEWAY_TEST_STEP_S=0.02 python tests/server/gateway_proc.py --port 8123

runs `python -m server`'s main() (the engine in its own process unless --no-engine-process)
around `build`. `build` is also the builder that tests hand to an engine process (it is pickled
by reference, so it lives at module level here). Faults, by prompt text:
- CRASH: the engine step raises, which kills the engine (the process exits non-zero);
- POISON: the batcher's fault hook raises for that request alone (it finishes with an error).
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from functools import partial
from typing import Any

from fastapi import FastAPI

from scheduler.build import build_engine
from scheduler.config import EngineConfig
from scheduler.engine import LLMEngine
from scheduler.request import Request
from server.__main__ import engine_factory, main
from server.app import create_app
from server.settings import ServerSettings

PROC_ENGINE = EngineConfig(model="fake", max_num_seqs=4, max_model_len=2048,
                           max_num_batched_tokens=64, speculative="none", profile_on_start=False)


def _contains(prompt: list[int], marker: list[int]) -> bool:
    return any(prompt[i : i + len(marker)] == marker for i in range(len(prompt)))


def build(config: EngineConfig, step_s: float = 0.02) -> LLMEngine:
    engine = build_engine(config)
    runner: Any = engine.runner
    runner.step_time_s = step_s
    crash = engine.tokenizer.encode("CRASH", add_special_tokens=False)
    poison = engine.tokenizer.encode("POISON", add_special_tokens=False)
    execute = runner.execute

    def execute_or_crash(plan: Any) -> Any:
        if any(_contains(s.req.prompt_ids, crash) for s in plan.scheduled):
            raise RuntimeError("injected engine step failure")
        return execute(plan)

    def fault_hook(req: Request) -> None:
        if _contains(req.prompt_ids, poison):
            raise RuntimeError("injected fault")

    runner.execute = execute_or_crash
    engine.fault_hook = fault_hook
    return engine


def process_app(settings: ServerSettings, step_s: float = 0.002) -> FastAPI:
    """An app whose engine (`build` around the settings' EngineConfig) runs in its own process."""
    settings = replace(settings, engine_process=True)
    return create_app(settings, engine_factory(settings, partial(build, step_s=step_s)))


if __name__ == "__main__":
    step = float(os.environ.get("GATEWAY_TEST_STEP_S", "0.02"))
    flags = ["--model", "fake", "--max-num-seqs", "4", "--max-model-len", "2048",
             "--max-num-batched-tokens", "64", "--speculative", "none", "--no-profile-on-start"]
    sys.exit(main([*flags, *sys.argv[1:]], builder=partial(build, step_s=step)))
