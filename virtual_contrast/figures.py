"""Figures of the cohort and of the per-subject pre-processing (fMRIPrep-style reportlets, as PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from virtual_contrast.io import atomic_path  # noqa: E402


def save_figure(fig: plt.Figure, path: Path | str, dpi: int = 110) -> Path:
    """Save and close ``fig`` atomically (PNG)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)
    return Path(path)


def plot_flowchart(counts: list[tuple[str, int]], path: Path | str) -> Path:
    """A flow chart of the exam counts through the exclusions, like the paper's Figure 2.

    ``counts`` alternates main boxes and exclusion boxes: (exams, excluded, patients, excluded, included).
    """
    fig, ax = plt.subplots(figsize=(6.5, 1.3 * len(counts)))
    ax.set_axis_off()
    main = [c for i, c in enumerate(counts) if i % 2 == 0]
    side = [c for i, c in enumerate(counts) if i % 2 == 1]
    ys = np.linspace(0.9, 0.1, len(main))
    box = {"boxstyle": "round,pad=0.5", "fc": "#e8f0fb", "ec": "#2b5d9b"}
    for y, (label, n) in zip(ys, main, strict=True):
        ax.text(0.3, y, f"{label}\nn = {n}", ha="center", va="center", fontsize=11, bbox=box)
    for i, (label, n) in enumerate(side):
        y_mid = (ys[i] + ys[i + 1]) / 2
        ax.annotate(
            "",
            xy=(0.3, ys[i + 1] + 0.06),
            xytext=(0.3, ys[i] - 0.06),
            arrowprops={"arrowstyle": "->", "color": "#2b5d9b"},
        )
        ax.annotate(
            "",
            xy=(0.58, y_mid),
            xytext=(0.3, y_mid),
            arrowprops={"arrowstyle": "->", "color": "#9b2b2b"},
        )
        ax.text(
            0.78,
            y_mid,
            f"{label}\nn = {n}",
            ha="center",
            va="center",
            fontsize=10,
            bbox={"boxstyle": "round,pad=0.4", "fc": "#fbe8e8", "ec": "#9b2b2b"},
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title("Exams and exclusions", fontsize=12)
    return save_figure(fig, path)


def _mid_slices(volume: np.ndarray, centre: tuple[int, int, int]) -> list[np.ndarray]:
    """Sagittal, coronal, axial slices through ``centre``, oriented for display (RAS arrays)."""
    i, j, k = centre
    return [volume[i, :, :].T, volume[:, j, :].T, volume[:, :, k].T]


def _robust_limits(volume: np.ndarray) -> tuple[float, float]:
    values = volume[volume > 0]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(values, [1, 99.5])
    return float(lo), float(max(hi, lo + 1e-6))


def gate_text(figures: dict, verdict: dict | None) -> str:
    """One line of the registration quality figures and the gate's verdict, for figure titles."""
    scales = "/".join(f"{v:.2f}" for v in figures["scales"])
    text = f"scales {scales}, det {figures['determinant']:.2f}"
    if "correlation" in figures:
        text += (
            f", correlation {figures['correlation']:.2f}, brain Dice {figures['brain_dice']:.2f}"
        )
    coverage = figures.get("brain_coverage") or {}
    if coverage:
        least = min(coverage, key=coverage.get)
        text += f", least brain coverage {coverage[least]:.2f} ({least})"
    if verdict is None:
        return text
    if verdict["passed"]:
        return f"quality gate passed: {text}"
    if verdict.get("overridden"):
        return f"REJECTED by the quality gate (overridden): {text}"
    return f"REJECTED by the quality gate: {text}"


def plot_registration(
    image: np.ndarray,
    reference_brain: np.ndarray,
    brain_mask: np.ndarray | None,
    figures: dict,
    verdict: dict | None,
    *,
    subject: str | None,
    path: Path | str,
    affine: np.ndarray | None = None,
    what: str = "T1 on the atlas",
) -> Path:
    """The registered image with the reference brain outline (red) and the subject's brain mask carried
    along (blue, when given), three orthogonal slices through the reference brain's centre, the gate's
    figures in the title. With ``affine`` the axes are shown in the closest RAS order, voxel sizes kept."""
    zooms = np.ones(3)
    if affine is not None:
        image, zooms = _canonical(image, affine)
        reference_brain, _ = _canonical(reference_brain, affine)
        if brain_mask is not None:
            brain_mask, _ = _canonical(brain_mask, affine)
    aspects = [zooms[2] / zooms[1], zooms[2] / zooms[0], zooms[1] / zooms[0]]
    centre = tuple(int(c) for c in np.round(np.argwhere(reference_brain > 0.5).mean(axis=0)))
    fig, axes = plt.subplots(1, 3, figsize=(11, 4.2))
    lo, hi = _robust_limits(
        image * (reference_brain > 0.5 if brain_mask is None else brain_mask > 0.5)
    )
    masks = (
        _mid_slices(np.asarray(brain_mask, np.float32), centre)
        if brain_mask is not None
        else [None] * 3
    )
    for ax, img, ref, msk, aspect, view in zip(
        axes,
        _mid_slices(image, centre),
        _mid_slices(reference_brain, centre),
        masks,
        aspects,
        ("sagittal", "coronal", "axial"),
        strict=True,
    ):
        ax.imshow(img, cmap="gray", origin="lower", vmin=lo, vmax=hi, aspect=aspect)
        ax.contour(ref, levels=[0.5], colors="#ff5050", linewidths=0.9)
        if msk is not None:
            ax.contour(msk, levels=[0.5], colors="#40c0ff", linewidths=0.9)
        ax.set_title(view, fontsize=9)
        ax.set_axis_off()
    name = f"sub-{subject}" if subject else "registration"
    legend = "red: reference brain" + ("" if brain_mask is None else ", blue: subject brain mask")
    fig.suptitle(
        f"{name}: {what}; {legend}\n{gate_text(figures, verdict)}",
        fontsize=9,
        color="#b00000" if verdict is not None and not verdict["passed"] else "black",
    )
    fig.tight_layout()
    return save_figure(fig, path)


def _canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``data`` with its axes permuted and flipped to the closest RAS order, and its voxel sizes."""
    import nibabel as nib

    img = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(data, np.float32), affine))
    return np.asanyarray(img.dataobj), np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0))


def plot_subject_qc(
    *,
    t1_native: np.ndarray,
    native_affine: np.ndarray,
    native_mask: np.ndarray,
    t1: np.ndarray,
    atlas_brain: np.ndarray,
    brain_mask: np.ndarray,
    channels: dict[str, np.ndarray],
    subject: str,
    backends: dict[str, str],
    gate: str,
    path: Path | str,
) -> Path:
    """One PNG per subject, a row per step a person should check at a glance:

    1. brain extraction: the native T1 (axes in the closest RAS order, voxel sizes kept) with the brain-mask
       outline (blue), through the mask's centre;
    2. registration: the T1 on the atlas grid with the atlas brain outline (red) and the subject's brain mask
       carried there (blue);
    3. the normalised channels side by side (axial mid-slice of the crop).
    """
    native, zooms = _canonical(t1_native, native_affine)
    mask_c, _ = _canonical(native_mask, native_affine)
    native_centre = tuple(int(c) for c in np.round(np.argwhere(mask_c > 0.5).mean(axis=0)))
    aspects = [zooms[2] / zooms[1], zooms[2] / zooms[0], zooms[1] / zooms[0]]
    centre = tuple(int(c) for c in np.round(np.argwhere(atlas_brain > 0.5).mean(axis=0)))
    n_chan = len(channels)
    fig, axes = plt.subplots(3, max(3, n_chan), figsize=(2.6 * max(3, n_chan), 8.2))
    for ax in axes.ravel():
        ax.set_axis_off()
    views = ("sagittal", "coronal", "axial")
    lo, hi = _robust_limits(native)
    for col, (img, msk, aspect, view) in enumerate(
        zip(
            _mid_slices(native, native_centre),
            _mid_slices(mask_c, native_centre),
            aspects,
            views,
            strict=True,
        )
    ):
        ax = axes[0, col]
        ax.imshow(img, cmap="gray", origin="lower", vmin=lo, vmax=hi, aspect=aspect)
        ax.contour(msk, levels=[0.5], colors="#40c0ff", linewidths=0.9)
        ax.set_title(f"brain mask, native {view}", fontsize=9)
    lo, hi = _robust_limits(t1 * (brain_mask > 0.5))
    for col, (img, atl, msk, view) in enumerate(
        zip(
            _mid_slices(t1, centre),
            _mid_slices(atlas_brain, centre),
            _mid_slices(brain_mask, centre),
            views,
            strict=True,
        )
    ):
        ax = axes[1, col]
        ax.imshow(img, cmap="gray", origin="lower", vmin=lo, vmax=hi)
        ax.contour(atl, levels=[0.5], colors="#ff5050", linewidths=0.9)
        ax.contour(msk, levels=[0.5], colors="#40c0ff", linewidths=0.9)
        ax.set_title(f"registration, atlas {view}", fontsize=9)
    for col, (name, vol) in enumerate(channels.items()):
        k = vol.shape[2] // 2
        ax = axes[2, col]
        ax.imshow(vol[:, :, k].T, cmap="gray", origin="lower", vmin=0, vmax=1)
        ax.set_title(f"{name} (normalised)", fontsize=9)
    info = ", ".join(f"{k}: {v}" for k, v in backends.items())
    fig.suptitle(
        f"sub-{subject}  |  {info}\nblue: brain mask; red: atlas brain outline  |  {gate}",
        fontsize=10,
    )
    fig.tight_layout()
    return save_figure(fig, path)


#: Outline colours of the masks of :func:`plot_brain_masks`, in order.
MASK_COLOURS = ("#40c0ff", "#ffa030", "#60e060", "#ff5050")


def plot_brain_masks(
    heads: list[tuple[str, np.ndarray, np.ndarray, dict[str, np.ndarray]]], path: Path | str
) -> Path:
    """Brain masks of several tools on several native T1s, to compare them by eye: one row per head
    ``(title, t1, affine, {label: mask on the T1's grid})``, its sagittal, coronal and axial slices through the
    first mask's centre (axes in the closest RAS order, voxel sizes kept), one outline colour per label."""
    fig, axes = plt.subplots(len(heads), 3, figsize=(11, 3.7 * len(heads)), squeeze=False)
    for row, (title, t1, affine, masks) in enumerate(heads):
        native, zooms = _canonical(t1, affine)
        canonical = {label: _canonical(mask, affine)[0] for label, mask in masks.items()}
        first = next(iter(canonical.values()))
        centre = tuple(int(c) for c in np.round(np.argwhere(first > 0.5).mean(axis=0)))
        aspects = [zooms[2] / zooms[1], zooms[2] / zooms[0], zooms[1] / zooms[0]]
        lo, hi = _robust_limits(native)
        slices = {label: _mid_slices(mask, centre) for label, mask in canonical.items()}
        for col, (img, aspect, view) in enumerate(
            zip(_mid_slices(native, centre), aspects, ("sagittal", "coronal", "axial"), strict=True)
        ):
            ax = axes[row, col]
            ax.imshow(img, cmap="gray", origin="lower", vmin=lo, vmax=hi, aspect=aspect)
            for colour, label in zip(MASK_COLOURS, slices, strict=False):
                ax.contour(slices[label][col], levels=[0.5], colors=colour, linewidths=0.8)
            ax.set_title(f"{title}, {view}" if col == 0 else view, fontsize=9)
            ax.set_axis_off()
    legend = "; ".join(
        f"{colour_name}: {label}"
        for colour_name, label in zip(("blue", "orange", "green", "red"), heads[0][3], strict=False)
    )
    fig.suptitle(f"brain masks on the native T1s ({legend})", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
