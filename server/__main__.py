"""`python -m server`: read settings, serve with uvicorn, exit non-zero if the engine dies.

The engine core runs in its own process (`--engine-process`, the default) with `--threads`
torch threads, or on a thread of this process (`--no-engine-process`).
SIGTERM / Ctrl-C: uvicorn stops accepting, lets open responses finish for up to
`--drain-timeout-s`, then the app's lifespan drains and stops the engine; exit status 0 (the
engine process ignores the signal itself, so one sent to the whole process group drains too).
Engine death or a failed model load: the app calls `on_fatal`, we ask uvicorn to stop, and the
process exits with status 1 so a supervisor restarts it.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import uvicorn

from scheduler.build import build_engine
from server.app import create_app
from server.engine_core import Builder, EngineCoreSpec, set_torch_threads
from server.engine_process import launch_engine_process
from server.settings import ServerSettings, parse_settings

log = logging.getLogger("server")

EXIT_ENGINE_FAILED = 1


def engine_factory(settings: ServerSettings, builder: Builder = build_engine) -> Callable[[], Any]:
    """What the app calls (in a worker thread) to get its engine: a launched engine process, or
    an engine built in this process. `builder` (a test seam) turns the EngineConfig into an
    LLMEngine; for the process it must be picklable by reference (a module-level function)."""
    if settings.engine_process:
        spec = EngineCoreSpec(settings.engine, builder, settings.threads, settings.log_level)
        return lambda: launch_engine_process(spec)

    def build() -> Any:
        # The only path from this process into torch: the engine builder, in a worker thread.
        set_torch_threads(settings.threads)
        return builder(settings.engine)

    return build


def main(argv: Sequence[str] | None = None, builder: Builder = build_engine) -> int:
    """Serve until SIGTERM (exit 0) or engine failure (exit 1). `builder` is a test seam."""
    settings = parse_settings(argv)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    fatal: list[str] = []
    server: uvicorn.Server | None = None

    def on_fatal(reason: str) -> None:
        fatal.append(reason)
        log.error("fatal: %s; shutting down", reason)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, engine_factory(settings, builder), on_fatal=on_fatal)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.drain_timeout_s),
        lifespan="on",
    )
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it has shut down, which would end the
    # process with -SIGTERM; a finished drain is a clean exit, so absorb it and return 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    if fatal or not server.started:
        return EXIT_ENGINE_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
