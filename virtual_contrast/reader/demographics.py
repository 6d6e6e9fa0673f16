"""Table-1-style demographics of the training and test samples (paper, Table 1).

Categorical variables (sex, indication) are compared with Fisher's exact test on the levels × groups table
(two-sided; for more than two levels the exact generalisation: the sum of the probabilities of all tables
with the observed margins that are no more likely than the observed one, enumerated); continuous variables
(age, weight) with the two-sided Mann-Whitney U test. Tests need exactly two groups. Missing values are left
out variable by variable.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from virtual_contrast.io import InputError
from virtual_contrast.report import format_p, markdown_table

log = logging.getLogger(__name__)

CATEGORICAL = ("sex", "indication")
CONTINUOUS = ("age", "weight")
UNITS = {"age": "y", "weight": "kg"}
#: Accepted column names of each variable (the cohort's participants.tsv writes ``weight_kg``).
ALIASES = {
    "age": ("age", "age_years"),
    "sex": ("sex", "gender"),
    "weight": ("weight", "weight_kg"),
    "indication": ("indication", "diagnosis"),
}
_MAX_TABLES = 5_000_000


def fisher_exact_2xk(counts: np.ndarray) -> float:
    """Two-sided Fisher exact p-value of a K × 2 contingency table (rows: levels, columns: groups).

    Enumerates every table with the observed margins (multivariate hypergeometric on the first column) and
    sums the probabilities not larger than the observed one (relative tolerance 1e-7, as R and SciPy do).
    Equals ``scipy.stats.fisher_exact`` for a 2 × 2 table.
    """
    counts = np.asarray(counts, dtype=int)
    if counts.ndim != 2 or counts.shape[1] != 2 or (counts < 0).any():
        raise ValueError(f"expected a K x 2 table of non-negative counts, got shape {counts.shape}")
    counts = counts[counts.sum(axis=1) > 0]
    if len(counts) < 2:
        return 1.0
    rows = counts.sum(axis=1).tolist()
    col0 = int(counts[:, 0].sum())
    total = int(counts.sum())
    n_tables = math.prod(r + 1 for r in rows)
    if n_tables > _MAX_TABLES:
        raise InputError(f"Fisher exact test: table too large to enumerate ({n_tables} tables)")
    log_denominator = _log_comb(total, col0)

    def log_p(x: Sequence[int]) -> float:
        return sum(_log_comb(r, xi) for r, xi in zip(rows, x, strict=True)) - log_denominator

    observed = log_p(counts[:, 0].tolist())
    threshold = observed + math.log1p(1e-7)
    suffix = np.cumsum(rows[::-1])[::-1].tolist() + [0]  # rows[i:] total
    p = 0.0

    def walk(i: int, remaining: int, partial: list[int]) -> None:
        nonlocal p
        if i == len(rows) - 1:
            if 0 <= remaining <= rows[i]:
                lp = log_p([*partial, remaining])
                if lp <= threshold:
                    p += math.exp(lp)
            return
        lo = max(0, remaining - suffix[i + 1])
        hi = min(rows[i], remaining)
        for xi in range(lo, hi + 1):
            walk(i + 1, remaining - xi, [*partial, xi])

    walk(0, col0, [])
    return min(1.0, p)


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def demographics_table(
    subjects: pd.DataFrame,
    *,
    group_column: str = "split",
    groups: Sequence[str] | None = None,
) -> pd.DataFrame | None:
    """Table 1: one row per variable level; a column per group with ``"54% (58/107)"`` or ``"55 (±14) y"``;
    ``p_value`` and ``statistical_test``. ``None`` when the table has none of age, sex, weight, indication
    (also read from the columns of :data:`ALIASES`, e.g. ``weight_kg``).

    ``groups`` defaults to ``("train", "test")`` when both occur, else the sorted group values.
    """
    renames = {}
    for variable, names in ALIASES.items():
        found = [n for n in names if n in subjects.columns]
        if found:
            renames[found[0]] = variable
    subjects = subjects.rename(columns=renames)
    present = [c for c in ("age", "sex", "weight", "indication") if c in renames.values()]
    if not present:
        return None
    if group_column not in subjects.columns:
        raise InputError(f"subjects table has no {group_column!r} column to compare groups")
    values = subjects[group_column].astype(str)
    if groups is None:
        found = sorted(values.unique())
        groups = ["train", "test"] if {"train", "test"} <= set(found) else found
    groups = list(groups)
    data = subjects[values.isin(groups)].assign(**{group_column: values[values.isin(groups)]})
    two = len(groups) == 2
    rows = [
        {
            "variable": "patients",
            "level": "",
            **{g: str(int((data[group_column] == g).sum())) for g in groups},
            "p_value": np.nan,
            "statistical_test": "",
        }
    ]
    for variable in present:
        column = data[[variable, group_column]].dropna()
        if variable in CONTINUOUS:
            numeric = pd.to_numeric(column[variable], errors="coerce")
            bad = column.index[numeric.isna()]
            if len(bad):
                raise InputError(
                    f"subjects table: {variable} is not a number for {len(bad)} row(s)"
                )
            cells = {}
            samples = []
            for g in groups:
                v = numeric[column[group_column] == g].to_numpy(float)
                samples.append(v)
                sd = f" (±{np.std(v, ddof=1):.0f})" if v.size > 1 else ""
                cells[g] = f"{np.mean(v):.0f}{sd} {UNITS[variable]}" if v.size else "n/a"
            p = np.nan
            if two and all(s.size for s in samples):
                p = float(
                    stats.mannwhitneyu(samples[0], samples[1], alternative="two-sided").pvalue
                )
            rows.append(
                {
                    "variable": variable,
                    "level": "",
                    **cells,
                    "p_value": p,
                    "statistical_test": "Mann-Whitney U" if two else "",
                }
            )
        else:
            levels = column[variable].astype(str).str.strip()
            table = pd.crosstab(levels, column[group_column]).reindex(columns=groups, fill_value=0)
            p = fisher_exact_2xk(table.to_numpy()) if two else np.nan
            totals = table.sum(axis=0)
            for k, (level, counts) in enumerate(table.iterrows()):
                cells = {
                    g: f"{100 * counts[g] / totals[g]:.0f}% ({counts[g]}/{totals[g]})"
                    if totals[g]
                    else "n/a"
                    for g in groups
                }
                rows.append(
                    {
                        "variable": variable,
                        "level": level,
                        **cells,
                        "p_value": p if k == 0 else np.nan,
                        "statistical_test": ("Fisher exact" if two else "") if k == 0 else "",
                    }
                )
    return pd.DataFrame(rows, columns=["variable", "level", *groups, "p_value", "statistical_test"])


def demographics_markdown(table: pd.DataFrame) -> str:
    """Render :func:`demographics_table` as markdown."""
    groups = [
        c for c in table.columns if c not in ("variable", "level", "p_value", "statistical_test")
    ]
    body = []
    for _, r in table.iterrows():
        name = r["variable"] if not r["level"] else f"{r['variable']}: {r['level']}"
        p = format_p(r["p_value"]) if np.isfinite(r["p_value"]) else ""
        body.append([name, *(str(r[g]) for g in groups), p])
    return markdown_table(["variable", *groups, "p"], body) + "\n"
