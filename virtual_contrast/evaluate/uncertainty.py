"""How well vir-T1c's uncertainty map tells where it errs: calibration on held-out patients, per lesion.

- :func:`calibration_scores`: over a subject's brain voxels (atlas space), the Spearman correlation between a
  map and |vir − ref|, and the ROC AUC of the map for the voxels whose error is in the top 1 % (how well the
  map ranks the largest errors). :func:`subject_calibration` scores the calibrated map and the raw spreads of
  the passes (over all passes, over fold means, over mirrors) side by side.
- :func:`reliability_table`: the map's predicted |error| in bins of equal voxel counts against the observed
  mean |error| of the same voxels (pooled over subjects), and :func:`plot_reliability`.
- :func:`lesion_uncertainty`: each detection's mean uncertainty over its core (the detection tables' column
  ``mean_uncertainty``); :func:`uncertainty_by_outcome` sorts vir-T1c's detections into true and false
  positives against the true lesions and adds the lesions it missed (their mean uncertainty over a ball of
  their long axis at their true centre), and :func:`outcome_summary` compares the groups.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy.stats import mannwhitneyu, spearmanr  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from virtual_contrast.io import InputError, atomic_path, load_array  # noqa: E402
from virtual_contrast.matching import match_lesions  # noqa: E402

log = logging.getLogger(__name__)

#: Fraction of the brain voxels with the largest |vir − ref| that the AUC asks the map to find.
TOP_FRACTION = 0.01
#: The maps scored (file volumes of the predict step): the calibrated map and the raw spreads.
MAPS = ("calibrated", "std_passes", "std_folds", "std_mirrors")
OUTCOMES = ("true_positive", "false_positive", "missed")


def calibration_scores(uncertainty: np.ndarray, error: np.ndarray) -> dict[str, float]:
    """Spearman's rho between a map and |error| (brain voxels, 1D) and the ROC AUC of the map for the top
    :data:`TOP_FRACTION` of the errors; NaN where the map is constant."""
    uncertainty, error = np.asarray(uncertainty, float), np.asarray(error, float)
    if uncertainty.shape != error.shape or uncertainty.ndim != 1:
        raise InputError("uncertainty and error must be 1D arrays of the same voxels")
    top = error >= np.quantile(error, 1 - TOP_FRACTION)
    if np.ptp(uncertainty) == 0 or top.all() or not top.any():
        return {"spearman": np.nan, "auc_top1": np.nan}
    return {
        "spearman": float(spearmanr(uncertainty, error)[0]),
        "auc_top1": float(roc_auc_score(top, uncertainty)),
    }


def subject_calibration(
    subject: str,
    *,
    vir: np.ndarray,
    ref: np.ndarray,
    mask: np.ndarray,
    maps: Mapping[str, np.ndarray],
) -> pd.DataFrame:
    """One row per map: ``subject, map, spearman, auc_top1, n_voxels, mean_abs_error, mean_map``."""
    inside = np.asarray(mask) > 0.5
    error = np.abs(np.asarray(vir, float) - np.asarray(ref, float))[inside]
    rows = []
    for name, values in maps.items():
        if np.shape(values) != np.shape(vir):
            raise InputError(f"map {name} is not on vir-T1c's grid", subject=subject)
        u = np.asarray(values, float)[inside]
        rows.append(
            {"subject": subject, "map": name, **calibration_scores(u, error),
             "n_voxels": int(inside.sum()), "mean_abs_error": float(error.mean()),
             "mean_map": float(u.mean())}
        )  # fmt: skip
    return pd.DataFrame(rows)


def calibration_summary(per_subject: pd.DataFrame) -> pd.DataFrame:
    """Median (and range) over subjects of each map's scores."""
    grouped = per_subject.groupby("map", sort=False)
    out = grouped.agg(
        n_subjects=("subject", "nunique"),
        spearman_median=("spearman", "median"),
        spearman_min=("spearman", "min"),
        spearman_max=("spearman", "max"),
        auc_top1_median=("auc_top1", "median"),
        auc_top1_min=("auc_top1", "min"),
        auc_top1_max=("auc_top1", "max"),
    )
    return out.reset_index()


def reliability_table(
    predicted: np.ndarray, observed: np.ndarray, n_bins: int = 10
) -> pd.DataFrame:
    """Voxels in ``n_bins`` bins of equal counts by predicted |error|: mean predicted, mean observed |error|
    (and its 10th and 90th percentiles) per bin."""
    predicted, observed = np.asarray(predicted, float), np.asarray(observed, float)
    order = np.argsort(predicted, kind="stable")
    rows = []
    for b, chunk in enumerate(np.array_split(order, n_bins)):
        if len(chunk) == 0:
            continue
        rows.append(
            {"bin": b, "n_voxels": len(chunk), "predicted": predicted[chunk].mean(),
             "observed": observed[chunk].mean(), "observed_p10": np.quantile(observed[chunk], 0.1),
             "observed_p90": np.quantile(observed[chunk], 0.9)}
        )  # fmt: skip
    return pd.DataFrame(rows)


