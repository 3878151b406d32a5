"""Prompt chunks' products in the CPU's bfloat16 tiles (scheduler/kernels/q4_prompt.cpp): the
Q4_1 blocks dequantised to the dense copy's bfloat16 values and multiplied, against that
product written out in torch; a row alone gets the bits it gets among others; a native linear
multiplies prompt chunks through it and holds no dense copy. The kernel needs AMX-BF16: on
a CPU without it these tests say so and the dense copy serves (the last test checks that)."""

from __future__ import annotations

import pytest
import torch

from scheduler import kernels
from scheduler.gguf_blocks import GROUP
from scheduler.loader import default_cache_dir
from scheduler.quant import Int4Linear, TiledPromptProduct, pack_native, prompt_chunk_products

from .test_q4_linear import random_q4


@pytest.fixture(scope="module", autouse=True)
def built():
    assert kernels.load(default_cache_dir()), kernels.build_error()


needs_tiles = pytest.mark.skipif(
    not (kernels.load(default_cache_dir()) and kernels.prompt_tiles()),
    reason="this CPU has no AMX-BF16 tiles: prompt chunks read the dense copy here",
)


def dequantised(q, scale, zero) -> torch.Tensor:
    """The dense copy's bfloat16 weights: w = d * q + m per block, m = zero - 8d."""
    out, inp = q.shape
    d = scale.view(out, -1, 1)
    m = (zero - 8 * scale).view(out, -1, 1)
    return (q.float().view(out, -1, GROUP) * d + m).view(out, inp).to(torch.bfloat16)


def product(x: torch.Tensor, q, scale, zero) -> torch.Tensor:
    qs, d_m = pack_native(q, scale, zero, GROUP)
    return torch.ops.dspark_kernels.q4_bf16_linear(x, qs, d_m[0], d_m[1])


@needs_tiles
@pytest.mark.parametrize("out, inp", [(48, 64), (96, 576), (64, 1536)])  # 3 tiles: one alone
@pytest.mark.parametrize("rows", [1, 16, 17, 33, 64, 65, 130])
def test_matches_the_dense_product(out, inp, rows):
    """Each output the float32 sum of bf16 inputs times the dense copy's bf16 weights, rounded
    once to bfloat16: within one bfloat16 step of the float64 product."""
    gen = torch.Generator().manual_seed(rows * inp + out)
    q, scale, zero = random_q4(out, inp, gen)
    x = torch.randn(rows, inp, generator=gen).to(torch.bfloat16)
    want = x.double() @ dequantised(q, scale, zero).double().T
    got = product(x, q, scale, zero)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, out)
    step = want.abs().clamp_min(1e-3) * 2**-8  # one bfloat16 step at the value
    assert ((got.double() - want).abs() <= step).all()


@needs_tiles
@pytest.mark.parametrize("rows", [2, 16, 17, 40, 64, 65, 130])
def test_a_row_alone_equals_the_row_among_others(rows):
    """A prompt token's products do not depend on the chunk it was cut into."""
    gen = torch.Generator().manual_seed(rows)
    q, scale, zero = random_q4(96, 576, gen)
    x = torch.randn(rows, 576, generator=gen).to(torch.bfloat16)
    together = product(x, q, scale, zero)
    for r in (0, rows // 2, rows - 1):
        assert torch.equal(product(x[r : r + 1].contiguous(), q, scale, zero)[0], together[r])


@needs_tiles
def test_a_native_linear_multiplies_prompt_chunks_in_tiles_and_keeps_no_copy():
    gen = torch.Generator().manual_seed(3)
    q, scale, zero = random_q4(64, 576, gen)
    bias = torch.randn(64, generator=gen).to(torch.bfloat16)
    lin = Int4Linear(q, scale, zero, GROUP, bias, torch.bfloat16, native=True)
    x = torch.randn(20, 576, generator=gen).to(torch.bfloat16)
    with prompt_chunk_products():
        got = lin(x)
    assert isinstance(lin._prompt_product(), TiledPromptProduct)
    assert lin.prompt_weight is None
    assert torch.equal(got, product(x, q, scale, zero) + bias)
    decoded = lin(x)  # outside a prompt chunk: the integer kernel, close but not the same bits
    torch.testing.assert_close(decoded, got, atol=0.05, rtol=0.02)


def test_elsewhere_prompt_chunks_read_the_dense_copy():
    """An aten int4 linear (and a native one on a CPU without the tiles) multiplies prompt
    chunks through the dense copy it was given."""
    gen = torch.Generator().manual_seed(4)
    q, scale, zero = random_q4(64, 128, gen)
    lin = Int4Linear(q, scale, zero, GROUP, None, torch.bfloat16)
    lin.prompt_weight = dequantised(q, scale, zero)
    x = torch.randn(20, 128, generator=gen).to(torch.bfloat16)
    with prompt_chunk_products():
        got = lin(x)
    assert not isinstance(lin._prompt_product(), TiledPromptProduct)
    torch.testing.assert_close(
        got.float(), x.float() @ dequantised(q, scale, zero).float().T, atol=0.05, rtol=0.02
    )
