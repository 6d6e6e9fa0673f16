"""Brain intensities mapped to [0, 1], as in the paper: clip at the 1st/99th percentiles, map linearly.

The percentiles are taken over brain voxels only (the mask), so the amount of background in the crop does not
move them. Voxels outside the brain are set to 0: they were already zeroed by the skull stripping, and 0 is
also where the lowest brain intensity maps, so the network sees no step at the brain outline.

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
    """``data`` clipped to its [``low``, ``high``] percentiles over ``mask`` > 0, mapped to [0, 1], 0 outside.

    Raises :class:`InputError` as :func:`brain_range` does.
    """
    data = np.asarray(data, dtype=np.float32)
    lo, hi = brain_range(data, mask, low, high)
    # Clip after the mapping so that float32 rounding cannot leave [0, 1].
    out = np.clip((data - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0)
    out[~(np.asarray(mask) > 0)] = 0.0
    return out.astype(np.float32)
