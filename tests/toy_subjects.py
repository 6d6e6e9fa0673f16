"""Toy normalised subjects with a known input → target mapping, for tests and benchmarks (benchmarks/train.py).

Each channel is smooth random texture in [0, 1] inside an ellipsoidal "brain", zero outside; the target is a
fixed, mildly non-linear voxel-wise function of the inputs (T1 plus amplified low-dose enhancement), so a small
UNet can learn it in a few dozen steps and the mapping is exactly flip-equivariant.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from virtual_contrast.io import save_image
from virtual_contrast.model.config import DEFAULT_CHANNELS
from virtual_contrast.model.data import TARGET, SubjectVolumes, mask_filename, norm_filename


def toy_target(inputs: dict[str, np.ndarray], mask: np.ndarray) -> np.ndarray:
    """The toy 'full-dose' image: T1 plus the low-dose enhancement over T1, amplified 2.5×, in [0, 1]."""
    t1 = inputs.get("T1w", np.zeros_like(mask))
    low = inputs.get("lowT1c", np.zeros_like(mask))
    return np.clip(0.6 * t1 + 2.5 * np.clip(low - t1, 0, None) ** 1.2, 0, 1) * mask


def make_toy_subjects(
    folder: Path | str,
    n: int,
    shape: Sequence[int] = (16, 16, 16),
    *,
    seed: int = 0,
    channels: Sequence[str] = DEFAULT_CHANNELS,
    voxel_mm: float = 1.0,
    compress: bool = True,
    prefix: str = "toy",
) -> list[SubjectVolumes]:
    """Write ``n`` toy subjects as ``sub-{prefix}{i:02d}_desc-norm_{channel}.nii(.gz)`` plus masks."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    ext = ".nii.gz" if compress else ".nii"
    out = []
    for i in range(n):
        subject = f"{prefix}{i:02d}"
        radii = rng.uniform(0.75, 0.95, size=3)
        mask = (((grid / radii[:, None, None, None]) ** 2).sum(0) <= 1).astype(np.float32)
        inputs = {}
        for ch in ("ADC", "FLAIR", "T1w", "lowT1c"):
            field = gaussian_filter(
                rng.standard_normal(shape), sigma=min(3.0, max(1.0, min(shape) / 12))
            )
            field = (field - field.min()) / (np.ptp(field) + 1e-8)
            inputs[ch] = (field * mask).astype(np.float32)
        target = toy_target(inputs, mask)

        def path(name: str) -> Path:
            return folder / name.replace(".nii.gz", ext)

        paths = {}
        for ch in channels:
            paths[ch] = save_image(inputs[ch], affine, path(norm_filename(subject, ch)))
        tpath = save_image(target, affine, path(norm_filename(subject, TARGET)))
        mpath = save_image(mask, affine, path(mask_filename(subject)), dtype=np.uint8)
        out.append(SubjectVolumes(subject=subject, channels=paths, target=tpath, mask=mpath))
    return out
