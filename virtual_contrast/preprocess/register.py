"""Registration to the atlas: one 12-DOF transform T1→atlas, each other sequence rigidly to the T1.

Transform convention (used by every function here and by the files written): a 4×4 matrix ``A`` in world RAS
mm that maps points of the *reference* (fixed) world to the *moving* world, the "pull" convention of resampling:
the value at reference point ``x`` is read from the moving image at ``A @ x``. With ``A_t1`` (atlas world → T1
world) and a rigid ``R`` (T1 world → FLAIR world), FLAIR is pulled onto the atlas grid by ``R @ A_t1``, so each
image is interpolated exactly once. Transforms are saved as plain-text 4×4 matrices (``np.savetxt``) whose header
comment states this convention.

Two backends estimate the transforms (:func:`select_backend`):

* ``fsl``: FSL FLIRT through nipype, as in the paper (see :mod:`virtual_contrast.preprocess.fsl`);
* ``simpleitk``: the embedded one, SimpleITK Mattes mutual information, a multi-resolution pyramid and an
  affine (12 DOF) or rigid (6 DOF) transform, deterministic for a given thread count.

``auto`` picks FSL when it is installed and says so in the log; asking for ``fsl`` without FSL fails at once.

Raw heads carry skull and scalp while the ICBM template is skull-stripped. Mutual information between the two
alone can lock onto a wrong pose when the head starts far off, so when the reference has a head mask the
registration starts with a coarse stage that matches the subject's head outline (Otsu threshold, filled) to that
head mask, then refines with mutual information restricted to the dilated atlas brain mask.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import nibabel as nib
import numpy as np
from scipy import ndimage

from virtual_contrast.io import InputError, load_image, save_image, write_text

log = logging.getLogger(__name__)

BACKENDS = ("auto", "fsl", "simpleitk")

TRANSFORM_HEADER = (
    "virtual-contrast affine transform, 4x4, world RAS mm.\n"
    "Maps points of the REFERENCE (fixed) world to the MOVING world (pull convention):\n"
    "the resampled image at reference point x takes the moving image's value at A @ x."
)

# RAS <-> LPS (ITK's world) is a flip of the first two axes; it is its own inverse.
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


# ----------------------------------------------------------------------------------------------- transforms
def save_transform(matrix: np.ndarray, path: Path | str, *, note: str = "") -> Path:
    """Write a 4×4 transform as text with the convention in its header (atomic)."""
    matrix = _check_matrix(np.asarray(matrix, dtype=float), where=str(path))
    import io

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
    and labels), zero outside the moving field of view. Two choices an imaging researcher would expect:

    * ``antialias``: when the reference grid is coarser than the moving one along some axis (e.g. 0.9 mm in
      plane onto a 4 mm grid), the moving image is first smoothed along that axis with the Gaussian whose FWHM
      makes up the difference (σ = √(r² − 1) / 2.355 moving voxels for a ratio r of sample spacings);
    * ``clip``: cubic splines overshoot at sharp edges (skull, background), so the result is clipped to the
      moving image's range; a non-negative image stays non-negative.
    """
    data = np.asanyarray(moving.dataobj, dtype=np.float32)
    vox2vox = np.linalg.inv(moving.affine) @ np.asarray(transform, float) @ np.asarray(ref_affine, float)
    if order > 0 and antialias:
        # Spacing between neighbouring reference samples, measured in moving voxels along each moving axis.
        step = np.sqrt((vox2vox[:3, :3] ** 2).sum(axis=1))
        sigma = np.sqrt(np.clip(step**2 - 1.0, 0.0, None)) / 2.355
        if np.any(sigma > 0.1):
            data = ndimage.gaussian_filter(data, sigma=np.where(sigma > 0.1, sigma, 0.0))
    out = ndimage.affine_transform(
        data,
        vox2vox[:3, :3],
        offset=vox2vox[:3, 3],
        output_shape=tuple(int(s) for s in ref_shape[:3]),
        order=order,
        mode="constant",
        cval=0.0,
        prefilter=order > 1,
        output=np.float32,
    )
    if clip and order > 1 and data.size:
        np.clip(out, min(0.0, float(data.min())), max(0.0, float(data.max())), out=out)
    return out


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


