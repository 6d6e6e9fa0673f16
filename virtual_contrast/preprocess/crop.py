"""Crop (or zero-pad) atlas-space images to the network's input shape.

Every subject is already on the atlas grid, so one crop serves them all: the box of ``shape`` voxels centred on
the bounding box of the *atlas* brain mask (:func:`crop_start_for_mask`). This is what the paper does
implicitly (160×192×160 at 1 mm around the ICBM brain), and it keeps all subjects on one shared grid, so a
prediction lands voxel-for-voxel on its reference. Centring on each subject's own mask would give every subject
a different grid for no benefit. Where the box leaves the image, it is padded with zeros; the affine is shifted
so that every voxel keeps its world position.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from virtual_contrast.io import InputError, load_image, save_image

log = logging.getLogger(__name__)

PAPER_SHAPE = (160, 192, 160)


def crop_start_for_mask(mask: np.ndarray, shape: Sequence[int]) -> tuple[int, int, int]:
    """First voxel of a ``shape`` box centred on the bounding box of ``mask`` (may be negative: padding)."""
    idx = np.argwhere(np.asarray(mask) > 0)
    if idx.size == 0:
        raise InputError("the reference brain mask is empty")
    centre = (idx.min(axis=0) + idx.max(axis=0)) / 2.0
    return _start_for_centre(centre, shape)


def crop_or_pad(
    data: np.ndarray,
    affine: np.ndarray,
    shape: Sequence[int] = PAPER_SHAPE,
    centre: Sequence[float] | None = None,
    *,
    start: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Crop or zero-pad the first three axes of ``data`` to ``shape``; returns (data, shifted affine).

    The box is placed by ``start`` (its first voxel, e.g. from :func:`crop_start_for_mask`), or centred on
    the voxel coordinate ``centre``, or, with neither, on the centre of the grid. Trailing axes (channels)
    are kept.
    """
    data = np.asarray(data)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive integers, got {shape}")
    if data.ndim < 3:
        raise ValueError(f"expected at least 3 dimensions, got shape {data.shape}")
    if start is not None and centre is not None:
        raise ValueError("give either start or centre, not both")
    if start is None:
        if centre is None:
            centre = (np.asarray(data.shape[:3]) - 1) / 2.0
        start = _start_for_centre(centre, shape)
    start = np.asarray(start, dtype=int)

    out = np.zeros(shape + data.shape[3:], dtype=data.dtype)
    src, dst = [], []
    for axis in range(3):
        lo = max(start[axis], 0)
        hi = min(start[axis] + shape[axis], data.shape[axis])
        if hi <= lo:  # the box misses the image on this axis: all padding
            return out, _shifted_affine(affine, start)
        src.append(slice(lo, hi))
        dst.append(slice(lo - start[axis], hi - start[axis]))
    out[tuple(dst)] = data[tuple(src)]
    return out, _shifted_affine(affine, start)


def crop_images(
    inputs: Mapping[str, Path | str],
    outputs: Mapping[str, Path | str],
    shape: Sequence[int] = PAPER_SHAPE,
    atlas_brain_mask: Path | str | None = None,
    *,
    subject: str | None = None,
) -> dict:
    """Crop every ``inputs[key]`` to ``outputs[key]`` with the one box of :func:`crop_start_for_mask`.

    All inputs must lie on the grid of ``atlas_brain_mask`` (the atlas grid: same shape and affine); without a
    mask the box is centred on the grid of the first input. Keys ending in ``mask`` are written as uint8,
    the others as float32. Returns a provenance dict (start voxel, shape, fraction of the atlas brain kept).
    """
    if set(inputs) != set(outputs):
        raise ValueError(
            f"inputs and outputs must have the same keys: {sorted(inputs)} vs {sorted(outputs)}"
        )
    if not inputs:
        raise ValueError("nothing to crop")
    shape = tuple(int(s) for s in shape)
    images = {key: load_image(path, subject=subject) for key, path in inputs.items()}
    provenance: dict = {"shape": list(shape)}
    if atlas_brain_mask is not None:
        ref = load_image(atlas_brain_mask, subject=subject)
        ref_data = np.asanyarray(ref.dataobj) > 0.5
        try:
            start = crop_start_for_mask(ref_data, shape)
        except InputError as exc:
            raise InputError(str(exc), subject=subject, path=atlas_brain_mask) from exc
        ref_shape, ref_affine = ref.shape, ref.affine
        provenance["reference_mask"] = str(atlas_brain_mask)
    else:
        first = next(iter(images.values()))
        ref_shape, ref_affine, ref_data = first.shape, first.affine, None
        start = _start_for_centre((np.asarray(ref_shape) - 1) / 2.0, shape)
    for key, img in images.items():
        if img.shape != ref_shape or not np.allclose(img.affine, ref_affine, atol=1e-3):
            raise InputError(
                f"not on the atlas grid (shape {img.shape} vs {ref_shape}); crop runs after registration",
                subject=subject,
                path=inputs[key],
            )
    provenance["start"] = [int(s) for s in start]
    if ref_data is not None:
        kept, _ = crop_or_pad(ref_data.astype(np.uint8), ref_affine, shape, start=start)
        provenance["brain_fraction_kept"] = float(kept.sum() / max(ref_data.sum(), 1))
        if provenance["brain_fraction_kept"] < 0.999:
            log.warning(
                "the crop %s cuts %.1f %% of the atlas brain",
                shape,
                100 * (1 - provenance["brain_fraction_kept"]),
            )
    for key, img in images.items():
        cropped, affine = crop_or_pad(np.asanyarray(img.dataobj), img.affine, shape, start=start)
        dtype = np.uint8 if key.endswith("mask") else np.float32
        save_image(cropped, affine, outputs[key], dtype=dtype)
    log.info(
        "%scropped %d images to %s from voxel %s",
        f"{subject}: " if subject else "",
        len(images),
        shape,
        provenance["start"],
    )
    return provenance


def _start_for_centre(centre: Sequence[float], shape: Sequence[int]) -> tuple[int, int, int]:
    # A box [start, start + n) has its centre at start + (n - 1) / 2; round half up, deterministically.
    start = np.floor(np.asarray(centre, dtype=float) - (np.asarray(shape) - 1) / 2.0 + 0.5)
    return tuple(int(s) for s in start)  # type: ignore[return-value]


def _shifted_affine(affine: np.ndarray, start: np.ndarray) -> np.ndarray:
    new = np.array(affine, dtype=np.float64, copy=True)
    new[:3, 3] = affine[:3, :3] @ np.asarray(start, dtype=np.float64) + affine[:3, 3]
    return new
