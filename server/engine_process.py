"""The engine core in its own process, seen from the HTTP process as an engine thread.

`launch_engine_process(spec)` spawns `server.engine_core.run_engine_core` and waits until the
engine is built; the `EngineProcess` it returns has what the app reads from an engine (name,
tokenizer, limits) and implements `EngineThreadLike` for `AsyncEngineClient`: add_request and
abort are ZeroMQ sends (never blocking, whatever the engine is doing), and a reader thread
hands each step's message to `on_step`, as the engine thread's loop would.

Why a process: torch's OpenMP workers, the engine loop and the HTTP event loop no longer share
one GIL and one OpenMP pool; the HTTP process imports no torch at all.

Death: the reader watches the engine's messages and the process's sentinel. After "died" (the
loop failed; its last step message already finished every request with an ERROR) or an exit
without "stopped" (killed, out of memory), `error` is set and `is_alive` turns False; the app
then answers 503 and exits, as for a dead engine thread. The arrival times the HTTP process
stamps on requests and the engine's own clock are both `time.monotonic()`, one system-wide
clock on Linux, so queue times stay comparable across the boundary.
"""

from __future__ import annotations

import logging
import multiprocessing
import shutil
import tempfile
import threading
from multiprocessing import util as mp_util
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import zmq

from scheduler.request import Request
from server.engine_client import OnStep
from server.engine_core import EngineCoreSpec, EngineInfo, decode, encode, run_engine_core

log = logging.getLogger(__name__)

POLL_MS = 100  # how often waiting loops look up from their socket (start-up, close)
# After the process is gone, how long its last messages may still take to come out of the socket.
EXIT_GRACE_MS = 500
STOP_WAIT_S = 5.0


class EngineProcessError(RuntimeError):
    """The engine process could not be built, or stopped without being asked to."""


