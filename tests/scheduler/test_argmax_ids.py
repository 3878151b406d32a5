"""`argmax_ids` (greedy verification's argmax, through NumPy on CPU) picks what torch's argmax
picks: the first of tied maxima, NaN as the maximum, on strided views and in every dtype."""

from __future__ import annotations

import torch

from scheduler.sampling import argmax_ids


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
