"""Intensity normalisation of the pre-processed images: the 1st/99th brain percentiles mapped linearly to 0 and 1,
without the paper's clip (:mod:`virtual_contrast.intensity` says why), file by file."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from virtual_contrast.intensity import brain_range, normalize
from virtual_contrast.io import InputError, load_image, save_image

log = logging.getLogger(__name__)


def normalize_image(
    image: Path | str,
    mask: Path | str,
    out: Path | str,
    *,
    low: float = 1.0,
    high: float = 99.0,
    subject: str | None = None,
) -> dict:
    """File version of :func:`normalize`; returns the percentile values used (provenance)."""
    img = load_image(image, subject=subject)
    mask_img = load_image(mask, subject=subject)
    data = np.asanyarray(img.dataobj)
    brain = np.asanyarray(mask_img.dataobj) > 0.5
    if brain.shape != data.shape or not np.allclose(img.affine, mask_img.affine, atol=1e-3):
        raise InputError(
            f"the mask (shape {brain.shape}) is not on the image grid (shape {data.shape})",
            subject=subject,
            path=mask,
        )
    if not brain.any():  # the mask's fault, not the image's: name the mask
        raise InputError("the brain mask is empty (no voxel above 0.5)", subject=subject, path=mask)
    try:
        lo, hi = brain_range(data, brain, low, high)
    except InputError as exc:
        raise InputError(str(exc), subject=subject, path=image) from exc
    save_image(normalize(data, brain, low, high), img.affine, out)
    log.info(
        "%snormalised %s: [%g, %g] (percentiles %g, %g) -> [0, 1], not clipped",
        f"{subject}: " if subject else "",
        Path(image).name,
        lo,
        hi,
        low,
        high,
    )
    return {
        "low_percentile": low,
        "high_percentile": high,
        "low_value": float(lo),
        "high_value": float(hi),
    }


def normalize_images(
    images: dict[str, Path | str],
    mask: Path | str,
    outputs: dict[str, Path | str],
    *,
    percentiles: tuple[float, float],
    subject: str | None = None,
) -> dict[str, dict]:
    """:func:`normalize_image` for every channel of one subject, with the one percentile pair of the
    pre-processing options; returns each channel's provenance (the values the percentiles took)."""
    low, high = percentiles
    return {
        name: normalize_image(path, mask, outputs[name], low=low, high=high, subject=subject)
        for name, path in images.items()
    }
