"""The embedded registration backend: SimpleITK Mattes mutual information.

Stages, each recorded with its metric value and time (see :class:`SimpleITKBackend`):

1. start: a given matrix (rigid within-subject: the scanner's own world alignment), or the subject's brain
   mask matched to the atlas brain mask (brain outlines, 7 DOF; from the matched centres of mass and six
   starts rotated by 20 degrees, :data:`OUTLINE_START_ROTATIONS_DEG`), or the centres of mass;
2. for 12 DOF started from the centres of mass, a coarse search over head rotations (FLIRT's ``-searchr``
   idea) on an 8 mm grid (the outline match makes it unnecessary, see :meth:`SimpleITKBackend.register`);
3. multi-resolution Mattes MI restricted to the reference mask, random sampling with a fixed seed, from the
   searched start and (when the search rotated it) from the start before the search: the lower final metric
   wins (same samples, so the values compare).

Measured facts behind the choices are in the docstrings. ITK works in LPS and its transforms map fixed points
to moving points; :func:`_ras_from_sitk` converts with diag(-1, -1, 1) on both sides.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import nibabel as nib
import numpy as np
from scipy import ndimage

from virtual_contrast.io import InputError
from virtual_contrast.preprocess.registration.base import Registration
from virtual_contrast.preprocess.transforms import resample, voxel_sizes

log = logging.getLogger(__name__)
T = TypeVar("T")

# RAS <-> LPS (ITK's world) is a flip of the first two axes; it is its own inverse.
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Starts of the brain-outline match (rotations about the L-R, A-P and S-I axes, degrees, applied about the
#: brain's centre after the centres of mass are matched; which wins: :data:`OUTLINE_SWITCH_FRACTION`). When
#: the match compared every voxel, from the unrotated start alone one embedded-cohort head at 2.5 mm (vc011,
#: rotated by less than 15 degrees) ended 36 degrees off with a mask mismatch 70 times the others' (0.037 vs
#: 0.0004-0.0018); the quality gate passed it (correlation 0.44, brain Dice 0.87) and its lesions landed 24 mm
#: from where the atlas puts them. The sampled match (:meth:`SimpleITKBackend._outline_stage`) finds that
#: head's pose from the unrotated start; the rotated starts still bring back a head turned 70 degrees (a wrong
#: orientation in a file's header: tests/test_register.py), at 0.1-0.25 s each.
OUTLINE_START_ROTATIONS_DEG = (
    (0.0, 0.0, 0.0),
    *(
        tuple(sign * 20.0 if axis == i else 0.0 for i in range(3))
        for axis in range(3)
        for sign in (1.0, -1.0)
    ),
)
#: The rotated start with the lowest final metric replaces the unrotated one only when that metric is below
#: this fraction of the unrotated one's: starts that reach the same pose end within a factor of 1.6 of each
#: other (vc015 at 2.5 mm: 0.00041-0.00063). Comparing every voxel, one head of the demo cohort (2 mm) of 20
#: took a rotated start's pose (vc009: 0.0011 -> 0.00049) and three at 2.5 mm (vc011, vc009, vc018); with the
#: sampled match none does, and their final registrations moved by at most 0.05 mm.
OUTLINE_SWITCH_FRACTION = 0.5


def pyramid_levels(voxel_mm: float, *, coarsest_mm: float = 4.0) -> list[tuple[int, float]]:
    """(shrink factor, smoothing σ in mm) per level for a reference grid of ``voxel_mm``.

    The recipe measured on the 1 mm atlas (shrink 4/2/1, smoothing 2/1/0 mm) expressed in millimetres, so a
    coarser grid keeps only the levels that are not coarser than ``coarsest_mm``: 1 mm → 4/2/1, 2 mm → 2/1
    (4 and 2 mm), 3 or 4 mm → one level.
    """
    levels = [f for f in (4, 2, 1) if f <= 2 or f * voxel_mm <= coarsest_mm + 1e-6]
    return [(f, 0.5 * f * voxel_mm if f > 1 else 0.0) for f in levels]


@contextmanager
def itk_threads(threads: int | None) -> Iterator[None]:
    """ITK's global default number of threads set to ``threads`` for the duration (``None``: unchanged)."""
    import SimpleITK as sitk

    if threads is None:
        yield
        return
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(threads))
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


