"""Bring an atlas-space image (the vir-T1c prediction) back to the subject's native low-dose T1c grid.

Radiologists read vir-T1c beside the acquired series, so it is resampled once (cubic spline) through the
inverse of the registration: the low-dose T1c's transform maps atlas points to its native world, so its inverse
pulls atlas-space values onto native voxels. Then, in this order:

1. clip to the prediction's own range (its minimum and maximum on the atlas grid, background 0 included): a
   cubic spline overshoots at the brain's edge and rings in the zero background around it;
2. map linearly, without clipping, so that 0 and 1 on the normalised scale (the 1st and 99th brain
   percentiles) land on the low-dose T1c's 1st and 99th brain percentiles (``intensity_range``): vir-T1c opens
   with a familiar window next to the acquired series (the full-dose intensity scale is unknown at prediction
   time: there is no full-dose scan), and its enhancement brighter than that 99th percentile stays brighter
   (before issue 25 step 1 clipped to [0, 1], which flattened every voxel above the low dose's 99th
   percentile);
3. add the native detail (:func:`native_detail`), when the native pre-contrast T1 is given (the workflow and
   ``virtual-contrast predict`` on a raw exam always give it): what is finer than the working grid, taken
   from the low-dose T1c itself, its enhancement scaled to the full dose to first order. The network sees the
   exam only as its grid keeps it: on the demo's 4 mm grid a ring-enhancing lesion's 2-3 mm wall is blurred
   to a fraction of its peak, so that the native vir-T1c of the demo's held-out patients drew their lesions
   ≥ 10 mm at 0.29 of the full dose's peak enhancement (0.24-0.61) without it, 0.95 (0.86-1.09) with it;
4. zero outside the native brain mask. The mask is the native T1's (from skull stripping), brought onto the
   low-dose grid through the rigid low-dose → T1 alignment of the registration; of it, the largest
   face-connected body is kept (resampling a mask onto thick slices can split off single voxels at its
   edge).

The detail is the low dose's own (its noise, at its level, included) wherever nothing enhances; only the part
judged to be contrast is scaled, after an adaptive Wiener filter has taken most of its noise off where it is
flat (scaling the raw difference made the inside of enhancing lesions 4-5 times as noisy as the full dose).
What it relies on: the rigid alignment of the pre-contrast T1 with the low dose. Where they are misaligned at
a sharp edge, the difference looks like a thin enhancement and is scaled too (in a synthetic exam, a 0.5 mm
shift at a step of 150 brightened the edge's 99th percentile by about 90); on the demo's exams no such rims
were seen. A guard was tried and not kept: taking off the difference that a shift of the T1 within 0.5 mm
explains (linear interpolation's bound) removed the rim of a 0.5 mm shift in that exam, but also the walls of
the demo's ring lesions, which border a core darker than white matter on the T1 (their peaks fell from
0.92-1.30 of the full dose's to 0.54-0.65, before the Wiener filter). The uncertainty map stays the network's
(at the working grid): it says nothing of the detail.

Before (a ``data > 0`` test after the resampling), the spline's ringing in the background passed the test and
was mapped to the low end of the range: thousands of isolated voxels around every native vir-T1c.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from virtual_contrast.io import InputError, load_image, save_image
from virtual_contrast.preprocess.enhancement import (
    enhancement_evidence,
    local_wiener,
    match_intensities,
)
from virtual_contrast.preprocess.transforms import (
    carry_mask,
    load_transform,
    resample,
    resample_to_native,
)

log = logging.getLogger(__name__)

#: Full dose / quarter dose − 1: to first order (relaxation rate linear in the agent's concentration,
#: 0.1 / 0.025 mmol/kg) a full dose enhances four times as much as a quarter dose. The native detail's
#: enhancement is scaled by it (:func:`native_detail`); the network's own enhancement output starts from the
#: same first-order guess.
DETAIL_ENHANCEMENT_GAIN = 3.0


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest face-connected (6-neighbour) component of a boolean mask."""
    labels, n = ndimage.label(np.asarray(mask, bool))
    if n <= 1:
        return labels > 0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def native_brain_mask(
    t1_mask: Path | str,
    t1_transform: Path | str,
    low_transform: Path | str,
    native_reference: Path | str,
    *,
    subject: str | None = None,
) -> np.ndarray:
    """The native T1's brain mask on the low-dose T1c's grid (bool, one face-connected body).

    ``t1_transform`` (atlas → T1 world, ``A``) and ``low_transform`` (atlas → low-dose world, ``R @ A``) are the
    files the registration wrote; low-dose world → T1 world is therefore ``A @ (R @ A)⁻¹``.
    """
    mask = load_image(t1_mask, subject=subject)
    low = load_image(native_reference, subject=subject)
    a_t1 = load_transform(t1_transform, subject=subject)
    a_low = load_transform(low_transform, subject=subject)
    on_low = carry_mask(mask, low.shape, low.affine, a_t1 @ np.linalg.inv(a_low))
    if not on_low.any():
        raise InputError(
            "the T1's brain mask does not reach the low-dose T1c's field of view",
            subject=subject,
            path=native_reference,
        )
    return largest_component(on_low)


