"""C++ kernels of the compiled step, built for this CPU on first use and cached on disk.

`row_attention.cpp`: a step's packed rows attending their requests' cached keys and values
(scheduler/compiled.py). `q4_linear.cpp`: a GGUF's Q4_1 and Q8_0 matrices times activations
rounded to two int8 digits, with integer dot products (scheduler/quant.py), from 16 rows through
the tile unit where the CPU has one (AMX: the same bits). `q4_prompt.cpp`: prompt chunks'
products from the same Q4_1 blocks, dequantised to bfloat16 and multiplied in the tile unit
(where the CPU has AMX-BF16; elsewhere prompt chunks read a dense copy); both tile kernels
include `amx_tiles.h`. They are compiled with the machine's own instruction set (AVX-512 where
the CPU has it, portable loops elsewhere) by torch's extension builder (needs a C++ compiler and
ninja), ~10 s the first time, then loaded from `<cache>/kernels/` in a fraction of a second. The
folder's name carries the CPU's flags, so a cache carried to another CPU builds anew rather than
loading instructions that CPU lacks.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import subprocess
import threading
from pathlib import Path

log = logging.getLogger(__name__)

SOURCES = [
    Path(__file__).with_name(name)
    for name in ("row_attention.cpp", "q4_linear.cpp", "q4_prompt.cpp")
]
# What row_attention.cpp is instantiated for: head sizes, query heads per key/value head.
HEAD_DIMS = (32, 64, 128, 256)
MAX_GROUP = 8
_lock = threading.Lock()
_loaded: bool | None = None
_error: str | None = None


def load(cache_dir: Path) -> bool:
    """Build (or reload) the kernels; False, with the reason in `build_error()`, when they
    cannot be built here."""
    global _loaded, _error
    with _lock:
        if _loaded is None:
            try:
                _build(cache_dir)
                _register_fakes()
                _loaded = True
            # No compiler, no ninja, a compile error: say so and serve without them.
            except (OSError, RuntimeError, ImportError, subprocess.SubprocessError) as e:
                _loaded, _error = False, f"{type(e).__name__}: {e}"
                log.warning("native kernels unavailable (%s)", _error)
    return _loaded


def build_error() -> str | None:
    return _error


def attention_serves(head_dim: int, num_heads: int, num_kv_heads: int) -> bool:
    """Whether row_attention is built for a model of this shape."""
    return head_dim in HEAD_DIMS and num_heads // num_kv_heads <= MAX_GROUP


@functools.cache  # one answer per process; every native linear asks at construction
def row_quantum() -> int:
    """Rows q4_linear's and q8_linear's calls are paid for in whole groups of (the tile path's
    8, where it serves; 1 elsewhere): the stairs of a step's time that the throughput profile
    must see (scheduler/profiler.py). The kernels must be loaded."""
    import torch

    return int(torch.ops.dspark_kernels.tile_rows())


def prompt_tiles() -> bool:
    """Whether q4_prompt.cpp's bfloat16 tile products serve here (built with AMX-BF16 and the
    tiles granted). False where the kernels are not loaded."""
    return bool(_loaded) and _tiles_granted()


@functools.cache  # one answer per process, once loaded
def _tiles_granted() -> bool:
    import torch

    return bool(torch.ops.dspark_kernels.q4_bf16_available())


def has_vnni() -> bool:
    """Whether this CPU has the integer dot products q4_linear is written for (elsewhere it
    builds as plain loops, correct and slow)."""
    flags = set(_cpu_flags().split())
    return {"avx512_vnni", "avx512bw"} <= flags


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _build(cache_dir: Path) -> None:
    import torch
    from torch.utils import cpp_extension

    try:  # the ninja wheel (a dependency) puts its binary beside it, maybe not on PATH
        import ninja

        os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    except ImportError:
        pass
    fingerprint = hashlib.sha256((_cpu_flags() + torch.__version__).encode()).hexdigest()[:10]
    name = f"dspark_kernels_{fingerprint}"
    build_dir = cache_dir / "kernels" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    # torch's builder guards the folder with a `lock` file, which a build killed halfway
    # leaves behind: every later start then waited on it for good. A file lock of our own is
    # released with its process, so whoever holds it may clear torch's.
    from filelock import FileLock  # a dependency of huggingface_hub, so always installed

    with FileLock(build_dir.with_name(name + ".lock")):
        (build_dir / "lock").unlink(missing_ok=True)
        cpp_extension.load(
            name=name,
            sources=[str(s) for s in SOURCES],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            is_python_module=False,
        )


def _register_fakes() -> None:
    import torch

    @torch.library.register_fake("dspark_kernels::row_attention")
    def _(q, k_new, v_new, k_cache, v_cache, rows):  # type: ignore[no-untyped-def]
        return q.new_empty(q.shape, dtype=torch.float32)

    @torch.library.register_fake("dspark_kernels::q4_linear")
    def _(x, qs, d, m):  # type: ignore[no-untyped-def]
        return x.new_empty((x.shape[0], qs.shape[0]))

    @torch.library.register_fake("dspark_kernels::q4_bf16_linear")
    def _(x, qs, d, m):  # type: ignore[no-untyped-def]
        return x.new_empty((x.shape[0], qs.shape[0]))

    @torch.library.register_fake("dspark_kernels::q8_linear")
    def _(x, qs, d, c):  # type: ignore[no-untyped-def]
        return x.new_empty((x.shape[0], qs.shape[0]))
