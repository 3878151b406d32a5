"""The GGUF conversion cache when several processes start on a fresh one (replicas, training
workers on one machine): one converts, the others wait and reuse its folder."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import pytest

from scheduler import loader


def _slow_convert(gguf: Path, out_dir: Path) -> None:
    with (out_dir.parent / "conversions.log").open("a") as f:
        f.write("converted\n")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    tmp.mkdir()  # a second converter at the same time fails here, as the real one failed on rename
    time.sleep(0.5)
    (tmp / "config.json").write_text("{}")
    tmp.rename(out_dir)


def _resolve(gguf: str, cache: str, results: mp.Queue) -> None:
    loader._convert_gguf = _slow_convert  # this child's copy of the module
    try:
        path, name = loader.resolve_model_path(gguf, Path(cache))
        results.put(("ok", str(path), name))
    except OSError as exc:  # a second converter at once fails here; the parent reports it
        results.put(("error", repr(exc), ""))


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs fork")
def test_concurrent_starts_convert_once_and_all_load(tmp_path: Path) -> None:
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    cache = tmp_path / "cache"
    ctx = mp.get_context("fork")
    results: mp.Queue = ctx.Queue()
    procs = [ctx.Process(target=_resolve, args=(str(gguf), str(cache), results)) for _ in range(3)]
    for p in procs:
        p.start()
    got = [results.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert [g[0] for g in got] == ["ok"] * 3, got
    assert {g[1] for g in got} == {str(cache / "models" / "tiny")}
    assert (cache / "models" / "conversions.log").read_text().count("converted") == 1
