"""The native Q4 kernel (scheduler/kernels/q4_linear.cpp, `--int4-kernel native`): Q4_1 weights
times activations rounded to two int8 digits per block of 32, against that formula written out
in torch; a row's output alone equals the row among others, bit for bit; the fused linear
equals its parts. On a CPU without VNNI the kernel builds as plain loops and these tests run
those."""

from __future__ import annotations

import pytest
import torch

from scheduler import kernels
from scheduler.gguf_blocks import GROUP, quantize_q8_0
from scheduler.linear import FrozenLinear
from scheduler.loader import default_cache_dir, native_int4
from scheduler.quant import Int4Linear, Q8Linear, q8_product


@pytest.fixture(scope="module", autouse=True)
def built():
    assert kernels.load(default_cache_dir()), kernels.build_error()


def random_q4(out: int, inp: int, gen: torch.Generator):
    q = torch.randint(0, 16, (out, inp), dtype=torch.uint8, generator=gen)
    scale = (torch.rand(out, inp // GROUP, generator=gen) * 0.02).half().float()
    m = (-8 * scale + torch.randn(out, inp // GROUP, generator=gen) * 1e-3).half().float()
    return q, scale, m + 8 * scale  # the int4 kernel's terms: w = (q - 8) * scale + zero


def two_digits(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each activation block of 32 rounded to two int8 digits as the kernel rounds (in float32):
    a * (p + p2 / 128) with a = max|x| / 127. Returns (128 p + p2, a / 128, the blocks of x),
    the first two in float64, shapes [rows, blocks, 32], [rows, blocks], [rows, blocks, 32]."""
    xb = x.float().view(x.shape[0], -1, GROUP)
    a = xb.abs().amax(-1, keepdim=True) / 127
    t = xb * torch.where(a > 0, 1 / a, torch.zeros_like(a))
    p = torch.round(t)
    digits = 128 * p + torch.round((t - p) * 128)
    return digits.double(), a.squeeze(-1).double() / 128, xb


def reference(x: torch.Tensor, q, scale, zero) -> torch.Tensor:
    """y = sum over blocks of d * (a / 128) * sum(q * (128 p + p2)) + m * S, with m = zero - 8d
    and S the block's exact sum, in float64."""
    digits, step, xb = two_digits(x)
    dots = torch.einsum("rbj,obj->rob", digits, q.double().view(q.shape[0], -1, GROUP))
    d, m = scale.double(), (zero - 8 * scale).double()
    return (dots * (d[None] * step[:, None])).sum(-1) + xb.double().sum(-1) @ m.T


@pytest.mark.parametrize("inp", [64, 576, 1536])  # 1 pair; 2 groups of 4 pairs + 1; 6 groups
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_the_formula(inp, dtype):
    gen = torch.Generator().manual_seed(inp)
    q, scale, zero = random_q4(96, inp, gen)
    lin = Int4Linear(q, scale, zero, GROUP, None, dtype, native=True)
    # a few outlier channels, as in a transformer's hidden states
    x = torch.randn(7, inp, generator=gen) * torch.where(
        torch.rand(inp, generator=gen) < 0.03, 40.0, 1.0
    )
    x = x.to(dtype)
    want = reference(x.float(), q, scale, zero)
    got = lin(x).double()
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bfloat16: the output is rounded
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()))


@pytest.mark.parametrize("rows", [13, 16, 17, 40])
@pytest.mark.parametrize("weights", ["q4_1", "q8_0"])
def test_a_row_alone_equals_the_row_among_others(rows, weights):
    """Losslessness rests on it. From 16 rows, on a CPU with the tile unit (AMX), a call takes
    its integer sums from tile products, in groups of 8 rows (17 and 40: a padded group); one
    row always takes the vector path."""
    gen = torch.Generator().manual_seed(rows)
    if weights == "q4_1":
        q, scale, zero = random_q4(128, 576, gen)
        lin = Int4Linear(q, scale, zero, GROUP, None, torch.bfloat16, native=True)
    else:
        lin = q8_product(torch.randn(128, 576, generator=gen).bfloat16(), None)
    x = torch.randn(rows, 576, generator=gen).to(torch.bfloat16)
    together = lin(x)
    for r in (0, 3, 8, rows - 1):
        assert torch.equal(lin(x[r : r + 1])[0], together[r])


def test_fused_equals_its_parts():
    gen = torch.Generator().manual_seed(2)
    parts = [
        Int4Linear(*random_q4(out, 576, gen), GROUP, None, torch.bfloat16, native=True)
        for out in (96, 48, 48)
    ]
    fused = Int4Linear.concat(parts)
    assert fused is not None and fused.native and fused.kernel_rows == parts[0].kernel_rows
    x = torch.randn(5, 576, generator=gen).to(torch.bfloat16)
    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], -1))


