"""Sequential Temperature Scaling on synthetic rollouts with a known miscalibrated head."""

from __future__ import annotations

import torch

from drafts.common import DraftConfig, StsTable, config_from_target
from drafts.train.sts import ece, ece_noise_floor, fit_sts, per_position_ece


def _rollouts(
    n: int, seed: int, scale: float = 3.0, shift: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Head logits = scale * (true logit) + shift; outcomes drawn from the true logits."""
    g = torch.Generator().manual_seed(seed)
    true_logit = torch.randn(n, 7, generator=g) * 1.5 + 1.0
    accept = torch.rand(n, 7, generator=g) < torch.sigmoid(true_logit)
    accepted = accept.long().cumprod(1).sum(1)
    return true_logit * scale + shift, accepted


def test_ece_is_zero_for_perfect_bins() -> None:
    prob = torch.tensor([0.25] * 4 + [0.75] * 4)
    label = torch.tensor([1, 0, 0, 0, 1, 1, 1, 0])
    assert ece(prob, label) < 1e-6


def test_sts_recovers_temperature_and_cuts_error() -> None:
    z, a = _rollouts(6000, 0)
    table = fit_sts(z, a, offsets=False)
    assert table.offsets == ()
    assert abs(table.temperatures[0] - 3.0) < 0.6
    zt, at = _rollouts(6000, 1)  # held-out check
    before = per_position_ece(zt, at, StsTable())
    after = per_position_ece(zt, at, table)
    assert max(after) < 0.03
    assert sum(after) < 0.5 * sum(before)


def test_noise_floor_tells_a_calibrated_head_from_a_miscalibrated_one() -> None:
    """A calibrated head measures near the floor, an over-confident one far above it, and the
    floor itself shrinks like 1/sqrt(rounds)."""
    z, a = _rollouts(400, 2, scale=1.0)  # head logits are the true logits: calibrated
    floor = ece_noise_floor(z, StsTable(), draws=50)
    measured = per_position_ece(z, a, StsTable())
    assert floor[0] > 0.01  # 400 rounds cannot resolve a 1% error
    assert measured[0] < 1.5 * floor[0]
    over, a_over = _rollouts(400, 2, scale=3.0)
    assert (
        per_position_ece(over, a_over, StsTable())[0]
        > 2 * ece_noise_floor(over, StsTable(), draws=50)[0]
    )
    big, _ = _rollouts(6400, 3, scale=1.0)
    ratio = floor[0] / ece_noise_floor(big, StsTable(), draws=20)[0]
    assert 2.5 < ratio < 6.5  # sqrt(6400 / 400) = 4


def test_offset_fixes_a_shifted_head_that_temperature_alone_cannot() -> None:
    # z = 1.5 * true + 2: over-confident by a constant as well as by scale.
    z, a = _rollouts(6000, 0, scale=1.5, shift=2.0)
    temp_only, with_offset = fit_sts(z, a, offsets=False), fit_sts(z, a, offsets=True)
    assert abs(with_offset.temperatures[0] - 1.5) < 0.4
    assert abs(with_offset.offsets[0] + 2.0 / 1.5) < 0.4  # z / T + b = true logit
    zt, at = _rollouts(6000, 1, scale=1.5, shift=2.0)
    err_temp, err_offset = (
        per_position_ece(zt, at, temp_only),
        per_position_ece(zt, at, with_offset),
    )
    assert max(err_offset) < 0.03
    assert err_offset[0] < 0.5 * err_temp[0]
    # left to choose, cross-validation keeps the offsets this head needs
    assert fit_sts(z, a, offsets=None) == with_offset


def test_the_table_of_each_sampling_mode_round_trips_through_the_config(tiny_target) -> None:  # type: ignore[no-untyped-def]
    cfg = config_from_target(tiny_target.config, "dspark", aux_layer_ids=[0])
    assert not cfg.sts_for(1.0)  # uncalibrated: the raw head
    sampled, greedy = StsTable((2.0, 1.0), (-0.5, 0.0)), StsTable((0.5,), (1.0,))
    cfg.set_sts(1.0, sampled)
    assert cfg.sts_for(0.0) == sampled  # no greedy table yet: the sampled one
    cfg.set_sts(0.0, greedy)
    restored = DraftConfig.from_dict(cfg.to_dict())
    assert restored.sts_for(0.7) == sampled and restored.sts_for(0.0) == greedy
    z = torch.tensor([[1.0, 2.0, 3.0]])
    expected = torch.sigmoid(torch.tensor([[1.0 / 2.0 - 0.5, 2.0, 3.0]]))
    assert torch.allclose(sampled.apply(z), expected)
