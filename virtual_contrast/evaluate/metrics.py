"""Voxel-wise metrics of a synthesised contrast-enhanced T1 against the full-dose reference (paper, Table 3).

Every metric is computed on brain voxels only, on normalised images (the 1st and 99th brain percentiles at 0 and
1, not clipped: :func:`virtual_contrast.intensity.normalize`). The paper's rows (SSIM, PSNR, ROC AUC, Youden
point) score each image on the paper's scale: pred, ref and pre clipped to [0, 1]
(:func:`virtual_contrast.intensity.paper_scale`), which is exactly the paper's normalisation (clip at the
1st/99th percentiles, map to [0, 1]), so these figures stay comparable with its Table 3; what lies above the 99th percentile (the brightest
enhancement, which the paper's normalisation flattened in every image) does not enter them. Two more rows, SSIM
and PSNR over the full range (``ssim_full_range``, ``psnr_full_range``), score the same images unclipped, with
the same data range 1 (the span between the 1st and the 99th percentile): there the brightest enhancement counts
with its own error. Each is computed as follows:

- **SSIM** as Wang et al. 2004: Gaussian window σ = 1.5 truncated at 3.5 σ (radius 5 voxels), K1 = 0.01,
  K2 = 0.03, population (co)variances, the SSIM map averaged over the brain mask. This is exactly
  ``skimage.metrics.structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=1.0, full=True)[1][mask].mean()``; it is faster because the filters run on the mask's bounding box
  plus the filter radius only (values inside the box do not depend on anything farther away, and at the
  volume's border the box touches the same reflecting boundary skimage uses).
- **PSNR**: ``10 log10(1 / MSE)`` with the MSE over brain voxels.
- **ROC AUC**: enhancement maps are post-contrast minus pre-contrast T1, clipped at 0; the reference map is
  binarised with Otsu's threshold (voxels strictly above it are positive, skimage's convention); the score is the
  candidate's enhancement map. The curve is scikit-learn's ``roc_curve`` (one point per distinct score, ties
  counted once), the area its trapezoidal integral, so the AUC equals ``roc_auc_score``. The Youden operating
  point maximises sensitivity + specificity - 1.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage, stats
from skimage.filters import threshold_otsu

from virtual_contrast.intensity import normalize, paper_scale, range_problem
from virtual_contrast.io import InputError, load_array, write_table
from virtual_contrast.report import format_p

log = logging.getLogger(__name__)

#: Fixed false-positive-rate grid on which each subject's ROC curve is stored, so curves of different subjects
#: can be averaged point by point (Figure 5). Dense near 0, where brain ROC curves rise steeply.
ROC_FPR_GRID = np.unique(
    np.concatenate([[0.0], np.geomspace(1e-5, 1e-2, 31), np.linspace(0.0, 1.0, 201)])
)

#: Columns of the per-subject voxel metrics table, one row per (subject, modality).
METRIC_COLUMNS = (
    "subject",
    "modality",
    "ssim",
    "psnr",
    "auc",
    "youden_sensitivity",
    "youden_specificity",
    "youden_threshold",
    "otsu_threshold",
    "n_brain_voxels",
    "n_enhancing_voxels",
    "ssim_full_range",
    "psnr_full_range",
)


@dataclass(frozen=True)
class RocCurve:
    """A ROC curve as scikit-learn's ``roc_curve`` returns it (thresholds decreasing, starting at +inf)."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray

    @property
    def auc(self) -> float:
        return float(np.trapezoid(self.tpr, self.fpr))

    def youden(self) -> tuple[float, float, float]:
        """(sensitivity, specificity, threshold) at the point maximising TPR - FPR (first one on ties)."""
        i = int(np.argmax(self.tpr - self.fpr))
        return float(self.tpr[i]), float(1.0 - self.fpr[i]), float(self.thresholds[i])

    def on_grid(self, fpr_grid: np.ndarray = ROC_FPR_GRID) -> np.ndarray:
        """TPR interpolated on ``fpr_grid`` (the curve is a step-free polyline through its points)."""
        # np.interp needs increasing x; where FPR repeats (vertical segments) take the highest TPR.
        fpr, idx = np.unique(self.fpr, return_index=True)
        last = np.r_[idx[1:] - 1, len(self.fpr) - 1]
        return np.interp(fpr_grid, fpr, self.tpr[last])


