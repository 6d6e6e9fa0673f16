"""Affine transforms and resampling between grids: numpy, scipy and nibabel only.

Kept apart from :mod:`virtual_contrast.preprocess.register` so that steps which only *apply* a registration
(bringing vir-T1c back to the native grid, mapping the cohort's truth to atlas space) do not import the
registration backends (FSL through nipype, SimpleITK) their environments do not install.

Convention (used by every function here and by the files written): a 4×4 matrix ``A`` in world RAS mm that maps
points of the *reference* (fixed) world to the *moving* world, the "pull" convention of resampling: the value at
reference point ``x`` is read from the moving image at ``A @ x``. Transforms are saved as plain-text 4×4 matrices
(``np.savetxt``) whose header comment states this convention.
"""

from __future__ import annotations

import io
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from virtual_contrast.io import InputError, write_text

TRANSFORM_HEADER = (
    "virtual-contrast affine transform, 4x4, world RAS mm.\n"
    "Maps points of the REFERENCE (fixed) world to the MOVING world (pull convention):\n"
    "the resampled image at reference point x takes the moving image's value at A @ x."
)


# ----------------------------------------------------------------------------------------------- transforms
def save_transform(matrix: np.ndarray, path: Path | str, *, note: str = "") -> Path:
    """Write a 4×4 transform as text with the convention in its header (atomic)."""
    matrix = _check_matrix(np.asarray(matrix, dtype=float), where=str(path))
    buf = io.StringIO()
    header = TRANSFORM_HEADER + (f"\n{note}" if note else "")
    np.savetxt(buf, matrix, fmt="%.10f", header=header)
    return write_text(buf.getvalue(), path)


def load_transform(path: Path | str, *, subject: str | None = None) -> np.ndarray:
    """Read a transform written by :func:`save_transform`; :class:`InputError` if it is not a valid 4×4."""
    path = Path(path)
    if not path.exists():
        raise InputError("transform file not found", subject=subject, path=path)
    try:
        matrix = np.loadtxt(path, ndmin=2)
    except ValueError as exc:
        raise InputError(f"not a text matrix: {exc}", subject=subject, path=path) from exc
    try:
        return _check_matrix(matrix, where=str(path))
    except ValueError as exc:
        raise InputError(str(exc), subject=subject, path=path) from exc


def _check_matrix(matrix: np.ndarray, *, where: str) -> np.ndarray:
    if matrix.shape != (4, 4):
        raise ValueError(f"{where}: a transform is a 4x4 matrix, got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)) or not np.allclose(matrix[3], [0, 0, 0, 1]):
        raise ValueError(f"{where}: not an affine 4x4 matrix (last row must be 0 0 0 1)")
    if abs(np.linalg.det(matrix[:3, :3])) < 1e-6:
        raise ValueError(f"{where}: singular transform")
    return matrix


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel sizes (mm) of a voxel-to-world affine: the norms of its columns."""
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


# ----------------------------------------------------------------------------------------------- resampling
def resample(
    moving: nib.Nifti1Image,
    ref_shape: tuple[int, ...],
    ref_affine: np.ndarray,
    transform: np.ndarray,
    order: int = 3,
    *,
    antialias: bool = True,
    clip: bool = True,
) -> np.ndarray:
    """Pull ``moving`` onto the reference grid through ``transform`` (reference world → moving world).

    One interpolation: B-spline of ``order`` (3 = cubic, with the spline pre-filter; 0 = nearest, for masks
    and labels), zero outside the moving field of view (the voxels' extent, see :func:`_inside`). Two
    choices an imaging researcher would expect:

    * ``antialias``: when the reference grid is coarser than the moving one along some axis (e.g. 0.9 mm in
      plane onto a 4 mm grid), the moving image is first smoothed along that axis with the Gaussian whose FWHM
      makes up the difference (σ = √(r² − 1) / 2.355 moving voxels for a ratio r of sample spacings);
    * ``clip``: cubic splines overshoot at sharp edges (skull, background), so the result is clipped to the
      moving image's range; a non-negative image stays non-negative.
    """
    data = np.asanyarray(moving.dataobj, dtype=np.float32)
    vox2vox = (
        np.linalg.inv(moving.affine) @ np.asarray(transform, float) @ np.asarray(ref_affine, float)
    )
    if order > 0 and antialias:
        # Spacing between neighbouring reference samples, measured in moving voxels along each moving axis.
        step = np.sqrt((vox2vox[:3, :3] ** 2).sum(axis=1))
        sigma = np.sqrt(np.clip(step**2 - 1.0, 0.0, None)) / 2.355
        if np.any(sigma > 0.1):
            data = ndimage.gaussian_filter(data, sigma=np.where(sigma > 0.1, sigma, 0.0))
    shape = tuple(int(s) for s in ref_shape[:3])
    out = ndimage.affine_transform(
        data,
        vox2vox[:3, :3],
        offset=vox2vox[:3, 3],
        output_shape=shape,
        order=order,
        mode="nearest",
        prefilter=order > 1,
        output=np.float32,
    )
    if clip and order > 1 and data.size:
        np.clip(out, min(0.0, float(data.min())), max(0.0, float(data.max())), out=out)
    out[~_inside(vox2vox, shape, data.shape)] = 0.0
    return out


def _inside(
    vox2vox: np.ndarray, shape: tuple[int, ...], moving_shape: tuple[int, ...]
) -> np.ndarray:
    """Output voxels whose centre falls inside the moving image's voxels, [-0.5, n - 0.5] on each axis.

    The field of view is the voxels' extent, not their centres: scipy's "constant" mode would cut half a
    voxel at each face, 2.75 mm at each end of a 5.5 mm slab (ITK counts the half voxel too).
    """
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    inside = np.ones(shape, bool)
    for axis in range(3):
        coord = vox2vox[axis, 3] + sum(vox2vox[axis, k] * grids[k] for k in range(3))
        inside &= (coord >= -0.5) & (coord <= moving_shape[axis] - 0.5)
    return inside


def resample_to_native(
    img_atlas: nib.Nifti1Image, native_img: nib.Nifti1Image, transform: np.ndarray, order: int = 3
) -> np.ndarray:
    """Bring an atlas-space image back onto a subject's native grid.

    ``transform`` is the one that brought the native image onto the atlas (atlas world → native world);
    pulling the other way needs its inverse.
    """
    return resample(
        img_atlas, native_img.shape, native_img.affine, np.linalg.inv(transform), order=order
    )


def carry_mask(
    mask: nib.Nifti1Image, shape: tuple[int, ...], affine: np.ndarray, transform: np.ndarray
) -> np.ndarray:
    """A binary mask pulled onto another grid: linear interpolation, then the 0.5 level (bool).

    Linear interpolation and a threshold keep the outline where the mask's own half-voxel boundary lies;
    nearest neighbour would shift it by up to half a voxel of the coarser grid.
    """
    binary = nib.Nifti1Image((np.asanyarray(mask.dataobj) > 0.5).astype(np.float32), mask.affine)
    return resample(binary, shape, affine, transform, order=1) >= 0.5
