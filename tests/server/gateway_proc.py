"""`python -m server`'s main() around a scripted engine, for process-level tests.

    GATEWAY_TEST_STEP_S=0.02 python tests/server/gateway_proc.py --port 8123

The engine thread dies when a prompt contains the text CRASH (the script raises on the engine
thread), which is how the tests make the process exit non-zero.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from gateway_doubles import ScriptedEngine, ScriptedThread

from scheduler.fake import build_fake_tokenizer
from scheduler.request import Request
from server.__main__ import main


def build() -> ScriptedEngine:
    tok = build_fake_tokenizer()
    ids = tok.encode("la " * 400, add_special_tokens=False)
    marker = tok.encode("CRASH", add_special_tokens=False)

    def script(req: Request) -> list[Any]:
        p = req.prompt_ids
        if any(p[i : i + len(marker)] == marker for i in range(len(p))):
            raise RuntimeError("scripted engine failure")
        return ids

    return ScriptedEngine(tok, script, step_s=float(os.environ.get("GATEWAY_TEST_STEP_S", "0.02")),
                          max_model_len=2048, num_slots=4)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], engine_factory=build, thread_factory=ScriptedThread))