def _check_same_shape(arrays: Mapping[str, np.ndarray]) -> None:
    shapes = {name: np.shape(a) for name, a in arrays.items()}
    if len(set(shapes.values())) != 1:
        raise InputError(f"images must have the same shape, got {shapes}")


def _mask_bbox(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Bounding box of ``mask`` grown by ``margin`` voxels, clipped to the array."""
    if not mask.any():
        raise InputError("the brain mask is empty")
    slices = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        nz = np.flatnonzero(mask.any(axis=other))
        slices.append(slice(max(nz[0] - margin, 0), min(nz[-1] + margin + 1, mask.shape[axis])))
    return tuple(slices)


def ssim(
    pred: np.ndarray,
    ref: np.ndarray,
    mask: np.ndarray,
    *,
    data_range: float = 1.0,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    truncate: float = 3.5,
) -> float:
    """Mean of the Gaussian-window SSIM map (Wang et al. 2004) over ``mask``; see the module docstring."""
    _check_same_shape({"pred": pred, "ref": ref, "mask": mask})
    mask = np.asarray(mask, dtype=bool)
    radius = int(
        truncate * sigma + 0.5
    )  # scipy.ndimage's kernel radius for this sigma and truncate
    box = _mask_bbox(mask, radius)
    x = np.asarray(pred[box], dtype=np.float64)
    y = np.asarray(ref[box], dtype=np.float64)

    def blur(a: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(a, sigma, mode="reflect", truncate=truncate)

    ux, uy = blur(x), blur(y)
    vx = blur(x * x) - ux * ux
    vy = blur(y * y) - uy * uy
    vxy = blur(x * y) - ux * uy
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    s_map = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return float(s_map[mask[box]].mean())


def psnr(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray, *, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over ``mask`` (inf when the images agree exactly there)."""
    _check_same_shape({"pred": pred, "ref": ref, "mask": mask})
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise InputError("the brain mask is empty")
    diff = np.asarray(pred[mask], dtype=np.float64) - np.asarray(ref[mask], dtype=np.float64)
    mse = float(np.mean(diff * diff))
    return float("inf") if mse == 0 else float(10.0 * np.log10(data_range**2 / mse))


def enhancement(post: np.ndarray, pre: np.ndarray) -> np.ndarray:
    """Enhancement map: post-contrast minus pre-contrast T1, clipped at 0."""
    return np.clip(np.asarray(post, dtype=np.float32) - np.asarray(pre, dtype=np.float32), 0, None)


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> RocCurve:
    """scikit-learn's ``roc_curve(labels, scores, drop_intermediate=False)`` for binary labels, vectorised.

    One point per distinct score (descending), so tied scores form one diagonal segment and the trapezoidal
    area equals the Mann-Whitney probability with ties counted one half.
    """
    labels = np.asarray(labels, dtype=bool).ravel()
    scores = np.asarray(scores).ravel()
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"ROC needs both classes, got {n_pos} positive and {n_neg} negative voxels"
        )
    order = np.argsort(scores, kind="stable")[::-1]
    s = scores[order]
    y = labels[order]
    # The last index of each run of equal scores is a threshold.
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tps = np.cumsum(y, dtype=np.int64)[last]
    fps = last + 1 - tps
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    thresholds = np.r_[np.inf, s[last]]
    return RocCurve(fpr=fpr, tpr=tpr, thresholds=thresholds)


