"""Automated detection of enhancing lesions: the reader ``auto`` of the reader study.

On an enhancement map (post-contrast minus pre-contrast T1, smoothed by a Gaussian of 1 mm, clipped at 0,
brain voxels only) the detector thresholds with hysteresis (voxels above ``threshold`` and at least
``edge_margin_mm`` inside the brain seed a lesion, which grows into connected voxels above ``low_threshold``;
``exclude`` removes physiological enhancement such as the choroid plexus), fills enclosed cavities (the
necrotic core of ring lesions belongs to the lesion, as in RANO), labels face-connected components, trims each
to its half-maximum core, drops those below ``min_volume_mm3`` and measures each one like a radiologist would:

- centre: the component's centroid, in world (RAS) mm;
- long axis: in the axial slice where the component is longest, the largest distance between two of its voxel
  centres plus the voxel size along that direction (so that a single voxel measures one voxel, and a disc of
  diameter D measures about D);
- short axis: in that slice, the component's extent perpendicular to the long axis (between voxel centres),
  plus the voxel size along that direction.

"Axial" is the voxel axis closest to the world superior-inferior axis, so the measurement is right for any
affine. Without radiologists this detector makes the reader statistics run; real reads replace it. It is
validated against the synthetic cohort's true lesions by :func:`validate_detector`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial import ConvexHull

from virtual_contrast.io import InputError, load_array
from virtual_contrast.reader.matching import MatchRule, match_lesions
from virtual_contrast.reader.stats import LESION_COLUMNS, READ_COLUMNS

log = logging.getLogger(__name__)

DETECTION_COLUMNS = (
    "lesion_id",
    "x_mm",
    "y_mm",
    "z_mm",
    "long_axis_mm",
    "short_axis_mm",
    "volume_mm3",
    "n_voxels",
    "max_enhancement",
    "mean_enhancement",
    "axial_slice",
)
TRUTH_COLUMNS = ("subject", "x_mm", "y_mm", "z_mm", "long_axis_mm", "short_axis_mm")
#: Default size bins (long axis, mm) of the detector validation: [0, 5), [5, 10), [10, 20), [20, inf).
DEFAULT_SIZE_BINS = (0.0, 5.0, 10.0, 20.0, float("inf"))


def enhancement_map(
    post: np.ndarray,
    pre: np.ndarray,
    mask: np.ndarray,
    *,
    affine: np.ndarray | None = None,
    smoothing_mm: float = 0.0,
) -> np.ndarray:
    """Post minus pre, clipped at 0, zero outside the brain mask (float32).

    With ``smoothing_mm`` > 0 the difference is first smoothed by a Gaussian of that sigma (mm, per axis
    from the affine's voxel sizes), normalised by the smoothed mask so that the brain's edge is not darkened
    by the zeros outside it. Smoothing before clipping keeps the noise unbiased.
    """
    inside = np.asarray(mask) > 0
    diff = np.asarray(post, np.float32) - np.asarray(pre, np.float32)
    diff[~inside] = 0
    if smoothing_mm > 0:
        if affine is None:
            raise ValueError("smoothing needs the affine (voxel sizes)")
        voxel = np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)
        sigma = smoothing_mm / voxel
        weight = ndimage.gaussian_filter(inside.astype(np.float32), sigma)
        diff = ndimage.gaussian_filter(diff, sigma) / np.maximum(weight, 1e-6)
    enh = np.clip(diff, 0, None)
    enh[~inside] = 0
    return enh


def axial_axis(affine: np.ndarray) -> int:
    """Voxel axis whose world direction is closest to superior-inferior (RAS z)."""
    cols = np.asarray(affine, float)[:3, :3]
    cos = np.abs(cols[2, :]) / np.linalg.norm(cols, axis=0)
    return int(np.argmax(cos))


def _farthest_pair(points: np.ndarray, plane_basis: np.ndarray) -> tuple[int, int, float]:
    """Indices and distance of the two farthest points (all in one plane)."""
    candidates = np.arange(len(points))
    if len(points) > 64:
        # The farthest pair lies on the convex hull; compute it in the plane's own 2D coordinates.
        try:
            candidates = ConvexHull(points @ plane_basis.T).vertices
        except Exception:  # noqa: BLE001 - degenerate (collinear) sets: fall back to all points
            candidates = np.arange(len(points))
    p = points[candidates]
    d = np.linalg.norm(p[:, None, :] - p[None, :, :], axis=2)
    i, j = np.unravel_index(int(np.argmax(d)), d.shape)
    return int(candidates[i]), int(candidates[j]), float(d[i, j])


def measure_axes(voxels: np.ndarray, affine: np.ndarray) -> tuple[float, float, int]:
    """RANO-like long and perpendicular short axis (mm) of one component, and the slice they were measured in.

    ``voxels`` is an (n, 3) array of voxel indices. Each axial slice of the component is measured; the slice
    with the longest long axis wins (ties: the one with more voxels).
    """
    affine = np.asarray(affine, float)
    s = axial_axis(affine)
    inplane = [a for a in range(3) if a != s]
    a_p, a_q = affine[:3, inplane[0]], affine[:3, inplane[1]]
    normal = np.cross(a_p, a_q)
    normal /= np.linalg.norm(normal)
    e1 = a_p / np.linalg.norm(a_p)
    basis = np.stack([e1, np.cross(normal, e1)])

    inplane_matrix = np.stack(
        [basis @ a_p, basis @ a_q], axis=1
    )  # voxel steps in 2D plane coordinates
    inverse = np.linalg.inv(inplane_matrix)

    def width(u: np.ndarray) -> float:
        # Voxel size along the in-plane unit direction u: the length of u measured in voxel steps, inverted
        # (the voxel size for isotropic voxels in every direction). Voxel centres of a disc of diameter D
        # span about D minus one voxel along any direction, so adding this restores D.
        return float(1.0 / np.linalg.norm(inverse @ (basis @ u)))

    best = (-1.0, 0.0, -1, -1)  # long, short, n_voxels, slice
    for k in np.unique(voxels[:, s]):
        idx = voxels[voxels[:, s] == k]
        world = idx @ affine[:3, :3].T + affine[:3, 3]
        if len(world) == 1:
            u = e1
            long_ = width(u)
        else:
            i, j, d = _farthest_pair(world, basis)
            u = (world[j] - world[i]) / d
            long_ = d + width(u)
        w = np.cross(normal, u)
        proj = world @ w
        short = float(np.ptp(proj)) + width(w)
        if (long_, len(idx)) > (best[0], best[2]):
            best = (long_, min(short, long_), len(idx), int(k))
    return best[0], best[1], best[3]


def _half_maximum_core(
    enh: np.ndarray, component: np.ndarray, fraction: float, structure: np.ndarray
) -> np.ndarray:
    """The part of ``component`` above ``fraction`` × its peak enhancement: cavities filled, largest piece."""
    values = np.where(component, enh, 0.0)
    core = values >= fraction * float(values.max())
    core = ndimage.binary_fill_holes(core, structure=structure) & component
    labels, n = ndimage.label(core, structure=structure)
    if n > 1:
        sizes = np.bincount(labels.ravel())[1:]
        core = labels == (int(np.argmax(sizes)) + 1)
    return core


def detect_lesions(
    post: np.ndarray,
    pre: np.ndarray,
    mask: np.ndarray,
    affine: np.ndarray,
    *,
    threshold: float = 0.15,
    low_threshold: float | None = None,
    min_volume_mm3: float = 10.0,
    fill_holes: bool = True,
    edge_fraction: float | None = 0.5,
    smoothing_mm: float = 1.0,
    edge_margin_mm: float = 3.0,
    exclude: np.ndarray | None = None,
) -> pd.DataFrame:
    """Enhancing lesions of one image, one row per lesion with :data:`DETECTION_COLUMNS`.

    Intensities are those of normalised images ([0, 1]); ``threshold`` is on the enhancement (post - pre).
    ``low_threshold`` (default ``threshold / 2``) is the hysteresis floor a lesion grows into, which keeps the
    measured axes close to the lesion's edge on blurry predictions. Lesions are numbered by decreasing volume.
    ``edge_fraction``: each lesion is then trimmed to its voxels above this fraction of its own peak
    enhancement (half maximum by default; cavities filled, largest piece kept), which puts the edge where the
    partial-volume and blur-smoothed profile crosses the middle of the step, i.e. at the true boundary, and makes
    the axes independent of the detection threshold. ``None`` keeps the thresholded extent.
    ``smoothing_mm``: Gaussian sigma applied to the difference first (see :func:`enhancement_map`); it turns
    voxel noise, which a threshold would cut into hundreds of specks, into a smooth background.
    ``edge_margin_mm``: a lesion must have a seed voxel at least this deep inside the brain mask, which drops
    the dura, the venous sinuses and mask-edge misregistration, which enhance as thin rims at the surface.
    ``exclude``: voxels of physiological enhancement (choroid plexus, vessels) where no lesion may grow, e.g.
    :func:`normal_enhancement_mask` of the training subjects in atlas space.
    """
    shapes = {"post": np.shape(post), "pre": np.shape(pre), "mask": np.shape(mask)}
    if len(set(shapes.values())) != 1 or len(shapes["post"]) != 3:
        raise InputError(f"post, pre and mask must be 3D arrays of one shape, got {shapes}")
    if threshold <= 0:
        raise InputError(f"threshold must be positive, got {threshold}")
    low = threshold / 2 if low_threshold is None else low_threshold
    if not 0 < low <= threshold:
        raise InputError(f"low_threshold must be in (0, threshold], got {low}")
    enh = enhancement_map(post, pre, mask, affine=affine, smoothing_mm=smoothing_mm)
    allowed = np.asarray(mask) > 0
    if exclude is not None:
        if np.shape(exclude) != enh.shape:
            raise InputError(f"exclude mask has shape {np.shape(exclude)}, expected {enh.shape}")
        allowed &= ~(np.asarray(exclude) > 0)
    seeds = allowed & (enh > threshold)
    if edge_margin_mm > 0 and seeds.any():
        voxel = np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)
        depth = ndimage.distance_transform_edt(np.asarray(mask) > 0, sampling=voxel)
        seeds &= depth >= edge_margin_mm
    face = ndimage.generate_binary_structure(3, 1)
    candidates, n = ndimage.label(allowed & (enh > low), structure=face)
    if n:
        seeded = np.zeros(n + 1, dtype=bool)
        seeded[np.unique(candidates[seeds])] = True
        seeded[0] = False
        binary = seeded[candidates]
    else:
        binary = np.zeros(enh.shape, dtype=bool)
    if fill_holes and binary.any():
        binary = ndimage.binary_fill_holes(binary, structure=face)
    labels, n = ndimage.label(binary, structure=face)
    voxel_volume = float(abs(np.linalg.det(np.asarray(affine, float)[:3, :3])))
    rows = []
    for i, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        local = labels[box] == i
        if edge_fraction is not None:
            local = _half_maximum_core(enh[box], local, edge_fraction, face)
        n_vox = int(local.sum())
        if n_vox * voxel_volume < min_volume_mm3:
            continue
        voxels = np.argwhere(local) + np.array([sl.start for sl in box])
        centre = (
            voxels.mean(axis=0) @ np.asarray(affine, float)[:3, :3].T
            + np.asarray(affine, float)[:3, 3]
        )
        long_, short, k = measure_axes(voxels, affine)
        values = enh[box][local]
        rows.append(
            {
                "x_mm": centre[0],
                "y_mm": centre[1],
                "z_mm": centre[2],
                "long_axis_mm": long_,
                "short_axis_mm": short,
                "volume_mm3": n_vox * voxel_volume,
                "n_voxels": n_vox,
                "max_enhancement": float(values.max()),
                "mean_enhancement": float(values.mean()),
                "axial_slice": k,
            }
        )
    table = pd.DataFrame(rows, columns=[c for c in DETECTION_COLUMNS if c != "lesion_id"])
    table = table.sort_values("volume_mm3", ascending=False, kind="stable").reset_index(drop=True)
    table.insert(0, "lesion_id", np.arange(1, len(table) + 1))
    log.info(
        "detected %d lesions (threshold %.3g, floor %.3g, min %.3g mm3)",
        len(table),
        threshold,
        low,
        min_volume_mm3,
    )
    return table


def normal_enhancement_mask(
    enhancements: Sequence[np.ndarray], *, threshold: float, fraction: float = 0.5
) -> np.ndarray:
    """Voxels that enhance above ``threshold`` in at least ``fraction`` of the given subjects.

    Physiological enhancement (choroid plexus, venous sinuses, dura) sits at the same place in every brain once
    registered to the atlas, lesions do not: computed on the training subjects' enhancement maps in atlas space
    (:func:`enhancement_map`), this is an ``exclude`` mask for :func:`detect_lesions`.
    """
    if not enhancements:
        raise InputError("normal_enhancement_mask needs at least one enhancement map")
    shapes = {np.shape(e) for e in enhancements}
    if len(shapes) != 1:
        raise InputError(f"enhancement maps must share one grid, got shapes {sorted(shapes)}")
    count = np.zeros(next(iter(shapes)), dtype=np.int32)
    for e in enhancements:
        count += np.asarray(e) > threshold
    return count >= fraction * len(enhancements)


def detect_lesions_from_files(
    *,
    post: Path,
    pre: Path,
    mask: Path,
    subject: str | None = None,
    **kwargs,
) -> pd.DataFrame:
    """:func:`detect_lesions` on image files that share one grid (the affine is the post image's)."""
    post_a, affine = load_array(post, subject=subject)
    pre_a, pre_aff = load_array(pre, subject=subject)
    mask_a, mask_aff = load_array(mask, subject=subject)
    for name, arr, aff, path in (("pre", pre_a, pre_aff, pre), ("mask", mask_a, mask_aff, mask)):
        if arr.shape != post_a.shape or not np.allclose(aff, affine, atol=1e-3):
            raise InputError(
                f"{name} is not on the post-contrast image's grid", subject=subject, path=path
            )
    table = detect_lesions(post_a, pre_a, mask_a, affine, **kwargs)
    if subject is not None:
        table.insert(0, "subject", subject)
    return table


def detections_to_reads(
    detections: pd.DataFrame, *, patient: str, modality: str, reader: str = "auto"
) -> pd.DataFrame:
    """Detections of one image as rows of the reader study's lesions CSV (reader ``auto``)."""
    out = detections[["x_mm", "y_mm", "z_mm", "long_axis_mm", "short_axis_mm"]].copy()
    out.insert(0, "modality", modality)
    out.insert(0, "reader", reader)
    out.insert(0, "patient", patient)
    return out.reset_index(drop=True)


def auto_reader_tables(
    detections: Mapping[tuple[str, str], pd.DataFrame], *, reader: str = "auto"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The reader study's lesions and reads tables of the automated reader.

    ``detections`` maps (patient, modality) to :func:`detect_lesions` outputs, with modality ``ref``, ``low``
    or ``vir``; every key is a read (also those without detection), with no quality grade or reading time.
    Feed both tables to :func:`virtual_contrast.reader.stats.reader_stats` with ``reference_reader="auto"``.
    """
    lesions = [
        detections_to_reads(table, patient=patient, modality=modality, reader=reader)
        for (patient, modality), table in detections.items()
    ]
    columns = list(LESION_COLUMNS)
    lesion_table = (
        pd.concat(lesions, ignore_index=True) if lesions else pd.DataFrame(columns=columns)
    )
    reads = pd.DataFrame(
        [(patient, reader, modality, np.nan, np.nan) for patient, modality in detections],
        columns=list(READ_COLUMNS),
    )
    return lesion_table[columns], reads


def _bin_labels(bins: Sequence[float]) -> list[str]:
    return [f"[{lo:g}, {hi:g})" for lo, hi in zip(bins[:-1], bins[1:], strict=True)]


def validate_detector(
    detections: pd.DataFrame,
    truth: pd.DataFrame,
    *,
    subjects: Sequence[str] | None = None,
    bins: Sequence[float] = DEFAULT_SIZE_BINS,
    rule: MatchRule = "both",
) -> pd.DataFrame:
    """Sensitivity and PPV of the detector against true lesions, per size bin of the long axis.

    Both tables have ``subject, x_mm, y_mm, z_mm, long_axis_mm, short_axis_mm`` (the cohort's ``lesions.tsv``
    and :func:`detect_lesions_from_files` outputs, concatenated). Matching is
    :func:`virtual_contrast.reader.matching.match_lesions` per subject, on all lesions. As in the reader
    statistics, a true lesion's bin is its true long axis (for sensitivity and true positives) and a false
    positive's bin is its own measured long axis; PPV = TP / (TP + FP) in the bin. ``subjects`` defaults to
    every subject in either table; pass the full list so that ``n_subjects`` counts subjects with neither.
    The last row, ``all``, pools every bin.
    """
    for name, df in (("detections", detections), ("truth", truth)):
        missing = [c for c in TRUTH_COLUMNS if c not in df.columns]
        if missing:
            raise InputError(f"{name} table lacks columns {missing}")
    if subjects is None:
        subjects = sorted(
            set(truth["subject"].astype(str)) | set(detections["subject"].astype(str))
        )
    truth = truth.assign(subject=truth["subject"].astype(str))
    detections = detections.assign(subject=detections["subject"].astype(str))
    true_rows, fp_rows = [], []
    for subject in subjects:
        t = truth[truth["subject"] == subject].reset_index(drop=True)
        d = detections[detections["subject"] == subject].reset_index(drop=True)
        ref_to_det, det_to_ref = match_lesions(t, d, rule=rule)
        true_rows.append(pd.DataFrame({"long": t["long_axis_mm"], "detected": ref_to_det >= 0}))
        fp_rows.append(pd.DataFrame({"long": d["long_axis_mm"][det_to_ref < 0]}))
    hits = (
        pd.concat(true_rows, ignore_index=True)
        if true_rows
        else pd.DataFrame(columns=["long", "detected"])
    )
    fps = pd.concat(fp_rows, ignore_index=True) if fp_rows else pd.DataFrame(columns=["long"])
    edges = list(bins)
    rows = []
    for label, lo, hi in [
        *zip(_bin_labels(edges), edges[:-1], edges[1:], strict=True),
        ("all", edges[0], edges[-1]),
    ]:
        in_bin = hits[(hits["long"] >= lo) & (hits["long"] < hi)]
        fp = int(((fps["long"] >= lo) & (fps["long"] < hi)).sum())
        tp = int(in_bin["detected"].sum())
        n_true = len(in_bin)
        rows.append(
            {
                "size_bin": label,
                "min_long_axis_mm": lo,
                "max_long_axis_mm": hi,
                "n_true": n_true,
                "true_positives": tp,
                "false_positives": fp,
                "n_detections": tp + fp,
                "sensitivity": tp / n_true if n_true else np.nan,
                "ppv": tp / (tp + fp) if tp + fp else np.nan,
                "n_subjects": len(subjects),
            }
        )
    return pd.DataFrame(rows)