# ----------------------------------------------------------------------------------------------- masks
def head_mask_from_image(data: np.ndarray) -> np.ndarray:
    """Head outline of a raw image: Otsu threshold, the largest component, closed and filled.

    Holes are filled in 3D and then slice by slice along each axis, because a slab that cuts through the head
    (thick axial slices rarely cover the whole skull) leaves the dark skull and CSF open at the slab faces,
    which a 3D fill alone does not treat as holes.
    """
    from skimage.filters import threshold_otsu

    data = np.asarray(data, dtype=np.float32)
    smooth = ndimage.gaussian_filter(data, 1.0)
    if float(smooth.max()) <= float(smooth.min()):
        return np.zeros(data.shape, bool)
    fg = smooth > threshold_otsu(smooth)
    labels, n = ndimage.label(fg)
    if n > 1:
        sizes = ndimage.sum_labels(fg, labels, index=np.arange(1, n + 1))
        fg = labels == (int(np.argmax(sizes)) + 1)
    fg = ndimage.binary_closing(fg, structure=np.ones((3, 3, 3)), iterations=2, border_value=0) | fg
    fg = ndimage.binary_fill_holes(fg)
    for axis in range(3):
        fg = _fill_slices(fg, axis)
    return fg


def _fill_slices(mask: np.ndarray, axis: int) -> np.ndarray:
    out = np.moveaxis(mask.copy(), axis, 0)
    for i in range(out.shape[0]):
        out[i] = ndimage.binary_fill_holes(out[i])
    return np.moveaxis(out, 0, axis)


def dilate_mask(mask: np.ndarray, affine: np.ndarray, mm: float) -> np.ndarray:
    """``mask`` grown by ``mm`` millimetres (Euclidean, in world units)."""
    mask = np.asarray(mask) > 0.5
    if mm <= 0 or not mask.any():
        return mask
    dist = ndimage.distance_transform_edt(~mask, sampling=voxel_sizes(affine))
    return dist <= mm


# ----------------------------------------------------------------------------------------------- backends
@dataclass
class Registration:
    """One estimated transform and how it was obtained."""

    transform: np.ndarray  # reference world -> moving world, RAS mm
    backend: str
    dof: int
    stages: list[dict] = field(default_factory=list)  # name, metric, iterations, seconds, ...
    seconds: float = 0.0

    def summary(self) -> dict:
        return {
            "backend": self.backend,
            "dof": self.dof,
            "seconds": round(self.seconds, 3),
            "stages": self.stages,
            "transform": np.round(self.transform, 8).tolist(),
        }


class Backend(Protocol):
    """What a registration backend provides (images in memory, transforms in our convention)."""

    name: str

    def register(
        self,
        moving: nib.Nifti1Image,
        reference: nib.Nifti1Image,
        *,
        dof: int = 12,
        reference_mask: np.ndarray | None = None,
        reference_head_mask: np.ndarray | None = None,
        initial: np.ndarray | None = None,
    ) -> Registration: ...

    def resample(
        self,
        moving: nib.Nifti1Image,
        ref_shape: tuple[int, ...],
        ref_affine: np.ndarray,
        transform: np.ndarray,
        order: int = 3,
    ) -> np.ndarray: ...


class BackendUnavailableError(InputError):
    """The configured backend cannot run on this machine."""


