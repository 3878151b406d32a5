"""Sequential Temperature Scaling on synthetic rollouts with a known over-confident head."""

from __future__ import annotations

import torch

from drafts.train.sts import ece, fit_sts, per_position_ece


def _rollouts(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    true_logit = torch.randn(n, 7, generator=g) * 1.5 + 1.0
    accept = torch.rand(n, 7, generator=g) < torch.sigmoid(true_logit)
    accepted = accept.long().cumprod(1).sum(1)
    return true_logit * 3.0, accepted  # head is 3x over-confident


def test_ece_is_zero_for_perfect_bins() -> None:
    prob = torch.tensor([0.25] * 4 + [0.75] * 4)
    label = torch.tensor([1, 0, 0, 0, 1, 1, 1, 0])
    assert ece(prob, label) < 1e-6


def test_sts_recovers_temperature_and_cuts_error() -> None:
    z, a = _rollouts(6000, 0)
    temps = fit_sts(z, a)
    assert abs(temps[0] - 3.0) < 0.6
    zt, at = _rollouts(6000, 1)  # held-out check
    before = per_position_ece(zt, at, [1.0] * 7)
    after = per_position_ece(zt, at, temps)
    assert max(after) < 0.03
    assert sum(after) < 0.5 * sum(before)
