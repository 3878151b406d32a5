"""`python -m server`'s main() around the fake engine, for process-level tests.

    GATEWAY_TEST_STEP_S=0.02 python tests/server/gateway_proc.py --port 8123

The engine step raises (killing the engine thread) when a scheduled prompt contains the text
CRASH; that is how the tests make the process exit non-zero.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from scheduler.build import build_engine
from scheduler.config import EngineConfig
from scheduler.engine import LLMEngine
from server.__main__ import main


def build() -> LLMEngine:
    engine = build_engine(EngineConfig(model="fake", max_num_seqs=4, max_model_len=2048,
                                       max_num_batched_tokens=64, speculative="none"))
    runner: Any = engine.runner
    runner.step_time_s = float(os.environ.get("GATEWAY_TEST_STEP_S", "0.02"))
    marker = engine.tokenizer.encode("CRASH", add_special_tokens=False)
    execute = runner.execute

    def execute_or_crash(plan: Any) -> Any:
        for s in plan.scheduled:
            p = s.req.prompt_ids
            if any(p[i : i + len(marker)] == marker for i in range(len(p))):
                raise RuntimeError("injected engine step failure")
        return execute(plan)

    runner.execute = execute_or_crash
    return engine


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], engine_factory=build))
