"""Uncertainty of a statistic: the delete-a-group jackknife and its Student-t interval.

Why the jackknife and not the bootstrap: the statistics it is used on (debiased CKA, the
view-invariance index) are built from U-statistics over distinct pairs of examples; a
bootstrap resample repeats examples, and a repeated example paired with itself is exactly
the diagonal term those estimators leave out, so the resampled values would be biased.
Deleting groups keeps every remaining pair distinct (Efron & Stein 1981; Arvesen 1969 for
U-statistics).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Estimate", "t_quantile", "jackknife"]

# Two-sided 95% quantiles of Student's t, df = 1..30 (beyond: the Cornish-Fisher expansion).
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)


@dataclass(frozen=True)
class Estimate:
    """A statistic with its 95% interval.

    Attributes:
        value: the statistic on all the data.
        lo, hi: value -/+ t(0.975, g - 1) * jackknife standard error.
        se: the jackknife standard error.
        groups: number of groups deleted in turn (g).
    """

    value: float
    lo: float
    hi: float
    se: float
    groups: int

    @property
    def width(self) -> float:
        return self.hi - self.lo


def t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` >= 1 degrees of freedom (to 3 decimals for
    df <= 30, the Cornish-Fisher expansion to order 1/df^2 beyond, error < 1e-3)."""
    if df < 1:
        raise ValueError(f"t_quantile needs df >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def jackknife(value: float, replicates: Sequence[float]) -> Estimate:
    """Jackknife interval of a statistic from its delete-one-group replicates.

    se = sqrt((g - 1) / g * sum_i (theta_(i) - mean theta_(.))^2) (Efron & Stein 1981), and the
    interval value -/+ t(0.975, g - 1) se. NaN everywhere when `value` or a replicate is NaN.

    Args:
        value: the statistic on all groups.
        replicates: the statistic with group i left out, one per group (g >= 2).

    Raises:
        ValueError: fewer than two replicates.
    """
    g = len(replicates)
    if g < 2:
        raise ValueError(f"the jackknife needs at least 2 groups, got {g}")
    if math.isnan(value) or any(math.isnan(r) for r in replicates):
        nan = math.nan
        return Estimate(nan, nan, nan, nan, g)
    mean = sum(replicates) / g
    se = math.sqrt((g - 1) / g * sum((r - mean) ** 2 for r in replicates))
    half = t_quantile(g - 1) * se
    return Estimate(float(value), float(value - half), float(value + half), float(se), g)
