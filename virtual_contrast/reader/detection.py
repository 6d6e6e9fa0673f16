"""Lesion detection of the reader study (the paper's Table 5): matching each read to the reference, then
sensitivity, false detection rate, PPV and F1 per reader, modality and lesion size, and their comparisons.

Definitions (paper, Statistical analysis), for a reader, a modality and a size threshold T on the long axis:

- lesions are matched per patient by :func:`virtual_contrast.matching.match_lesions` (centres closer
  than half the mean of the two lesions' long and short axes; one-to-one), on all lesions; thresholds are
  applied afterwards, with ``long_axis_mm >= T``: to the reference lesion's long axis for the reference count
  and the true positives, to the detection's own long axis for the false positives;
- SE = true positives / reference lesions, with a Clopper-Pearson 95 % interval;
- FDR = false positives per patient (mean over the patients read), with a Student-t 95 % interval of that mean;
- PPV = true positives / (true positives + false positives); F1 = 2·SE·PPV / (SE + PPV);
- low vs vir (same reader) and reader vs reader (same modality): McNemar mid-p on the paired detection of each
  reference lesion and a Wilcoxon signed-rank test on the per-patient false-positive counts
  (:mod:`virtual_contrast.reader.inference`). Pairs are the patients (lesions) both reads cover.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from virtual_contrast.matching import MatchRule, match_lesions
from virtual_contrast.reader.inference import (
    clopper_pearson,
    mcnemar_midp,
    t_interval,
    wilcoxon_signed_rank,
)

DEFAULT_THRESHOLDS = (0.0, 2.5, 5.0, 7.5, 10.0)
DETECTION_COLUMNS = (
    "reader",
    "modality",
    "min_long_axis_mm",
    "n_reference",
    "true_positives",
    "n_detections",
    "false_positives",
    "n_patients",
    "sensitivity",
    "sensitivity_ci_low",
    "sensitivity_ci_high",
    "fdr",
    "fdr_ci_low",
    "fdr_ci_high",
    "ppv",
    "f1",
)
COMPARISON_COLUMNS = (
    "comparison",
    "reader",
    "modality",
    "min_long_axis_mm",
    "metric",
    "test",
    "statistic",
    "p_value",
    "n_pairs",
    "only_first",
    "only_second",
)


@dataclass(frozen=True)
class StudyMatches:
    """Outcome of matching every evaluated read with the reference read of the same patient."""

    reference_reader: str
    #: one row per (evaluated read, reference lesion): patient, reader, modality, ref_lesion, ref_long_axis_mm,
    #: detected
    hits: pd.DataFrame
    #: one row per unmatched detection: patient, reader, modality, long_axis_mm
    false_positives: pd.DataFrame
    #: the evaluated reads: patient, reader, modality
    reads: pd.DataFrame


def match_study(
    lesions: pd.DataFrame, reads: pd.DataFrame, reference_reader: str, *, rule: MatchRule = "both"
) -> StudyMatches:
    """Match each evaluated read (every read but the reference reader's ref reads) to the reference."""
    ref_sel = (lesions["reader"] == reference_reader) & (lesions["modality"] == "ref")
    reference = {p: g.reset_index(drop=True) for p, g in lesions[ref_sel].groupby("patient")}
    marked = {
        k: g.reset_index(drop=True)
        for k, g in lesions[~ref_sel].groupby(["patient", "reader", "modality"])
    }
    evaluated = reads.loc[
        ~((reads["reader"] == reference_reader) & (reads["modality"] == "ref")),
        ["patient", "reader", "modality"],
    ].reset_index(drop=True)
    empty = lesions.iloc[0:0]
    hits, fps = [], []
    for patient, reader, modality in evaluated.itertuples(index=False, name=None):
        ref = reference.get(patient, empty)
        det = marked.get((patient, reader, modality), empty)
        ref_to_det, det_to_ref = match_lesions(ref, det, rule=rule)
        hits.append(
            pd.DataFrame(
                {
                    "patient": patient,
                    "reader": reader,
                    "modality": modality,
                    "ref_lesion": np.arange(len(ref)),
                    "ref_long_axis_mm": ref["long_axis_mm"].to_numpy(float),
                    "detected": ref_to_det >= 0,
                }
            )
        )
        fps.append(
            pd.DataFrame(
                {
                    "patient": patient,
                    "reader": reader,
                    "modality": modality,
                    "long_axis_mm": det["long_axis_mm"].to_numpy(float)[det_to_ref < 0],
                }
            )
        )
    hit_cols = ["patient", "reader", "modality", "ref_lesion", "ref_long_axis_mm", "detected"]
    fp_cols = ["patient", "reader", "modality", "long_axis_mm"]
    return StudyMatches(
        reference_reader=reference_reader,
        hits=pd.concat(hits, ignore_index=True) if hits else pd.DataFrame(columns=hit_cols),
        false_positives=pd.concat(fps, ignore_index=True) if fps else pd.DataFrame(columns=fp_cols),
        reads=evaluated,
    )


def _fp_per_patient(m: StudyMatches, reader: str, modality: str, threshold: float) -> pd.Series:
    patients = m.reads.loc[
        (m.reads["reader"] == reader) & (m.reads["modality"] == modality), "patient"
    ]
    fp = m.false_positives
    sel = fp[
        (fp["reader"] == reader) & (fp["modality"] == modality) & (fp["long_axis_mm"] >= threshold)
    ]
    return sel.groupby("patient").size().reindex(sorted(patients), fill_value=0).astype(int)


def _hits(m: StudyMatches, reader: str, modality: str, threshold: float) -> pd.Series:
    h = m.hits
    sel = h[
        (h["reader"] == reader) & (h["modality"] == modality) & (h["ref_long_axis_mm"] >= threshold)
    ]
    return sel.set_index(["patient", "ref_lesion"])["detected"].astype(bool)


def evaluated_pairs(m: StudyMatches) -> list[tuple[str, str]]:
    """(reader, modality) of the evaluated reads, readers in order of appearance, then low, vir, ref."""
    order = {mod: i for i, mod in enumerate(("low", "vir", "ref"))}
    pairs = m.reads[["reader", "modality"]].drop_duplicates()
    readers = list(dict.fromkeys(pairs["reader"]))
    return sorted(
        map(tuple, pairs.to_numpy()), key=lambda rm: (readers.index(rm[0]), order.get(rm[1], 9))
    )


def detection_table(
    m: StudyMatches, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
) -> pd.DataFrame:
    """SE, FDR, PPV, F1 with intervals for each evaluated (reader, modality) and size threshold."""
    rows = []
    for reader, modality in evaluated_pairs(m):
        for thr in thresholds:
            hits = _hits(m, reader, modality, thr)
            fp = _fp_per_patient(m, reader, modality, thr)
            n_ref, tp, n_fp, n_pat = len(hits), int(hits.sum()), int(fp.sum()), len(fp)
            se = tp / n_ref if n_ref else np.nan
            ppv = tp / (tp + n_fp) if tp + n_fp else np.nan
            f1 = (
                2 * se * ppv / (se + ppv)
                if (np.isfinite(se) and np.isfinite(ppv) and se + ppv > 0)
                else np.nan
            )
            if np.isfinite(se) and np.isfinite(ppv) and se + ppv == 0:
                f1 = 0.0
            se_lo, se_hi = clopper_pearson(tp, n_ref)
            fdr_lo, fdr_hi = t_interval(fp.to_numpy())
            rows.append(
                {
                    "reader": reader,
                    "modality": modality,
                    "min_long_axis_mm": float(thr),
                    "n_reference": n_ref,
                    "true_positives": tp,
                    "n_detections": tp + n_fp,
                    "false_positives": n_fp,
                    "n_patients": n_pat,
                    "sensitivity": se,
                    "sensitivity_ci_low": se_lo,
                    "sensitivity_ci_high": se_hi,
                    "fdr": n_fp / n_pat if n_pat else np.nan,
                    "fdr_ci_low": fdr_lo,
                    "fdr_ci_high": fdr_hi,
                    "ppv": ppv,
                    "f1": f1,
                }
            )
    return pd.DataFrame(rows, columns=list(DETECTION_COLUMNS))


def _compare(
    m: StudyMatches, first: tuple[str, str], second: tuple[str, str], threshold: float
) -> list[dict]:
    """McNemar mid-p on SE and Wilcoxon on FP counts between two reads, paired on what both cover."""
    h1, h2 = _hits(m, *first, threshold), _hits(m, *second, threshold)
    common = h1.index.intersection(h2.index)
    a, b = h1.loc[common].to_numpy(), h2.loc[common].to_numpy()
    only_first, only_second = int((a & ~b).sum()), int((~a & b).sum())
    f1, f2 = _fp_per_patient(m, *first, threshold), _fp_per_patient(m, *second, threshold)
    patients = f1.index.intersection(f2.index)
    w_stat, w_p = wilcoxon_signed_rank(f1.loc[patients].to_numpy(), f2.loc[patients].to_numpy())
    return [
        {
            "metric": "sensitivity",
            "test": "McNemar mid-p",
            "statistic": float(min(only_first, only_second)),
            "p_value": mcnemar_midp(only_first, only_second),
            "n_pairs": len(common),
            "only_first": only_first,
            "only_second": only_second,
        },
        {
            "metric": "fdr",
            "test": "Wilcoxon signed-rank",
            "statistic": w_stat,
            "p_value": w_p,
            "n_pairs": len(patients),
            "only_first": int(f1.loc[patients].sum()),
            "only_second": int(f2.loc[patients].sum()),
        },
    ]


def comparison_table(
    m: StudyMatches,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    *,
    baseline: str = "low",
    candidate: str = "vir",
) -> pd.DataFrame:
    """low vs vir per reader, and reader vs reader per modality, for each size threshold.

    ``only_first`` / ``only_second``: for SE the discordant lesions (found by the first read only / the second
    only); for FDR the total false positives of each read over the paired patients. In ``low_vs_vir`` rows
    the first read is the baseline (low); in ``reader_vs_reader`` rows ``reader`` is ``"R1 vs R2"``.
    """
    pairs = evaluated_pairs(m)
    readers = list(dict.fromkeys(r for r, _ in pairs))
    rows = []
    for thr in thresholds:
        for reader in readers:
            if (reader, baseline) in pairs and (reader, candidate) in pairs:
                for row in _compare(m, (reader, baseline), (reader, candidate), thr):
                    rows.append(
                        {
                            "comparison": f"{baseline}_vs_{candidate}",
                            "reader": reader,
                            "modality": f"{baseline} vs {candidate}",
                            "min_long_axis_mm": float(thr),
                            **row,
                        }
                    )
        for r1, r2 in itertools.combinations(readers, 2):
            for modality in (baseline, candidate):
                if (r1, modality) in pairs and (r2, modality) in pairs:
                    for row in _compare(m, (r1, modality), (r2, modality), thr):
                        rows.append(
                            {
                                "comparison": "reader_vs_reader",
                                "reader": f"{r1} vs {r2}",
                                "modality": modality,
                                "min_long_axis_mm": float(thr),
                                **row,
                            }
                        )
    return pd.DataFrame(rows, columns=list(COMPARISON_COLUMNS))
