"""`python -m server`: read settings, serve with uvicorn, exit non-zero if the engine dies.

SIGTERM / Ctrl-C: uvicorn stops accepting, lets open responses finish for up to
`--drain-timeout-s`, then the app's lifespan shuts the engine thread down; exit status 0.
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

from server.app import create_app
from server.engine_client import ThreadFactory
from server.settings import ServerSettings, parse_settings

log = logging.getLogger("server")

EXIT_ENGINE_FAILED = 1


def _engine_factory(settings: ServerSettings):  # type: ignore[no-untyped-def]
    def build():  # type: ignore[no-untyped-def]
        # The only path from the gateway into torch: the engine builder, in a worker thread.
        from scheduler.build import build_engine

        return build_engine(settings.engine)

    return build


def main(
    argv: Sequence[str] | None = None,
    engine_factory: Callable[[], Any] | None = None,
    thread_factory: ThreadFactory | None = None,
) -> int:
    """Serve until SIGTERM (exit 0) or engine failure (exit 1). The factories are test seams."""
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

    app = create_app(
        settings,
        engine_factory or _engine_factory(settings),
        thread_factory=thread_factory,
        on_fatal=on_fatal,
    )
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