def plot_reliability(table: pd.DataFrame, path: Path | str, *, title: str = "") -> Path:
    """Observed against predicted mean |vir − ref| per bin, with the identity line."""
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    top = float(max(table["predicted"].max(), table["observed"].max())) * 1.1
    ax.plot([0, top], [0, top], color="0.6", lw=1, ls="--", label="perfect calibration")
    ax.errorbar(
        table["predicted"],
        table["observed"],
        yerr=[
            table["observed"] - table["observed_p10"],
            table["observed_p90"] - table["observed"],
        ],
        fmt="o-",
        color="C3",
        ms=4,
        capsize=2,
        label="held-out voxels (mean, 10th-90th pct)",
    )
    ax.set_xlabel("predicted |vir − ref| (uncertainty map)")
    ax.set_ylabel("observed |vir − ref|")
    ax.set_xlim(0, top)
    ax.set_ylim(0, max(top, float(table["observed_p90"].max()) * 1.05))
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def lesion_uncertainty(labels: np.ndarray, uncertainty: np.ndarray, lesion_ids) -> np.ndarray:
    """Mean of the uncertainty map over each labelled core (``labels == lesion_id``), in ``lesion_ids``
    order."""
    labels = np.asarray(labels)
    if labels.shape != np.shape(uncertainty):
        raise InputError("the detection labels and the uncertainty map are not on one grid")
    n = int(labels.max()) + 1
    sums = np.bincount(labels.ravel(), weights=np.asarray(uncertainty, float).ravel(), minlength=n)
    counts = np.bincount(labels.ravel(), minlength=n)
    ids = np.asarray(lesion_ids, int)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts[ids] > 0, sums[ids] / np.maximum(counts[ids], 1), np.nan)


def _ball_mean(uncertainty: np.ndarray, affine: np.ndarray, centre, radius_mm: float) -> float:
    """Mean of the map over the voxels within ``radius_mm`` of a world centre (the nearest voxel when none)."""
    shape = np.shape(uncertainty)
    ijk = np.indices(shape).reshape(3, -1).T
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    dist = np.linalg.norm(world - np.asarray(centre, float), axis=1)
    inside = dist <= radius_mm
    if not inside.any():
        inside = dist == dist.min()
    return float(np.asarray(uncertainty).ravel()[inside].mean())


def uncertainty_by_outcome(
    subject: str,
    detections: pd.DataFrame,
    truth: pd.DataFrame,
    uncertainty: np.ndarray,
    affine: np.ndarray,
) -> pd.DataFrame:
    """vir-T1c's detections of one subject (with ``mean_uncertainty``) as true or false positives against its
    true lesions (atlas world mm), and the true lesions it missed with the map's mean over a ball of half
    their long axis (at least one voxel) at their centre. Columns ``subject, outcome, mean_uncertainty,
    long_axis_mm``; also ``truth_ball_uncertainty`` for true lesions (found or missed), so that found and
    missed lesions compare on the same measure."""
    t = truth.reset_index(drop=True)
    d = detections.reset_index(drop=True)
    ref_to_det, det_to_ref = match_lesions(t, d)
    voxel = float(np.abs(np.linalg.det(affine[:3, :3]))) ** (1 / 3)
    balls = [
        _ball_mean(uncertainty, affine, row[["x_mm", "y_mm", "z_mm"]].to_numpy(float),
                   max(float(row["long_axis_mm"]) / 2, voxel))
        for _, row in t.iterrows()
    ]  # fmt: skip
    rows = []
    for i, j in enumerate(det_to_ref):
        rows.append(
            {"subject": subject, "outcome": "true_positive" if j >= 0 else "false_positive",
             "mean_uncertainty": float(d.loc[i, "mean_uncertainty"]),
             "long_axis_mm": float(d.loc[i, "long_axis_mm"]),
             "truth_ball_uncertainty": balls[j] if j >= 0 else np.nan}
        )  # fmt: skip
    for k, found in enumerate(ref_to_det):
        if found < 0:
            rows.append(
                {"subject": subject, "outcome": "missed", "mean_uncertainty": balls[k],
                 "long_axis_mm": float(t.loc[k, "long_axis_mm"]), "truth_ball_uncertainty": balls[k]}
            )  # fmt: skip
    columns = ["subject", "outcome", "mean_uncertainty", "long_axis_mm", "truth_ball_uncertainty"]
    return pd.DataFrame(rows, columns=columns)


def _higher(a: pd.Series, b: pd.Series) -> tuple[float, float]:
    """P(a value of ``a`` > one of ``b``) (ties count half) and the two-sided Mann-Whitney p-value."""
    a, b = a.dropna().to_numpy(float), b.dropna().to_numpy(float)
    if len(a) == 0 or len(b) == 0:
        return np.nan, np.nan
    test = mannwhitneyu(a, b, alternative="two-sided")
    return float(test.statistic / (len(a) * len(b))), float(test.pvalue)


