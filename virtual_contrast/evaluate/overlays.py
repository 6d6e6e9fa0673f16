"""Detection overlays: what the automated reader marked, outlined on the images it read.

One row per site (a true lesion, or a detection on any image that is no true lesion and no other site), one
column per image read (ref-T1c, low-T1c, vir-T1c): the axial slice through the site's centre, with that image's
detections outlined (green: matched to a true lesion; red: false positive; cyan when the truth is unknown) and
the true lesions circled (dashed yellow, the long axis as diameter). The site of the row is boxed in white.
Arrays are reoriented to RAS voxel order first, and shown as radiologists read them: anterior up, the subject's
right on the viewer's left.
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.patches import Circle, Rectangle  # noqa: E402

from virtual_contrast.io import InputError, atomic_path  # noqa: E402
from virtual_contrast.matching import match_lesions  # noqa: E402

log = logging.getLogger(__name__)

TITLES = {"ref": "ref-T1c", "low": "low-T1c", "vir": "vir-T1c", "post": "post-contrast T1"}
#: At most this many rows (true lesions first, by size, then false positives by volume).
MAX_ROWS = 12


def _to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The array in RAS voxel order and its new affine."""
    ornt = nib.orientations.io_orientation(affine)
    data = nib.orientations.apply_orientation(array, ornt)
    new_affine = affine @ nib.orientations.inv_ornt_aff(ornt, array.shape)
    return data, new_affine