def select_backend(name: str = "auto", **options) -> Backend:
    """The backend called ``name`` (``auto``, ``fsl`` or ``simpleitk``); never a silent substitute.

    ``auto`` takes FSL when a ``flirt`` executable is found (on PATH, or in ``$FSLDIR/bin``) and the embedded
    SimpleITK backend otherwise, and logs which one and why. ``fsl`` without FSL raises
    :class:`BackendUnavailableError` at once, naming what to install. ``options`` go to the backend.
    """
    from virtual_contrast.preprocess import fsl

    if name not in BACKENDS:
        raise InputError(f"unknown registration backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name in ("auto", "fsl"):
        flirt, why = fsl.find_flirt()
        if flirt is not None:
            log.info("registration backend: fsl (%s%s)", "auto: " if name == "auto" else "", why)
            return fsl.FSLBackend(flirt, **options)
        if name == "fsl":
            raise BackendUnavailableError(
                f"registration backend 'fsl' requested but FSL is not available ({why}). Install FSL >= 6 "
                "(https://fsl.fmrib.ox.ac.uk/fsl/docs/install/), set FSLDIR to its folder and put "
                "$FSLDIR/bin (with flirt) on PATH; or choose backend 'simpleitk' (embedded) or 'auto'."
            )
        log.info("registration backend: simpleitk (auto: FSL not found: %s)", why)
        return SimpleITKBackend(**options)
    log.info("registration backend: simpleitk (requested)")
    return SimpleITKBackend(**options)


def pyramid_levels(voxel_mm: float, *, coarsest_mm: float = 4.0) -> list[tuple[int, float]]:
    """(shrink factor, smoothing σ in mm) per level for a reference grid of ``voxel_mm``.

    The recipe measured on the 1 mm atlas (shrink 4/2/1, smoothing 2/1/0 mm) expressed in millimetres, so a
    coarser grid keeps only the levels that are not coarser than ``coarsest_mm``: 1 mm → 4/2/1, 2 mm → 2/1
    (4 and 2 mm), 3 or 4 mm → one level.
    """
    levels = [f for f in (4, 2, 1) if f <= 2 or f * voxel_mm <= coarsest_mm + 1e-6]
    return [(f, 0.5 * f * voxel_mm if f > 1 else 0.0) for f in levels]


class SimpleITKBackend:
    """Embedded backend: SimpleITK multi-resolution Mattes mutual information.

    Deterministic: samples are drawn with a fixed ``seed`` and the metric uses ``threads`` threads (the sum of
    per-thread histograms depends on how the samples are split, so a result is reproducible for a given thread
    count; ``threads=None`` uses SimpleITK's global default, which is the number of cores).
    """

    name = "simpleitk"

    def __init__(
        self,
        *,
        seed: int = 20210901,
        threads: int | None = None,
        sampling: float = 0.10,
        min_samples: int = 20000,
        bins: int = 32,
        iterations: int = 200,
        mask_margin_mm: float = 0.0,
        rigid_finest_mm: float = 2.0,
    ):
        self.seed = seed
        self.threads = threads
        self.sampling = sampling
        self.min_samples = min_samples
        self.bins = bins
        self.iterations = iterations
        self.mask_margin_mm = mask_margin_mm
        self.rigid_finest_mm = rigid_finest_mm

    # -- public
    def register(
        self,
        moving: nib.Nifti1Image,
        reference: nib.Nifti1Image,
        *,
        dof: int = 12,
        reference_mask: np.ndarray | None = None,
        reference_head_mask: np.ndarray | None = None,
        initial: np.ndarray | None = None,
    ) -> Registration:
        if dof not in (6, 12):
            raise InputError(f"dof must be 6 (rigid) or 12 (affine), got {dof}")
        t0 = time.perf_counter()
        stages: list[dict] = []
        ref_data = np.asanyarray(reference.dataobj, dtype=np.float32)
        mov_data = np.asanyarray(moving.dataobj, dtype=np.float32)
        if initial is not None:
            init = np.asarray(initial, float)
            stages.append({"name": "initial", "source": "given"})
        elif reference_head_mask is not None:
            init, stage = self._head_stage(moving, reference, reference_head_mask)
            stages.append(stage)
        else:
            init = _moments_translation(ref_data, reference.affine, mov_data, moving.affine)
            stages.append({"name": "initial", "source": "centres of mass"})

        ref_img, ref_mask = reference, reference_mask
        ref_vox = voxel_sizes(reference.affine)
        finest = float(ref_vox.min()) if dof == 12 else max(float(ref_vox.min()), self.rigid_finest_mm)
        if dof == 6 or ref_vox.max() > 1.2 * ref_vox.min():
            # Shrink factors act on voxel indices, so an anisotropic (thick-slice) reference is first put on
            # an isotropic grid in its own orientation; rigid registration needs no more than ~2 mm.
            ref_img, ref_mask = _isotropic(reference, reference_mask, finest)
        transform, stage = self._mi_stage(moving, ref_img, ref_mask, dof=dof, initial=init)
        stages.append(stage)
        return Registration(
            transform=transform,
            backend=self.name,
            dof=dof,
            stages=stages,
            seconds=time.perf_counter() - t0,
        )

    def resample(self, moving, ref_shape, ref_affine, transform, order=3) -> np.ndarray:
        return resample(moving, ref_shape, ref_affine, transform, order=order)

    # -- stages
    def _method(self):
        import SimpleITK as sitk

        reg = sitk.ImageRegistrationMethod()
        if self.threads is not None:
            reg.SetNumberOfThreads(int(self.threads))
        reg.SetInterpolator(sitk.sitkLinear)
        return reg

    def _head_stage(self, moving, reference, reference_head_mask) -> tuple[np.ndarray, dict]:
        """Coarse 7-DOF (similarity) match of the subject's head outline to the reference head mask.

        The *subject* is the fixed image here: its field of view often cuts the head (thick slabs), and only
        points inside the fixed image are compared, so a truncated head is not pulled towards the full one.
        """
        import SimpleITK as sitk

        t0 = time.perf_counter()
        spacing = max(4.0, float(voxel_sizes(reference.affine).min()))
        head = head_mask_from_image(np.asanyarray(moving.dataobj, dtype=np.float32))
        if head.sum() < 100:
            raise InputError("head outline not found (image empty or constant?)")
        head_img = nib.Nifti1Image(head.astype(np.float32), moving.affine)
        fixed_img, _ = _isotropic(head_img, None, spacing, order=1)
        fixed = _to_sitk(fixed_img)
        moving_sitk = _to_sitk(
            nib.Nifti1Image(np.asarray(reference_head_mask, np.float32), reference.affine)
        )
        # Initial: centres of mass of the two masks (subject world -> reference world).
        init = _moments_translation(
            np.asanyarray(fixed_img.dataobj), fixed_img.affine, reference_head_mask, reference.affine
        )
        tx = sitk.Similarity3DTransform()
        centre = _centre_of_mass_world(np.asanyarray(fixed_img.dataobj), fixed_img.affine)
        _set_sitk_from_ras(tx, init, centre)
        reg = self._method()
        reg.SetMetricAsMeanSquares()
        reg.SetMetricSamplingStrategy(reg.NONE)
        reg.SetShrinkFactorsPerLevel([2, 1])
        reg.SetSmoothingSigmasPerLevel([2.0 * spacing, spacing])
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        reg.SetOptimizerAsRegularStepGradientDescent(
            learningRate=4.0, minStep=0.05, numberOfIterations=self.iterations, relaxationFactor=0.6
        )
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetInitialTransform(tx, inPlace=True)
        reg.Execute(fixed, moving_sitk)
        subject_to_ref = _ras_from_sitk(tx)
        stage = {
            "name": "head outline (similarity, mean squares)",
            "metric": float(reg.GetMetricValue()),
            "iterations": int(reg.GetOptimizerIteration()),
            "stop": reg.GetOptimizerStopConditionDescription(),
            "head_voxels": int(head.sum()),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        log.info("stage head outline: metric %.4f, %d iterations", stage["metric"], stage["iterations"])
        return np.linalg.inv(subject_to_ref), stage

    def _mi_stage(self, moving, reference, reference_mask, *, dof, initial) -> tuple[np.ndarray, dict]:
        """Mattes MI, one optimisation per pyramid level, each starting where the coarser one stopped.

        Levels run as separate optimisations (rather than SimpleITK's built-in pyramid, which restarts every
        level with the same step) so that the first step and the stopping step scale with the level's voxel:
        one voxel to start, 1/100 of a voxel to stop. The step shrinks by 0.8 (not ITK's 0.5) at each change
        of direction: with 0.5 the translation's oscillation in a narrow valley used up the step before the
        matrix terms converged, for some random sample sets (0.9 mm errors instead of 0.1 mm on a 2 mm grid).
        """
        import SimpleITK as sitk

        t0 = time.perf_counter()
        fixed = _to_sitk(reference)
        moving_sitk = _to_sitk(moving)
        vox = float(voxel_sizes(reference.affine).min())
        mask = None
        if reference_mask is not None:
            binary = (np.asarray(reference_mask) > 0.5).astype(np.float32)
            mask = sitk.Cast(_to_sitk(nib.Nifti1Image(binary, reference.affine)), sitk.sitkUInt8)
            n_mask = int(binary.sum())
        else:
            n_mask = int(np.prod(reference.shape[:3]))
        centre_data = (
            np.asarray(reference_mask, np.float32)
            if reference_mask is not None
            else np.asanyarray(reference.dataobj, np.float32)
        )
        tx = sitk.AffineTransform(3) if dof == 12 else sitk.Euler3DTransform()
        _set_sitk_from_ras(tx, initial, _centre_of_mass_world(centre_data, reference.affine))
        levels = []
        for shrink, sigma in pyramid_levels(vox):
            level_mm = shrink * vox
            # ~10 % random samples, but at least ``min_samples`` (a coarse level has few voxels).
            pct = float(np.clip(max(self.sampling, self.min_samples * shrink**3 / max(n_mask, 1)), 0.01, 1))
            reg = self._method()
            reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=self.bins)
            reg.SetMetricSamplingStrategy(reg.RANDOM)
            reg.SetMetricSamplingPercentage(pct, self.seed)
            if mask is not None:
                reg.SetMetricFixedMask(mask)
            reg.SetShrinkFactorsPerLevel([shrink])
            reg.SetSmoothingSigmasPerLevel([sigma])
            reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
            reg.SetOptimizerAsRegularStepGradientDescent(
                learningRate=level_mm,
                minStep=0.01 * level_mm,
                numberOfIterations=self.iterations,
                relaxationFactor=0.8,
                gradientMagnitudeTolerance=1e-8,
            )
            reg.SetOptimizerScalesFromPhysicalShift()
            reg.SetInitialTransform(tx, inPlace=True)
            s0 = time.perf_counter()
            reg.Execute(fixed, moving_sitk)
            levels.append(
                {
                    "level_mm": level_mm,
                    "smoothing_mm": sigma,
                    "sampling": round(pct, 4),
                    "metric": float(reg.GetMetricValue()),
                    "iterations": int(reg.GetOptimizerIteration()),
                    "stop": reg.GetOptimizerStopConditionDescription(),
                    "seconds": round(time.perf_counter() - s0, 3),
                }
            )
        transform = _ras_from_sitk(tx)
        stage = {
            "name": f"mutual information ({'affine' if dof == 12 else 'rigid'}, dof {dof})",
            "metric": levels[-1]["metric"],
            "levels": levels,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        log.info(
            "stage %s: metric %.4f, iterations per level %s, %.1f s",
            stage["name"],
            stage["metric"],
            [lv["iterations"] for lv in levels],
            stage["seconds"],
        )
        return transform, stage


# -- SimpleITK helpers (ITK works in LPS; a transform maps fixed points to moving points)
def _to_sitk(img: nib.Nifti1Image):
    import SimpleITK as sitk

    affine = np.asarray(img.affine, float)
    zooms = voxel_sizes(affine)
    direction = (_LPS[:3, :3] @ affine[:3, :3]) / zooms
    data = np.asanyarray(img.dataobj, dtype=np.float32)
    out = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    out.SetSpacing(zooms.tolist())
    out.SetOrigin((_LPS[:3, :3] @ affine[:3, 3]).tolist())
    out.SetDirection(direction.ravel().tolist())
    return out


def _ras_from_sitk(tx) -> np.ndarray:
    """4×4 RAS matrix of a SimpleITK matrix-offset transform (fixed → moving)."""
    m = np.asarray(tx.GetMatrix(), float).reshape(3, 3)
    c = np.asarray(tx.GetCenter(), float)
    t = np.asarray(tx.GetTranslation(), float)
    lps = np.eye(4)
    lps[:3, :3] = m
    lps[:3, 3] = t + c - m @ c
    return _LPS @ lps @ _LPS


def _set_sitk_from_ras(tx, ras: np.ndarray, centre_ras: np.ndarray) -> None:
    """Set a SimpleITK matrix-offset transform to the RAS matrix ``ras``, rotating about ``centre_ras``."""
    lps = _LPS @ np.asarray(ras, float) @ _LPS
    c = _LPS[:3, :3] @ np.asarray(centre_ras, float)
    m, b = lps[:3, :3], lps[:3, 3]
    tx.SetCenter(c.tolist())
    tx.SetMatrix(m.ravel().tolist())
    tx.SetTranslation((b - c + m @ c).tolist())


def _centre_of_mass_world(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    data = np.clip(np.asarray(data, np.float32), 0, None)
    if float(data.sum()) <= 0:
        ijk = (np.asarray(data.shape[:3]) - 1) / 2.0
    else:
        ijk = np.asarray(ndimage.center_of_mass(data))
    return (np.asarray(affine) @ np.r_[ijk, 1.0])[:3]


def _moments_translation(ref_data, ref_affine, mov_data, mov_affine) -> np.ndarray:
    """Translation that maps the reference centre of mass onto the moving one (reference → moving)."""
    out = np.eye(4)
    out[:3, 3] = _centre_of_mass_world(mov_data, mov_affine) - _centre_of_mass_world(ref_data, ref_affine)
    return out


def _isotropic(
    img: nib.Nifti1Image, mask: np.ndarray | None, spacing: float, *, order: int = 1
) -> tuple[nib.Nifti1Image, np.ndarray | None]:
    """``img`` (and its mask) on an isotropic grid of ``spacing`` mm in its own orientation and extent."""
    affine = np.asarray(img.affine, float)
    zooms = voxel_sizes(affine)
    extent = np.asarray(img.shape[:3]) * zooms
    shape = tuple(int(s) for s in np.maximum(np.ceil(extent / spacing - 1e-6), 1))
    new = affine.copy()
    new[:3, :3] = affine[:3, :3] / zooms * spacing
    # Same field-of-view centre.
    centre = affine @ np.r_[(np.asarray(img.shape[:3]) - 1) / 2.0, 1.0]
    new[:3, 3] = centre[:3] - new[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    data = resample(img, shape, new, np.eye(4), order=order)
    out_mask = None
    if mask is not None:
        out_mask = resample(
            nib.Nifti1Image(np.asarray(mask, np.float32), affine), shape, new, np.eye(4), order=0
        )
    return nib.Nifti1Image(data, new), out_mask


# ----------------------------------------------------------------------------------------------- quality
def masked_nmi(a: np.ndarray, b: np.ndarray, mask: np.ndarray, bins: int = 32) -> float:
    """Normalised mutual information (H(a)+H(b))/H(a,b) of two images inside ``mask`` (1 = independent, 2 =
    identical up to a relabelling). Backend-independent quality number for the provenance."""
    m = np.asarray(mask) > 0.5
    if m.sum() < 10:
        return float("nan")
    hist, _, _ = np.histogram2d(np.asarray(a)[m], np.asarray(b)[m], bins=bins)
    p = hist / hist.sum()
    px, py = p.sum(1), p.sum(0)

    def entropy(q):
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())

    return (entropy(px) + entropy(py)) / max(entropy(p.ravel()), 1e-12)


# ----------------------------------------------------------------------------------------------- high level
def register_images(
    moving: nib.Nifti1Image,
    reference: nib.Nifti1Image,
    *,
    dof: int = 12,
    backend: str | Backend = "auto",
    reference_mask: np.ndarray | None = None,
    reference_head_mask: np.ndarray | None = None,
    mask_dilation_mm: float = 8.0,
    initial: np.ndarray | None = None,
) -> Registration:
    """Estimate the transform reference world → moving world (in memory).

    ``reference_mask`` (e.g. the atlas brain mask, on the reference grid) restricts the similarity measure,
    after growing it by ``mask_dilation_mm`` so that the brain edge is inside; ``reference_head_mask`` (head
    with skull) enables the coarse head-outline first stage.
    """
    engine = select_backend(backend) if isinstance(backend, str) else backend
    mask = None
    if reference_mask is not None:
        mask = dilate_mask(_on_grid(reference_mask, reference), reference.affine, mask_dilation_mm)
    head = None if reference_head_mask is None else _on_grid(reference_head_mask, reference) > 0.5
    return engine.register(
        moving, reference, dof=dof, reference_mask=mask, reference_head_mask=head, initial=initial
    )


def _on_grid(mask: np.ndarray | nib.Nifti1Image, reference: nib.Nifti1Image) -> np.ndarray:
    """A mask array on the reference grid (an image on another grid is resampled, nearest neighbour)."""
    if isinstance(mask, nib.spatialimages.SpatialImage):
        if mask.shape[:3] == reference.shape[:3] and np.allclose(mask.affine, reference.affine, atol=1e-3):
            return np.asanyarray(mask.dataobj, dtype=np.float32)
        return resample(mask, reference.shape, reference.affine, np.eye(4), order=0)
    mask = np.asarray(mask, dtype=np.float32)
    if mask.shape[:3] != reference.shape[:3]:
        raise InputError(f"mask shape {mask.shape} differs from the reference grid {reference.shape}")
    return mask


def transform_path_for(out: Path | str) -> Path:
    """Where the transform of an output image is written: ``O`` with ``_xfm.txt`` (``x.nii.gz`` → ``x_xfm.txt``)."""
    out = Path(out)
    stem = out.name
    for suffix in (".nii.gz", ".nii", ".mnc.gz", ".mnc"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return out.with_name(f"{stem}_xfm.txt")


def register_to_reference(
    moving: Path,
    reference: Path,
    out: Path,
    *,
    dof: int = 12,
    backend: str = "auto",
    reference_mask: Path | None = None,
    reference_head_mask: Path | None = None,
    order: int = 3,
    subject: str | None = None,
) -> tuple[Path, Path, str]:
    """Register ``moving`` to ``reference`` and write it resampled on the reference grid.

    Writes ``out`` (float32) and the transform beside it (:func:`transform_path_for`). Returns
    ``(out, transform_path, backend_name)``.
    """
    engine = select_backend(backend)
    mov = load_image(moving, subject=subject)
    ref = load_image(reference, subject=subject)
    masks = {}
    for key, path in (("reference_mask", reference_mask), ("reference_head_mask", reference_head_mask)):
        if path is not None:
            masks[key] = load_image(path, subject=subject)
    result = register_images(mov, ref, dof=dof, backend=engine, **masks)
    data = engine.resample(mov, ref.shape, ref.affine, result.transform, order=order)
    save_image(data, ref.affine, out)
    xfm = save_transform(
        result.transform,
        transform_path_for(out),
        note=f"moving: {moving}\nreference: {reference}\nbackend: {engine.name}, dof {dof}",
    )
    log.info("registered %s to %s with %s in %.1f s", moving, reference, engine.name, result.seconds)
    return Path(out), xfm, engine.name


def register_subject(
    t1: Path,
    others: Mapping[str, tuple[Path, Path]],
    atlas,
    out_images: Mapping[str, Path],
    out_transforms: Mapping[str, Path],
    *,
    backend: str | Backend = "auto",
    order: int = 3,
    subject: str | None = None,
    mask_dilation_mm: float = 8.0,
) -> dict:
    """All of one subject's sequences onto the atlas grid, each interpolated once.

    * T1 → atlas: 12 DOF, with the head-outline first stage and MI restricted to the dilated atlas brain mask;
    * each channel in ``others`` (name → (image to resample, image used to estimate the alignment), e.g.
      ``"ADC": (adc, b0)``) → native T1: rigid (6 DOF), started from the scanner's world alignment;
    * channel ``c`` is pulled onto the atlas grid by ``R_c @ A_t1``.

    ``out_images`` must name ``"T1"`` and every channel of ``others``; ``out_transforms`` likewise: ``"T1"``
    gets ``A_t1`` (atlas → T1 world), a channel gets the composed atlas → channel-world transform, the one used
    to resample it. Returns a provenance dict: backend, per-stage metric values and timings, transforms, and
    the normalised mutual information of the resampled T1 and the atlas T1 in the atlas brain mask.
    """
    t_start = time.perf_counter()
    names = ["T1", *others]
    for mapping, what in ((out_images, "out_images"), (out_transforms, "out_transforms")):
        missing = [n for n in names if n not in mapping]
        if missing:
            raise InputError(f"{what} lacks {missing}", subject=subject)
    engine = select_backend(backend) if isinstance(backend, str) else backend
    atlas_img = nib.Nifti1Image(np.asarray(atlas.t1, np.float32), atlas.affine)
    t1_img = load_image(t1, subject=subject)

    t1_reg = register_images(
        t1_img,
        atlas_img,
        dof=12,
        backend=engine,
        reference_mask=atlas.brain_mask,
        reference_head_mask=atlas.head_mask,
        mask_dilation_mm=mask_dilation_mm,
    )
    a_t1 = t1_reg.transform
    provenance: dict = {
        "backend": engine.name,
        "atlas_shape": list(atlas.shape),
        "atlas_voxel_mm": atlas.voxel_mm,
        "interpolation_order": order,
        "channels": {"T1": {"registration": t1_reg.summary(), "source": str(t1)}},
    }
    t0 = time.perf_counter()
    t1_atlas = engine.resample(t1_img, atlas.shape, atlas.affine, a_t1, order=order)
    save_image(t1_atlas, atlas.affine, out_images["T1"])
    save_transform(a_t1, out_transforms["T1"], note=f"moving: {t1} (T1)\nreference: atlas grid")
    provenance["channels"]["T1"]["resample_seconds"] = round(time.perf_counter() - t0, 3)
    provenance["nmi_t1_atlas"] = masked_nmi(t1_atlas, atlas.t1, atlas.brain_mask)

    for name, (image, estimate_from) in others.items():
        img = load_image(image, subject=subject)
        est = img if Path(estimate_from) == Path(image) else load_image(estimate_from, subject=subject)
        rigid = engine.register(est, t1_img, dof=6, initial=np.eye(4))
        composed = rigid.transform @ a_t1
        t0 = time.perf_counter()
        data = engine.resample(img, atlas.shape, atlas.affine, composed, order=order)
        save_image(data, atlas.affine, out_images[name])
        save_transform(
            composed,
            out_transforms[name],
            note=f"moving: {image} ({name}); composed rigid {name}->T1 and affine T1->atlas\n"
            f"rigid T1 world -> {name} world: {np.round(rigid.transform, 6).tolist()}",
        )
        provenance["channels"][name] = {
            "registration": rigid.summary(),
            "source": str(image),
            "estimated_from": str(estimate_from),
            "composed_transform": np.round(composed, 8).tolist(),
            "resample_seconds": round(time.perf_counter() - t0, 3),
        }
    provenance["seconds"] = round(time.perf_counter() - t_start, 3)
    log.info("subject %s registered with %s in %.1f s", subject or t1, engine.name, provenance["seconds"])
    return provenance


# ----------------------------------------------------------------------------------------------- CLI
def add_register_command(subparsers: argparse._SubParsersAction) -> None:
    """``virtual-contrast register``: one image onto a reference grid, transform written beside it."""
    p = subparsers.add_parser(
        "register",
        help="register an image to a reference (12-DOF affine or 6-DOF rigid) and resample it once",
        description="Writes OUT (MOVING resampled on REFERENCE's grid) and OUT's stem + '_xfm.txt' "
        "(4x4 world RAS matrix mapping reference points to moving points).",
    )
    p.add_argument("--moving", required=True, type=Path, help="image to register")
    p.add_argument("--reference", required=True, type=Path, help="fixed image (e.g. the atlas T1)")
    p.add_argument("--out", required=True, type=Path, help="output image on the reference grid")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="default: auto")
    p.add_argument("--dof", type=int, choices=(6, 12), default=12, help="default: 12")
    p.add_argument("--reference-mask", type=Path, help="brain mask restricting the similarity measure")
    p.add_argument(
        "--reference-head-mask", type=Path, help="head mask (with skull): adds a head-outline first stage"
    )
    p.add_argument("--order", type=int, choices=(0, 1, 3), default=3, help="spline order (default: 3)")
    p.add_argument("--threads", type=int, help="threads for the embedded backend (reproducibility)")
    p.set_defaults(func=_register_cmd)


def _register_cmd(args: argparse.Namespace) -> int:
    if args.threads:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(args.threads))
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    out, xfm, name = register_to_reference(
        args.moving,
        args.reference,
        args.out,
        dof=args.dof,
        backend=args.backend,
        reference_mask=args.reference_mask,
        reference_head_mask=args.reference_head_mask,
        order=args.order,
    )
    print(f"{out}\n{xfm}\nbackend: {name}")
    return 0