def test_the_profile_is_told_the_rows_the_tile_path_pads_a_call_to():
    """Where the tile path serves, a call's rows are paid for in groups of 8 (16 decodes and
    one draft cost what 24 rows do): the native linear says so, for the profile's stairs."""
    gen = torch.Generator().manual_seed(3)
    linear = Int4Linear(*random_q4(32, 64, gen), GROUP, None, torch.bfloat16, native=True)
    threshold = torch.ops.dspark_kernels.amx_min_rows(16)  # -1: this build has no tile path
    torch.ops.dspark_kernels.amx_min_rows(threshold)
    assert linear.kernel_rows == (1 if threshold == -1 else 8)


def test_native_needs_bfloat16_activations():
    with pytest.raises(ValueError, match="not bfloat16"):
        native_int4("native", torch.float32, default_cache_dir())
    assert native_int4("auto", torch.float32, default_cache_dir()) is False  # falls back
    assert native_int4("aten", torch.bfloat16, default_cache_dir()) is False
    assert native_int4("auto", torch.bfloat16, default_cache_dir()) is kernels.has_vnni()


def test_a_dense_weight_as_q8_rounds_each_block_to_its_own_scale():
    """`quantize_q8_0`: d * q within half a step of every weight, d the block's max |w| / 127
    in float16, the largest weight of a block at +-127 (an all-zero block stays zero)."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(48, 96, generator=gen) * 0.05
    w[3, :GROUP] = 0
    qt = quantize_q8_0(w.bfloat16())
    q, d = qt.q, qt.scale
    blocks = w.bfloat16().float().view(48, -1, GROUP)
    assert torch.equal(d, (blocks.abs().amax(-1) / 127).half().float())
    back = q.float().view(48, -1, GROUP) * d[..., None]
    assert ((back - blocks).abs() <= d[..., None] / 2 + 1e-9).all()
    assert torch.equal(
        q.view(48, -1, GROUP).abs().amax(-1)[d > 0],
        torch.full_like(d[d > 0], 127, dtype=torch.int8),
    )
    assert not q[3, :GROUP].any()


def test_a_drafters_q8_product_multiplies_its_quantized_weight():
    """`q8_product` (a drafter's products beside a native target): the kernel's product of
    the weight's Q8_0 blocks, near the bf16 product; what the kernel cannot take (a bias,
    outputs not in 16s) stays the dense FrozenLinear."""
    gen = torch.Generator().manual_seed(6)
    w = (torch.randn(96, 576, generator=gen) * 0.05).bfloat16()
    x = torch.randn(7, 576, generator=gen).bfloat16()
    product = q8_product(w, None)
    assert isinstance(product, Q8Linear) and product.native
    qt = quantize_q8_0(w)
    torch.testing.assert_close(
        product(x), Q8Linear(qt.q, qt.scale, GROUP, torch.bfloat16, native=True)(x)
    )
    dense = x.float() @ w.float().T
    assert (product(x).float() - dense).norm() < 0.01 * dense.norm()
    assert isinstance(q8_product(w, torch.zeros(96).bfloat16()), FrozenLinear)
    assert isinstance(q8_product(w[:40], None), FrozenLinear)


def test_q8_matches_the_formula():
    """Q8_0 (w = d * q, q an int8, the embedded model's LM head): the same two-digit rounding."""
    gen = torch.Generator().manual_seed(3)
    out, inp = 64, 576
    q = torch.randint(-127, 128, (out, inp), dtype=torch.int8, generator=gen)
    scale = (torch.rand(out, inp // GROUP, generator=gen) * 0.01).half().float()
    head = Q8Linear(q, scale, GROUP, torch.float32, native=True)
    x = torch.randn(5, inp, generator=gen) * torch.where(
        torch.rand(inp, generator=gen) < 0.03, 40.0, 1.0
    )
    digits, step, _ = two_digits(x)
    dots = torch.einsum("rbj,obj->rob", digits, q.double().view(out, -1, GROUP))
    want = (dots * (scale.double()[None] * step[:, None])).sum(-1)
    got = head(x).double()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert torch.equal(head(x[2:3])[0], head(x)[2])
