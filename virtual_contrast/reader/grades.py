"""Image quality and reading times of the reader study (the paper's Tables 4 and 6): mean and sd per reader and
modality, and two-tailed paired t-tests (pairs: the same patient) between modalities for each reader and
between readers for each modality."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
from scipy import stats


def grade_table(reads: pd.DataFrame, column: str) -> pd.DataFrame:
    """Mean and sd of ``column`` (quality or reading_time_s) per reader and modality, and paired t-tests.

    Rows of kind ``summary`` (reader, modality, n, mean, sd); ``modality_comparison`` (reader, modality =
    ``"low vs vir"`` ...); ``reader_comparison`` (reader = ``"R1 vs R2"``, modality). Tests pair the patients
    both reads graded; fewer than 2 pairs or no variation gives no p-value.
    """
    data = reads.dropna(subset=[column])
    readers = list(dict.fromkeys(reads["reader"]))
    present = [m for m in ("low", "vir", "ref") if (reads["modality"] == m).any()]
    rows = []
    wide = {
        (r, mod): g.set_index("patient")[column]
        for (r, mod), g in data.groupby(["reader", "modality"])
    }
    for reader in readers:
        for mod in present:
            v = wide.get((reader, mod))
            if v is None:
                continue
            rows.append(
                {
                    "kind": "summary",
                    "reader": reader,
                    "modality": mod,
                    "n": int(v.size),
                    "mean": float(v.mean()),
                    "sd": float(v.std(ddof=1)) if v.size > 1 else np.nan,
                }
            )

    def ttest(a: pd.Series | None, b: pd.Series | None) -> dict:
        if a is None or b is None:
            return {}
        common = a.index.intersection(b.index)
        x, y = a.loc[common].to_numpy(float), b.loc[common].to_numpy(float)
        if len(common) < 2 or np.std(x - y) == 0:
            return {
                "n": len(common),
                "test": "paired t-test",
                "statistic": np.nan,
                "p_value": np.nan,
            }
        res = stats.ttest_rel(x, y)
        return {
            "n": len(common),
            "test": "paired t-test",
            "statistic": float(res.statistic),
            "p_value": float(res.pvalue),
        }

    for reader in readers:
        for m1, m2 in itertools.combinations(present, 2):
            res = ttest(wide.get((reader, m1)), wide.get((reader, m2)))
            if res:
                rows.append(
                    {
                        "kind": "modality_comparison",
                        "reader": reader,
                        "modality": f"{m1} vs {m2}",
                        **res,
                    }
                )
    for r1, r2 in itertools.combinations(readers, 2):
        for mod in present:
            res = ttest(wide.get((r1, mod)), wide.get((r2, mod)))
            if res:
                rows.append(
                    {"kind": "reader_comparison", "reader": f"{r1} vs {r2}", "modality": mod, **res}
                )
    columns = ["kind", "reader", "modality", "n", "mean", "sd", "test", "statistic", "p_value"]
    return pd.DataFrame(rows, columns=columns)
