"""What every registration backend shares: the :class:`Registration` it returns and the :class:`Backend`
protocol it follows (images in memory, transforms in the convention of
:mod:`virtual_contrast.preprocess.transforms`: reference world → moving world, RAS mm)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import nibabel as nib
import numpy as np


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
    """What a registration backend provides (images in memory, transforms in our convention).

    ``reference_mask`` restricts the similarity measure (on the reference grid). ``moving_outline`` (on the
    moving grid) and ``reference_outline`` (on the reference grid), the two brain masks, start a 12-DOF
    registration from the match of their outlines when no ``initial`` transform is given.
    """

    name: str

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
    ) -> Registration: ...

    def resample(
        self,
        moving: nib.Nifti1Image,
        ref_shape: tuple[int, ...],
        ref_affine: np.ndarray,
        transform: np.ndarray,
        order: int = 3,
    ) -> np.ndarray: ...
