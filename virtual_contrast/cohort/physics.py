"""Tissue properties at 3 T, the contrast agent, the sequences of the protocol and their signal equations.

Everything here is a number from the literature or a closed-form signal model; the simulation
(:mod:`virtual_contrast.cohort.acquisition`) turns compartment fractions into images with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# --- Tissue properties at 3 T ---------------------------------------------------------------------------------
# T1 and T2 of WM and GM: Wansapura et al., JMRI 1999;9:531-538 (3 T: WM T1 832 ms, T2 80 ms; GM T1 1331 ms,
# T2 110 ms). CSF T1 about 4.3 s at 3 T (Rooney et al., MRM 2007;57:308-318); CSF T2 is long (> 1 s; its exact
# value hardly matters: nulled on FLAIR, bright on b0). Blood T1 1664 ms at Hct 0.42 (Lu et al., MRM
# 2004;52:679-682). Fat and muscle: Gold et al., AJR 2004;183:343-351 (subcutaneous fat T1 371 ms, T2 133 ms;
# muscle T1 1420 ms, T2 32 ms). Proton densities relative to CSF from brain water content (WM ~0.70, GM ~0.82;
# e.g. Neeb et al., NeuroImage 2006;31:1156-1168). ADC: free water at 37 C ~3.0e-3 mm2/s; normal GM ~0.8e-3 and
# WM ~0.7e-3 mm2/s (Helenius et al., AJNR 2002;23:194-199). Lesion values are typical, not cited measurements:
# vasogenic oedema has longer T1 and T2 and a raised ADC; cellular enhancing tumour restricts diffusion
# (ADC ~0.65e-3); necrosis has long T1/T2 and a higher ADC. Cortical bone has T2* < 1 ms: dark everywhere.


@dataclass(frozen=True)
class Tissue:
    """Relaxation (s), proton density (relative to CSF), ADC (mm2/s) and the EPI fat-suppression factor."""

    t1: float
    t2: float
    pd: float
    adc: float
    dwi_scale: float = 1.0


TISSUES: dict[str, Tissue] = {
    "csf": Tissue(4.3, 2.0, 1.00, 3.0e-3),
    "gm": Tissue(1.331, 0.110, 0.82, 0.80e-3),
    "wm": Tissue(0.832, 0.080, 0.70, 0.70e-3),
    "oedema": Tissue(1.25, 0.180, 0.86, 1.4e-3),
    "tumour": Tissue(1.40, 0.110, 0.85, 0.65e-3),
    "necrosis": Tissue(2.50, 0.300, 0.95, 1.6e-3),
    "blood": Tissue(1.664, 0.120, 0.87, 3.0e-3),
    "fat": Tissue(0.371, 0.133, 0.90, 0.02e-3, dwi_scale=0.05),
    "muscle": Tissue(1.42, 0.032, 0.75, 1.5e-3),
    "bone": Tissue(0.25, 0.0005, 0.15, 0.3e-3),
    "marrow": Tissue(0.40, 0.100, 0.70, 0.05e-3, dwi_scale=0.05),
}
COMPARTMENTS = tuple(TISSUES)

# --- Contrast agent -----------------------------------------------------------------------------------------
#: Longitudinal and transverse relaxivity (/mM/s) of a gadobutrol-like macrocyclic agent at 3 T, 37 C: r1 is 4.97
#: in human plasma and 3.47 in whole blood (Szomolanyi et al., Invest Radiol 2019;54:559-564); 4 is the middle
#: value. (The paper injected gadoterate: r1 3.00 in plasma, 2.72 in blood at 3 T, same source.)
R1_RELAXIVITY = 4.0
R2_RELAXIVITY = 5.0
HEMATOCRIT = 0.42
#: Concentration in each compartment per unit plasma concentration (the plasma curve over the exam is in
#: :mod:`virtual_contrast.cohort.kinetics`). Normal brain keeps the agent in its blood volume (CBV ~4 % GM, ~2 % WM;
#: Leenders et al., Brain 1990;113:27-47) and, water exchanging fast, the whole voxel relaxes with the mean
#: concentration; extracellular tissues (muscle, scalp) take up their ECV. The tumour's concentration follows
#: the extended Tofts model with kinetic parameters drawn per lesion (see :class:`~virtual_contrast.cohort.lesions.Lesion`).
UPTAKE: dict[str, float] = {
    "csf": 0.0,
    "gm": 0.04 * (1 - HEMATOCRIT),
    "wm": 0.02 * (1 - HEMATOCRIT),
    "oedema": 0.02 * (1 - HEMATOCRIT),
    "tumour": 0.0,  # per lesion: kinetics.tissue_mm
    "necrosis": 0.03,
    "blood": 1 - HEMATOCRIT,
    "fat": 0.03,
    "muscle": 0.12,
    "bone": 0.0,
    "marrow": 0.05,
}

# --- Sequences (3 T protocol) ---------------------------------------------------------------------------------
T1W = {"tr": 0.008, "te": 0.003, "flip_deg": 12.0}  # 3D spoiled gradient echo
FLAIR = {"tr": 9.0, "te": 0.120}  # 2D inversion recovery; TI nulls CSF (see flair_ti)
T2W = {
    "tr": 5.0,
    "te": 0.100,
}  # 2D turbo spin echo, before the injection (as in BraTS-style protocols)
DWI = {"tr": 5.0, "te": 0.080}  # spin-echo EPI, fat suppressed
#: b-values (s/mm2), b = 0 volumes interleaved as scanners do (readers must use the .bval, not the order).
DWI_BVALS = (0, 1000, 1000, 1000, 0, 1000, 1000, 1000)
DWI_DIRECTIONS = np.array(
    [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]], dtype=float
) / np.sqrt([[1], [1], [1], [2], [2], [2]])
#: Noise standard deviation relative to the WM signal of each sequence (SNR of WM 40, 30, 25 on b0), per
#: native voxel; each series draws its own.
NOISE = {"t1": 0.025, "flair": 0.033, "dwi": 0.04, "t2": 0.03}
#: Nominal WM signal in scanner units (int16 storage), times a per-exam gain of 0.8-1.25.
TARGET_WM = {"t1": 600.0, "flair": 400.0, "dwi": 300.0, "t2": 500.0}
FLAIR_SLICE_FACTOR = 2.0  # FLAIR (and T2) slice thickness / T1 voxel size
DWI_VOXEL_FACTOR = 2.0  # DWI voxel / T1 voxel


# --- Signal equations -------------------------------------------------------------------------------------------
def spgr_signal(pd, r1, r2s, *, tr: float, te: float, flip_deg: float):
    """Spoiled gradient echo (steady state): PD sin a (1 - E1) / (1 - cos a E1) exp(-TE R2*)."""
    a = np.deg2rad(flip_deg)
    e1 = np.exp(-tr * r1)
    return pd * np.sin(a) * (1 - e1) / (1 - np.cos(a) * e1) * np.exp(-te * r2s)


def flair_ti(t1_null: float = TISSUES["csf"].t1, *, tr: float = FLAIR["tr"]) -> float:
    """Inversion time that nulls a tissue of T1 ``t1_null``: 1 - 2 exp(-TI/T1) + exp(-TR/T1) = 0."""
    return float(t1_null * np.log(2.0 / (1.0 + np.exp(-tr / t1_null))))


def flair_signal(
    pd, r1, r2, *, tr: float = FLAIR["tr"], te: float = FLAIR["te"], ti: float | None = None
):
    """Magnitude inversion recovery: PD |1 - 2 exp(-TI R1) + exp(-TR R1)| exp(-TE R2)."""
    ti = flair_ti() if ti is None else ti
    return pd * np.abs(1 - 2 * np.exp(-ti * r1) + np.exp(-tr * r1)) * np.exp(-te * r2)


def t2_signal(pd, r1, r2, *, tr: float = T2W["tr"], te: float = T2W["te"]):
    """Spin echo: PD (1 - exp(-TR R1)) exp(-TE R2)."""
    return pd * (1 - np.exp(-tr * r1)) * np.exp(-te * r2)


def dwi_signal(pd, r1, r2, adc, b, *, tr: float = DWI["tr"], te: float = DWI["te"]):
    """Spin-echo EPI: PD (1 - exp(-TR R1)) exp(-TE R2) exp(-b ADC)."""
    return pd * (1 - np.exp(-tr * r1)) * np.exp(-te * r2) * np.exp(-b * adc)


def compartment_signals(plasma_mm: float) -> dict[str, np.ndarray]:
    """Signal of one unit of each compartment (except the per-lesion tumour uptake), per output."""
    out = {k: [] for k in ("t1", "flair", "t2", "b0", "b1000")}
    for name in COMPARTMENTS:
        t = TISSUES[name]
        c = UPTAKE[name] * plasma_mm
        out["t1"].append(
            spgr_signal(t.pd, 1 / t.t1 + R1_RELAXIVITY * c, 1 / t.t2 + R2_RELAXIVITY * c, **T1W)
        )
        out["flair"].append(flair_signal(t.pd, 1 / t.t1, 1 / t.t2))
        out["t2"].append(t2_signal(t.pd, 1 / t.t1, 1 / t.t2))
        out["b0"].append(t.dwi_scale * dwi_signal(t.pd, 1 / t.t1, 1 / t.t2, t.adc, 0.0))
        out["b1000"].append(t.dwi_scale * dwi_signal(t.pd, 1 / t.t1, 1 / t.t2, t.adc, 1000.0))
    return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}


def reference_wm(kind: str) -> float:
    """Noise-free WM signal of a sequence without contrast (the scale of its gain and noise)."""
    wm = TISSUES["wm"]
    if kind == "t1":
        return float(spgr_signal(wm.pd, 1 / wm.t1, 1 / wm.t2, **T1W))
    if kind == "flair":
        return float(flair_signal(wm.pd, 1 / wm.t1, 1 / wm.t2))
    if kind == "t2":
        return float(t2_signal(wm.pd, 1 / wm.t1, 1 / wm.t2))
    return float(dwi_signal(wm.pd, 1 / wm.t1, 1 / wm.t2, wm.adc, 0.0))
