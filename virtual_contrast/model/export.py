"""Bring a prediction from the cropped atlas grid back to the subject's native low-dose T1c grid.

Radiologists read vir-T1c beside the original series, so it is resampled (one cubic-spline interpolation)
through the inverse of the registration: the low-dose T1c's transform maps atlas points to its native world,
so its inverse pulls atlas-space values onto native voxels. The network works in [0, 1] units of the *normalised* full-dose T1c, whose
intensity scale is unknown at prediction time (there is no full-dose scan); the native-space image is mapped
linearly onto the low-dose T1c's own 1st–99th percentile brain range, so that it opens with a familiar
window next to the acquired series. The atlas-space prediction keeps the network's [0, 1] units.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from virtual_contrast.io import load_image, save_image
from virtual_contrast.preprocess.transforms import load_transform, resample_to_native

log = logging.getLogger(__name__)


def export_native(
    prediction: Path | str,
    native_reference: Path | str,
    transform: Path | str,
    out: Path | str,
    *,
    intensity_range: tuple[float, float] = (0.0, 1.0),
    subject: str | None = None,
) -> Path:
    """Resample ``prediction`` (atlas space, [0, 1]) onto ``native_reference``'s grid, rescaled to
    ``intensity_range`` (the low-dose T1c's normalisation range). ``transform`` maps atlas world → native
    world (as written by the ``register`` step for the low-dose T1c).
    """
    pred = load_image(prediction, subject=subject)
    native = load_image(native_reference, subject=subject)
    matrix = load_transform(transform, subject=subject)
    data = resample_to_native(pred, native, matrix, order=3)
    lo, hi = intensity_range
    out_data = np.where(data > 0, lo + np.clip(data, 0.0, 1.0) * (hi - lo), 0.0)
    log.info("vir-T1c on the native grid %s, intensities mapped to [%g, %g]", native.shape, lo, hi)
    return save_image(out_data.astype(np.float32), native.affine, out)
