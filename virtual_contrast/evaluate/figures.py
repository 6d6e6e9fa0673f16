"""Figures of the evaluation: the mean ROC curves with a 95 % band (paper, Figure 5) and a per-subject montage
of the inputs, the prediction and the reference (paper, Figure 4).

Matplotlib runs headless (Agg) and every figure is written atomically (temporary file beside, then renamed).
Montages assume arrays in RAS voxel order (our atlas space): axial slices are ``[:, :, k]``, shown with anterior
up and the subject's right on the viewer's left (radiological convention, as radiologists read).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import ndimage, stats  # noqa: E402

from virtual_contrast.evaluate.metrics import display_decimals  # noqa: E402
from virtual_contrast.io import InputError, atomic_path  # noqa: E402

log = logging.getLogger(__name__)

#: Column order and titles of the Figure-4 montage.
MONTAGE_COLUMNS = (
    ("t1", "T1"),
    ("t2w", "T2"),
    ("flair", "FLAIR"),
    ("adc", "ADC"),
    ("low", "low-T1c"),
    ("vir", "vir-T1c"),
    ("ref", "ref-T1c"),
)
MODALITY_LABELS = {"low": "low-T1c", "vir": "vir-T1c", "ref": "ref-T1c"}
MODALITY_COLORS = {"low": "tab:orange", "vir": "tab:blue"}


def _save(fig: plt.Figure, path: Path | str, *, dpi: int = 150) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def mean_roc(curves: pd.DataFrame, *, confidence: float = 0.95) -> pd.DataFrame:
    """Point-wise mean TPR across subjects per (modality, fpr), with a Student-t confidence band.

    ``curves`` has columns subject, modality, fpr, tpr with every subject on the same FPR grid (as
    :func:`virtual_contrast.evaluate.metrics.evaluate_subject` writes them). The band is mean ± t·sd/√n,
    clipped to [0, 1]; with one subject it collapses onto the mean.
    """
    missing = {"subject", "modality", "fpr", "tpr"} - set(curves.columns)
    if missing:
        raise InputError(f"ROC table lacks columns {sorted(missing)}")
    g = curves.groupby(["modality", "fpr"])["tpr"]
    out = g.agg(["mean", "std", "count"]).reset_index()
    tcrit = stats.t.ppf(0.5 + confidence / 2, np.maximum(out["count"] - 1, 1))
    half = np.where(out["count"] > 1, tcrit * out["std"].fillna(0) / np.sqrt(out["count"]), 0.0)
    out["low"] = np.clip(out["mean"] - half, 0, 1)
    out["high"] = np.clip(out["mean"] + half, 0, 1)
    return out.rename(columns={"mean": "tpr", "count": "n"}).drop(columns="std")


def plot_mean_roc(
    curves: pd.DataFrame,
    path: Path | str,
    *,
    metrics: pd.DataFrame | None = None,
    modalities: Sequence[str] = ("low", "vir"),
    youden_modality: str = "vir",
    labels: Mapping[str, str] | None = None,
) -> Path:
    """Figure 5: mean ROC curve of each modality with its 95 % band, AUC in the legend, Youden point marked.
    ``labels`` renames modalities in the legend (a simulated low dose says so).

    The legend's AUC is mean ± sd of the per-subject AUCs when ``metrics`` (the voxel metrics table) is given,
    else the area under the mean curve. The Youden point is the one of the mean ``youden_modality`` curve.
    """
    table = mean_roc(curves)
    aucs = {}
    if metrics is not None:
        aucs = {m: 100 * metrics.loc[metrics["modality"] == m, "auc"] for m in modalities}
        aucs = {m: a for m, a in aucs.items() if len(a)}
    # The decimals that tell the modalities' AUCs apart (99.95 vs 99.96 %, not 100.0 and 100.0).
    decimals = display_decimals([a.std(ddof=1) if len(a) > 1 else np.nan for a in aucs.values()])
    fig, ax = plt.subplots(figsize=(5, 5))
    for modality in modalities:
        sub = table[table["modality"] == modality].sort_values("fpr")
        if sub.empty:
            continue
        label = {**MODALITY_LABELS, **(labels or {})}.get(modality, modality)
        if modality in aucs:
            auc = aucs[modality]
            sd = auc.std(ddof=1) if len(auc) > 1 else 0.0
            label += f" (AUC {auc.mean():.{decimals}f} ± {sd:.{decimals}f} %)"
        else:
            label += f" (AUC of mean curve {100 * np.trapezoid(sub['tpr'], sub['fpr']):.1f} %)"
        color = MODALITY_COLORS.get(modality)
        ax.plot(sub["fpr"], sub["tpr"], color=color, label=label)
        ax.fill_between(sub["fpr"], sub["low"], sub["high"], color=color, alpha=0.25, linewidth=0)
        if modality == youden_modality:
            i = int(np.argmax(sub["tpr"].to_numpy() - sub["fpr"].to_numpy()))
            fpr, tpr = float(sub["fpr"].iloc[i]), float(sub["tpr"].iloc[i])
            ax.plot([fpr], [tpr], "o", color="black")
            ax.annotate(
                f"Youden: SE {100 * tpr:.1f} %, SP {100 * (1 - fpr):.1f} %",
                (fpr, tpr),
                xytext=(fpr + 0.08, tpr - 0.12),
                arrowprops={"arrowstyle": "-", "color": "black"},
            )
    ax.plot([0, 1], [0, 1], ":", color="grey", linewidth=1)
    n = curves["subject"].nunique()
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1.01),
        xlabel="1 - specificity (voxel-wise)",
        ylabel="sensitivity (voxel-wise)",
        title=f"Mean ROC over {n} test subjects (95 % band)",
    )
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


#: Slices whose brain cross-section is smaller than this fraction of the largest one's are not shown by
#: default, and enhancement counts only this deep into the brain (a fraction of the deepest voxel's distance
#: to the mask's edge, about 9 mm in an adult brain): on real heads the venous sinuses, the dura, the
#: choroid plexus and the skull base enhance the most of a T1c, at the brain's surface or in small
#: cross-sections (BraTS-MET-00110 and TCGA-FG-6692 both went there).
MIN_SLICE_BRAIN_FRACTION = 0.5
MIN_DEPTH_FRACTION = 0.15


def select_axial_slice(ref: np.ndarray, pre: np.ndarray, mask: np.ndarray) -> int:
    """Axial slice (last axis) with the most reference enhancement inside the brain (at least
    :data:`MIN_DEPTH_FRACTION` deep), among the slices whose brain cross-section is at least
    :data:`MIN_SLICE_BRAIN_FRACTION` of the largest; the largest slice when nothing enhances there."""
    mask = np.asarray(mask) > 0
    area = mask.sum(axis=(0, 1))
    if not area.any():
        return mask.shape[2] // 2
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1, 1:-1]
    inner = depth >= MIN_DEPTH_FRACTION * depth.max()
    enh = (
        np.clip(np.asarray(ref, dtype=np.float32) - np.asarray(pre, dtype=np.float32), 0, None)
        * inner
    )
    per_slice = np.where(area >= MIN_SLICE_BRAIN_FRACTION * area.max(), enh.sum(axis=(0, 1)), 0)
    if per_slice.max() > 0:
        return int(np.argmax(per_slice))
    return int(np.argmax(area))


def plot_montage(
    images: Mapping[str, np.ndarray],
    path: Path | str,
    *,
    slice_index: int | None = None,
    mask: np.ndarray | None = None,
    title: str | None = None,
    labels: Mapping[str, str] | None = None,
    uncertainty: np.ndarray | None = None,
) -> Path:
    """Figure 4 for one subject: one axial slice of T1, FLAIR, ADC, low, vir and ref side by side.

    With ``uncertainty`` (vir-T1c's uncertainty map, an expected |vir − ref|) a second row shows it under
    vir-T1c and the observed |vir − ref| under ref-T1c (when both are shown), on one colour scale: where the
    map is bright, vir-T1c should not be trusted.

    ``images`` maps keys of :data:`MONTAGE_COLUMNS` (t1, t2w, flair, adc, low, vir, ref) to 3D arrays on one grid;
    missing keys are left out. Intensities are shown on [0, 1] (normalised images); ADC on its own 1st-99th
    percentile window. The slice defaults to :func:`select_axial_slice` (needs t1 and ref). ``labels``
    renames columns (a simulated low dose says so).
    """
    titles = {**dict(MONTAGE_COLUMNS), **(labels or {})}
    present = [(k, titles[k]) for k, _ in MONTAGE_COLUMNS if k in images]
    if not present:
        raise InputError(f"no image to show; expected some of {[k for k, _ in MONTAGE_COLUMNS]}")
    shapes = {k: np.shape(images[k]) for k, _ in present}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 3:
        raise InputError(f"montage images must be 3D arrays on one grid, got shapes {shapes}")
    shape = next(iter(shapes.values()))
    if mask is None:
        mask = np.ones(shape, dtype=bool)
    if slice_index is None:
        if "ref" in images and "t1" in images:
            slice_index = select_axial_slice(images["ref"], images["t1"], mask)
        else:
            slice_index = shape[2] // 2
    # Crop every panel to the brain's extent in this slice (plus a margin) so the anatomy fills the panels.
    in_slice = np.asarray(mask)[:, :, slice_index] > 0
    if in_slice.any():
        xs, ys = np.flatnonzero(in_slice.any(axis=1)), np.flatnonzero(in_slice.any(axis=0))
        crop = (
            slice(max(xs[0] - 3, 0), xs[-1] + 4),
            slice(max(ys[0] - 3, 0), ys[-1] + 4),
        )
    else:
        crop = (slice(None), slice(None))
    second_row = uncertainty is not None and "vir" in images
    n_rows = 2 if second_row else 1
    fig, axes = plt.subplots(
        n_rows, len(present), figsize=(2.2 * len(present), 2.8 * n_rows), squeeze=False
    )
    for ax, (key, label) in zip(axes[0], present, strict=True):
        # Transpose so rows run posterior→anterior; flip x so the subject's right is on the viewer's left.
        plane = np.asarray(images[key][crop[0], crop[1], slice_index], dtype=np.float32).T[
            ::-1, ::-1
        ]
        if key == "adc":
            vmin, vmax = np.percentile(plane, [1, 99]) if np.ptp(plane) > 0 else (0.0, 1.0)
        else:
            vmin, vmax = 0.0, 1.0
        ax.imshow(
            plane, cmap="gray", vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1, origin="upper"
        )
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    axes[0][0].text(0.02, 0.5, "R", color="yellow", transform=axes[0][0].transAxes, fontsize=8)
    if second_row:
        _uncertainty_row(axes[1], present, images, uncertainty, crop, slice_index, mask)
    fig.suptitle(f"{title + ': ' if title else ''}axial slice {slice_index}", fontsize=10)
    return _save(fig, path)


def _uncertainty_row(axes, present, images, uncertainty, crop, slice_index, mask) -> None:
    """The montage's second row: the uncertainty map under vir, |vir − ref| under ref, one colour scale."""
    panels = {"vir": ("uncertainty (expected |vir − ref|)", np.asarray(uncertainty, np.float32))}
    if "ref" in images:
        error = np.abs(
            np.asarray(images["vir"], np.float32) - np.asarray(images["ref"], np.float32)
        )
        panels["ref"] = ("observed |vir − ref|", np.where(np.asarray(mask) > 0, error, 0.0))
    in_brain = np.asarray(mask)[:, :, slice_index] > 0
    top = max(
        float(np.percentile(v[:, :, slice_index][in_brain], 99)) if in_brain.any() else 0.0
        for _, v in panels.values()
    )
    top = top if top > 0 else 1.0
    shown = None
    for ax, (key, _) in zip(axes, present, strict=True):
        ax.axis("off")
        if key not in panels:
            continue
        label, volume = panels[key]
        plane = volume[crop[0], crop[1], slice_index].T[::-1, ::-1]
        shown = ax.imshow(plane, cmap="magma", vmin=0.0, vmax=top, origin="upper")
        ax.set_title(label, fontsize=8)
    if shown is not None:
        bar = plt.colorbar(shown, ax=list(axes), fraction=0.02, pad=0.01)
        bar.ax.tick_params(labelsize=7)


def plot_froc(froc: pd.DataFrame, path: Path | str, *, operating_point: dict | None = None) -> Path:
    """FROC curves: sensitivity of each size bin (and all lesions) against false positives per patient, one
    point per decision threshold; the operating point and the target false-positive rate marked."""
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    bins = list(dict.fromkeys(froc["size_bin"]))
    for size_bin in bins:
        sub = froc[froc["size_bin"] == size_bin].sort_values("threshold")
        n_true = int(sub["n_true"].iloc[0]) if len(sub) else 0
        if n_true == 0:
            continue
        style = {"color": "black", "linewidth": 2} if size_bin == "all" else {"linewidth": 1.2}
        label = (
            "all lesions" if size_bin == "all" else f"long axis {size_bin} mm"
        ) + f" (n={n_true})"
        ax.plot(sub["fp_per_patient"], sub["sensitivity"], marker=".", label=label, **style)
    if operating_point is not None:
        at = froc[np.isclose(froc["threshold"], operating_point["threshold"])]
        ax.plot(
            at["fp_per_patient"],
            at["sensitivity"],
            "o",
            mfc="none",
            color="red",
            label=f"operating point: threshold {operating_point['threshold']:g}",
        )
        ax.axvline(operating_point["max_fp_per_patient"], color="grey", linestyle=":", lw=1)
    ax.set(
        xlabel="false positives per patient",
        ylabel="sensitivity",
        ylim=(-0.02, 1.02),
        xscale="symlog",
        title=f"Detector FROC on {int(froc['n_subjects'].iloc[0])} training subjects",
    )
    ax.set_xlim(left=0)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)