def enhancement_roc(
    pred: np.ndarray, ref: np.ndarray, pre: np.ndarray, mask: np.ndarray
) -> tuple[RocCurve, float, int]:
    """ROC of ``pred``'s enhancement map against Otsu-binarised ``ref`` enhancement, in ``mask``.

    Returns the curve, the Otsu threshold and the number of positive (enhancing) reference voxels.
    """
    mask = np.asarray(mask, dtype=bool)
    ref_enh = enhancement(ref[mask], pre[mask])
    score = enhancement(pred[mask], pre[mask])
    if np.ptp(ref_enh) == 0:
        raise InputError(
            "the reference enhancement map is constant in the brain mask (no contrast?)"
        )
    otsu = float(threshold_otsu(ref_enh))
    labels = ref_enh > otsu
    return roc_curve(labels, score), otsu, int(labels.sum())


def subject_voxel_metrics(
    pred: np.ndarray, ref: np.ndarray, pre: np.ndarray, mask: np.ndarray, *, data_range: float = 1.0
) -> dict:
    """All voxel metrics of one candidate image (vir or low) against the reference, on brain voxels, the
    images normalised (see the module docstring: the paper's rows on the images clipped to [0, 1], the full-range
    rows on the images as given).

    Returns a dict with ``ssim``, ``psnr``, ``auc``, ``youden_sensitivity``, ``youden_specificity``,
    ``youden_threshold``, ``otsu_threshold``, ``n_brain_voxels``, ``n_enhancing_voxels``, ``ssim_full_range``,
    ``psnr_full_range`` and ``roc_tpr`` (the curve's TPR on :data:`ROC_FPR_GRID`).
    """
    _check_same_shape({"pred": pred, "ref": ref, "pre": pre, "mask": mask})
    mask = np.asarray(mask) > 0
    paper = {
        name: paper_scale(image) for name, image in (("pred", pred), ("ref", ref), ("pre", pre))
    }
    curve, otsu, n_pos = enhancement_roc(paper["pred"], paper["ref"], paper["pre"], mask)
    sens, spec, thr = curve.youden()
    return {
        "ssim": ssim(paper["pred"], paper["ref"], mask, data_range=data_range),
        "psnr": psnr(paper["pred"], paper["ref"], mask, data_range=data_range),
        "auc": curve.auc,
        "youden_sensitivity": sens,
        "youden_specificity": spec,
        "youden_threshold": thr,
        "otsu_threshold": otsu,
        "n_brain_voxels": int(mask.sum()),
        "n_enhancing_voxels": n_pos,
        "ssim_full_range": ssim(pred, ref, mask, data_range=data_range),
        "psnr_full_range": psnr(pred, ref, mask, data_range=data_range),
        "roc_tpr": curve.on_grid(),
    }


def check_normalised(image: np.ndarray, mask: np.ndarray, *, name: str) -> None:
    """Raise :class:`InputError` when ``image`` cannot be normalised (brain values beyond any normalised image:
    :func:`virtual_contrast.intensity.range_problem`), which the data range 1 of the metrics assumes."""
    problem = range_problem(np.asarray(image)[np.asarray(mask) > 0])
    if problem is not None:
        raise InputError(
            f"{name} is not normalised: {problem}; normalise the images first (--normalize: the 1st and "
            "99th brain percentiles mapped to 0 and 1, as the preprocessing does)"
        )


def normalize_percentiles(
    image: np.ndarray, mask: np.ndarray, *, low: float = 1.0, high: float = 99.0
) -> np.ndarray:
    """The preprocessing's standardisation (:func:`virtual_contrast.intensity.normalize`): the ``low``/``high``
    percentiles over brain voxels mapped linearly to 0 and 1, not clipped, 0 outside; for scoring images that
    did not go through our preprocessing."""
    return normalize(image, mask, low, high)