@dataclass(frozen=True)
class NativeGrid:
    """Where an atlas-space image of one subject goes back to: the native low-dose T1c (its grid and affine),
    the atlas world → low-dose world transform, the native brain mask on that grid (:func:`native_brain_mask`)
    and the low-dose T1c's normalisation range (its 1st and 99th brain percentiles). Built once per subject by
    :func:`native_grid`, used by vir-T1c and its uncertainty map alike."""

    reference: nib.Nifti1Image
    transform: np.ndarray
    brain: np.ndarray
    intensity_range: tuple[float, float]
    subject: str | None = None
    #: The native pre-contrast T1 on the same grid (rigid low-dose → T1 alignment, cubic spline), when given:
    #: vir-T1c then gets the native detail (:func:`native_detail`).
    precontrast: np.ndarray | None = None


def native_grid(
    native_reference: Path | str,
    low_transform: Path | str,
    *,
    t1_mask: Path | str,
    t1_transform: Path | str,
    intensity_range: tuple[float, float],
    subject: str | None = None,
    t1: Path | str | None = None,
) -> NativeGrid:
    """:class:`NativeGrid` from the files the registration and skull stripping wrote: ``low_transform`` maps
    atlas world → low-dose world and ``t1_transform`` atlas world → T1 world; ``t1_mask`` is the native T1's
    brain mask; ``intensity_range`` the low-dose T1c's normalisation range; ``t1`` the native pre-contrast T1
    (for the native detail; without it vir-T1c is the prediction alone, at the working grid's resolution)."""
    lo, hi = (float(v) for v in intensity_range)
    if not hi > lo:
        raise InputError(f"empty intensity range [{lo:g}, {hi:g}]", subject=subject)
    reference = load_image(native_reference, subject=subject)
    to_low = load_transform(low_transform, subject=subject)
    precontrast = None
    if t1 is not None:  # inside the brain (the T1's own mask) the T1 has data
        low_to_t1 = load_transform(t1_transform, subject=subject) @ np.linalg.inv(to_low)
        t1_img = load_image(t1, subject=subject)
        precontrast = resample(t1_img, reference.shape, reference.affine, low_to_t1, order=3)
    return NativeGrid(
        reference=reference,
        transform=to_low,
        brain=native_brain_mask(
            t1_mask, t1_transform, low_transform, native_reference, subject=subject
        ),
        intensity_range=(lo, hi),
        subject=subject,
        precontrast=precontrast,
    )


def through_grid(
    data: np.ndarray, grid: NativeGrid, atlas_shape: tuple[int, ...], atlas_affine: np.ndarray
) -> np.ndarray:
    """A native image (on ``grid``) brought onto the working grid as the registration brings the low-dose
    T1c (cubic spline, anti-aliased) and back as vir-T1c comes (cubic spline): what of it the working grid
    keeps."""
    native = nib.Nifti1Image(np.asarray(data, np.float32), grid.reference.affine)
    coarse = resample(native, atlas_shape, atlas_affine, grid.transform, order=3)
    return resample_to_native(
        nib.Nifti1Image(coarse, atlas_affine), grid.reference, grid.transform, order=3
    )


def native_detail(
    grid: NativeGrid, atlas_shape: tuple[int, ...], atlas_affine: np.ndarray
) -> tuple[np.ndarray, dict]:
    """The detail finer than the working grid that vir-T1c gets on the native grid: that of the low-dose T1c,
    its enhancement scaled to the full dose to first order (:data:`DETAIL_ENHANCEMENT_GAIN`).

    The low dose's enhancement is ``low − (a T1 + b)`` (the line fitted robustly over the brain, the enhancing
    voxels its outliers: :func:`~virtual_contrast.preprocess.enhancement.match_intensities`), weighted by the
    probability that it is contrast rather than noise
    (:func:`~virtual_contrast.preprocess.enhancement.enhancement_evidence`), so that noise is not scaled as if
    it were contrast (a misalignment of the two series at a sharp edge can be: module docstring), and freed of
    its noise where it is flat by an adaptive Wiener filter
    (:func:`~virtual_contrast.preprocess.enhancement.local_wiener`), so that the noise inside an enhancing
    lesion is not scaled with its contrast while a ring's thin wall keeps its peak. The detail is
    ``s − through_grid(s)`` of ``s = low + gain × enhancement`` (zero outside the brain): where the network
    sees a lesion only as the working grid keeps it (a 4 mm grid blurs a 10 mm lesion's peak to 0.4-0.9 of
    itself), the peak comes back as the low dose draws it, four times as bright in its enhancement. Returns the
    detail (0 outside the brain) and what was measured.
    """
    if grid.precontrast is None:
        raise ValueError("the native detail needs the native pre-contrast T1 (native_grid(t1=...))")
    brain = grid.brain
    low = np.asanyarray(grid.reference.dataobj, dtype=np.float32)
    match = match_intensities(grid.precontrast, low, brain)
    delta = np.where(brain, low - match.apply(grid.precontrast), 0.0).astype(np.float32)
    probability, _ = enhancement_evidence(delta, brain)
    # The difference's noise is not scaled with its contrast: denoised where it is flat, kept where a wall or
    # an edge makes it vary more than the noise (before, the raw difference was scaled: 4-5 times one
    # acquisition's noise inside every enhancing lesion, a speckle the full dose does not have).
    denoised, difference_noise = local_wiener(delta, brain)
    enhancement = probability * np.maximum(denoised, 0.0)
    source = np.where(brain, low + DETAIL_ENHANCEMENT_GAIN * enhancement, 0.0)
    detail = np.where(brain, source - through_grid(source, grid, atlas_shape, atlas_affine), 0.0)
    measured = {
        "intensity_match": match.summary(),
        "enhancing_voxels": int((probability > 0.5).sum()),
        "gain": DETAIL_ENHANCEMENT_GAIN,
        "difference_noise": round(difference_noise, 4),
        "detail_std": round(float(detail[brain].std()), 4),
    }
    return detail.astype(np.float32), measured


