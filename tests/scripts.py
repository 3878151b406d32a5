"""Scripts the tests import that are not in a package (benchmarks/, docker/grafana/generate.py):
loaded by their path."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(path: Path) -> ModuleType:
    """The Python file at `path` as a module of its own."""
    spec = importlib.util.spec_from_file_location(f"{path.stem}_script", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/<name>.py."""
    return load_script(BENCHMARKS / f"{name}.py")
