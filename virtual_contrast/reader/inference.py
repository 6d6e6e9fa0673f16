"""Intervals and paired tests of the reader study (paper, Statistical analysis).

- SE: Clopper-Pearson 95 % interval; FDR: Student-t 95 % interval of the mean false positives per patient
  (mean ± t(0.975, n-1)·sd/√n, not clipped at 0, as the paper's "[±0.10]");
- low vs vir (same reader) and reader vs reader (same modality): McNemar mid-p on the paired detection of each
  reference lesion (Fagerland et al. 2013: ``2·P(X <= min(b, c)) - P(X = min(b, c))``, X ~ Bin(b + c, 1/2))
  and a Wilcoxon signed-rank test on the per-patient false-positive counts (zero differences discarded,
  normal approximation with tie correction and no continuity correction; the exact distribution when there
  are at most 25 pairs, no zero and no tie: SciPy 1.5's defaults, which the paper used).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval of a binomial proportion k/n; (nan, nan) when n = 0."""
    if n == 0:
        return np.nan, np.nan
    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="exact")
    return float(ci.low), float(ci.high)


def t_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Student-t interval of a mean, mean ± t·sd/√n (nan with fewer than 2 values)."""
    values = np.asarray(values, float)
    if values.size < 2:
        return np.nan, np.nan
    mean = values.mean()
    half = (
        stats.t.ppf(0.5 + confidence / 2, values.size - 1)
        * values.std(ddof=1)
        / np.sqrt(values.size)
    )
    return float(mean - half), float(mean + half)


def mcnemar_midp(b: int, c: int) -> float:
    """Two-sided McNemar mid-p (Fagerland, Lydersen & Laake 2013) from the discordant counts b and c.

    ``2·P(X <= min(b, c)) - P(X = min(b, c))`` with X ~ Binomial(b + c, 1/2); 1 when there is no discordant
    pair.
    """
    n = int(b) + int(c)
    if n == 0:
        return 1.0
    k = min(int(b), int(c))
    # Exact integer arithmetic (one correctly rounded division), so that e.g. b=5, c=1 gives exactly 0.125.
    numerator = 2 * sum(math.comb(n, i) for i in range(k)) + math.comb(n, k)
    return min(1.0, numerator / 2**n)


def wilcoxon_signed_rank(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Two-sided Wilcoxon signed-rank test of paired samples as SciPy 1.5 computed it by default.

    Zero differences are discarded; exact distribution when at most 25 pairs remain with no tie, else the
    normal approximation with tie correction, no continuity correction. All differences zero: (0, 1).
    """
    d = np.asarray(x, float) - np.asarray(y, float)
    nonzero = d[d != 0]
    if nonzero.size == 0:
        return 0.0, 1.0
    ties = np.unique(np.abs(nonzero)).size < nonzero.size
    method = "exact" if (d.size <= 25 and nonzero.size == d.size and not ties) else "asymptotic"
    res = stats.wilcoxon(nonzero, zero_method="wilcox", correction=False, method=method)
    return float(res.statistic), float(res.pvalue)