def voxel_metrics_from_files(
    *,
    pred: Path,
    ref: Path,
    pre: Path,
    mask: Path,
    subject: str | None = None,
    normalize: bool = False,
) -> dict:
    """Load the four images, check their grids, and return :func:`subject_voxel_metrics` (without the curve
    when called for printing; the caller may drop ``roc_tpr``)."""
    arrays, affines = {}, {}
    for name, path in {"pred": pred, "ref": ref, "pre": pre, "mask": mask}.items():
        arrays[name], affines[name] = load_array(path, subject=subject)
    shapes = {name: a.shape for name, a in arrays.items()}
    if len(set(shapes.values())) != 1:
        raise InputError(f"images are not on one voxel grid: shapes {shapes}", subject=subject)
    for name, aff in affines.items():
        if not np.allclose(aff, affines["ref"], atol=1e-3):
            raise InputError(
                f"{name} and ref have different affines; resample onto one grid first",
                subject=subject,
                path={"pred": pred, "ref": ref, "pre": pre, "mask": mask}[name],
            )
    brain = arrays["mask"] > 0
    if not brain.any():
        raise InputError("the brain mask is empty", subject=subject, path=mask)
    images = {k: arrays[k] for k in ("pred", "ref", "pre")}
    for name, image in images.items():
        if normalize:
            images[name] = normalize_percentiles(image, brain)
        else:
            check_normalised(image, brain, name=name)
    return subject_voxel_metrics(images["pred"], images["ref"], images["pre"], brain)


def evaluate_subject(
    subject: str,
    *,
    candidates: Mapping[str, Path],
    ref: Path,
    pre: Path,
    mask: Path,
    out_metrics: Path,
    out_roc: Path,
) -> pd.DataFrame:
    """Score each candidate image (e.g. ``{"low": ..., "vir": ...}``) of one subject; write two TSVs.

    ``out_metrics``: one row per candidate with :data:`METRIC_COLUMNS`. ``out_roc``: the ROC curves on
    :data:`ROC_FPR_GRID` in long format (subject, modality, fpr, tpr), for the mean-ROC figure.
    Images must be normalised (1st and 99th brain percentiles at 0 and 1) and share one grid.
    """
    rows, curves = [], []
    for modality, path in candidates.items():
        m = voxel_metrics_from_files(pred=path, ref=ref, pre=pre, mask=mask, subject=subject)
        tpr = m.pop("roc_tpr")
        rows.append({"subject": subject, "modality": modality, **m})
        curves.append(
            pd.DataFrame(
                {"subject": subject, "modality": modality, "fpr": ROC_FPR_GRID, "tpr": tpr}
            )
        )
        log.info(
            "%s %s: SSIM %.4f PSNR %.2f dB AUC %.4f",
            subject,
            modality,
            m["ssim"],
            m["psnr"],
            m["auc"],
        )
    table = pd.DataFrame(rows, columns=list(METRIC_COLUMNS))
    write_table(table, out_metrics)
    write_table(pd.concat(curves, ignore_index=True), out_roc)
    return table


#: Table 3 rows: metric column, label, scale for display, unit.
TABLE3_METRICS = (
    ("ssim", "SSIM", 100.0, "%"),
    ("psnr", "PSNR", 1.0, "dB"),
    ("auc", "AUC", 100.0, "%"),
    ("youden_sensitivity", "Youden SE", 100.0, "%"),
    ("youden_specificity", "Youden SP", 100.0, "%"),
    ("ssim_full_range", "SSIM, full range", 100.0, "%"),
    ("psnr_full_range", "PSNR, full range", 1.0, "dB"),
)


