"""Gadolinium concentrations over a dual-injection exam: plasma curve, tumour uptake, the series' timeline.

The paper's protocol (Ammari et al., Invest Radiol 2021): pre-contrast T1, FLAIR and DWI first; then
0.025 mmol/kg of gadoterate and the low-dose T1c; then 0.075 mmol/kg more and the reference T1c with identical
parameters, a median 6 min 5 s after the low-dose T1c (interquartile range 2 min 10 s). So the reference is not
the low-dose image with four times the agent: the first dose has partly washed out of the plasma and leaked
further into the tumour by the time the second one arrives.

* Plasma: the biexponential curve of Weinmann et al. (Physiol Chem Phys Med NMR 1984;16:167-172) as used in
  Tofts & Kermode (Magn Reson Med 1991;17:357-367), Cp(t) = D (a1 exp(-m1 t) + a2 exp(-m2 t)) per bolus of
  D mmol/kg, a1 = 3.99 kg/L, a2 = 4.78 kg/L, m1 = 0.144 /min, m2 = 0.0111 /min; boluses add linearly. At 3 min
  after 0.1 mmol/kg it gives 0.72 mM. A per-exam factor (0.75-1.25) stands for the patient's distribution volume
  and renal clearance.
* Tissue: the extended Tofts model (Tofts et al., JMRI 1999;10:223-232; Sourbron & Buckley, NMR Biomed
  2013;26:1004-1027), Ct(t) = vp Cp(t) + Ktrans (Cp * exp(-kep t)), kep = Ktrans / ve, which has a closed form
  for a biexponential Cp. Enhancing brain tumours: Ktrans 0.05-0.3 /min, ve 0.15-0.45, plasma volume
  0.02-0.06 (blood volume 3-10 %) in DCE studies of gliomas and metastases (e.g. the ranges reviewed by
  Sourbron & Buckley). Normal brain keeps the agent in its blood (intact blood-brain barrier): Ct = vp Cp.
* Timeline: each T1c is acquired 2-4 min after its injection (the time to start a 3D T1 after the bolus, to
  the centre of k-space), and the delay between the low-dose and the reference T1c follows the paper's median
  and interquartile range (a normal law with that median and IQR, clipped to 3-10 min), so the second bolus
  comes 2-4 min before the reference, at least 1 min after the low-dose series.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Biexponential plasma curve per mmol/kg: (amplitude kg/L, rate /min) pairs (Weinmann 1984, Tofts 1991).
WEINMANN = ((3.99, 0.144), (4.78, 0.0111))
FULL_DOSE_MMOL_KG = 0.1
LOW_DOSE_FRACTION = 0.25  # 0.025 mmol/kg first, then 0.075 mmol/kg: the paper's two injections
#: Delay between the low-dose and the reference T1c (min): the paper's median and interquartile range.
LOW_TO_REF_MIN = (6.08, 2.17)
LOW_TO_REF_RANGE_MIN = (3.0, 10.0)
#: Time from an injection to the centre of k-space of the T1c that follows it (min).
INJECTION_TO_T1C_MIN = (2.0, 4.0)
#: Per-exam scaling of the plasma curve (distribution volume, clearance).
PLASMA_SCALE = (0.75, 1.25)


@dataclass(frozen=True)
class Bolus:
    """One injection: dose (mmol/kg) at time ``t_min`` (minutes after the first injection)."""

    dose_mmol_kg: float
    t_min: float


@dataclass(frozen=True)
class Timeline:
    """The contrast events of one exam (minutes after the first injection) and its plasma scaling."""

    boluses: tuple[Bolus, ...]
    low_t1c_min: float
    ref_t1c_min: float
    plasma_scale: float

    def to_dict(self) -> dict:
        return {
            "injections": [
                {"dose_mmol_kg": b.dose_mmol_kg, "t_min": b.t_min} for b in self.boluses
            ],
            "low_t1c_min": self.low_t1c_min,
            "ref_t1c_min": self.ref_t1c_min,
            "plasma_scale": self.plasma_scale,
            "plasma_low_mM": plasma_mm(self, self.low_t1c_min),
            "plasma_ref_mM": plasma_mm(self, self.ref_t1c_min),
        }


def draw_timeline(rng: np.random.Generator) -> Timeline:
    """The paper's dual-injection exam with its delays drawn as the module docstring describes."""
    t_low = float(rng.uniform(*INJECTION_TO_T1C_MIN))
    median, iqr = LOW_TO_REF_MIN
    delay = float(np.clip(rng.normal(median, iqr / 1.349), *LOW_TO_REF_RANGE_MIN))
    to_ref = float(min(rng.uniform(*INJECTION_TO_T1C_MIN), delay - 1.0))
    t_ref = t_low + delay
    first = Bolus(FULL_DOSE_MMOL_KG * LOW_DOSE_FRACTION, 0.0)
    second = Bolus(FULL_DOSE_MMOL_KG * (1 - LOW_DOSE_FRACTION), t_ref - to_ref)
    return Timeline((first, second), t_low, t_ref, float(rng.uniform(*PLASMA_SCALE)))


def _after(boluses: Sequence[Bolus], t_min: float):
    """(dose, time since injection) of the boluses given before ``t_min``."""
    return [(b.dose_mmol_kg, t_min - b.t_min) for b in boluses if t_min > b.t_min]


def plasma_mm(timeline: Timeline, t_min: float) -> float:
    """Plasma concentration (mM) at ``t_min``: the sum of the boluses' biexponential curves."""
    total = 0.0
    for dose, tau in _after(timeline.boluses, t_min):
        total += dose * sum(a * np.exp(-m * tau) for a, m in WEINMANN)
    return float(timeline.plasma_scale * total)


def tissue_mm(timeline: Timeline, t_min: float, *, vp: float, ktrans: float, ve: float) -> float:
    """Extended Tofts tissue concentration (mM) at ``t_min``: vp Cp(t) + Ktrans (Cp * exp(-kep t))(t)."""
    kep = ktrans / ve
    leaked = 0.0
    for dose, tau in _after(timeline.boluses, t_min):
        for a, m in WEINMANN:
            # Convolution of a exp(-m t) with exp(-kep t): a (exp(-m tau) - exp(-kep tau)) / (kep - m).
            if abs(kep - m) < 1e-9:
                leaked += dose * a * tau * np.exp(-m * tau)
            else:
                leaked += dose * a * (np.exp(-m * tau) - np.exp(-kep * tau)) / (kep - m)
    return float(vp * plasma_mm(timeline, t_min) + timeline.plasma_scale * ktrans * leaked)