def prediction_to_native(prediction: Path | str, grid: NativeGrid, out: Path | str) -> Path:
    """Write ``prediction`` (atlas space, normalised scale) on the native grid: see the module docstring."""
    lo, hi = grid.intensity_range
    pred = load_image(prediction, subject=grid.subject)
    atlas = np.asanyarray(pred.dataobj)
    bottom, top = min(float(atlas.min()), 0.0), float(atlas.max())
    data = np.clip(resample_to_native(pred, grid.reference, grid.transform, order=3), bottom, top)
    native = lo + data * (hi - lo)
    if grid.precontrast is not None:
        detail, measured = native_detail(grid, pred.shape, pred.affine)
        # The detail's dips stop at the bottom of the prediction's own range (above 0: a magnitude image is not
        # negative, and vir-T1c is non-zero exactly inside the brain).
        floor = max(lo + bottom * (hi - lo), 1e-3 * (hi - lo))
        native = np.maximum(native + detail, floor)
        log.info(
            "vir-T1c's native detail (the low-dose T1c's, its enhancement x%g): intensity match %s, %d "
            "enhancing voxels, the difference's noise %g (Wiener-filtered before it is scaled), detail std %g",
            1 + measured["gain"],
            measured["intensity_match"],
            measured["enhancing_voxels"],
            measured["difference_noise"],
            measured["detail_std"],
        )
    else:
        log.info(
            "vir-T1c without native detail (no pre-contrast T1 given): the working grid's resolution"
        )
    out_data = np.where(grid.brain, native, 0.0).astype(np.float32)
    inside = out_data[grid.brain]
    log.info(
        "vir-T1c on the native grid %s: %d brain voxels, intensities in [%g, %g] (the low-dose T1c's 1st-99th "
        "brain percentiles: [%g, %g])",
        grid.reference.shape,
        int(grid.brain.sum()),
        float(inside.min()),
        float(inside.max()),
        lo,
        hi,
    )
    return save_image(out_data, grid.reference.affine, out)


def uncertainty_to_native(uncertainty: Path | str, grid: NativeGrid, out: Path | str) -> Path:
    """vir-T1c's uncertainty map (atlas space, an expected |error| in normalised units) on the native grid, in
    the native vir-T1c's intensity units: resampled linearly (a spread has no edges worth a spline's
    overshoot, and stays >= 0), scaled by the width of the intensity range (the factor that maps vir-T1c's
    normalised scale onto the native one, :func:`prediction_to_native`), zero outside the same brain mask."""
    lo, hi = grid.intensity_range
    image = load_image(uncertainty, subject=grid.subject)
    data = np.clip(resample_to_native(image, grid.reference, grid.transform, order=1), 0.0, None)
    out_data = np.where(grid.brain, data * (hi - lo), 0.0).astype(np.float32)
    return save_image(out_data, grid.reference.affine, out)


def export_native(
    prediction: Path | str,
    native_reference: Path | str,
    low_transform: Path | str,
    out: Path | str,
    *,
    t1_mask: Path | str,
    t1_transform: Path | str,
    intensity_range: tuple[float, float],
    subject: str | None = None,
    t1: Path | str | None = None,
) -> Path:
    """:func:`prediction_to_native` in one call, from the files (:func:`native_grid`; ``t1`` for the native
    detail)."""
    grid = native_grid(
        native_reference,
        low_transform,
        t1_mask=t1_mask,
        t1_transform=t1_transform,
        intensity_range=intensity_range,
        subject=subject,
        t1=t1,
    )
    return prediction_to_native(prediction, grid, out)
