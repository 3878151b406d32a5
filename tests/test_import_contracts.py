"""The layers hold: import-linter's contracts (pyproject.toml) pass on the tree and catch a
forbidden import when one is added."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("server", "scheduler", "drafts", "loadtest")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}  # the tree under test, not the installed one
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True,
        check=False,
        timeout=300,
    )


def test_the_tree_keeps_every_contract() -> None:
    run = lint_imports(ROOT)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.fixture
def tree_copy(tmp_path: Path) -> Path:
    """The packages and the contracts, copied so a test can add a forbidden import."""
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__", "checkpoints"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("server/probe.py", "import scheduler.batching\n", "server/ talks to the engine"),
        ("server/probe.py", "import drafts.registry\n", "server/ talks to the engine"),
        ("scheduler/kv_slots.py", "import torch\n", "the scheduler core is pure Python"),
        ("scheduler/speculator.py", "import drafts.proposer\n", "scheduler/ reaches drafts/ only"),
        ("drafts/probe.py", "import scheduler.batching\n", "drafts/ uses the scheduler's"),
        ("scheduler/plan.py", "import scheduler.batching\n", "no import cycles"),
        ("loadtest/probe.py", "import server.app\n", "load tests speak HTTP only"),
    ],
)
def test_a_forbidden_import_breaks_its_contract(
    tree_copy: Path, module: str, line: str, contract: str
) -> None:
    path = tree_copy / module
    path.write_text((path.read_text() if path.exists() else "") + line)
    run = lint_imports(tree_copy)
    assert run.returncode != 0
    broken = run.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, run.stdout
