"""Step 5: Sequential Temperature Scaling of the DSpark confidence head (dspark.md §2.2).

Left to right over positions k = 1..gamma, grid-search a scalar temperature T_k so that the
cumulative product prod_{i<=k} sigma(z_i / T_i) is calibrated (minimum ECE) against the observed
prefix survival (drafts 1..k all accepted), with T_1..T_{k-1} already fixed.
"""

from __future__ import annotations

import torch

# 2^(i/8) for i in [-24, 40]: 0.125 ... 32, fine enough near 1
GRID = [2.0 ** (i / 8) for i in range(-24, 41)]


def ece(prob: torch.Tensor, label: torch.Tensor, bins: int = 20) -> float:
    """Expected calibration error with equal-width bins (DeepSpec's recorder uses 20)."""
    if prob.numel() == 0:
        return float("nan")
    idx = (prob * bins).long().clamp(max=bins - 1)
    total = torch.zeros(bins).index_add_(0, idx, torch.ones_like(prob))
    conf = torch.zeros(bins).index_add_(0, idx, prob)
    acc = torch.zeros(bins).index_add_(0, idx, label.float())
    nz = total > 0
    return float(((conf[nz] - acc[nz]).abs()).sum() / prob.numel())


def survival_labels(accepted: torch.Tensor, gamma: int) -> torch.Tensor:
    """[R] accepted counts -> [R, gamma] prefix-survival labels (1 iff drafts 1..k accepted)."""
    return (torch.arange(gamma)[None, :] < accepted[:, None]).float()


def per_position_ece(
    conf_logits: torch.Tensor, accepted: torch.Tensor, temps: list[float]
) -> list[float]:
    """ECE of the cumulative survival estimate at each position under temperatures `temps`."""
    g = conf_logits.shape[1]
    t = torch.tensor([temps[k] if k < len(temps) else 1.0 for k in range(g)])
    cum = torch.sigmoid(conf_logits / t).cumprod(dim=1)
    labels = survival_labels(accepted, g)
    return [ece(cum[:, k], labels[:, k]) for k in range(g)]


def fit_sts(
    conf_logits: torch.Tensor, accepted: torch.Tensor, grid: list[float] | None = None
) -> list[float]:
    """conf_logits [R, gamma] raw head outputs of R full-length rounds; accepted [R] drafts accepted."""
    grid = grid or GRID
    g = conf_logits.shape[1]
    labels = survival_labels(accepted, g)
    temps: list[float] = []
    prefix = torch.ones(conf_logits.shape[0])
    for k in range(g):
        best_t, best_e = 1.0, float("inf")
        for t in grid:
            e = ece(prefix * torch.sigmoid(conf_logits[:, k] / t), labels[:, k])
            # prefer the temperature closest to 1 on ties (no change without evidence)
            if e < best_e - 1e-12 or (abs(e - best_e) <= 1e-12 and abs(t - 1) < abs(best_t - 1)):
                best_t, best_e = t, e
        temps.append(best_t)
        prefix = prefix * torch.sigmoid(conf_logits[:, k] / best_t)
    return temps
