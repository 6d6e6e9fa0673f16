"""The raw sequences of one exam, checked together before any work.

``virtual-contrast predict`` on a raw exam and the workflow's ``register`` job (its first job that reads every
sequence of a subject) call :func:`check_exam` first, so a bad exam is reported in one line naming the subject,
the file and the problem, before minutes of registration and not as a traceback from ITK. Each sequence must
exist, load (a truncated or corrupt file fails here), have the right number of dimensions (3D; the DWI 4D with
one b-value per volume and both a b≈0 and a b≈1000 shell), be finite, have signal (not one constant value,
e.g. all zero), have voxel sizes within :data:`VOXEL_MM_RANGE`, and overlap the T1 in world space.

Overlap is measured on the scanner's world coordinates, which every sequence of one exam shares: the fraction
of the smaller field of view (a lattice of points spanning its voxels) that lies inside the other's. Below
:data:`MIN_OVERLAP` the sequences cannot be aligned: a file from another exam, or a header that lost its
position (the registration would start with nothing in common and fail or converge anywhere).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import nibabel as nib
import numpy as np

from virtual_contrast.checks import VOXEL_MM_RANGE
from virtual_contrast.io import InputError, load_image
from virtual_contrast.subjects import SEQUENCE_LABELS

#: Least fraction of the smaller field of view that must lie inside the other's (a clinical slab covers
#: less of the head than a 3D T1, but not less than this).
MIN_OVERLAP = 0.25


def check_voxel_sizes(
    affine: np.ndarray, *, what: str, subject: str | None = None, path: Path | str | None = None
) -> None:
    """Raise :class:`InputError` unless every voxel size of ``affine`` lies within :data:`VOXEL_MM_RANGE`."""
    sizes = np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(axis=0))
    low, high = VOXEL_MM_RANGE
    if not np.all((sizes >= low) & (sizes <= high)):
        shown = " x ".join(f"{s:.4g}" for s in sizes)
        raise InputError(
            f"the {what} has voxels of {shown} mm: each voxel size must lie between {low:g} and "
            f"{high:g} mm (a damaged header?)",
            subject=subject,
            path=path,
        )


def check_image(
    path: Path | str, *, what: str, subject: str | None = None, ndim: int = 3
) -> nib.Nifti1Image:
    """Load one sequence and check it (exists, loads, ``ndim`` dimensions, finite, not constant, voxel
    sizes within :data:`VOXEL_MM_RANGE`)."""
    img = load_image(path, subject=subject, ndim=ndim)
    check_voxel_sizes(img.affine, what=what, subject=subject, path=path)
    data = np.asanyarray(img.dataobj)
    lo, hi = float(data.min()), float(data.max())
    if not hi > lo:
        raise InputError(
            f"the {what} has no signal: every voxel is {lo:g}", subject=subject, path=path
        )
    return img


def fov_points(img: nib.spatialimages.SpatialImage, per_axis: int = 9) -> np.ndarray:
    """World coordinates (3 × N) of a lattice spanning the voxels of ``img`` (its field of view)."""
    shape = np.asarray(img.shape[:3])
    axes = [np.linspace(-0.5, n - 0.5, per_axis) for n in shape]
    ijk = np.stack(np.meshgrid(*axes, indexing="ij")).reshape(3, -1)
    return (img.affine @ np.vstack([ijk, np.ones(ijk.shape[1])]))[:3]


def fraction_inside(points: np.ndarray, img: nib.spatialimages.SpatialImage) -> float:
    """Fraction of world ``points`` (3 × N) that fall inside the voxels of ``img``."""
    ijk = (np.linalg.inv(img.affine) @ np.vstack([points, np.ones(points.shape[1])]))[:3]
    shape = np.asarray(img.shape[:3])[:, None]
    return float(np.all((ijk >= -0.5) & (ijk <= shape - 0.5), axis=0).mean())


def fov_overlap(a: nib.spatialimages.SpatialImage, b: nib.spatialimages.SpatialImage) -> float:
    """Fraction of the smaller of the two fields of view that lies inside the other."""
    vol_a = abs(np.linalg.det(a.affine[:3, :3])) * np.prod(a.shape[:3])
    vol_b = abs(np.linalg.det(b.affine[:3, :3])) * np.prod(b.shape[:3])
    small, large = (a, b) if vol_a <= vol_b else (b, a)
    return fraction_inside(fov_points(small), large)


def check_dwi(dwi: Path | str, bval: Path | str, *, subject: str | None = None) -> nib.Nifti1Image:
    """The DWI series: 4D, finite, with signal, one b-value per volume, b≈0 and b≈1000 volumes present."""
    from virtual_contrast.preprocess.adc import read_bvals, select_shells

    img = check_image(dwi, what=SEQUENCE_LABELS["dwi"], subject=subject, ndim=4)
    bvals = read_bvals(bval, subject=subject)
    if img.shape[3] != bvals.size:
        raise InputError(
            f"{bvals.size} b-values in {Path(bval).name!r} but the DWI series has {img.shape[3]} volumes",
            subject=subject,
            path=dwi,
        )
    low, high = select_shells(bvals)
    if not low.any() or not high.any():
        raise InputError(
            "the DWI needs b≈0 (≤ 50 s/mm²) and b≈1000 (850-1150 s/mm²) volumes to compute the ADC; "
            f"b-values here: {sorted({round(float(b)) for b in bvals})}",
            subject=subject,
            path=bval,
        )
    return img


def check_exam(
    sequences: Mapping[str, Path | str],
    *,
    subject: str | None = None,
    dwi: Path | str | None = None,
    bval: Path | str | None = None,
) -> dict:
    """Check every sequence of one exam, then each one's overlap with the T1; see the module docstring.

    ``sequences`` maps subjects-table columns (``t1``, ``flair``, ``low``, ``ref``) to files and must hold
    ``t1``; the DWI is checked when ``dwi`` and ``bval`` are given. Everything is loaded and checked before
    the first overlap is measured, so that the message is about the file that is broken. Returns the overlap
    of each sequence with the T1 (for the provenance).
    """
    if "t1" not in sequences:
        raise InputError("an exam needs its T1", subject=subject)
    images = {
        key: check_image(path, what=SEQUENCE_LABELS.get(key, key), subject=subject)
        for key, path in sequences.items()
    }
    paths = dict(sequences)
    if dwi is not None and bval is not None:
        images["dwi"] = check_dwi(dwi, bval, subject=subject)
        paths["dwi"] = dwi
    overlaps = {}
    for key, img in images.items():
        if key == "t1":
            continue
        overlaps[key] = round(fov_overlap(img, images["t1"]), 3)
        if overlaps[key] < MIN_OVERLAP:
            raise InputError(
                f"the {SEQUENCE_LABELS.get(key, key)} does not overlap the T1 in world space (only "
                f"{100 * overlaps[key]:.0f} % of the smaller field of view lies inside the other; at least "
                f"{100 * MIN_OVERLAP:.0f} % is needed): a file of another exam, or a header without the "
                "scanner position?",
                subject=subject,
                path=paths[key],
            )
    return {"overlap_with_t1": overlaps}
