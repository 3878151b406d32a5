"""What the app and its routes share: the settings, the metrics and the engine once it is up.

One `AppState` per app, stored as `app.state.dspark`; `server/app.py` fills it in during the
lifespan (load -> warm up -> serve -> drain) and `server/routes.py` reads it per request.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from server.engine_client import AsyncEngineClient, ThreadFactory
from server.metrics import Metrics
from server.settings import ServerSettings
from server.tokenizer import ChatTokenizer


@dataclass
class AppState:
    settings: ServerSettings
    metrics: Metrics
    engine_factory: Callable[[], Any]
    thread_factory: ThreadFactory
    on_fatal: Callable[[str], None] | None = None
    client: AsyncEngineClient | None = None
    tokenizer: ChatTokenizer | None = None
    model_name: str = ""
    max_model_len: int = 0
    structured_output: bool = False  # the engine can constrain its output
    ready: bool = False
    fatal: str | None = None  # why the server can no longer serve (load failure, engine death)
    created: int = field(default_factory=lambda: int(time.time()))