class EngineProcess:
    def __init__(self, spec: EngineCoreSpec) -> None:
        self._folder = Path(tempfile.mkdtemp(prefix="dspark-engine-"))  # private: mode 0700
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._commands = self._context.socket(zmq.PUSH)
        self._outputs = self._context.socket(zmq.PULL)
        for sock in (self._commands, self._outputs):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)  # admission control bounds the queue, not the socket
            sock.setsockopt(zmq.RCVHWM, 0)
        commands_address = f"ipc://{self._folder / 'commands'}"
        outputs_address = f"ipc://{self._folder / 'outputs'}"
        # Each side connects the socket it sends on: a connecting socket queues what it sends
        # until (and while no longer) connected, so a send never blocks, before the engine has
        # bound its socket or after it died.
        self._commands.connect(commands_address)
        self._outputs.bind(outputs_address)
        # spawn, not fork: the child starts clean (no copied event loop, threads or sockets).
        self._process: BaseProcess = multiprocessing.get_context("spawn").Process(
            target=run_engine_core,
            args=(spec, commands_address, outputs_address),
            name="dspark-engine",
            daemon=True,
        )
        self._send_lock = threading.Lock()  # sends come from the event loop and from shutdown
        self._stop_reading = threading.Event()
        self._reader = threading.Thread(target=self._read, name="engine-reader", daemon=True)
        self._on_step: OnStep | None = None
        self._closed = False
        self.info: EngineInfo | None = None
        self.error: BaseException | None = None
        self._num_running = 0
        self._num_waiting = 0
        # At exit multiprocessing would SIGTERM a leftover child, which ignores it, and then
        # wait for it forever; this finalizer runs before that (priority >= 0) and kills it.
        self._finalizer = mp_util.Finalize(
            None, _release, exitpriority=10,
            args=(self._process, self._reader, self._stop_reading, self._context, self._folder),
        )

    # --- what the app reads from an engine --------------------------------------------------

    @property
    def _ready(self) -> EngineInfo:
        assert self.info is not None, "engine process not ready"
        return self.info

    @property
    def model_name(self) -> str:
        return self._ready.model_name

    @property
    def tokenizer(self) -> Any:
        return self._ready.tokenizer

    @property
    def max_model_len(self) -> int:
        return self._ready.max_model_len

    @property
    def num_kv_slots(self) -> int:
        return self._ready.num_kv_slots

    @property
    def structured_output(self) -> bool:
        return self._ready.structured_output

    @property
    def pid(self) -> int | None:
        return self._process.pid

    # --- start-up ---------------------------------------------------------------------------

    def launch(self) -> EngineInfo:
        """Spawn the process and wait until its engine is built (or raise why it was not)."""
        self._process.start()
        try:
            while True:
                if not threading.main_thread().is_alive():
                    raise EngineProcessError("the server is exiting")  # stopped during the load
                if self._outputs.poll(POLL_MS):
                    kind, payload = decode(self._outputs.recv())
                    if kind == "ready":
                        self.info = payload
                        return payload  # type: ignore[no-any-return]
                    raise EngineProcessError(f"the engine could not be built: {payload}")
                if not self._process.is_alive():
                    raise EngineProcessError(
                        f"the engine process exited with status {self._process.exitcode} "
                        "while starting"
                    )
        except BaseException:
            self.close()
            raise

    # --- EngineThreadLike -------------------------------------------------------------------

    def attach(self, on_step: OnStep) -> EngineProcess:
        self._on_step = on_step
        return self

    def start(self) -> None:
        assert self._on_step is not None, "attach(on_step) first"
        self._reader.start()

    def add_request(self, req: Request) -> None:
        self._send(("add", req))

    def abort(self, req_id: str) -> None:
        self._send(("abort", req_id))

    def shutdown(self, timeout_s: float) -> None:
        """Let running requests finish for up to timeout_s, then abort the rest and stop."""
        if self._process.is_alive():
            self._send(("drain", timeout_s))
        if self._reader.is_alive():  # it returns at "stopped", "died" or the process's exit
            self._reader.join(timeout_s + STOP_WAIT_S)
        self._process.join(STOP_WAIT_S)
        self.close()

    def close(self) -> None:
        """Stop the process (killing it if it still runs) and free the sockets. Idempotent."""
        with self._send_lock:
            self._closed = True
        self._finalizer()

    @property
    def is_alive(self) -> bool:
        return self._reader.is_alive() and self.error is None

    @property
    def num_running(self) -> int:
        return self._num_running  # as of the last step the engine reported

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    # --- transport --------------------------------------------------------------------------

    def _send(self, command: tuple[str, Any]) -> None:
        data = encode(command)
        with self._send_lock:
            if not self._closed:  # after shutdown, late aborts (closing streams) have no target
                self._commands.send(data)

    def _read(self) -> None:
        poller = zmq.Poller()
        poller.register(self._outputs, zmq.POLLIN)
        poller.register(self._process.sentinel, zmq.POLLIN)
        while not self._stop_reading.is_set():
            events = dict(poller.poll(POLL_MS))
            if not events:
                continue
            if self._outputs in events:
                while self._outputs.poll(0):
                    if not self._handle(decode(self._outputs.recv())):
                        return
                continue
            # The process is gone; what it sent just before may still be in the socket.
            while self._outputs.poll(EXIT_GRACE_MS):
                if not self._handle(decode(self._outputs.recv())):
                    return
            code = self._process.exitcode
            log.error("the engine process exited unexpectedly (status %s)", code)
            self.error = EngineProcessError(f"the engine process exited with status {code}")
            return

    def _handle(self, message: tuple[Any, ...]) -> bool:
        """Deliver one message; False once the engine has said its last word."""
        kind = message[0]
        if kind == "step":
            _, outputs, stats = message
            self._num_running, self._num_waiting = stats.num_running, stats.num_waiting
            assert self._on_step is not None
            self._on_step(outputs, stats)
            return True
        if kind == "died":
            self.error = EngineProcessError(message[1])
        return False  # "stopped" or "died"


def launch_engine_process(spec: EngineCoreSpec) -> EngineProcess:
    """A running engine process, its engine built (blocking: call it from a worker thread)."""
    engine = EngineProcess(spec)
    engine.launch()
    return engine


def _release(
    process: BaseProcess,
    reader: threading.Thread,
    stop_reading: threading.Event,
    context: zmq.Context[Any],
    folder: Path,
) -> None:
    # The reader polls the output socket: it must be out of it before the sockets close.
    stop_reading.set()
    if reader.is_alive() and reader is not threading.current_thread():
        reader.join()
    if process.pid is not None and process.exitcode is None:
        process.kill()
        process.join(STOP_WAIT_S)
    context.destroy(linger=0)
    shutil.rmtree(folder, ignore_errors=True)
