"""The native attention kernel (scheduler/kernels/row_attention.cpp) against the attention rule
written out in torch: each packed row attends positions 0..its own, from the cache below its
request's start and from the step's new keys and values from there on. It must build on the
machines this project runs on (a C++ compiler is part of the set-up), so a failed build fails
here rather than passing silently on inductor's loops."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scheduler import kernels
from scheduler.loader import default_cache_dir


@pytest.fixture(scope="module")
def row_attention():
    assert kernels.load(default_cache_dir()), kernels.build_error()
    return torch.ops.dspark_kernels.row_attention


def reference(q, k_new, v_new, k_cache, v_cache, rows):
    out = []
    for n in range(q.shape[0]):
        _, pos, slot, start, first = rows[n].tolist()
        own = slice(first, first + pos + 1 - start)
        keys = torch.cat([k_cache[slot, :, :start], k_new[own].transpose(0, 1)], 1).double()
        values = torch.cat([v_cache[slot, :, :start], v_new[own].transpose(0, 1)], 1).double()
        probs = torch.softmax(torch.einsum("hgd,hld->hgl", q[n].double(), keys), -1)
        out.append(torch.einsum("hgl,hld->hgd", probs, values))
    return torch.stack(out).float()


def packed_rows(requests):
    """(slot, start, new tokens) per request -> rows [N, 5]: id, position, slot, start, first."""
    rows, first = [], 0
    for slot, start, n in requests:
        rows += [[11, start + j, slot, start, first] for j in range(n)]
        first += n
    return torch.tensor(rows)


# A verification in the middle of a context, a lone decode, a prompt with nothing cached, a
# decode at the cache's last position.
REQUESTS = [(2, 37, 3), (0, 5, 1), (1, 0, 4), (3, 99, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,group", [(64, 3), (32, 2), (128, 1)])
def test_row_attention_follows_the_rule(row_attention, dtype, head_dim, group):
    gen = torch.Generator().manual_seed(head_dim + group)
    kv_heads, slots, max_len = 3, 4, 100
    rows = packed_rows(REQUESTS)
    n = rows.shape[0]

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    k_cache, v_cache = (
        randn(slots, kv_heads, max_len, head_dim),
        randn(slots, kv_heads, max_len, head_dim),
    )
    k_new, v_new = randn(n, kv_heads, head_dim), randn(n, kv_heads, head_dim)
    q = randn(n, kv_heads, group, head_dim) * head_dim**-0.5
    got = row_attention(q, k_new, v_new, k_cache, v_cache, rows)
    assert got.dtype == torch.float32 and got.shape == q.shape
    torch.testing.assert_close(
        got, reference(q, k_new, v_new, k_cache, v_cache, rows), rtol=0, atol=2e-6
    )


def test_a_row_gets_the_same_bits_alone_or_beside_others(row_attention):
    """What keeps greedy speculation lossless: a row's output does not depend on the step."""
    gen = torch.Generator().manual_seed(3)
    k_cache = torch.randn(4, 3, 100, 64, generator=gen).bfloat16()
    v_cache = torch.randn(4, 3, 100, 64, generator=gen).bfloat16()
    rows = packed_rows(REQUESTS)
    n = rows.shape[0]
    q = torch.randn(n, 3, 3, 64, generator=gen).bfloat16()
    k_new = torch.randn(n, 3, 64, generator=gen).bfloat16()
    v_new = torch.randn(n, 3, 64, generator=gen).bfloat16()
    together = row_attention(q, k_new, v_new, k_cache, v_cache, rows)
    lone = 3  # the decode of slot 0 at position 5, alone in its step
    alone = row_attention(
        q[lone : lone + 1],
        k_new[lone : lone + 1],
        v_new[lone : lone + 1],
        k_cache,
        v_cache,
        torch.tensor([[11, 5, 0, 5, 0]]),
    )
    assert torch.equal(alone, together[lone : lone + 1])


def test_rows_out_of_range_are_refused_not_read(row_attention):
    k_cache = torch.zeros(2, 1, 16, 32)
    q, k_new = torch.zeros(1, 1, 1, 32), torch.zeros(1, 1, 32)
    for bad in ([11, 16, 0, 16, 0], [11, 3, 2, 3, 0], [11, 4, 0, 3, 0]):  # position, slot, own row
        with pytest.raises(RuntimeError, match="out of range"):
            row_attention(q, k_new, k_new, k_cache, k_cache, torch.tensor([bad]))


def test_the_served_step_attends_natively_where_the_kernel_builds(monkeypatch):
    """--attention auto takes the kernel when it builds and falls back to inductor's loops when
    it does not; --attention native refuses to start without it."""
    from scheduler.build import step_options
    from scheduler.config import EngineConfig
    from tests.scheduler.test_compiled import tiny_int4_llama

    hf = tiny_int4_llama(torch.bfloat16)
    config = EngineConfig(device="cpu")
    assert step_options(config, hf).native_attention
    assert not step_options(EngineConfig(attention="inductor"), hf).native_attention
    monkeypatch.setattr(kernels, "load", lambda cache_dir: False)
    assert not step_options(config, hf).native_attention
    with pytest.raises(RuntimeError, match="--attention native"):
        step_options(EngineConfig(attention="native"), hf)
    with pytest.raises(ValueError, match="attention must be one of"):
        EngineConfig(attention="flash")


def test_a_build_killed_halfway_does_not_hang_the_next_start(row_attention):
    """torch's extension builder guards its folder with a `lock` file and leaves it behind when
    the build is killed; a later start then waited on it for good (a CI run hung so after its
    predecessor was killed). A fresh process with such a file in place loads the kernels."""
    kernel_dirs = [p for p in (default_cache_dir() / "kernels").iterdir() if p.is_dir()]
    assert kernel_dirs
    for d in kernel_dirs:
        (d / "lock").touch()
    load = (
        "import sys; from scheduler import kernels; from scheduler.loader import "
        "default_cache_dir; sys.exit(0 if kernels.load(default_cache_dir()) else 1)"
    )
    repo = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", load], cwd=repo, timeout=300, check=True)
