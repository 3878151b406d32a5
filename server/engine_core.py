"""The engine core in its own process: build the engine, then drain commands -> step -> send.

`server/engine_process.py` spawns `run_engine_core` and talks to it over two ZeroMQ PUSH/PULL
sockets on private ipc:// paths. In: pickled commands, ("add", Request), ("abort", req_id),
("drain", timeout_s). Out: ("ready", EngineInfo) or ("failed", why) once, then one
("step", outputs, StepStats) per step that did work, then ("stopped", None) after a drain or
("died", why) if the loop failed. Requests travel pickled, so a field added to `Request` or
`SamplingParams` crosses the boundary without a change here.

The process builds its engine itself from the `EngineConfig` (no model is ever pickled), after
setting torch's intra-op threads. It ignores SIGINT and SIGTERM: the HTTP process owns the
shutdown (it drains its clients, then sends "drain"), so a signal sent to the whole process
group, by a terminal or a supervisor, does not cut running requests. If the HTTP process
disappears without a drain, its sentinel closes and the engine stops at once.
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from scheduler.build import build_engine
from scheduler.config import EngineConfig
from scheduler.engine import Command, EngineLoop, LLMEngine
from scheduler.request import RequestOutput
from scheduler.stats import StepStats

log = logging.getLogger(__name__)

Builder = Callable[[EngineConfig], LLMEngine]
# How long the last messages may take to leave when the process ends (its reader may be gone).
LINGER_MS = 2000


@dataclass(frozen=True)
class EngineCoreSpec:
    """Everything the engine process needs; picklable (the builder is pickled by reference)."""

    config: EngineConfig
    builder: Builder = build_engine
    threads: int = 0  # torch intra-op threads; 0: torch's default
    log_level: str = "info"


@dataclass(frozen=True)
class EngineInfo:
    """What the HTTP process needs to know about the engine, sent once it is built."""

    model_name: str
    tokenizer: Any  # the engine's tokenizer, pickled across (a transformers tokenizer)
    max_model_len: int
    num_kv_slots: int
    torch_threads: int | None  # None: the engine never loaded torch (the fake model)
    structured_output: bool  # the engine can constrain its output (grammar masks)


def set_torch_threads(threads: int) -> None:
    """Give torch `threads` intra-op threads (0: leave torch's default, one per physical core).

    Call it before the engine's first tensor operation, from the thread that builds it: torch
    hands the count to threads that start using it later (the engine loop's).
    """
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def torch_threads_in_use() -> int | None:
    """torch's intra-op thread count, without loading torch for an engine that did not."""
    torch = sys.modules.get("torch")
    return None if torch is None else int(torch.get_num_threads())


def encode(message: tuple[Any, ...]) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def decode(data: bytes) -> tuple[Any, ...]:
    return pickle.loads(data)  # type: ignore[no-any-return]  # our own peer's bytes only


class SocketInbox:
    """The EngineLoop's inbox in the engine process: commands from the HTTP process's socket.

    When the HTTP process is gone (its sentinel becomes readable), the inbox says "drain now"
    once, so the loop aborts what it holds and returns.
    """

    def __init__(self, socket: zmq.Socket[bytes], parent_sentinel: int | None) -> None:
        self._socket = socket
        self._sentinel = parent_sentinel
        self._poller = zmq.Poller()
        self._poller.register(socket, zmq.POLLIN)
        if parent_sentinel is not None:
            self._poller.register(parent_sentinel, zmq.POLLIN)
        self._orphaned = False

    def get(self, timeout_s: float) -> Command | None:
        if self._orphaned:
            return None
        events = dict(self._poller.poll(int(timeout_s * 1000)))
        if self._socket in events:
            return decode(self._socket.recv())  # type: ignore[return-value]
        if self._sentinel is not None and self._sentinel in events:
            log.warning("the HTTP process is gone; the engine stops")
            self._orphaned = True
            return ("drain", 0.0)
        return None


def run_engine_core(spec: EngineCoreSpec, commands_address: str, outputs_address: str) -> None:
    """The engine process's entry point; its exit status is 0 after a drain, 1 otherwise."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=spec.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s (engine process): %(message)s",
    )
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    commands = context.socket(zmq.PULL)
    outputs = context.socket(zmq.PUSH)
    for sock in (commands, outputs):
        sock.setsockopt(zmq.LINGER, LINGER_MS)
        sock.setsockopt(zmq.SNDHWM, 0)  # never block the engine on a slow reader
        sock.setsockopt(zmq.RCVHWM, 0)
    commands.bind(commands_address)  # the HTTP process connects to it (see EngineProcess)
    outputs.connect(outputs_address)
    parent = multiprocessing.parent_process()
    inbox = SocketInbox(commands, parent.sentinel if parent is not None else None)
    try:
        status = _serve(spec, inbox, outputs)
    finally:
        commands.close()
        outputs.close()
        context.term()
    sys.exit(status)


def _serve(spec: EngineCoreSpec, inbox: SocketInbox, out: zmq.Socket[bytes]) -> int:
    try:
        set_torch_threads(spec.threads)
        engine = spec.builder(spec.config)
    except Exception as exc:
        log.exception("building the engine failed")
        out.send(encode(("failed", f"{type(exc).__name__}: {exc}")))
        return 1
    threads = torch_threads_in_use()
    log.info("engine built: %s, torch threads: %s", engine.model_name, threads)
    info = EngineInfo(engine.model_name, engine.tokenizer, engine.max_model_len,
                      engine.num_kv_slots, threads, engine.structured_output)
    out.send(encode(("ready", info)))

    def send_step(step_outputs: list[RequestOutput], stats: StepStats) -> None:
        out.send(encode(("step", step_outputs, stats)))

    # The loop runs on this process's main thread, the thread that built (and compiled and
    # profiled) the engine. OpenMP keeps a thread team per thread that opens parallel regions;
    # with a second team (the loop on a thread of its own) the process manages more OpenMP
    # threads than the host has cores, and libgomp then cuts its workers' spin-waits short,
    # so each of the step's hundreds of parallel regions wakes sleeping workers: a batch-1
    # decode step of the embedded model took 28 ms instead of 9.5 ms on 2 cores.
    error = EngineLoop(engine, inbox, send_step).run()
    if error is None:
        out.send(encode(("stopped", None)))
        return 0
    out.send(encode(("died", f"{type(error).__name__}: {error}")))
    return 1
