"""Compiled graphs live under --cache-dir (so a restart, or an image's cache volume, reloads
them), even though importing inductor already pointed its cache at a temporary folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from scheduler.compiled import enable_disk_cache


def test_cache_dir_replaces_torchs_default_but_not_the_users(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    import torch._inductor.config  # noqa: F401  (sets the variable to torch's default)

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    enable_disk_cache(tmp_path)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")

    chosen = str(tmp_path / "mine")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", chosen)
    enable_disk_cache(tmp_path)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == chosen