def outcome_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per ``group`` (training subjects out of fold, test patients), ``map`` (when the table has one) and
    outcome: count, median and mean uncertainty; and whether false positives and misses carry more uncertainty than true positives:
    P(FP > TP) on the detections' own means, P(missed > found) on the true lesions' balls, with
    Mann-Whitney p-values."""
    rows = []
    keys = ["group", "map"] if "map" in table.columns else ["group"]
    for key, g in table.groupby(keys, sort=False):
        tp = g[g["outcome"] == "true_positive"]
        for outcome in OUTCOMES:
            sel = g[g["outcome"] == outcome]["mean_uncertainty"]
            row = {**dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True)),
                   "outcome": outcome, "n": int(sel.notna().sum()),
                   "median_uncertainty": sel.median(), "mean_uncertainty": sel.mean(),
                   "p_higher_than_tp": np.nan, "p_value": np.nan}  # fmt: skip
            if outcome == "false_positive":
                row["p_higher_than_tp"], row["p_value"] = _higher(sel, tp["mean_uncertainty"])
            elif outcome == "missed":
                row["p_higher_than_tp"], row["p_value"] = _higher(sel, tp["truth_ball_uncertainty"])
            rows.append(row)
    return pd.DataFrame(rows)


# --- from files (the workflow's rules uncertainty_calibration and uncertainty_lesions) -------------------


def calibration_from_files(
    subjects: list[str],
    *,
    vir: list[Path],
    ref: list[Path],
    mask: list[Path],
    uncertainty: list[Path],
    spread: list[Path],
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Per-subject scores of every map (:data:`MAPS`), their summary over subjects, and the reliability
    table of the calibrated map pooled over the subjects' brain voxels."""
    per_subject, predicted, observed = [], [], []
    for i, subject in enumerate(subjects):
        v = load_array(vir[i], subject=subject)[0]
        r, m = load_array(ref[i], subject=subject)[0], load_array(mask[i], subject=subject)[0]
        u = load_array(uncertainty[i], subject=subject)[0]
        s = load_array(spread[i], subject=subject, ndim=4)[0]
        # The spread file's volumes: std over all passes, over the fold models' means, over mirrors.
        maps = {"calibrated": u, **{name: s[..., k] for k, name in enumerate(MAPS[1:])}}
        per_subject.append(subject_calibration(subject, vir=v, ref=r, mask=m, maps=maps))
        inside = m > 0.5
        predicted.append(u[inside])
        observed.append(np.abs(v - r)[inside])
    table = pd.concat(per_subject, ignore_index=True)
    reliability = reliability_table(np.concatenate(predicted), np.concatenate(observed))
    return table, calibration_summary(table), reliability


def lesions_from_files(
    subjects: list[str],
    *,
    groups: Mapping[str, str],
    detections: list[Path],
    uncertainty: list[Path],
    truth: pd.DataFrame,
    labels: list[Path] | None = None,
    spread: list[Path] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The per-lesion table of every subject's vir-T1c detections and misses (:func:`uncertainty_by_outcome`,
    with ``group``: each subject's, e.g. train (out of fold) or test, and ``map``) and its
    :func:`outcome_summary`. ``truth`` holds the true lesions in atlas world mm. With the detections' label
    images (``labels``, 4D: ref, low, vir) and the spread files (``spread``) the same comparison is made on
    the raw standard deviation over the passes (map ``std_passes``), beside the calibrated map's
    (``calibrated``)."""
    rows = []
    for i, subject in enumerate(subjects):
        table = pd.read_csv(detections[i], sep="\t", dtype={"subject": str})
        vir = table[table["modality"] == "vir"]
        if "mean_uncertainty" not in table.columns:
            raise InputError(
                "the detections have no mean_uncertainty column",
                subject=subject,
                path=detections[i],
            )
        u, affine = load_array(uncertainty[i], subject=subject)
        t = truth[truth["subject"].astype(str) == subject]
        found = uncertainty_by_outcome(subject, vir, t, u, affine)
        found.insert(0, "map", "calibrated")
        found.insert(0, "group", groups[subject])
        rows.append(found)
        if labels is not None and spread is not None:
            raw = load_array(spread[i], subject=subject, ndim=4)[0][
                ..., MAPS.index("std_passes") - 1
            ]
            # The label image's volumes are ref, low, vir (evaluate.lesions.READ_MODALITIES).
            vir_labels = load_array(labels[i], subject=subject, ndim=4)[0][..., 2].astype(int)
            vir = vir.assign(mean_uncertainty=lesion_uncertainty(vir_labels, raw, vir["lesion_id"]))
            found = uncertainty_by_outcome(subject, vir, t, raw, affine)
            found.insert(0, "map", "std_passes")
            found.insert(0, "group", groups[subject])
            rows.append(found)
    table = pd.concat(rows, ignore_index=True)
    return table, outcome_summary(table)
