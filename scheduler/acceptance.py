"""Online acceptance estimates for drafters without a confidence head (n-gram, EAGLE-3, DFlash).

The DSpark policy needs, for every proposed draft j, c_j = P(draft j accepted | drafts before j
accepted). A DSpark drafter predicts it; for the others this module learns it from what the
verifier reports, so `dspark` scheduling works with every drafter.

Model (small on purpose: a few hundred floats, O(len(drafts)) per call, nothing to train offline):
    cell (position j, bin of the draft's own confidence feature f_j)
    c(j, bin) = (s_cell + k * m_j) / (n_cell + k)        cell estimate, shrunk to ...
    m_j       = (s_pos + k * m_{j-1}) / (n_pos + k)      ... the position's rate, shrunk to the
    m_{-1}    = prior                                        previous position's rate
with s / n the (forgotten) accepted / observed counts, k = prior_strength. Beta smoothing in
two levels: a fresh cell behaves like its position, a fresh position like the one before it,
and position 0 like the prior (0.6 by default: high enough that a cold start speculates, so
there are outcomes to learn from). Chaining the positions matters under a cost-aware policy:
deep positions are verified only when the shallow ones look good, so they may go untested for
long; a copied run accepted at 0.9 per position in positions 0-3 is assumed to continue at 0.9
rather than at the prior, which would keep them unverified and so untested for good. Counts
decay by `decay` per observe() call, so the estimates follow a drift in traffic (a new prompt
mix, a temperature change) with an effective memory of ~1 / (1 - decay) verifications.
Positions at or past max_positions share the last position's cells; features outside [0, 1]
are clamped; a None feature (deterministic drafters without one) has its own bin. A drafter that
knows more about its drafts than a probability passes a hashable key instead (the suffix drafter:
match length, support and agreement, bucketed): each distinct key is a cell of its own.

The feature must not depend on the draft token it describes. Whether draft j is verified is
decided from c_j; if c_j were computed from q_j(x_j), the draft's probability of the token it
actually drew, the decision would peek at x_j and bias the output (a sampling drafter would be
verified mostly when it drew its likely token). Use max_v q_j(v), the draft distribution's top
probability at position j, which is fixed before x_j is drawn; for greedy drafters it equals
q_j(x_j). tests/scheduler/test_acceptance.py shows the bias and its absence by simulation.

Censoring: after a verification of n drafts with a accepted, positions 0..a-1 were accepted,
position a was rejected (if a < n), and positions after a were never tested under the
"earlier drafts accepted" condition, whether verified or not: they teach nothing about c and are
not counted.

Pure Python: no torch, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

_RESCALE_AT = 1e12  # renormalise the forgetting scale before floats lose precision


@dataclass(frozen=True, slots=True)
class PositionCalibration:
    """Predicted versus realised conditional acceptance at one draft position."""

    position: int
    count: int  # verifications that tested this position
    mean_predicted: float
    mean_realised: float

    @property
    def abs_error(self) -> float:
        return abs(self.mean_predicted - self.mean_realised)


class OnlineAcceptanceEstimator:
    """Per-(position, feature bin) conditional acceptance, learned from verification outcomes."""

    def __init__(
        self,
        max_positions: int = 8,
        num_bins: int = 10,
        prior_mean: float = 0.6,
        prior_strength: float = 4.0,
        decay: float = 0.999,
    ) -> None:
        if max_positions < 1 or num_bins < 1:
            raise ValueError("max_positions and num_bins must be >= 1")
        if not 0 < prior_mean < 1 or prior_strength <= 0 or not 0 < decay <= 1:
            raise ValueError("need 0 < prior_mean < 1, prior_strength > 0, 0 < decay <= 1")
        self.max_positions = max_positions
        self.num_bins = num_bins
        self.prior_mean = prior_mean
        self.prior_strength = prior_strength
        self.decay = decay
        # Stored counts are scaled by self._weight (the weight of a new observation), which grows
        # by 1/decay per observe() call: forgetting without touching every cell on every call.
        self._weight = 1.0
        self._pos_hits = [0.0] * max_positions
        self._pos_total = [0.0] * max_positions
        # Per position: cell key (a bin number, or a drafter's own key) -> counts.
        self._hits: list[dict[Hashable, float]] = [{} for _ in range(max_positions)]
        self._total: list[dict[Hashable, float]] = [{} for _ in range(max_positions)]
        # Calibration of the estimates actually handed out (no forgetting: a report).
        self._cal_count = [0] * max_positions
        self._cal_pred = [0.0] * max_positions
        self._cal_real = [0.0] * max_positions

    def _bin(self, feature: Hashable) -> Hashable:
        if feature is None:
            return self.num_bins  # the bin after the last float bin
        if not isinstance(feature, (int, float)):
            return feature  # a drafter's own cell key
        f = 0.0 if math.isnan(feature) else min(1.0, max(0.0, feature))  # NaN -> lowest bin
        return min(int(f * self.num_bins), self.num_bins - 1)

    def _position_rates(self, num_positions: int) -> list[float]:
        """m_j per position: its own outcomes shrunk to m_{j-1} (m_{-1} = prior_mean)."""
        k = self.prior_strength * self._weight  # prior counts live in the same scaled units
        rates, m = [], self.prior_mean
        for p in range(min(num_positions, self.max_positions)):
            m = (self._pos_hits[p] + k * m) / (self._pos_total[p] + k)
            rates.append(m)
        return rates + rates[-1:] * (num_positions - len(rates))

    def position_rates(self, num_positions: int) -> list[float]:
        """Each position's own rate (the level its cells are shrunk to), whatever the feature:
        what a draft at that position is worth before its features are known."""
        return self._position_rates(num_positions)

    def confidences(self, draft_features: Sequence[Hashable]) -> list[float]:
        """Estimated conditional acceptance of each proposed draft of one request.

        draft_features[j]: a statistic of the draft distribution at position j that does not
        depend on the drafted token x_j (the top probability max_v q_j(v); see the module
        docstring), None for deterministic drafters without one, or a drafter's own cell key.
        """
        k = self.prior_strength * self._weight
        last = self.max_positions - 1
        rates = self._position_rates(len(draft_features))
        out = []
        for j, f in enumerate(draft_features):
            pos, b = min(j, last), self._bin(f)
            hits, total = self._hits[pos].get(b, 0.0), self._total[pos].get(b, 0.0)
            out.append((hits + k * rates[j]) / (total + k))
        return out

    def observe(
        self, draft_features: Sequence[Hashable], num_verified: int, num_accepted: int
    ) -> None:
        """One verification: drafts 0..num_accepted-1 accepted, draft num_accepted rejected if
        num_accepted < num_verified; everything after is censored."""
        if not 0 <= num_accepted <= num_verified <= len(draft_features):
            raise ValueError(
                f"need 0 <= accepted ({num_accepted}) <= verified ({num_verified}) "
                f"<= proposed ({len(draft_features)})"
            )
        tested = min(num_accepted + 1, num_verified)
        if tested == 0:
            return
        predicted = self.confidences(draft_features[:tested])
        w = self._weight
        last = self.max_positions - 1
        for j in range(tested):
            pos, b = min(j, last), self._bin(draft_features[j])
            hit = 1.0 if j < num_accepted else 0.0
            self._pos_hits[pos] += w * hit
            self._pos_total[pos] += w
            self._hits[pos][b] = self._hits[pos].get(b, 0.0) + w * hit
            self._total[pos][b] = self._total[pos].get(b, 0.0) + w
            self._cal_count[pos] += 1
            self._cal_pred[pos] += predicted[j]
            self._cal_real[pos] += hit
        self._weight /= self.decay
        if self._weight > _RESCALE_AT:
            self._rescale()

    def _rescale(self) -> None:
        s = 1.0 / self._weight
        self._weight = 1.0
        for rows in (self._hits, self._total):
            for row in rows:
                for key in row:
                    row[key] *= s
        self._pos_hits = [v * s for v in self._pos_hits]
        self._pos_total = [v * s for v in self._pos_total]

    def calibration(self) -> list[PositionCalibration]:
        """Mean estimate handed out vs realised acceptance, per position that was tested."""
        return [
            PositionCalibration(j, n, self._cal_pred[j] / n, self._cal_real[j] / n)
            for j, n in enumerate(self._cal_count)
            if n > 0
        ]