def _on_itk_threads(method: Callable[..., T]) -> Callable[..., T]:
    """A method of :class:`SimpleITKBackend` run within ``itk_threads(self.threads)``."""

    @functools.wraps(method)
    def on_threads(self, *args, **kwargs) -> T:
        with itk_threads(self.threads):
            return method(self, *args, **kwargs)

    return on_threads


class SimpleITKBackend:
    """Embedded backend: SimpleITK multi-resolution Mattes mutual information.

    Deterministic with one thread (the default): samples are drawn with a fixed ``seed``, and ITK runs on
    ``threads`` threads while the backend works (its global default, which every filter and metric follows;
    the registration method's own thread count does not reach them all). With more threads the metric's sums
    depend on how the threads were scheduled: the same registration of a cohort head, run again in a fresh
    process, moved by up to 2e-5 mm, and a statistic of nearly equal numbers computed downstream (the paired t
    of two AUCs that differ by 6e-5) by 5 %. ``threads=None`` leaves ITK's default (all cores) as it is.
    """

    name = "simpleitk"

    def __init__(
        self,
        *,
        seed: int = 20210901,
        threads: int | None = 1,
        sampling: float = 0.10,
        min_samples: int = 20_000,
        max_samples: int = 50_000,
        rigid_max_samples: int = 20_000,
        bins: int = 32,
        iterations: int = 200,
        rigid_finest_mm: float = 2.0,
        search: bool = True,
        search_mm: float = 8.0,
        search_keep: int = 6,
        search_min_points: int = 1000,
        outline_samples: int | None = 50_000,
    ):
        self.seed = seed
        self.threads = threads
        self.sampling = sampling
        self.min_samples = min_samples
        self.max_samples = max_samples
        self.rigid_max_samples = rigid_max_samples
        self.bins = bins
        self.iterations = iterations
        self.rigid_finest_mm = rigid_finest_mm
        self.search = search
        self.search_mm = search_mm
        self.search_keep = search_keep
        self.search_min_points = search_min_points
        self.outline_samples = outline_samples

    # -- public
    @_on_itk_threads
    def register(
        self,
        moving: nib.Nifti1Image,
        reference: nib.Nifti1Image,
        *,
        dof: int = 12,
        reference_mask: np.ndarray | None = None,
        moving_outline: np.ndarray | None = None,
        reference_outline: np.ndarray | None = None,
        initial: np.ndarray | None = None,
    ) -> Registration:
        """Estimate reference world → moving world; see :class:`~virtual_contrast.preprocess.registration.base.Backend`.
        ITK runs on ``threads`` threads meanwhile (:func:`itk_threads`).

        After an outline match the rotation search is skipped: brain to brain, the brain-mask match alone
        found the pose of BraTS-MET-00110 and TCGA-FG-6692 at 1 mm from a start rotated by (35°, 15°, −20°)
        and shifted by 44 mm (the same transform as with the search, in half the time).
        """
        if dof not in (6, 12):
            raise InputError(f"dof must be 6 (rigid) or 12 (affine), got {dof}")
        t0 = time.perf_counter()
        stages: list[dict] = []
        outlined = initial is None and moving_outline is not None and reference_outline is not None
        ref_data = np.asanyarray(reference.dataobj, dtype=np.float32)
        mov_data = np.asanyarray(moving.dataobj, dtype=np.float32)
        if initial is not None:
            init = np.asarray(initial, float)
            stages.append({"name": "initial", "source": "given"})
        elif outlined:
            init, stage = self._outline_stage(moving, moving_outline, reference, reference_outline)
            stages.append(stage)
        else:
            init = _moments_translation(ref_data, reference.affine, mov_data, moving.affine)
            stages.append({"name": "initial", "source": "centres of mass"})
        starts = [init]
        if dof == 12 and self.search and not outlined:
            searched, stage = self._search_stage(moving, reference, reference_mask, init)
            stages.append(stage)
            if stage.get("best_rotation_deg", [0, 0, 0]) != [0, 0, 0]:
                # The coarse grid's ranking does not always survive refinement (TCGA-FG-6692, 1 mm: the
                # searched start ended at MI -0.112 and brain Dice 0.910, the unrotated one at -0.116 and
                # 0.933), so both are refined and the better final metric wins.
                starts = [searched, init]
            else:
                starts = [searched]

        ref_img, ref_mask = reference, reference_mask
        ref_vox = voxel_sizes(reference.affine)
        finest = (
            float(ref_vox.min()) if dof == 12 else max(float(ref_vox.min()), self.rigid_finest_mm)
        )
        if dof == 6 or ref_vox.max() > 1.2 * ref_vox.min():
            # Shrink factors act on voxel indices, so an anisotropic (thick-slice) reference is first put on
            # an isotropic grid in its own orientation; rigid registration needs no more than ~2 mm.
            ref_img, ref_mask = _isotropic(reference, reference_mask, finest)
        mov_vox = voxel_sizes(moving.affine)
        if mov_vox.max() > 1.2 * mov_vox.min() or mov_vox.min() < 0.8 * finest:
            # Thick slices: with ITK's default moving-image gradient filter the optimiser climbed the metric
            # away from the right pose on TCGA-FG-6692 (0.9 x 0.9 x 5.5 mm). Taking gradients at the sample
            # points (see _method) fixed it, and so did an isotropic copy no finer than the finest level,
            # which also keeps each level's smoothing cheap; both are kept.
            moving, _ = _isotropic(moving, None, max(float(mov_vox.min()), finest))
        results = [
            self._mi_stage(moving, ref_img, ref_mask, dof=dof, initial=start) for start in starts
        ]
        best = min(range(len(results)), key=lambda i: results[i][1]["metric"])
        transform, stage = results[best]
        if len(results) > 1:
            stage["start"] = ["rotation search", "before the search"][best]
            stage["other_start_metric"] = results[1 - best][1]["metric"]
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
        # Image gradients at the sample points only: the default filters differentiate the whole (smoothed)
        # images at every level, 2.5 s of set-up per level on the 1 mm atlas against 0.4 s without.
        reg.SetMetricUseFixedImageGradientFilter(False)
        reg.SetMetricUseMovingImageGradientFilter(False)
        return reg

    def _outline_stage(
        self, moving, moving_outline, reference, reference_outline
    ) -> tuple[np.ndarray, dict]:
        """Coarse 7-DOF (similarity) match of the subject's brain mask to the reference brain mask.

        Mean squares between the two binary masks on a 4 mm grid: no intensities, so neither contrast nor a
        slab's field of view matters. The *subject* is the fixed image here: only points inside the fixed
        image are compared, so a slab that cuts the brain is not pulled towards the whole brain.
        """
        import SimpleITK as sitk

        t0 = time.perf_counter()
        spacing = max(4.0, float(voxel_sizes(reference.affine).min()))
        subject_mask = np.asarray(moving_outline) > 0.5
        if subject_mask.sum() < 10:
            raise InputError("the brain mask has fewer than 10 voxels")
        mask_img = nib.Nifti1Image(subject_mask.astype(np.float32), moving.affine)
        fixed_img, _ = _isotropic(mask_img, None, spacing, order=1)
        fixed = _to_sitk(fixed_img)
        ref_mask, _ = _isotropic(
            nib.Nifti1Image(np.asarray(reference_outline, np.float32), reference.affine),
            None,
            spacing,
        )
        moving_sitk = _to_sitk(ref_mask)
        # Initial: centres of mass of the two masks (subject world -> reference world).
        init = _moments_translation(
            np.asanyarray(fixed_img.dataobj),
            fixed_img.affine,
            np.asanyarray(ref_mask.dataobj),
            ref_mask.affine,
        )
        centre = _centre_of_mass_world(np.asanyarray(fixed_img.dataobj), fixed_img.affine)
        # Every voxel of a head's 4 mm grid (~180,000) made each of the seven starts about 0.6 s (two levels,
        # ~15 iterations each). A regular sample of ~50,000 points took the whole stage from 2.1-4.8 s to
        # 0.8-1.7 s per head, and every final registration (20 demo-cohort heads at 2 mm, 3 at 2.5 mm, the
        # three real heads) moved by at most 0.11 mm, brain Dice with the atlas within 0.0003.
        n_fixed = int(np.prod(fixed.GetSize()))
        fraction = 1.0 if self.outline_samples is None else min(1.0, self.outline_samples / n_fixed)
        runs = []
        for rotation_deg in OUTLINE_START_ROTATIONS_DEG:
            tx = sitk.Similarity3DTransform()
            _set_sitk_from_ras(tx, init @ _rotation_about(rotation_deg, centre), centre)
            reg = self._method()
            reg.SetMetricAsMeanSquares()
            if fraction < 1.0:
                # The same regular grid of points (fixed seed) for every start, so the final metrics compare.
                reg.SetMetricSamplingStrategy(reg.REGULAR)
                reg.SetMetricSamplingPercentage(fraction, self.seed)
            else:
                reg.SetMetricSamplingStrategy(reg.NONE)
            reg.SetShrinkFactorsPerLevel([2, 1])
            reg.SetSmoothingSigmasPerLevel([2.0 * spacing, spacing])
            reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
            reg.SetOptimizerAsRegularStepGradientDescent(
                learningRate=4.0,
                minStep=0.05,
                numberOfIterations=self.iterations,
                relaxationFactor=0.6,
                gradientMagnitudeTolerance=1e-12,
            )
            reg.SetOptimizerScalesFromPhysicalShift()
            reg.SetInitialTransform(tx, inPlace=True)
            reg.Execute(fixed, moving_sitk)
            runs.append((float(reg.GetMetricValue()), rotation_deg, reg, _ras_from_sitk(tx)))
        best = min(runs, key=lambda run: run[0])
        if best[0] >= OUTLINE_SWITCH_FRACTION * runs[0][0]:
            best = runs[0]  # the same pose within the optimiser's noise: keep the unrotated start's
        metric, rotation_deg, reg, subject_to_ref = best
        stage = {
            "name": "brain outline (similarity, mean squares of the brain masks)",
            "metric": metric,
            "start_rotation_deg": list(rotation_deg),
            "start_metrics": [round(run[0], 5) for run in runs],
            "iterations": int(reg.GetOptimizerIteration()),
            "stop": reg.GetOptimizerStopConditionDescription(),
            "brain_voxels": int(subject_mask.sum()),
            "sampling": round(fraction, 4),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        log.info(
            "stage brain outline: metric %.4f, %d iterations, from the start rotated by %s deg (of %d)",
            stage["metric"],
            stage["iterations"],
            list(rotation_deg),
            len(runs),
        )
        return np.linalg.inv(subject_to_ref), stage

    def _search_stage(self, moving, reference, reference_mask, initial) -> tuple[np.ndarray, dict]:
        """Coarse search over head rotations, as FLIRT's ``-searchr``, before the fine optimisation.

        Clinical heads are often pitched by 20-30° (chin to chest: TCGA-FG-6692 is) and a thick slab cuts the
        head, so neither the centres of mass nor the head outline fix the rotation well, and mutual
        information started far off stops in a wrong basin: on TCGA-FG-6692 from the centres of mass alone
        the brain Dice was 0.85 (1 mm atlas), with the search 0.91, with the head outline 0.93.
        On an ``search_mm`` grid, the metric is evaluated for rotations about the reference mask's centre
        (pitch ±30°, roll and yaw ±10°, 10° steps); the best ``search_keep`` starts, and the unrotated one,
        are each optimised briefly (12 DOF) and the best final metric wins.
        """
        import SimpleITK as sitk

        t0 = time.perf_counter()
        spacing = max(self.search_mm, 2.0 * float(voxel_sizes(reference.affine).min()))
        fixed_img, fixed_mask = _isotropic(reference, reference_mask, spacing)
        n_points = (
            int((fixed_mask > 0.5).sum())
            if fixed_mask is not None
            else int(np.prod(fixed_img.shape))
        )
        if n_points < self.search_min_points:
            # A field of view of a few search voxels (a small test image) gives no usable histogram.
            log.info("rotation search skipped: %d points on the %g mm grid", n_points, spacing)
            return initial, {
                "name": "rotation search (skipped: image too small)",
                "points": n_points,
            }
        moving_img, _ = _isotropic(moving, None, spacing / 2.0)
        fixed = _to_sitk(fixed_img)
        moving_sitk = _to_sitk(moving_img)
        mask = None
        if fixed_mask is not None:
            binary = (fixed_mask > 0.5).astype(np.float32)
            mask = sitk.Cast(_to_sitk(nib.Nifti1Image(binary, fixed_img.affine)), sitk.sitkUInt8)
            centre = _centre_of_mass_world(binary, fixed_img.affine)
        else:
            centre = _centre_of_mass_world(np.asanyarray(fixed_img.dataobj), fixed_img.affine)

        def method():
            reg = self._method()
            reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=self.bins)
            reg.SetMetricSamplingStrategy(reg.NONE)
            if mask is not None:
                reg.SetMetricFixedMask(mask)
            return reg

        # Ranking the starts needs only the metric, so it is computed here in NumPy (a plain joint histogram
        # over the mask's voxels): SimpleITK's MetricEvaluate re-initialises its pipeline at every call
        # (~0.13 s each, against ~2 ms here).
        evaluate = _histogram_mi_scorer(fixed_img, fixed_mask, moving_img, self.bins)

        candidates = []
        for angles in itertools.product(range(-30, 31, 10), (-10, 0, 10), (-10, 0, 10)):
            matrix = initial @ _rotation_about(angles, centre)
            candidates.append((evaluate(matrix), angles, matrix))
        candidates.sort(key=lambda c: c[0])
        starts = candidates[: self.search_keep]
        if not any(c[1] == (0, 0, 0) for c in starts):
            starts.append(next(c for c in candidates if c[1] == (0, 0, 0)))
        best = None
        for value, angles, matrix in starts:
            reg = method()
            reg.SetOptimizerAsRegularStepGradientDescent(
                learningRate=spacing,
                minStep=0.05 * spacing,
                numberOfIterations=100,
                relaxationFactor=0.8,
                gradientMagnitudeTolerance=1e-8,
            )
            reg.SetOptimizerScalesFromPhysicalShift()
            tx = sitk.AffineTransform(3)
            _set_sitk_from_ras(tx, matrix, centre)
            reg.SetInitialTransform(tx, inPlace=True)
            try:
                reg.Execute(fixed, moving_sitk)
            except RuntimeError as exc:
                log.debug("search start %s failed: %s", angles, exc)
                continue
            final = float(reg.GetMetricValue())
            log.debug("search start %s: metric %.4f -> %.4f", angles, value, final)
            if best is None or final < best[0]:
                best = (final, angles, _ras_from_sitk(tx), value)
        if best is None:
            raise InputError("coarse rotation search failed: the images do not overlap")
        stage = {
            "name": f"rotation search ({spacing:g} mm grid, {len(candidates)} rotations)",
            "metric": best[0],
            "best_rotation_deg": list(best[1]),
            "metric_before_optimisation": best[3],
            "metric_unrotated_start": next(c[0] for c in candidates if c[1] == (0, 0, 0)),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        log.info(
            "stage rotation search: best start %s°, metric %.4f, %.1f s",
            stage["best_rotation_deg"],
            stage["metric"],
            stage["seconds"],
        )
        return best[2], stage

    def _mi_stage(
        self, moving, reference, reference_mask, *, dof, initial
    ) -> tuple[np.ndarray, dict]:
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
            # ~10 % random samples, but at least ``min_samples`` (a coarse level has few voxels) and at most
            # ``max_samples`` (the cost per iteration is proportional to the samples; on the 1 mm atlas 50 000
            # gave the same known-affine error as 230 000, 0.03 mm, in a third of the time). Six parameters
            # need fewer: 20 000 moved within-subject rigid results by < 0.1 mm against 50 000.
            level_voxels = max(n_mask / shrink**3, 1.0)
            cap = self.max_samples if dof == 12 else self.rigid_max_samples
            wanted = float(np.clip(self.sampling * level_voxels, min(self.min_samples, cap), cap))
            pct = float(np.clip(wanted / level_voxels, 0.001, 1.0))
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


def _rotation_about(angles_deg: tuple[float, float, float], centre_ras: np.ndarray) -> np.ndarray:
    """4×4 RAS matrix of the rotation by Euler angles (x, y, z; degrees) about ``centre_ras``."""
    from scipy.spatial.transform import Rotation

    rotation, to_centre, from_centre = np.eye(4), np.eye(4), np.eye(4)
    rotation[:3, :3] = Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix()
    to_centre[:3, 3], from_centre[:3, 3] = centre_ras, -np.asarray(centre_ras, float)
    return to_centre @ rotation @ from_centre


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
    out[:3, 3] = _centre_of_mass_world(mov_data, mov_affine) - _centre_of_mass_world(
        ref_data, ref_affine
    )
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


def _histogram_mi_scorer(fixed_img, fixed_mask, moving_img, bins: int):
    """A function matrix → −MI (lower is better) of the two images over the fixed mask's voxels.

    Starts that leave less than half of the mask inside the moving field of view score +inf.
    """
    fixed = np.asanyarray(fixed_img.dataobj, dtype=np.float32)
    sel = (fixed_mask > 0.5) if fixed_mask is not None else np.ones(fixed.shape, bool)
    ijk = np.argwhere(sel)
    points = fixed_img.affine @ np.c_[ijk, np.ones(len(ijk))].T
    fixed_bins = _to_bins(fixed[sel], bins)
    moving = np.asanyarray(moving_img.dataobj, dtype=np.float32)
    lo, hi = float(moving.min()), float(moving.max())
    world_to_moving = np.linalg.inv(moving_img.affine)
    shape = np.asarray(moving.shape)[:, None]

    def score(matrix: np.ndarray) -> float:
        coords = (world_to_moving @ matrix @ points)[:3]
        inside = np.all((coords >= -0.5) & (coords <= shape - 0.5), axis=0)
        if inside.sum() < 0.5 * len(inside):
            return float("inf")
        values = ndimage.map_coordinates(moving, coords[:, inside], order=1, mode="nearest")
        moving_bins = np.clip(((values - lo) / max(hi - lo, 1e-12) * bins).astype(int), 0, bins - 1)
        joint = np.bincount(fixed_bins[inside] * bins + moving_bins, minlength=bins * bins)
        p = joint.reshape(bins, bins) / inside.sum()
        px, py = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
        nz = p > 0
        return -float((p[nz] * np.log(p[nz] / (px @ py)[nz])).sum())

    return score


def _to_bins(values: np.ndarray, bins: int) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    return np.clip(((values - lo) / max(hi - lo, 1e-12) * bins).astype(int), 0, bins - 1)
