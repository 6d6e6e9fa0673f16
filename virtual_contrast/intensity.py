"""Brain intensities on a common scale: the 1st and 99th brain percentiles mapped linearly to 0 and 1.

The paper clips each image at its 1st/99th percentiles before the map, so that every image lies in [0, 1]. Here
nothing is clipped (issue 25): the brightest percent of a contrast-enhanced T1 is its enhancing lesions and
vessels, and a clip at the 99th percentile flattens exactly them, in the network's inputs, in its target and so
in vir-T1c. On BraTS-MET-00110 the full-dose T1c's brain maximum lies at 2.7 on this scale (the quarter dose
simulated as T1 + 0.25 (T1c - T1): 1.8), its 99.99th percentile at 1.9. The map is the paper's on [0, 1]:
clipping the result to [0, 1] (:func:`paper_scale`) gives the paper's normalised image exactly, which is how the
voxel metrics stay comparable with the paper's Table 3 (:mod:`virtual_contrast.evaluate.metrics`).

The percentiles are taken over brain voxels only (the mask), so the amount of background in the crop does not
move them. Voxels outside the brain are set to 0: they were already zeroed by the skull stripping, and 0 is
also where the 1st brain percentile maps, so the network sees no step at the brain outline (the darkest percent
of the brain lies a little below 0).

Arrays only: the pre-processing applies it to files (:mod:`virtual_contrast.preprocess.normalize`) and the
evaluation to images that did not go through the pre-processing (:mod:`virtual_contrast.evaluate.metrics`),
without either importing the other.
"""

from __future__ import annotations

import numpy as np

from virtual_contrast.checks import check_percentiles
from virtual_contrast.io import InputError


def brain_range(
    data: np.ndarray, mask: np.ndarray, low: float = 1.0, high: float = 99.0
) -> tuple[float, float]:
    """The ``low`` and ``high`` percentiles of ``data`` over ``mask`` > 0, checked to span a range.

    Raises :class:`InputError` when the mask is empty or the brain intensities are constant (there is no
    range to map: a blank or corrupted image).
    """
    check_percentiles(low, high)
    data = np.asarray(data)
    brain = np.asarray(mask) > 0
    if brain.shape != data.shape:
        raise InputError(f"mask shape {brain.shape} differs from image shape {data.shape}")
    if not brain.any():
        raise InputError("the brain mask is empty")
    lo, hi = (float(v) for v in np.percentile(data[brain], [low, high]))
    if not hi > lo:
        raise InputError(
            f"the image is constant inside the brain mask ({lo:g} at both the {low:g}th and the "
            f"{high:g}th percentile): nothing to normalise"
        )
    return lo, hi


def normalize(
    data: np.ndarray, mask: np.ndarray, low: float = 1.0, high: float = 99.0
) -> np.ndarray:
    """``data`` mapped linearly so that its ``low`` and ``high`` percentiles over ``mask`` > 0 become 0 and 1,
    without clipping (see the module docstring); 0 outside the mask.

    Raises :class:`InputError` as :func:`brain_range` does.
    """
    data = np.asarray(data, dtype=np.float32)
    lo, hi = brain_range(data, mask, low, high)
    out = (data - np.float32(lo)) / np.float32(hi - lo)
    out[~(np.asarray(mask) > 0)] = 0.0
    return out.astype(np.float32)


def paper_scale(data: np.ndarray) -> np.ndarray:
    """A normalised image clipped to [0, 1]: the paper's normalisation (clip at the 1st/99th percentiles, map
    to [0, 1]) of the image that :func:`normalize` mapped without clipping."""
    return np.clip(np.asarray(data, dtype=np.float32), 0.0, 1.0)


#: Brain values that no normalised image reaches (the brightest enhancement of a full dose lies near 3): an image
#: beyond them is in scanner units, not normalised.
NORMALISED_LIMITS = (-5.0, 10.0)


def range_problem(values: np.ndarray) -> str | None:
    """Why brain ``values`` cannot be on the normalised scale (outside :data:`NORMALISED_LIMITS`), or None.

    A range test, as the paper's [0, 1] was: it refuses an image in scanner units (a T1 in the hundreds), not
    a raw ADC (mm²/s, below 0.004), whose channel the pre-processing computes itself. It must hold for a
    prediction too, which is on the normalised scale without having its 99th percentile exactly at 1."""
    values = np.asarray(values, dtype=np.float32)
    lo, hi = float(values.min()), float(values.max())
    if lo < NORMALISED_LIMITS[0] or hi > NORMALISED_LIMITS[1]:
        return (
            f"brain values span [{lo:.4g}, {hi:.4g}], beyond any normalised image "
            f"({NORMALISED_LIMITS[0]:g} to {NORMALISED_LIMITS[1]:g})"
        )
    return None
