"""The paper's Table 5 layout of the detection tables: one column per reader and modality, one row per size
threshold and metric (SE, FDR, PPV, F1), with the p-values of low vs vir and of reader vs reader."""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import numpy as np
import pandas as pd

from virtual_contrast.report import format_p, html_table, markdown_table


def image_label(modality: str, labels: Mapping[str, str] | None = None) -> str:
    """The display name of a modality (``low`` -> ``low-T1c``), or the one ``labels`` gives it."""
    return (labels or {}).get(modality, f"{modality}-T1c")


def _threshold_label(thr: float) -> str:
    return "All lesions" if thr == 0 else f"≥ {thr:g} mm"


def table5_rows(
    detection: pd.DataFrame,
    comparisons: pd.DataFrame,
    *,
    baseline: str = "low",
    candidate: str = "vir",
    labels: Mapping[str, str] | None = None,
) -> tuple[list[str], list[list[str]]]:
    """Header and body of the Table-5-like table (strings), shared by the markdown and HTML renderings;
    ``labels`` names the modalities in the header (:func:`image_label`)."""
    readers = list(dict.fromkeys(detection["reader"]))
    readers = [
        r
        for r in readers
        if {baseline, candidate} & set(detection.loc[detection["reader"] == r, "modality"])
    ]
    base, cand = image_label(baseline, labels), image_label(candidate, labels)
    header = ["size", "metric"]
    for r in readers:
        header += [f"{r} {base}", f"{r} {cand}", f"{r} {baseline} vs. {candidate}"]
    pairs = list(itertools.combinations(readers, 2))
    for r1, r2 in pairs:
        header += [f"{r1} vs. {r2} {base}", f"{r1} vs. {r2} {cand}"]
    if len(readers) > 1:
        header += [f"average {base}", f"average {cand}"]

    def det(reader: str, modality: str, thr: float) -> pd.Series | None:
        sel = detection[
            (detection["reader"] == reader)
            & (detection["modality"] == modality)
            & (detection["min_long_axis_mm"] == thr)
        ]
        return None if sel.empty else sel.iloc[0]

    def comp(kind: str, reader: str, modality: str, thr: float, metric: str) -> str:
        sel = comparisons[
            (comparisons["comparison"] == kind)
            & (comparisons["reader"] == reader)
            & (comparisons["modality"] == modality)
            & (comparisons["min_long_axis_mm"] == thr)
            & (comparisons["metric"] == metric)
        ]
        return "n/a" if sel.empty else format_p(float(sel["p_value"].iloc[0]))

    def pct(x: float) -> str:
        return "n/a" if not np.isfinite(x) else f"{100 * x:.0f}%"

    def cell(row: pd.Series | None, metric: str) -> str:
        if row is None:
            return ""
        if metric == "SE":
            lo, hi = row["sensitivity_ci_low"], row["sensitivity_ci_high"]
            ci = f" [{100 * lo:.0f}; {100 * hi:.0f}]" if np.isfinite(lo) else ""
            return f"{pct(row['sensitivity'])} ({row['true_positives']}/{row['n_reference']}){ci}"
        if metric == "FDR":
            half = (row["fdr_ci_high"] - row["fdr_ci_low"]) / 2
            ci = f" [±{half:.2f}]" if np.isfinite(half) else ""
            return f"{row['fdr']:.2f} ({row['false_positives']}/{row['n_patients']}){ci}"
        if metric == "PPV":
            return f"{pct(row['ppv'])} ({row['true_positives']}/{row['n_detections']})"
        return pct(row["f1"])

    column = {"SE": "sensitivity", "FDR": "fdr", "PPV": "ppv", "F1": "f1"}
    tested = {"SE": "sensitivity", "FDR": "fdr"}
    body = []
    for thr in sorted(detection["min_long_axis_mm"].unique()):
        for metric in ("SE", "FDR", "PPV", "F1"):
            line = [_threshold_label(thr), metric]
            for r in readers:
                line += [cell(det(r, baseline, thr), metric), cell(det(r, candidate, thr), metric)]
                line.append(
                    comp(
                        f"{baseline}_vs_{candidate}",
                        r,
                        f"{baseline} vs {candidate}",
                        thr,
                        tested[metric],
                    )
                    if metric in tested
                    else ""
                )
            for r1, r2 in pairs:
                for mod in (baseline, candidate):
                    line.append(
                        comp("reader_vs_reader", f"{r1} vs {r2}", mod, thr, tested[metric])
                        if metric in tested
                        else ""
                    )
            if len(readers) > 1:
                for mod in (baseline, candidate):
                    vals = [det(r, mod, thr) for r in readers]
                    vals = [float(v[column[metric]]) for v in vals if v is not None]
                    mean = float(np.nanmean(vals)) if vals and np.isfinite(vals).any() else np.nan
                    line.append(
                        f"{mean:.2f}" if metric == "FDR" and np.isfinite(mean) else pct(mean)
                    )
            body.append(line)
    return header, body


TABLE5_CAPTION = (
    "Sensitivity (SE: true positives / reference lesions, Clopper-Pearson 95 % CI), false detection rate (FDR: "
    "false positives per patient, Student-t 95 % CI), positive predictive value (PPV: true positives / "
    "detections) and F1 (harmonic mean of SE and PPV), for lesions whose long axis is at least the threshold "
    "(the reference lesion's for SE and true positives, the detection's for false positives). low vs. vir and "
    "reader vs. reader: McNemar mid-p for SE, Wilcoxon signed-rank for FDR, two-tailed."
)


def table5_markdown(
    detection: pd.DataFrame,
    comparisons: pd.DataFrame,
    *,
    labels: Mapping[str, str] | None = None,
) -> str:
    """The paper's Table 5 layout as a markdown table."""
    header, body = table5_rows(detection, comparisons, labels=labels)
    return markdown_table(header, body) + "\n\n" + TABLE5_CAPTION + "\n"


def table5_html(
    detection: pd.DataFrame,
    comparisons: pd.DataFrame,
    *,
    labels: Mapping[str, str] | None = None,
) -> str:
    """The paper's Table 5 layout as a standalone HTML table."""
    header, body = table5_rows(detection, comparisons, labels=labels)
    return html_table(header, body, css_class="table5", caption=TABLE5_CAPTION)