def aggregate_voxel_metrics(
    metrics: pd.DataFrame, *, baseline: str = "low", candidate: str = "vir"
) -> pd.DataFrame:
    """Table 3: mean and sd across subjects of each metric for two modalities, two-tailed paired t-test.

    ``metrics`` is the concatenation of per-subject tables (:data:`METRIC_COLUMNS`). Only subjects scored in
    both modalities enter the test. Values stay in their native units (fractions, dB).
    """
    missing = {"subject", "modality"} - set(metrics.columns)
    if missing:
        raise InputError(f"voxel metrics table lacks columns {sorted(missing)}")
    rows = []
    for column, label, _, unit in TABLE3_METRICS:
        if column not in metrics.columns:  # a table written before the full-range columns existed
            continue
        wide = metrics.pivot_table(
            index="subject", columns="modality", values=column, aggfunc="first"
        )
        row = {"metric": column, "label": label, "unit": unit}
        for modality in (baseline, candidate):
            values = wide[modality].dropna() if modality in wide else pd.Series(dtype=float)
            row[f"{modality}_n"] = int(values.size)
            row[f"{modality}_mean"] = float(values.mean()) if values.size else np.nan
            row[f"{modality}_sd"] = float(values.std(ddof=1)) if values.size > 1 else np.nan
        if baseline in wide and candidate in wide:
            paired = wide[[baseline, candidate]].replace([np.inf, -np.inf], np.nan).dropna()
        else:
            paired = pd.DataFrame()
        if len(paired) >= 2 and (paired[candidate] - paired[baseline]).std() > 0:
            test = stats.ttest_rel(paired[candidate], paired[baseline])
            row["t_statistic"], row["p_value"] = float(test.statistic), float(test.pvalue)
        else:
            row["t_statistic"], row["p_value"] = np.nan, np.nan
        row["n_paired"] = len(paired)
        rows.append(row)
    return pd.DataFrame(rows)


def display_decimals(sds: Sequence[float], *, least: int = 1, most: int = 3) -> int:
    """Decimals that show the smaller standard deviation of a row with one significant digit, within
    [least, most]: one decimal as the paper prints, more where subjects agree so closely that one decimal
    would print two different means as the same number (an AUC of 99.95 against 99.96 % as 100.0 and 100.0)."""
    finite = [abs(s) for s in sds if np.isfinite(s) and s > 0]
    if not finite:
        return least
    return int(min(most, max(least, math.ceil(-math.log10(min(finite)) - 1e-9))))


def table3_markdown(
    table: pd.DataFrame,
    *,
    baseline: str = "low",
    candidate: str = "vir",
    labels: Mapping[str, str] | None = None,
) -> str:
    """Render :func:`aggregate_voxel_metrics` like the paper's Table 3 (mean (± sd), paired t-test), each row
    with the decimals of :func:`display_decimals`; ``labels`` names the columns (``{"low": "simulated
    low-T1c"}``)."""
    scale = {m: s for m, _, s, _ in TABLE3_METRICS}
    names = {m: (labels or {}).get(m, f"{m}-T1c") for m in (baseline, candidate)}
    lines = [
        f"| | {names[baseline]} | {names[candidate]} | {baseline} vs. {candidate} |",
        "|---|---|---|---|",
    ]
    for _, r in table.iterrows():
        k = scale.get(r["metric"], 1.0)
        d = display_decimals([r[f"{m}_sd"] * k for m in (baseline, candidate)])
        cells = []
        for modality in (baseline, candidate):
            mean, sd = r[f"{modality}_mean"] * k, r[f"{modality}_sd"] * k
            cells.append("n/a" if not np.isfinite(mean) else f"{mean:.{d}f} (±{sd:.{d}f})")
        lines.append(
            f"| {r['label']} ({r['unit']}) | {cells[0]} | {cells[1]} | {format_p(r['p_value'])} |"
        )
    n = int(table["n_paired"].max()) if len(table) else 0
    lines.append("")
    lines.append(
        f"Mean (± standard deviation) over {n} test subjects, brain voxels only; two-tailed paired t-tests. "
        "SSIM, PSNR, AUC and the Youden point on the paper's scale (each image's 1st and 99th brain "
        "percentiles at 0 and 1, clipped to [0, 1]); the full-range rows on the same scale unclipped (data "
        "range 1), where the enhancement above the 99th percentile counts too."
    )
    return "\n".join(lines) + "\n"
