"""Where the served path spends its time: py-spy on both processes under N streaming users.

    python benchmarks/profile_served.py --streams 1 16           # the embedded model, 64 tokens
    python benchmarks/profile_served.py --server-args="--no-engine-process" --streams 1

Starts `python -m server` (flags from --server-args), keeps N streaming chats busy (closed loop,
greedy, ignore_eos), and meanwhile samples the HTTP process and the engine process with
`py-spy record` (non-blocking, so the processes are never paused). Prints per process the share
of wall-clock samples in which some thread was running, the leaf functions that ran (self time)
and the functions of this project that the samples pass through (inclusive time), then one JSON
line. py-spy is a profiling tool, not a project dependency: `pip install py-spy`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from gateway_load import spawn_server

OURS = ("server/", "scheduler/", "drafts/")


def engine_pid(pid: int) -> int | None:
    """The engine process: the server's child started by multiprocessing's spawn (its other
    child, if any, is multiprocessing's resource tracker)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
    return None


async def users(base: str, streams: int, max_tokens: int, stop_at: float) -> int:
    """Closed-loop streaming chats until `stop_at`; returns the tokens received."""
    received = 0

    async def one_user(i: int) -> None:
        nonlocal received
        body = {
            "messages": [{"role": "user", "content": f"Tell me a story about a robot (#{i})."}],
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "ignore_eos": True,
        }
        async with httpx.AsyncClient(timeout=120.0) as client:
            while time.monotonic() < stop_at:
                async with client.stream("POST", base + "/v1/chat/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            received += 1

    await asyncio.gather(*(one_user(i) for i in range(streams)))
    return received


def record(pid: int, seconds: float, rate: int, out: Path) -> subprocess.Popen[bytes]:
    cmd = ["py-spy", "record", "--pid", str(pid), "--duration", str(int(seconds)),
           "--rate", str(rate), "--format", "raw", "--nonblocking", "--threads",
           "--output", str(out)]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def frame_name(frame: str) -> str:
    """'func (path/to/file.py:12)' -> 'file.py:func' keeping the project's package folder."""
    func, _, where = frame.partition(" (")
    path = where.split(":")[0]
    for pkg in OURS:
        if pkg in path:
            return pkg + path.split(pkg, 1)[1] + ":" + func
    return Path(path).name + ":" + func if path else func


def summarize(raw: Path, seconds: float, rate: int, top: int) -> dict[str, Any]:
    """Self and inclusive shares of the samples in a py-spy raw (collapsed stacks) file."""
    leaf: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    per_thread: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = stack.split(";")
        total += n
        per_thread[frames[0]] += n
        names = [frame_name(f) for f in frames[1:]]
        if names:
            leaf[names[-1]] += n
        for name in set(names):
            if name.startswith(OURS) and not name.endswith((":<module>", "__main__.py:main")):
                inclusive[name] += n
    expected = seconds * rate  # samples of one always-busy thread
    return {
        "busy_thread_share": round(total / expected, 3),  # > 1: several threads ran at once
        "threads": {t: round(n / expected, 3) for t, n in per_thread.most_common(6)},
        "self": {k: round(n / total, 3) for k, n in leaf.most_common(top)},
        "inclusive_ours": {k: round(n / total, 3) for k, n in inclusive.most_common(top)},
    }


def profile(streams: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    server = spawn_server(shlex.split(args.server_args))
    try:
        pids = {"http": server.proc.pid}
        engine = engine_pid(server.proc.pid)
        if engine is not None:
            pids["engine"] = engine
        start = time.monotonic()
        stop_at = start + args.warmup + args.seconds + 2
        loop = asyncio.new_event_loop()
        load = loop.create_task(users(server.url, streams, args.max_tokens, stop_at))
        loop.run_until_complete(asyncio.sleep(args.warmup))
        spies = {
            name: record(pid, args.seconds, args.rate, work / f"{name}_{streams}.txt")
            for name, pid in pids.items()
        }
        for spy in spies.values():
            while spy.poll() is None:
                loop.run_until_complete(asyncio.sleep(0.5))
        tokens = loop.run_until_complete(load)
        loop.close()
        wall = time.monotonic() - start
    finally:
        server.stop()
    result: dict[str, Any] = {"streams": streams, "tok_s": round(tokens / wall, 1)}
    for name in spies:
        result[name] = summarize(work / f"{name}_{streams}.txt", args.seconds, args.rate, args.top)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--server-args", default="--speculative none")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--warmup", type=float, default=10.0)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--rate", type=int, default=200, help="samples per second")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--keep", type=Path, help="keep the raw stacks in this folder")
    args = ap.parse_args()
    if shutil.which("py-spy") is None:
        raise SystemExit("py-spy not found: pip install py-spy")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = [profile(n, args, work) for n in args.streams]
    for r in results:
        print(f"\n== {r['streams']} stream(s): {r['tok_s']} tok/s received ==")
        for name in ("http", "engine"):
            if name not in r:
                continue
            p = r[name]
            print(f"-- {name} process: busy threads {p['busy_thread_share']}  {p['threads']}")
            print("   self:      " + ", ".join(f"{k} {v:.0%}" for k, v in p["self"].items()))
            print(
                "   inclusive: " + ", ".join(f"{k} {v:.0%}" for k, v in p["inclusive_ours"].items())
            )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
