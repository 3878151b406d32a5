"""Step 5: Sequential Temperature Scaling of the DSpark confidence head (dspark.md §2.2).

Left to right over positions k = 1..gamma, grid-search a temperature T_k (and, where it helps,
an offset b_k) for the cumulative product prod_{i<=k} sigma(z_i / T_i + b_i) against the
observed prefix survival (drafts 1..k all accepted), with positions 1..k-1 already fixed. Why
an offset: see StsTable.

The paper picks T_k by minimum ECE. We minimise the log-loss instead and report ECE. On the
embedded model's rollouts (18 prompts) an ECE-minimising grid search with offsets overfitted:
fitted on half of the prompts, it gave up to 20% error at position 1 on the other half. The
log-loss is a proper scoring rule, so the fit keeps the head's ranking. Whether to fit offsets
at all is decided by held-out ECE (fit_sts with offsets=None).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from drafts.common import StsTable

# 2^(i/8) for i in [-24, 40]: 0.125 ... 32, fine enough near 1
GRID = [2.0 ** (i / 8) for i in range(-24, 41)]
# -3 ... 3 in steps of 0.1 (a shift of the logit)
OFFSET_GRID = [i / 10 for i in range(-30, 31)]


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
    conf_logits: torch.Tensor, accepted: torch.Tensor, table: StsTable
) -> list[float]:
    """ECE of the cumulative survival estimate at each position under the STS `table`."""
    g = conf_logits.shape[1]
    cum = table.apply(conf_logits).cumprod(dim=1)
    labels = survival_labels(accepted, g)
    return [ece(cum[:, k], labels[:, k]) for k in range(g)]


def ece_noise_floor(
    conf_logits: torch.Tensor, table: StsTable, draws: int = 200, seed: int = 0
) -> list[float]:
    """Per-position ECE that a perfectly calibrated head would still show on these rounds.

    Outcomes are drawn from the calibrated confidences themselves (draft k is accepted with
    probability c_k while drafts 1..k-1 were), scored like per_position_ece, and averaged over
    `draws`. A measured ECE near this floor cannot be told from sampling noise; the floor
    shrinks about as 1/sqrt(rounds). On 8 prompts per dataset (~500 rounds) it is 3-7% at
    position 1, so a 2% goal there needs several times more rounds to be measured at all.
    """
    gen = torch.Generator().manual_seed(seed)
    conf = table.apply(conf_logits)
    cum = conf.cumprod(dim=1)
    total = torch.zeros(conf.shape[1])
    for _ in range(draws):
        survived = (torch.rand(conf.shape, generator=gen) < conf).float().cumprod(dim=1)
        total += torch.tensor([ece(cum[:, k], survived[:, k]) for k in range(conf.shape[1])])
    return (total / draws).tolist()


def fit_sts(
    conf_logits: torch.Tensor, accepted: torch.Tensor, offsets: bool | None = None
) -> StsTable:
    """conf_logits [R, gamma] raw head outputs of R full-length rounds; accepted [R] drafts accepted.

    offsets=None fits them only where they calibrate unseen rounds better: 2-fold
    cross-validation over the first and second half of the rounds (rollouts come in prompt
    order, so the halves hold different prompts), scored by the mean per-position ECE. On the
    embedded model's rollouts the offsets helped at temperature 1 and hurt at temperature 0.
    """
    if offsets is None:
        offsets = _held_out_ece(conf_logits, accepted, True) < _held_out_ece(
            conf_logits, accepted, False
        )
    g = conf_logits.shape[1]
    labels = survival_labels(accepted, g)
    offset_grid = OFFSET_GRID if offsets else [0.0]
    temps: list[float] = []
    offs: list[float] = []
    prefix = torch.ones(conf_logits.shape[0])
    for k in range(g):
        best = (float("inf"), 0.0, 1.0, 0.0)  # (log-loss, distance from the identity, T, b)
        for t in GRID:
            for b in offset_grid:
                survival = prefix * torch.sigmoid(conf_logits[:, k] / t + b)
                e = float(F.binary_cross_entropy(survival.clamp(1e-6, 1 - 1e-6), labels[:, k]))
                # on ties prefer the table closest to the raw head (no change without evidence)
                cand = (e, abs(t - 1) + abs(b), t, b)
                if e < best[0] - 1e-12 or (abs(e - best[0]) <= 1e-12 and cand[1] < best[1]):
                    best = cand
        _, _, t, b = best
        temps.append(t)
        offs.append(b)
        prefix = prefix * torch.sigmoid(conf_logits[:, k] / t + b)
    return StsTable(tuple(temps), tuple(offs) if offsets else ())


def _held_out_ece(conf_logits: torch.Tensor, accepted: torch.Tensor, offsets: bool) -> float:
    half = conf_logits.shape[0] // 2
    first, second = slice(0, half), slice(half, None)
    return sum(
        sum(per_position_ece(conf_logits[test], accepted[test], fit_sts(z, a, offsets)))
        for (z, a), test in (
            ((conf_logits[first], accepted[first]), second),
            ((conf_logits[second], accepted[second]), first),
        )
    )
