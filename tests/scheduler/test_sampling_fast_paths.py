"""The sampler's fast paths against what they replace: `argmax_ids` (greedy verification's
argmax, through NumPy on CPU) picks what torch's argmax picks, and `sample_rows` (an
inverse-CDF draw) draws torch.multinomial's law."""

from __future__ import annotations

import numpy as np
import torch

from scheduler.sampling import argmax_ids, sample_rows
from tests.scheduler.test_sampling_exact import ALPHA, chi_square_pvalue


def test_argmax_ids_equals_torchs_argmax():
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(-3, 3, (64, 50), generator=gen).float()  # many ties
    rows[5, 7] = float("nan")
    rows[6] = float("-inf")
    rows[7, [3, 40]] = float("inf")
    for view in (rows, rows[:, 10:], rows[::3], rows.double()):
        assert argmax_ids(view) == view.argmax(-1).tolist()
    assert argmax_ids(rows.bfloat16()) == rows.bfloat16().argmax(-1).tolist()
    with torch.inference_mode():  # as the runner calls it
        logits = torch.randn(8, 49152, generator=gen)
        assert argmax_ids(logits) == logits.argmax(-1).tolist()


def test_sample_rows_draws_each_rows_weights():
    """Chi-square of 40,000 draws against each row's normalised weights: unnormalised rows, a
    row with zero weights (never drawn) and a peaked one, drawn as a batch and one by one."""
    weights = torch.tensor(
        [
            [1.0, 2.0, 3.0, 4.0, 0.0, 10.0],
            [0.0, 0.0, 5.0, 0.0, 1e-3, 0.0],
            [0.2, 0.2, 0.2, 0.2, 0.1, 0.1],
        ]
    )
    gen = torch.Generator().manual_seed(11)
    draws = torch.stack([sample_rows(weights, gen) for _ in range(40_000)])  # [draws, rows]
    single = torch.stack([sample_rows(weights[1], gen) for _ in range(2_000)])
    assert single.shape == (2_000,) and set(single.tolist()) <= {2, 4}
    for r, row in enumerate(weights):
        counts = np.bincount(draws[:, r].numpy(), minlength=row.numel())
        assert counts[row.numpy() == 0].sum() == 0, f"row {r} drew a token of weight 0"
        w = row.double() / row.double().sum()
        expected = {i: float(p) for i, p in enumerate(w) if p > 0}
        observed = dict(enumerate(counts.tolist()))
        assert chi_square_pvalue(observed, expected, len(draws)) > ALPHA, f"row {r}"
