"""An enhancing lesion of the cohort: its ellipsoid in subject space, the extended Tofts parameters that give
the agent's concentration in it over the exam (:mod:`virtual_contrast.cohort.kinetics`), and its growth between
visits. Where lesions lie in a patient is :mod:`virtual_contrast.cohort.anatomy`'s."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from virtual_contrast.cohort import kinetics


@dataclass(frozen=True)
class Lesion:
    """One enhancing lesion in subject space (mm around the head centre), before any growth."""

    lesion_id: int
    kind: str  # nodule | ring
    centre: np.ndarray
    axes: np.ndarray  # 3x3, columns are the ellipsoid's axes
    radii: np.ndarray  # semi-axes (mm); their geometric mean is diameter/2
    wall_mm: float  # enhancing wall of a ring
    oedema_mm: float  # reach of the oedema beyond the lesion
    vp: float  # plasma volume fraction of the enhancing tumour (extended Tofts model)
    ktrans: float  # transfer constant, /min
    ve: float  # extravascular extracellular volume fraction

    def concentration_mm(self, timeline: kinetics.Timeline, t_min: float) -> float:
        """Agent in the enhancing tumour (mM) at ``t_min`` minutes after the first injection."""
        return kinetics.tissue_mm(timeline, t_min, vp=self.vp, ktrans=self.ktrans, ve=self.ve)

    @property
    def diameter_mm(self) -> float:
        return float(2 * np.prod(self.radii) ** (1 / 3))

    def grown(self, factor: float) -> Lesion:
        return Lesion(
            self.lesion_id,
            self.kind,
            self.centre,
            self.axes,
            self.radii * factor,
            self.wall_mm,
            self.oedema_mm * factor,
            self.vp,
            self.ktrans,
            self.ve,
        )