def _sites(
    detections: Mapping[str, pd.DataFrame], truth: pd.DataFrame | None
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Rows to show (x_mm, y_mm, z_mm, long_axis_mm, short_axis_mm, kind) and, per image, whether each of its
    detections matches a true lesion."""
    matched = {}
    sites = []
    if truth is not None:
        for row in truth.sort_values("long_axis_mm", ascending=False).itertuples():
            sites.append(
                (row.x_mm, row.y_mm, row.z_mm, row.long_axis_mm, row.short_axis_mm, "true")
            )
    for name, table in detections.items():
        if truth is not None:
            _, det_to_ref = match_lesions(
                truth.reset_index(drop=True), table.reset_index(drop=True)
            )
            matched[name] = det_to_ref >= 0
        else:
            matched[name] = np.zeros(len(table), bool)
    extra = []
    for name, table in detections.items():
        for row, hit in zip(table.itertuples(), matched[name], strict=True):
            if not hit:
                extra.append((row.volume_mm3, row))
    for _, row in sorted(extra, key=lambda item: -item[0]):
        shown = pd.DataFrame(
            sites, columns=["x_mm", "y_mm", "z_mm", "long_axis_mm", "short_axis_mm", "kind"]
        )
        candidate = pd.DataFrame([row._asdict()])
        if len(shown) and (match_lesions(shown, candidate)[1] >= 0).any():
            continue
        sites.append(
            (row.x_mm, row.y_mm, row.z_mm, row.long_axis_mm, row.short_axis_mm, "detected")
        )
    columns = ["x_mm", "y_mm", "z_mm", "long_axis_mm", "short_axis_mm", "kind"]
    return pd.DataFrame(sites, columns=columns), matched


def plot_detection_overlay(
    images: Mapping[str, np.ndarray],
    labels: Mapping[str, np.ndarray],
    detections: Mapping[str, pd.DataFrame],
    affine: np.ndarray,
    path: Path | str,
    *,
    truth: pd.DataFrame | None = None,
    title: str = "",
    titles: Mapping[str, str] | None = None,
    uncertainty: np.ndarray | None = None,
) -> Path:
    """Write the overlay figure (PNG) of the images read (name -> 3D array on one grid, normalised to [0, 1]),
    their detection label images (name -> lesion_id image) and tables (name -> rows with ``lesion_id``, centre
    and axes in world mm), with the true lesions (world mm of the same grid) when known. ``titles`` renames
    the images (a simulated low dose says so). With ``uncertainty`` (vir-T1c's uncertainty map on the same
    grid) and a vir image, a last column shows the map at each site with vir-T1c's detections outlined, on one
    colour scale for the figure (0 to the map's 99.5th percentile)."""
    if not images:
        raise InputError("no image to show")
    shapes = {np.shape(a) for a in [*images.values(), *labels.values()]}
    if len(shapes) != 1:
        raise InputError(f"images and labels must share one grid, got shapes {sorted(shapes)}")
    names = list(images)
    unc_column = uncertainty is not None and "vir" in names
    if unc_column and np.shape(uncertainty) != np.shape(images["vir"]):
        raise InputError("the uncertainty map is not on the images' grid")
    ras = {n: _to_ras(np.asarray(images[n], np.float32), affine)[0] for n in names}
    if unc_column:
        unc_ras = _to_ras(np.asarray(uncertainty, np.float32), affine)[0]
        positive = unc_ras[unc_ras > 0]
        unc_top = float(np.percentile(positive, 99.5)) if positive.size else 1.0
    lab = {n: _to_ras(np.asarray(labels[n]), affine)[0] for n in names}
    ras_affine = _to_ras(np.asarray(images[names[0]]), affine)[1]
    sites, matched = _sites({n: detections[n] for n in names}, truth)
    more = max(len(sites) - MAX_ROWS, 0)
    sites = sites.head(MAX_ROWS)
    rows = max(len(sites), 1)
    n_columns = len(names) + int(unc_column)
    width = max(2.6 * n_columns, 4.0)
    fig, axes = plt.subplots(rows, n_columns, figsize=(width, 2.7 * rows + 0.4), squeeze=False)
    inverse = np.linalg.inv(ras_affine)
    voxel = np.linalg.norm(ras_affine[:3, :3], axis=0)
    shape = next(iter(ras.values())).shape
    # Each column: (volume, whose detections it outlines, colour map, top of the scale, title).
    panels = [
        (ras[name], name, "gray", 1.0, {**TITLES, **(titles or {})}.get(name, name))
        for name in names
    ]
    if unc_column:
        top = unc_top if unc_top > 0 else 1.0
        panels.append((unc_ras, "vir", "magma", top, f"vir-T1c uncertainty (0-{unc_top:.2g})"))
    for r in range(rows):
        if sites.empty:
            k = shape[2] // 2
            site = None
        else:
            site = sites.iloc[r]
            ijk = inverse @ [site.x_mm, site.y_mm, site.z_mm, 1.0]
            k = int(np.clip(np.round(ijk[2]), 0, shape[2] - 1))
        for c, (volume, outlined, cmap, vmax, column_title) in enumerate(panels):
            ax = axes[r][c]
            # Rows run anterior -> posterior (top -> bottom), the subject's right on the viewer's left.
            ax.imshow(volume[:, :, k].T[::-1, ::-1], cmap=cmap, vmin=0, vmax=vmax, origin="upper")
            _outline(
                ax,
                lab[outlined][:, :, k].T[::-1, ::-1],
                detections[outlined],
                matched[outlined],
                truth,
            )
            if truth is not None:
                _circle_truth(ax, truth, inverse, voxel, k, shape)
            if site is not None:
                _box_site(ax, site, inverse, voxel, shape)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(column_title, fontsize=9)
        label = (
            "no detection"
            if site is None
            else (
                f"{'true lesion' if site.kind == 'true' else 'detection'} {site.long_axis_mm:.0f} mm, slice {k}"
            )
        )
        axes[r][0].set_ylabel(label, fontsize=8)
    suffix = f" (+{more} more sites not shown)" if more else ""
    heading = textwrap.fill(f"{title}{suffix}", width=int(12 * width))
    # The title hangs from the top edge (the default height is a fraction of the figure, far down a tall
    # one) and tight_layout keeps its lines and a gap free above the first row; it covered the column
    # titles of a tall figure.
    height = fig.get_figheight()
    fig.suptitle(heading, fontsize=9, y=1 - 0.06 / height, va="top")
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.17 * (heading.count("\n") + 1) + 0.15) / height))
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def _outline(ax, plane: np.ndarray, table: pd.DataFrame, matched: np.ndarray, truth) -> None:
    for lesion_id, hit in zip(table["lesion_id"].to_numpy(int), matched, strict=True):
        region = plane == lesion_id
        if not region.any():
            continue
        colour = "cyan" if truth is None else ("lime" if hit else "red")
        ax.contour(region.astype(float), levels=[0.5], colors=colour, linewidths=1.0)


def _display_xy(ijk: np.ndarray, shape: tuple[int, ...]) -> tuple[float, float]:
    """Voxel (i, j) -> (column, row) of the displayed plane (transposed, both axes flipped)."""
    return shape[0] - 1 - ijk[0], shape[1] - 1 - ijk[1]


def _circle_truth(ax, truth: pd.DataFrame, inverse, voxel, k: int, shape) -> None:
    for row in truth.itertuples():
        ijk = inverse @ [row.x_mm, row.y_mm, row.z_mm, 1.0]
        radius = row.long_axis_mm / 2
        if abs(ijk[2] - k) * voxel[2] > radius:
            continue
        x, y = _display_xy(ijk, shape)
        ax.add_patch(
            Circle((x, y), radius / voxel[0], fill=False, color="yellow", linestyle="--", lw=0.9)
        )


def _box_site(ax, site, inverse, voxel, shape) -> None:
    ijk = inverse @ [site.x_mm, site.y_mm, site.z_mm, 1.0]
    x, y = _display_xy(ijk, shape)
    half = max(site.long_axis_mm / 2 + 3.0, 6.0) / voxel[0]
    ax.add_patch(
        Rectangle((x - half, y - half), 2 * half, 2 * half, fill=False, color="white", lw=0.6)
    )
