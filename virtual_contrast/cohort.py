"""The embedded synthetic cohort: multi-sequence brain exams with enhancing lesions, in native scanner space.

Every exam is simulated from physics rather than painted: the atlas tissue maps (GM, WM, CSF) give each point of
the head a mixture of compartments with literature relaxation times, proton densities and diffusivities at 3 T,
and the signal equations of each sequence turn them into intensities:

* T1w, low-dose and full-dose T1c: 3D spoiled gradient echo, S = PD sin a (1 - E1) / (1 - cos a E1) exp(-TE R2*).
  Gadolinium shortens T1 through R1 = R1_0 + r1 C (and T2* through r2 C). The quarter dose (0.025 mmol/kg)
  enhances less than the full dose but more than a quarter as much, because the signal saturates as R1 grows:
  the physics, not a scale factor, relates the two images.
* FLAIR: inversion recovery whose TI nulls CSF, long TE: oedema (long T2) is bright, CSF is dark.
* DWI: spin-echo EPI with b = 0 and b = 1000 s/mm2, S = S0 exp(-b ADC) per compartment (fat suppressed).

The anatomy of each patient is the atlas bent by a smooth random deformation (a few mm) and scaled (head size);
each exam places the head in the scanner with a random rigid pose (rotations up to 15 deg, translations up to
20 mm) and images it on the grids of a real protocol: near-isotropic T1 (LAS, axis-aligned), FLAIR with thick
oblique slices, DWI at twice the T1 voxel, oblique. Lesions (nodules and necrotic rings of 2-30 mm) replace
brain tissue, leak contrast agent (so they enhance), restrict diffusion, and are surrounded by vasogenic oedema.
Skull (dark), diploe and scalp fat (bright on T1) surround the brain; the sagittal sinus and the choroid plexus
carry blood and enhance a little. A smooth multiplicative bias field and Rician noise finish each image, which
is stored as int16 in scanner-like units with its qform/sform.

Each T1 series is an acquisition of its own, as in the paper's protocol (pre-contrast T1, FLAIR and DWI; 0.025
mmol/kg and the low-dose T1c; 0.075 mmol/kg more and the reference T1c, a median 6 min later):

* its own head position: a rigid movement from the pre-contrast pose of about 1 mm and 1 deg (root mean square;
  the FLAIR and the DWI move the same way), simulated afresh, not resampled;
* its own noise, at the T1 sequence's SNR of 40 in white matter (:data:`NOISE`), and the same receive field,
  fixed in the scanner, through which the moved head passes;
* the agent's concentrations of its time (:mod:`virtual_contrast.kinetics`): plasma after the two boluses
  (Weinmann's biexponential curve) and, in each lesion, the extended Tofts model with its own Ktrans, ve and
  blood volume, so the tumour's low/full ratio is not the plasma's and varies from lesion to lesion.

Normal vessels (sinus, choroid plexus, cortical veins) are a small part of the brain mask (cortical veins
0.4 %, :data:`CORTICAL_VEIN_FRACTION`). With 1.2 % the 99th percentile of a full-dose brain sat on enhancing
blood while the low dose's sat on tissue, and after the percentile normalisation the two doses disagreed over
the whole brain (PSNR 21 dB at 1 mm against the paper's 27.4). Measured after the workflow's pre-processing at
1 mm (``benchmarks/cohort_fidelity.py``), low vs full now lands in the paper's band (README, "Embedded cohort").

Determinism: an exam depends only on (seed, subject id, session, parameters): each subject draws its random
numbers from ``SeedSequence([seed, *subject id bytes, stream])``, so adding patients never changes existing
ones, and the same seed gives byte-identical files.

Layout written by :func:`make_cohort` (BIDS-like)::

    participants.tsv     participant_id (sub-vc001), age, sex, weight_kg, indication, acquisition_date
                         (the date of the patient's first exam, YYYY-MM-DD)
    lesions.tsv          one row per true lesion and exam: subject (vc001), session ("" when the patient has a
                         single exam, else 01/02), lesion_id, x_mm y_mm z_mm (centre, world RAS mm of the
                         full-dose T1c; the other series' head positions differ by about 1 mm), long_axis_mm short_axis_mm (largest axial cross-section of the lesion
                         through its centre, as a RANO reader measures it), diameter_mm (equivalent sphere),
                         kind (nodule|ring), atlas_x_mm atlas_y_mm atlas_z_mm (centre in atlas space)
    sub-vc001/ses-01/anat/sub-vc001_ses-01_{T1w,FLAIR,ce-low_T1w,ce-full_T1w}.nii.gz (+ .json sidecars)
    sub-vc001/ses-01/dwi/sub-vc001_ses-01_dwi.{nii.gz,bval,bvec}    (ses-02 the same: a later visit)
    sub-vc001/sub-vc001_sessions.tsv    session_id, acquisition_date (patients with several visits only)
    sub-vc002/anat/sub-vc002_T1w.nii.gz ...   (patients with one exam: no session level)
    sub-vcm01/...        patients whose exam lacks one sequence (FLAIR first, then DWI, then low-dose T1c)
    derivatives/truth/sub-*/[ses-*/]anat/*_space-T1w_{dseg,desc-brain_mask,desc-lesions_dseg}.nii.gz
                         the true tissue classes (see ``DSEG_LABELS``), brain mask and lesion ids on the T1
                         grid (the pre-contrast T1's), and *_desc-truth.json (pose of each series, head
                         scaling, contrast timeline, plasma and lesion concentrations of each series)

The exams planned (who has a later visit, who lacks a sequence) are those of
:func:`virtual_contrast.workflow.plan_cohort`, so the tree equals what the workflow builds exam by exam with
:func:`make_exam`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial.transform import Rotation

from virtual_contrast import kinetics
from virtual_contrast.atlas import Atlas
from virtual_contrast.io import InputError, save_image, write_json, write_table, write_text

log = logging.getLogger(__name__)

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
#: :mod:`virtual_contrast.kinetics`). Normal brain keeps the agent in its blood volume (CBV ~4 % GM, ~2 % WM;
#: Leenders et al., Brain 1990;113:27-47) and, water exchanging fast, the whole voxel relaxes with the mean
#: concentration; extracellular tissues (muscle, scalp) take up their ECV. The tumour's concentration follows
#: the extended Tofts model with kinetic parameters drawn per lesion (see :class:`Lesion`).
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
DWI = {"tr": 5.0, "te": 0.080}  # spin-echo EPI, fat suppressed
#: b-values (s/mm2), b = 0 volumes interleaved as scanners do (readers must use the .bval, not the order).
DWI_BVALS = (0, 1000, 1000, 1000, 0, 1000, 1000, 1000)
DWI_DIRECTIONS = np.array(
    [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]], dtype=float
) / np.sqrt([[1], [1], [1], [2], [2], [2]])
#: Noise standard deviation relative to the WM signal of each sequence (SNR of WM 40, 30, 25 on b0), per
#: native voxel; each series draws its own.
NOISE = {"t1": 0.025, "flair": 0.033, "dwi": 0.04}
#: Nominal WM signal in scanner units (int16 storage), times a per-exam gain of 0.8-1.25.
TARGET_WM = {"t1": 600.0, "flair": 400.0, "dwi": 300.0}
FLAIR_SLICE_FACTOR = 2.0  # FLAIR slice thickness / T1 voxel size
DWI_VOXEL_FACTOR = 2.0  # DWI voxel / T1 voxel

# --- Anatomy and pose -----------------------------------------------------------------------------------------
SCALP_MM = 5.0  # outer layer of the head: scalp (fat and muscle)
RIM_MM = 2.0  # extra-axial CSF between brain and skull
SKULL_MAX_MM = 14.0  # beyond this distance from the brain (face, neck): soft tissue, not bone
MAX_ROTATION_DEG = (15.0, 8.0, 8.0)  # pitch (about L-R), roll, yaw of the head in the scanner
MAX_TRANSLATION_MM = 20.0
#: Head motion between two series of one exam: standard deviation per axis, so that the rotation and the
#: translation are about 1 deg and 1 mm (root mean square).
MOTION_DEG, MOTION_MM = 1 / np.sqrt(3), 1 / np.sqrt(3)
INDICATIONS = ("metastases", "glioma", "other")  # "other": no enhancing lesion (33 % in the paper)
FIRST_DATE, LAST_DATE = dt.date(2019, 11, 1), dt.date(2020, 2, 29)  # the paper's acquisition window
#: Labels of the truth tissue segmentation (derivatives/truth ..._dseg.nii.gz).
DSEG_LABELS = {
    0: "background",
    1: "CSF",
    2: "GM",
    3: "WM",
    4: "oedema",
    5: "enhancing tumour",
    6: "necrosis",
    7: "blood vessel",
    8: "extra-cerebral tissue (scalp, bone, fat, muscle, meningeal CSF)",
}
#: File suffix of each sequence key (the keys of the workflow's BIDS_FILES).
SEQUENCE_SUFFIX = {
    "t1": ("anat", "T1w"),
    "flair": ("anat", "FLAIR"),
    "low": ("anat", "ce-low_T1w"),
    "ref": ("anat", "ce-full_T1w"),
    "dwi": ("dwi", "dwi"),
}
LESION_COLUMNS = [
    "subject",
    "session",
    "lesion_id",
    "x_mm",
    "y_mm",
    "z_mm",
    "long_axis_mm",
    "short_axis_mm",
    "diameter_mm",
    "kind",
    "atlas_x_mm",
    "atlas_y_mm",
    "atlas_z_mm",
]
# Subject-space grids (warp, texture) cover [-136, 136] mm around the head centre.
_S_ORIGIN = -136.0
_WARP_SPACING, _TEXTURE_SPACING = 8.0, 3.0
_CHUNK = 600_000  # points simulated at once: keeps memory modest at 1 mm


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


def dwi_signal(pd, r1, r2, adc, b, *, tr: float = DWI["tr"], te: float = DWI["te"]):
    """Spin-echo EPI: PD (1 - exp(-TR R1)) exp(-TE R2) exp(-b ADC)."""
    return pd * (1 - np.exp(-tr * r1)) * np.exp(-te * r2) * np.exp(-b * adc)


def _compartment_signals(plasma_mm: float) -> dict[str, np.ndarray]:
    """Signal of one unit of each compartment (except the per-lesion tumour uptake), per output."""
    out = {k: [] for k in ("t1", "flair", "b0", "b1000")}
    for name in COMPARTMENTS:
        t = TISSUES[name]
        c = UPTAKE[name] * plasma_mm
        out["t1"].append(
            spgr_signal(t.pd, 1 / t.t1 + R1_RELAXIVITY * c, 1 / t.t2 + R2_RELAXIVITY * c, **T1W)
        )
        out["flair"].append(flair_signal(t.pd, 1 / t.t1, 1 / t.t2))
        out["b0"].append(t.dwi_scale * dwi_signal(t.pd, 1 / t.t1, 1 / t.t2, t.adc, 0.0))
        out["b1000"].append(t.dwi_scale * dwi_signal(t.pd, 1 / t.t1, 1 / t.t2, t.adc, 1000.0))
    return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}


def _reference_wm(kind: str) -> float:
    """Noise-free WM signal of a sequence without contrast (the scale of its gain and noise)."""
    wm = TISSUES["wm"]
    if kind == "t1":
        return float(spgr_signal(wm.pd, 1 / wm.t1, 1 / wm.t2, **T1W))
    if kind == "flair":
        return float(flair_signal(wm.pd, 1 / wm.t1, 1 / wm.t2))
    return float(dwi_signal(wm.pd, 1 / wm.t1, 1 / wm.t2, wm.adc, 0.0))


# --- The atlas as a head model (computed once per atlas) ---------------------------------------------------------
@dataclass(frozen=True)
class HeadModel:
    """Atlas-derived channels sampled by every exam, and where lesions may go.

    ``channels`` (6 volumes): GM, WM, CSF fractions of the brain, signed distance (mm) to the brain surface
    (positive outside), depth (mm) inside the head (negative outside), blood fraction (sinus, choroid plexus).
    """

    channels: tuple[np.ndarray, ...]
    affine: np.ndarray
    centre: np.ndarray  # atlas mm: the head's bounding-box centre (origin of subject space)
    surface: np.ndarray  # atlas mm of head-surface points (to fit each field of view)
    candidates: np.ndarray  # atlas mm of voxels where a lesion centre may lie
    depth_in_brain: np.ndarray  # mm from each candidate to the brain surface
    weights: np.ndarray  # preference of each candidate (grey-white junction)


def head_model(atlas: Atlas) -> HeadModel:
    """Prepare ``atlas`` for simulation; raises :class:`InputError` when it has no brain or head."""
    brain = atlas.brain_mask > 0.5
    head = (atlas.head_mask > 0.5) | brain
    if brain.sum() < 50 or head.sum() <= brain.sum():
        raise InputError("the atlas needs a brain mask and a larger head mask to simulate a cohort")
    vox = atlas.voxel_mm
    outside_brain = ndimage.distance_transform_edt(~brain) * vox
    inside_brain = ndimage.distance_transform_edt(brain) * vox
    signed_brain = outside_brain - inside_brain + np.where(brain, 0.5, -0.5) * vox
    depth = ndimage.distance_transform_edt(head) * vox - ndimage.distance_transform_edt(~head) * vox
    depth = depth - np.where(head, 0.5, -0.5) * vox

    world = _world_grid(atlas.affine, atlas.shape)
    blood = _vessels(world, atlas, brain, signed_brain)

    channels = tuple(
        np.ascontiguousarray(c, dtype=np.float32)
        for c in (atlas.gm, atlas.wm, atlas.csf, signed_brain, depth, blood)
    )
    head_idx = np.argwhere(head)
    centre = (world[tuple(head_idx.min(0))] + world[tuple(head_idx.max(0))]) / 2.0
    shell = head & ~ndimage.binary_erosion(head)
    surface = world[shell]
    surface = surface[:: max(1, len(surface) // 4000)]

    tissue = atlas.gm + atlas.wm
    ok = brain & (tissue >= 0.6) & (inside_brain >= 4.0)
    candidates = world[ok]
    junction = (atlas.gm * atlas.wm)[ok]  # metastases favour the grey-white junction
    return HeadModel(
        channels=channels,
        affine=atlas.affine.astype(float),
        centre=centre,
        surface=surface,
        candidates=candidates,
        depth_in_brain=inside_brain[ok],
        weights=(0.3 + 4.0 * junction) / float((0.3 + 4.0 * junction).sum()),
    )


def _world_grid(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """World mm (X, Y, Z, 3, float32) of every voxel, built from the three axes (no index array)."""
    i, j, k = (np.arange(n, dtype=np.float32) for n in shape[:3])
    i, j, k = i[:, None, None], j[None, :, None], k[None, None, :]
    a = affine.astype(np.float32)
    world = np.empty((*shape[:3], 3), np.float32)
    for r in range(3):
        world[..., r] = a[r, 0] * i + a[r, 1] * j + a[r, 2] * k + a[r, 3]
    return world


def _vessels(
    world: np.ndarray, atlas: Atlas, brain: np.ndarray, signed_brain: np.ndarray
) -> np.ndarray:
    """Blood fraction: superior sagittal sinus (midline, just outside the brain), choroid plexus glomera and
    cortical veins."""
    x, y, z = world[..., 0], world[..., 1], world[..., 2]
    sinus = (~brain) & (np.abs(x) <= 4.0) & (signed_brain > 0) & (signed_brain <= 6.0)
    # From the frontal convexity over the vertex to the torcula; not along the skull base.
    sinus &= (z > -20.0) & ~((y > 30.0) & (z < 30.0))
    blood = 0.7 * sinus.astype(np.float32)
    # Glomus of the choroid plexus in each atrium of the lateral ventricles (about (+-28, -42, 14) mm in MNI).
    csf_deep = (atlas.csf > 0.6) & brain
    for target in ((28.0, -42.0, 14.0), (-28.0, -42.0, 14.0)):
        d2 = ((world - np.asarray(target)) ** 2).sum(-1)
        d2 = np.where(csf_deep, d2, np.inf)
        if not np.isfinite(d2.min()) or d2.min() > 15.0**2:
            continue
        nearest = world[np.unravel_index(np.argmin(d2), d2.shape)]
        blob = np.exp(-((world - nearest) ** 2).sum(-1) / (2 * 3.0**2))
        blood = np.maximum(blood, 0.5 * blob * (atlas.csf > 0.3))
    return np.maximum(blood, _cortical_veins(atlas, brain, signed_brain))


#: Fraction of the brain mask's volume taken by the cortical veins of the sulci (see _cortical_veins).
CORTICAL_VEIN_FRACTION = 0.004


def _cortical_veins(atlas: Atlas, brain: np.ndarray, signed_brain: np.ndarray) -> np.ndarray:
    """Blood fraction of the cortical veins: a network of tubes in the sulci over the convexity.

    On a full-dose T1c these veins are among the brightest voxels of a skull-stripped brain, but a small part
    of it: cerebral blood volume is about 4 mL per 100 g (Leenders et al. 1990), most of it in vessels far
    below a millimetre, so visible pial veins are a fraction of a percent of the brain (an estimate; with 1.2 %
    the full dose's 99th percentile sat on blood, see the module docstring). Tubes are where two independent smooth random fields both cross zero (the intersection of
    two random surfaces is a set of curves); the thickness is chosen for :data:`CORTICAL_VEIN_FRACTION`. The
    network belongs to the template (a fixed seed), and each patient's deformation moves it.
    """
    rng = np.random.default_rng(20091)
    sigma = 6.0 / atlas.voxel_mm  # curvature of the veins: about 1 cm
    f1, f2 = (
        ndimage.gaussian_filter(rng.standard_normal(atlas.shape).astype(np.float32), sigma)
        for _ in range(2)
    )
    f1 /= f1.std()
    f2 /= f2.std()
    where = brain & (signed_brain > -8.0) & (atlas.csf > 0.1)  # sulcal CSF near the surface
    if not where.any():
        return np.zeros(atlas.shape, np.float32)
    closeness = np.maximum(np.abs(f1), np.abs(f2))
    target = CORTICAL_VEIN_FRACTION * brain.sum() / where.sum()
    width = np.quantile(closeness[where], min(target, 1.0))
    return np.where(where & (closeness <= width), 0.8, 0.0).astype(np.float32)


# --- Subjects, lesions, exams -----------------------------------------------------------------------------------
def _rng(seed: int, subject: str, *stream: int) -> np.random.Generator:
    """The random stream ``stream`` of one subject: depends on (seed, subject id) only."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), *subject.encode(), *stream]))


def participant(subject: str, seed: int, *, lesion_free_fraction: float = 0.3) -> dict:
    """Demographics of a cohort patient (the paper's Table 1 variables) and the date of its first exam."""
    rng = _rng(seed, subject, 1)
    sex = "F" if rng.random() < 0.55 else "M"
    age = int(np.clip(np.round(rng.normal(57, 14)), 18, 90))
    weight = float(np.clip(rng.normal(64 if sex == "F" else 78, 15), 40, 150))
    u = rng.random()
    # Lesion-free patients are "other"; of the others 70 % have metastases (66 vs 30 gliomas in the paper).
    if u < lesion_free_fraction:
        indication = INDICATIONS[2]
    elif u < lesion_free_fraction + (1 - lesion_free_fraction) * 0.7:
        indication = INDICATIONS[0]
    else:
        indication = INDICATIONS[1]
    span = (LAST_DATE - FIRST_DATE).days
    first = FIRST_DATE + dt.timedelta(days=int(rng.integers(0, span + 1)))
    return {
        "participant_id": f"sub-{subject}",
        "age": age,
        "sex": sex,
        "weight_kg": round(weight, 1),
        "indication": indication,
        "acquisition_date": first.isoformat(),
    }


def session_date(subject: str, session: str, seed: int) -> str:
    """Acquisition date (YYYY-MM-DD) of an exam: the first one, or 2-12 weeks after the previous visit."""
    date = dt.date.fromisoformat(participant(subject, seed)["acquisition_date"])
    for visit in range(2, _session_index(session) + 1):
        date += dt.timedelta(days=int(_rng(seed, subject, 2, visit).integers(14, 85)))
    return date.isoformat()


def _session_index(session: str) -> int:
    """1 for the first exam ("" or "01"), 2 for "02", ..."""
    if not session:
        return 1
    if not session.isdigit() or int(session) < 1:
        raise InputError(f"cohort sessions are numbered 01, 02, ...; got {session!r}")
    return int(session)


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


@dataclass(frozen=True)
class Anatomy:
    """A patient: head scaling and deformation of the atlas, lesion texture and lesions (first visit)."""

    scale: np.ndarray  # atlas = centre + scale * s + warp(s)
    warp: np.ndarray  # (3, X, Y, Z) displacement (mm) on the subject-space grid of _WARP_SPACING
    texture: np.ndarray  # (X, Y, Z) smooth N(0, 1) field on the grid of _TEXTURE_SPACING
    lesions: tuple[Lesion, ...]
    indication: str


@dataclass(frozen=True)
class Exam:
    """One visit: pose of the head in the scanner (s = R (w - t)), lesions at this visit, contrast timeline."""

    rotation: np.ndarray
    translation: np.ndarray
    lesions: tuple[Lesion, ...]
    timeline: kinetics.Timeline
    gains: dict[str, float]  # scanner units per unit signal, per sequence family


@dataclass(frozen=True)
class T1Series:
    """One T1 acquisition of an exam: the head's pose then and the agent's concentrations (mM)."""

    pose: Exam
    plasma_mm: float
    tumour_mm: Mapping[int, float]  # per lesion id


def _smooth_field(
    rng: np.random.Generator, spacing: float, components: int, sigma_mm: float
) -> np.ndarray:
    n = int(np.ceil(-2 * _S_ORIGIN / spacing)) + 1
    field = rng.standard_normal((components, n, n, n)).astype(np.float32)
    for c in range(components):
        field[c] = ndimage.gaussian_filter(field[c], sigma_mm / spacing, mode="nearest")
    return field


def make_anatomy(
    model: HeadModel,
    subject: str,
    seed: int,
    *,
    deformation_mm: float = 4.0,
    lesions_per_subject: tuple[int, int] = (1, 4),
    lesion_free_fraction: float = 0.3,
) -> Anatomy:
    """The patient ``subject``: depends on (seed, subject) and the parameters only."""
    rng = _rng(seed, subject, 3)
    scale = rng.uniform(0.92, 1.06) * rng.uniform(0.97, 1.03, size=3)
    warp = _smooth_field(rng, _WARP_SPACING, 3, sigma_mm=20.0)
    peak = float(np.sqrt((warp**2).sum(0)).max())
    warp *= deformation_mm / max(peak, 1e-6)
    texture = _smooth_field(rng, _TEXTURE_SPACING, 1, sigma_mm=3.0)[0]
    texture /= max(float(texture.std()), 1e-6)
    indication = participant(subject, seed, lesion_free_fraction=lesion_free_fraction)["indication"]
    partial = Anatomy(scale, warp, texture, (), indication)
    lesions = _sample_lesions(
        model,
        partial,
        _rng(seed, subject, 4),
        _rng(seed, subject, 7),
        indication,
        lesions_per_subject,
    )
    return Anatomy(scale, warp, texture, lesions, indication)


def _sample_lesions(
    model: HeadModel,
    anat: Anatomy,
    rng: np.random.Generator,
    kinetics_rng: np.random.Generator,
    indication: str,
    lesions_per_subject: tuple[int, int],
) -> tuple[Lesion, ...]:
    lo, hi = lesions_per_subject
    if indication == "other" or hi < 1:
        return ()
    if indication == "glioma":
        count = max(lo, 1 + int(hi >= 2 and rng.random() < 0.25))  # sometimes a satellite nodule
    else:
        count = int(rng.integers(max(lo, 1), hi + 1))
    lesions: list[Lesion] = []
    for j in range(count):
        if indication == "glioma" and j == 0:
            diameter, kind = rng.uniform(15.0, 30.0), "ring"
        else:
            diameter = float(np.exp(rng.uniform(np.log(2.0), np.log(30.0))))
            kind = "ring" if diameter >= 10.0 and rng.random() < 0.5 else "nodule"
        aspect = np.exp(rng.normal(0.0, 0.12, 3))
        radii = diameter / 2 * aspect / np.prod(aspect) ** (1 / 3)
        q, r = np.linalg.qr(rng.standard_normal((3, 3)))
        axes = q * np.sign(np.diag(r))
        wall = float(np.clip(diameter * rng.uniform(0.12, 0.25), 1.5, 6.0))
        reach = rng.uniform(0.5, 1.3) if indication == "glioma" else rng.uniform(0.2, 1.2)
        oedema = float(min(diameter * reach * (0.5 if diameter < 5 else 1.0), 30.0))
        # Extended Tofts parameters (ranges in virtual_contrast.kinetics): blood volume 3-10 %, ve 0.15-0.45,
        # Ktrans 0.05-0.3 /min (its own stream, so the lesions' geometry does not depend on it).
        vp = (1 - HEMATOCRIT) * rng.uniform(0.03, 0.10)
        ve = rng.uniform(0.15, 0.45)
        ktrans = float(kinetics_rng.uniform(0.05, 0.3))
        need = radii.max() * 1.1 + 2.0
        for _ in range(60):
            ok = np.flatnonzero(model.depth_in_brain >= need)
            if not len(ok):
                break
            pick = rng.choice(ok, p=model.weights[ok] / model.weights[ok].sum())
            atlas_point = model.candidates[pick] + rng.uniform(-0.5, 0.5, 3) * _voxel(model)
            centre = _atlas_to_subject(model, anat, atlas_point)
            if all(
                np.linalg.norm(centre - o.centre) > radii.max() + o.radii.max() + 3.0
                for o in lesions
            ):
                lesions.append(
                    Lesion(
                        len(lesions) + 1, kind, centre, axes, radii, wall, oedema, vp, ktrans, ve
                    )
                )
                break
        else:
            log.debug("no room for a %.1f mm lesion", diameter)
    return tuple(lesions)


def _voxel(model: HeadModel) -> float:
    return float(np.sqrt((model.affine[:3, :3] ** 2).sum(0)).mean())


def make_exam_state(anat: Anatomy, subject: str, session: str, seed: int) -> Exam:
    """The pose, lesion growth and contrast of one visit."""
    index = _session_index(session)
    rng = _rng(seed, subject, 5, index)
    angles = rng.uniform(-1, 1, 3) * np.asarray(MAX_ROTATION_DEG)
    rotation = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    translation = rng.uniform(-MAX_TRANSLATION_MM, MAX_TRANSLATION_MM, 3)
    lesions = anat.lesions
    if index > 1:  # lesions evolve between visits (treatment response or progression)
        lesions = tuple(
            les.grown(
                float(np.clip(rng.uniform(0.6, 1.5), 2.0 / les.diameter_mm, 30.0 / les.diameter_mm))
            )
            for les in lesions
        )  # sizes stay within 2-30 mm
    gains = {k: float(rng.uniform(0.8, 1.25)) * TARGET_WM[k] / _reference_wm(k) for k in TARGET_WM}
    return Exam(
        rotation=rotation,
        translation=translation,
        lesions=lesions,
        timeline=kinetics.draw_timeline(rng),
        gains=gains,
    )


# --- Coordinates ---------------------------------------------------------------------------------------------------
def _sample(volume: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """Linear interpolation of a 3D ``volume`` at voxel coordinates ``ijk`` (3, N); nearest value outside."""
    return ndimage.map_coordinates(volume, ijk, order=1, mode="nearest", output=np.float32)


def _grid_index(s: np.ndarray, spacing: float) -> np.ndarray:
    """Voxel coordinates (3, N) on a subject-space grid of points ``s`` (N, 3)."""
    return ((s - _S_ORIGIN) / spacing).T


def _warp_at(anat: Anatomy, s: np.ndarray) -> np.ndarray:
    ijk = _grid_index(s, _WARP_SPACING)
    return np.stack([_sample(anat.warp[c], ijk) for c in range(3)], axis=1)


def _subject_to_atlas(model: HeadModel, anat: Anatomy, s: np.ndarray) -> np.ndarray:
    """Atlas mm of subject-space points: centre + scale * s + warp(s)."""
    return model.centre + s * anat.scale + _warp_at(anat, s)


def _atlas_to_subject(model: HeadModel, anat: Anatomy, a: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_subject_to_atlas` by fixed-point iteration (the warp is small and smooth)."""
    a = np.atleast_2d(a)
    s = (a - model.centre) / anat.scale
    for _ in range(20):
        s = (a - model.centre - _warp_at(anat, s)) / anat.scale
    return s[0] if len(s) == 1 else s


def _subject_to_world(exam: Exam, s: np.ndarray) -> np.ndarray:
    return s @ exam.rotation + exam.translation


def _moved(exam: Exam, rng: np.random.Generator) -> Exam:
    """The exam with a little head motion (between two sequences)."""
    angles = np.clip(rng.normal(0, MOTION_DEG, 3), -2.5, 2.5)
    shift = np.clip(rng.normal(0, MOTION_MM, 3), -2.5, 2.5)
    rotation = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() @ exam.rotation
    return Exam(rotation, exam.translation + shift, exam.lesions, exam.timeline, exam.gains)


#: Random stream (of make_exam's ``rng_for``) of each T1 series: its motion and noise (and, for the pre-contrast
#: T1, the T1 sequence's receive field, which the three series share).
T1_STREAMS = {"t1": 1, "low": 5, "ref": 6}


def t1_series(exam: Exam, streams: Mapping[str, np.random.Generator]) -> dict[str, T1Series]:
    """The exam's three T1 acquisitions: the pre-contrast T1 in the exam's pose, then the low-dose and the
    reference T1c, each in a pose of its own (a small head movement between series, drawn from its stream)
    and with the concentrations of its time on the exam's contrast timeline."""
    timeline = exam.timeline
    out = {"t1": T1Series(exam, 0.0, {})}
    for key, t_min in (("low", timeline.low_t1c_min), ("ref", timeline.ref_t1c_min)):
        out[key] = T1Series(
            _moved(exam, streams[key]),
            kinetics.plasma_mm(timeline, t_min),
            {les.lesion_id: les.concentration_mm(timeline, t_min) for les in exam.lesions},
        )
    return out


def _fit_grid(
    points: np.ndarray, frame: np.ndarray, zooms: np.ndarray, margin_mm: float, jitter: np.ndarray
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A grid whose axes are the columns of ``frame`` (orthonormal) covering ``points`` (world mm)."""
    f = points @ frame  # coordinates along the grid axes
    lo, hi = f.min(0) - margin_mm, f.max(0) + margin_mm
    shape = np.ceil((hi - lo) / zooms).astype(int) + 1
    first = (lo + hi) / 2 + jitter - zooms * (shape - 1) / 2
    affine = np.eye(4)
    affine[:3, :3] = frame * zooms
    affine[:3, 3] = frame @ first
    return affine, tuple(int(n) for n in shape)  # type: ignore[return-value]


# --- Simulation ------------------------------------------------------------------------------------------------------
def _ramp(x):
    return np.clip(x + 0.5, 0.0, 1.0)


def _fractions(
    model: HeadModel,
    anat: Anatomy,
    exam: Exam,
    s: np.ndarray,
    pv_mm: float,
    tumour_mm: Mapping[int, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Compartment fractions (one row per :data:`COMPARTMENTS`) at subject-space points ``s`` (N, 3).

    Also returns the agent's concentration (mM) in the enhancing tumour at each point (``tumour_mm`` gives it
    per lesion id; a smooth texture modulates it by up to 60 %), the lesion id (0 = none) and the
    intracranial fraction of each point.
    """
    tumour_mm = tumour_mm or {}
    a = _subject_to_atlas(model, anat, s)
    inv = np.linalg.inv(model.affine)
    ijk = (inv[:3, :3] @ a.T + inv[:3, 3:4]).astype(np.float32)
    gm, wm, csf, to_brain, depth, blood = (_sample(c, ijk) for c in model.channels)
    blood = np.clip(blood, 0, 1)
    brain = np.clip(gm + wm + csf, 0, 1)
    ramp_w = max(pv_mm, 1.0)
    head = _ramp(depth / ramp_w)
    non_brain = np.clip(head - brain, 0, 1)
    scalp = _ramp((SCALP_MM - depth) / ramp_w)
    rim = (1 - scalp) * _ramp((RIM_MM - to_brain) / ramp_w)
    rest = 1 - scalp - rim
    deep = rest * _ramp((to_brain - SKULL_MAX_MM) / ramp_w)
    bone = rest - deep
    marrow = (
        0.6 * _ramp((to_brain - RIM_MM - 2.0) / ramp_w) * _ramp((depth - SCALP_MM - 2.0) / ramp_w)
    )
    f = {
        "csf": csf + non_brain * rim,
        "gm": gm,
        "wm": wm,
        "fat": non_brain * (0.65 * scalp + 0.2 * deep),
        "muscle": non_brain * (0.35 * scalp + 0.8 * deep),
        "bone": non_brain * bone * (1 - marrow),
        "marrow": non_brain * bone * marrow,
    }
    blood = blood * np.maximum(head, brain)
    for k in f:
        f[k] = f[k] * (1 - blood)
    f["blood"] = blood

    n = len(s)
    lesion_frac = np.zeros(n, np.float32)
    necrosis = np.zeros(n, np.float32)
    oedema = np.zeros(n, np.float32)
    tumour_conc = np.zeros(n, np.float32)
    label = np.zeros(n, np.int16)
    for les in exam.lesions:
        reach = les.radii.max() + les.oedema_mm + 2 * pv_mm + 4.0
        d = s - les.centre
        near = np.flatnonzero((np.abs(d) < reach).all(1))
        near = near[(d[near] ** 2).sum(1) < reach**2]
        if not len(near):
            continue
        dn = d[near]
        dist = np.sqrt((dn**2).sum(1))
        local = dn @ les.axes  # coordinates along the ellipsoid's axes

        def surface_distance(radii, local=local, dist=dist):
            rho = np.sqrt(((local / radii) ** 2).sum(1))
            radius_dir = np.where(rho > 1e-6, dist / np.maximum(rho, 1e-6), radii.mean())
            # ~ signed distance to the ellipsoid's surface (mm), negative inside
            return (rho - 1) * radius_dir

        outer = surface_distance(les.radii)
        inside = _ramp(-outer / pv_mm)
        core = np.zeros_like(inside)
        if les.kind == "ring":
            inner = np.maximum(les.radii - les.wall_mm, 0.3 * les.radii)
            core = _ramp(-surface_distance(inner) / pv_mm)
        tex = _sample(anat.texture, _grid_index(s[near], _TEXTURE_SPACING))
        tex2 = _sample(anat.texture, _grid_index(s[near] + 37.0, _TEXTURE_SPACING))
        reach_here = les.oedema_mm * np.clip(0.75 + 0.25 * tex2, 0.3, 1.2)
        oed = _ramp((reach_here - outer) / 3.0) * (les.oedema_mm > 0) * 0.9
        upd = inside > lesion_frac[near]
        lesion_frac[near] = np.maximum(lesion_frac[near], inside)
        necrosis[near] = np.where(upd, np.minimum(core, inside), necrosis[near])
        conc = tumour_mm.get(les.lesion_id, 0.0) * np.clip(1 + 0.3 * tex, 0.4, 1.6)
        tumour_conc[near] = np.where(upd, conc, tumour_conc[near])
        oedema[near] = np.maximum(oedema[near], oed)
        label[near[inside >= 0.5]] = les.lesion_id

    # Lesions replace brain tissue; oedema turns white (and some grey) matter oedematous.
    brain_tissue = ("csf", "gm", "wm")
    lesion_frac = lesion_frac * np.clip(brain, 0, 1)
    necrosis = np.minimum(necrosis, lesion_frac)
    for k in brain_tissue:
        f[k] = f[k] * (1 - lesion_frac)
    oedema = oedema * (1 - lesion_frac)
    f["oedema"] = oedema * (f["wm"] + 0.5 * f["gm"])
    f["wm"] = f["wm"] * (1 - oedema)
    f["gm"] = f["gm"] * (1 - 0.5 * oedema)
    f["tumour"] = lesion_frac - necrosis
    f["necrosis"] = necrosis
    fractions = np.empty((len(COMPARTMENTS), n), np.float32)
    for row, name in enumerate(COMPARTMENTS):
        fractions[row] = f[name]
    return fractions, tumour_conc, label, brain


def _simulate(
    model: HeadModel,
    anat: Anatomy,
    series: T1Series,
    affine: np.ndarray,
    shape: tuple[int, int, int],
    *,
    pv_mm: float,
    other_sequences: bool = False,
    truth: bool = False,
) -> dict[str, np.ndarray]:
    """Noise-free signals of one pose of the head on one grid (the T1 grid), slab by slab.

    Returns ``t1`` (the T1 with the series' concentrations); with ``other_sequences`` also flair, b0 and b1000
    (acquired before the injection, in the same pose), and dseg, brain, lesions when ``truth``. The FLAIR and
    DWI grids are coarser: they are resampled from these (see :func:`_resample`), which is the partial-volume
    average a thicker voxel makes, at a fraction of the cost of simulating them on their own.
    """
    exam = series.pose
    table = _compartment_signals(series.plasma_mm)
    table["t1"][COMPARTMENTS.index("tumour")] = (
        0.0  # depends on each point's concentration: added below
    )
    names = ["t1", *(("flair", "b0", "b1000") if other_sequences else ())]
    out = {name: np.zeros(shape, np.float32) for name in names}
    if truth:
        out.update(dseg=np.zeros(shape, np.uint8), brain=np.zeros(shape, np.uint8))
        out["lesions"] = np.zeros(shape, np.int16)
    tumour = TISSUES["tumour"]
    # voxel -> subject space in one affine: s = R (A v + b - t)
    to_s = exam.rotation @ affine[:3, :3]
    offset = exam.rotation @ (affine[:3, 3] - exam.translation)
    slab = max(1, _CHUNK // (shape[0] * shape[1]))
    for k0 in range(0, shape[2], slab):
        k1 = min(k0 + slab, shape[2])
        vox = np.indices((shape[0], shape[1], k1 - k0), dtype=np.float32).reshape(3, -1)
        vox[2] += k0
        pts = (to_s @ vox + offset[:, None]).T
        frac, conc, label, intracranial = _fractions(
            model, anat, exam, pts, pv_mm, series.tumour_mm
        )
        f_tumour = frac[COMPARTMENTS.index("tumour")]
        sl = (slice(None), slice(None), slice(k0, k1))
        slab_shape = (shape[0], shape[1], k1 - k0)
        tumour_signal = spgr_signal(
            tumour.pd,
            1 / tumour.t1 + R1_RELAXIVITY * conc,
            1 / tumour.t2 + R2_RELAXIVITY * conc,
            **T1W,
        )
        out["t1"][sl] = (table["t1"] @ frac + f_tumour * tumour_signal).reshape(slab_shape)
        for name in names[1:]:
            out[name][sl] = (table[name] @ frac).reshape(slab_shape)
        if truth:
            out["dseg"][sl] = _dseg(frac).reshape(slab_shape)
            out["brain"][sl] = (intracranial >= 0.5).reshape(slab_shape)
            out["lesions"][sl] = label.reshape(slab_shape)
    return out


def _resample(
    signal: np.ndarray,
    source_affine: np.ndarray,
    source_exam: Exam,
    target_affine: np.ndarray,
    target_shape: tuple[int, int, int],
    target_exam: Exam,
) -> np.ndarray:
    """The signal a coarser (or moved, tilted) acquisition sees: box-averaged, then sampled on its grid.

    A target voxel at world w holds the anatomy s = R' (w - t') (the head as it lay then), which lay at
    R^T s + t during the source acquisition. The voxel's box, seen in source voxels, is smoothed with the
    Gaussian of the same variance (a box of width e voxels has variance (e^2 - 1) / 12 beyond the source's own).
    """
    world_to_world = np.eye(4)
    world_to_world[:3, :3] = source_exam.rotation.T @ target_exam.rotation
    world_to_world[:3, 3] = (
        source_exam.translation - world_to_world[:3, :3] @ target_exam.translation
    )
    vox2vox = np.linalg.inv(source_affine) @ world_to_world @ target_affine
    extent = np.abs(vox2vox[:3, :3]).sum(axis=1)
    sigma = np.sqrt(np.maximum(extent**2 - 1.0, 0.0) / 12.0)
    smooth = (
        ndimage.gaussian_filter(signal, sigma, mode="constant") if sigma.max() > 0.05 else signal
    )
    return ndimage.affine_transform(
        smooth,
        vox2vox[:3, :3],
        offset=vox2vox[:3, 3],
        output_shape=target_shape,
        order=1,
        mode="constant",
        output=np.float32,
    )


def _dseg(frac: np.ndarray) -> np.ndarray:
    """Truth label (:data:`DSEG_LABELS`) of each point: its dominant compartment group."""
    f = dict(zip(COMPARTMENTS, frac, strict=True))
    groups = [
        f["csf"],
        f["gm"],
        f["wm"],
        f["oedema"],
        f["tumour"],
        f["necrosis"],
        f["blood"],
        f["fat"] + f["muscle"] + f["bone"] + f["marrow"],
    ]
    g = np.stack(groups, axis=0)
    label = np.argmax(g, axis=0).astype(np.uint8) + 1
    label[g.sum(0) < 0.5] = 0
    return label


# --- Bias, noise, storage ---------------------------------------------------------------------------------------------
def _bias(centre: np.ndarray, affine: np.ndarray, shape, coeffs: np.ndarray) -> np.ndarray:
    """Smooth multiplicative field exp(quadratic polynomial of world position / 100 mm)."""
    i, j, k = (np.arange(n, dtype=np.float32) for n in shape)
    i, j, k = i[:, None, None], j[None, :, None], k[None, None, :]
    a = (affine[:3, :3] / 100.0).astype(np.float32)
    b = ((affine[:3, 3] - centre) / 100.0).astype(np.float32)
    # world coordinates broadcast from the three voxel axes: no full-size index array is built
    x, y, z = (a[r, 0] * i + a[r, 1] * j + a[r, 2] * k + b[r] for r in range(3))
    c = coeffs.astype(np.float32)
    log_bias = c[0] * x + c[1] * y + c[2] * z + c[3] * x * x + c[4] * y * y + c[5] * z * z
    log_bias = log_bias + c[6] * x * y + c[7] * x * z + c[8] * y * z
    return np.exp(np.broadcast_to(log_bias, shape)).astype(np.float32)


def _acquire(signal: np.ndarray, bias: np.ndarray, gain: float, sigma: float, rng) -> np.ndarray:
    """Scanner image: bias x gain x signal plus complex Gaussian noise, magnitude, int16."""
    s = signal * bias * gain
    re = s + rng.standard_normal(s.shape, dtype=np.float32) * sigma
    im = rng.standard_normal(s.shape, dtype=np.float32) * sigma
    return np.clip(np.round(np.sqrt(re * re + im * im)), 0, 32767).astype(np.int16)


def _sidecar(kind: str, extra: dict | None = None) -> dict:
    base = {"MagneticFieldStrength": 3, "Manufacturer": "virtual-contrast synthetic cohort"}
    if kind == "t1":
        base.update(
            RepetitionTime=T1W["tr"],
            EchoTime=T1W["te"],
            FlipAngle=T1W["flip_deg"],
            MRAcquisitionType="3D",
        )
        base["ScanningSequence"] = "GR"
        base["SequenceVariant"] = "SP"
    elif kind == "flair":
        base.update(
            RepetitionTime=FLAIR["tr"],
            EchoTime=FLAIR["te"],
            InversionTime=round(flair_ti(), 4),
            MRAcquisitionType="2D",
        )
    else:
        base.update(RepetitionTime=DWI["tr"], EchoTime=DWI["te"], MRAcquisitionType="2D")
    base.update(extra or {})
    return base


# --- Exams on disk ----------------------------------------------------------------------------------------------------
def make_exam(
    paths: Mapping[str, Path | str],
    lesions_path: Path | str | None,
    *,
    subject: str,
    session: str,
    seed: int,
    atlas: Atlas | None = None,
    model: HeadModel | None = None,
    native_voxel_mm: float = 2.0,
    deformation_mm: float = 4.0,
    lesions_per_subject: tuple[int, int] = (1, 4),
    lesion_free_fraction: float = 0.3,
    truth_dir: Path | str | None = None,
) -> pd.DataFrame:
    """Simulate one exam and write the sequences named in ``paths``; return (and write) its true lesions.

    ``paths`` maps sequence keys (``t1``, ``flair``, ``low``, ``ref``, ``dwi``, ``bval``, ``bvec``) to files;
    a key left out is not acquired (an incomplete exam). ``lesions_path`` receives the lesion table (see the
    module docstring for the columns; ``session`` is written as given). ``truth_dir`` receives the truth maps
    on the T1 grid. Give ``model`` (from :func:`head_model`) to reuse the atlas preparation across exams.
    The result depends only on (seed, subject, session) and the keyword parameters.
    """
    if model is None:
        if atlas is None:
            raise InputError("make_exam needs the atlas (or a prepared head model)")
        model = head_model(atlas)
    _check_parameters(seed, native_voxel_mm, lesions_per_subject)
    unknown = set(paths) - {*SEQUENCE_SUFFIX, "bval", "bvec"}
    if unknown:
        raise InputError(f"unknown sequence key(s) {sorted(unknown)} for subject {subject}")
    anat = make_anatomy(
        model,
        subject,
        seed,
        deformation_mm=deformation_mm,
        lesions_per_subject=lesions_per_subject,
        lesion_free_fraction=lesion_free_fraction,
    )
    exam = make_exam_state(anat, subject, session, seed)
    v = float(native_voxel_mm)
    index = _session_index(session)

    def rng_for(sequence: int) -> np.random.Generator:
        """One random stream per sequence, so each is the same whichever others are written."""
        return _rng(seed, subject, 6, index, sequence)

    head_world = _subject_to_world(exam, (model.surface - model.centre) / anat.scale)
    head_centre = head_world.mean(0)
    # The receive coil's profile is shared by the exam's sequences; each adds a little of its own.
    coil = rng_for(0).normal(0.0, 0.1, 9)

    def bias_for(affine, shape, rng):
        return _bias(head_centre, affine, shape, coil + rng.normal(0.0, 0.03, 9))

    t1_affine, t1_shape = _fit_grid(
        head_world,
        np.diag([-1.0, 1.0, 1.0]),  # LAS, like many DICOM converters
        np.array([0.9375 * v, 0.9375 * v, v]),
        margin_mm=6.0 + v,
        jitter=rng_for(4).uniform(-4, 4, 3),
    )
    streams = {key: rng_for(stream) for key, stream in T1_STREAMS.items()}
    series = t1_series(exam, streams)
    sig = _simulate(
        model,
        anat,
        series["t1"],
        t1_affine,
        t1_shape,
        pv_mm=v,
        other_sequences=True,
        truth=truth_dir is not None,
    )
    # One receive field for the three T1 series (same coil, same sequence), fixed in the scanner: the head's
    # movement between series moves the anatomy through it.
    t1_bias = bias_for(t1_affine, t1_shape, streams["t1"])
    for key, acquisition in series.items():
        if key not in paths:
            continue
        rng = streams[key]
        signal = sig["t1"]
        if key != "t1":  # the head lay elsewhere and the agent had spread: simulated on its own
            signal = _simulate(model, anat, acquisition, t1_affine, t1_shape, pv_mm=v)["t1"]
        sigma = NOISE["t1"] * _reference_wm("t1") * exam.gains["t1"]
        data = _acquire(signal, t1_bias, exam.gains["t1"], sigma, rng)
        extra = {}
        if key != "t1":
            dose = kinetics.FULL_DOSE_MMOL_KG * (
                kinetics.LOW_DOSE_FRACTION if key == "low" else 1.0
            )
            extra = {
                "ContrastBolusIngredient": "GADOLINIUM",
                "ContrastDose_mmol_per_kg": dose,
                "ContrastRelaxivity_r1_per_mM_s": R1_RELAXIVITY,
            }
        _write_nifti(data, t1_affine, paths[key], _sidecar("t1", extra))

    if "flair" in paths:
        rng = rng_for(2)
        moved = _moved(exam, rng)
        tilt = Rotation.from_euler("x", rng.uniform(-12, 12), degrees=True).as_matrix()
        zooms = np.array([v, v, FLAIR_SLICE_FACTOR * v])
        affine, shape = _fit_grid(head_world, tilt, zooms, 6.0 + v, rng.uniform(-4, 4, 3))
        flair = _resample(sig["flair"], t1_affine, exam, affine, shape, moved)
        sigma = NOISE["flair"] * _reference_wm("flair") * exam.gains["flair"]
        data = _acquire(flair, bias_for(affine, shape, rng), exam.gains["flair"], sigma, rng)
        _write_nifti(data, affine, paths["flair"], _sidecar("flair"))

    if "dwi" in paths:
        rng = rng_for(3)
        moved = _moved(exam, rng)
        tilt = Rotation.from_euler("xz", rng.uniform(-12, 12, 2), degrees=True).as_matrix()
        zooms = np.full(3, DWI_VOXEL_FACTOR * v)
        affine, shape = _fit_grid(head_world, tilt, zooms, 6.0 + v, rng.uniform(-4, 4, 3))
        b0 = _resample(sig["b0"], t1_affine, exam, affine, shape, moved)
        b1000 = _resample(sig["b1000"], t1_affine, exam, affine, shape, moved)
        bias = bias_for(affine, shape, rng)
        sigma = NOISE["dwi"] * _reference_wm("dwi") * exam.gains["dwi"]
        vols = [
            _acquire(b0 if b == 0 else b1000, bias, exam.gains["dwi"], sigma, rng)
            for b in DWI_BVALS
        ]
        _write_nifti(np.stack(vols, axis=-1), affine, paths["dwi"], _sidecar("dwi"))
        _write_gradients(Path(paths["dwi"]), paths)

    table = lesion_table(model, anat, series["ref"].pose, subject, session)
    if lesions_path is not None:
        write_table(table, lesions_path)
    if truth_dir is not None:
        _write_truth(Path(truth_dir), subject, session, sig, t1_affine, model, anat, series)
    log.info(
        "exam sub-%s%s: %d lesion(s), T1 grid %s at %.2f mm",
        subject,
        f" ses-{session}" if session else "",
        len(table),
        t1_shape,
        v,
    )
    return table


def _check_parameters(
    seed: int, native_voxel_mm: float, lesions_per_subject: tuple[int, int]
) -> None:
    if int(seed) < 0:
        raise InputError(f"the cohort seed must be >= 0, got {seed}")
    if not native_voxel_mm > 0:
        raise InputError(f"native_voxel_mm must be positive, got {native_voxel_mm}")
    lo, hi = lesions_per_subject
    if not 0 <= lo <= hi:
        raise InputError(
            f"lesions_per_subject must be (min, max) with 0 <= min <= max, got {lesions_per_subject}"
        )


def _write_gradients(dwi_path: Path, paths: Mapping[str, Path | str]) -> None:
    """FSL-style .bval (one row) and .bvec (three rows, unit vectors; zeros for b = 0)."""
    bvecs, d = [], 0
    for b in DWI_BVALS:
        if b == 0:
            bvecs.append(np.zeros(3))
        else:
            bvecs.append(DWI_DIRECTIONS[d % len(DWI_DIRECTIONS)])
            d += 1
    write_text(
        " ".join(str(b) for b in DWI_BVALS) + "\n",
        paths.get("bval", _with_suffix(dwi_path, ".bval")),
    )
    rows = np.asarray(bvecs).T
    text = "\n".join(" ".join(f"{x:.6f}" for x in row) for row in rows) + "\n"
    write_text(text, paths.get("bvec", _with_suffix(dwi_path, ".bvec")))


def _with_suffix(path: Path, suffix: str) -> Path:
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    return path.with_name(name + suffix)


def _write_nifti(data: np.ndarray, affine: np.ndarray, path: Path | str, sidecar: dict) -> None:
    save_image(data, affine, path, dtype=data.dtype)
    write_json(sidecar, _with_suffix(Path(path), ".json"))


def lesion_table(
    model: HeadModel, anat: Anatomy, exam: Exam, subject: str, session: str
) -> pd.DataFrame:
    """True lesions of one exam (columns :data:`LESION_COLUMNS`), world mm of the T1c grid as the head lay in
    ``exam`` (the full-dose series, for the table make_exam writes)."""
    rows = []
    for les in exam.lesions:
        centre_w = _subject_to_world(exam, les.centre)
        centre_a = _subject_to_atlas(model, anat, les.centre[None])[0]
        # Ellipsoid (s - c)^T Q (s - c) <= 1 with s - c = R (w - c_w): Q_w = R^T Q R. The T1 grid is
        # axis-aligned, so its axial plane is the world x-y plane; the central section is the largest.
        q = les.axes @ np.diag(1 / les.radii**2) @ les.axes.T
        q_world = exam.rotation.T @ q @ exam.rotation
        eig = np.linalg.eigvalsh(q_world[:2, :2])
        rows.append(
            {
                "subject": subject,
                "session": session,
                "lesion_id": les.lesion_id,
                "x_mm": round(float(centre_w[0]), 3),
                "y_mm": round(float(centre_w[1]), 3),
                "z_mm": round(float(centre_w[2]), 3),
                "long_axis_mm": round(float(2 / np.sqrt(eig[0])), 3),
                "short_axis_mm": round(float(2 / np.sqrt(eig[1])), 3),
                "diameter_mm": round(les.diameter_mm, 3),
                "kind": les.kind,
                "atlas_x_mm": round(float(centre_a[0]), 3),
                "atlas_y_mm": round(float(centre_a[1]), 3),
                "atlas_z_mm": round(float(centre_a[2]), 3),
            }
        )
    return pd.DataFrame(rows, columns=LESION_COLUMNS)


def _write_truth(folder, subject, session, t1, affine, model, anat, series) -> None:
    exam = series["t1"].pose
    prefix = f"sub-{subject}" + (f"_ses-{session}" if session else "")
    base = folder / f"sub-{subject}" / (f"ses-{session}" if session else "") / "anat"
    save_image(t1["dseg"], affine, base / f"{prefix}_space-T1w_dseg.nii.gz", dtype=np.uint8)
    save_image(
        t1["brain"], affine, base / f"{prefix}_space-T1w_desc-brain_mask.nii.gz", dtype=np.uint8
    )
    save_image(
        t1["lesions"], affine, base / f"{prefix}_space-T1w_desc-lesions_dseg.nii.gz", dtype=np.int16
    )
    # world -> atlas, affine part (the smooth warp of a few mm comes on top): a = c + S R (w - t)
    sr = np.diag(anat.scale) @ exam.rotation
    to_atlas = np.eye(4)
    to_atlas[:3, :3] = sr
    to_atlas[:3, 3] = model.centre - sr @ exam.translation
    write_json(
        {
            "world_to_atlas_affine": to_atlas,
            "head_scale": anat.scale,
            "rotation": exam.rotation,
            "translation_mm": exam.translation,
            "max_deformation_mm": float(np.sqrt((anat.warp**2).sum(0)).max()),
            "contrast_timeline": exam.timeline.to_dict(),
            "series": {
                key: {
                    "rotation": s.pose.rotation,
                    "translation_mm": s.pose.translation,
                    "plasma_mM": s.plasma_mm,
                    "tumour_mM": {str(k): c for k, c in s.tumour_mm.items()},
                }
                for key, s in series.items()
            },
            "indication": anat.indication,
            "dseg_labels": DSEG_LABELS,
        },
        base / f"{prefix}_desc-truth.json",
    )


# --- The whole cohort -------------------------------------------------------------------------------------------------
def make_cohort(
    out_dir: Path | str,
    *,
    n: int,
    seed: int,
    atlas: Atlas,
    native_voxel_mm: float = 2.0,
    extra_visits: int = 1,
    missing_sequence: int = 1,
    lesions_per_subject: tuple[int, int] = (1, 4),
    lesion_free_fraction: float = 0.3,
    deformation_mm: float = 4.0,
    truth: bool = True,
    progress: bool = False,
) -> Path:
    """Write a BIDS-like cohort of ``n`` complete patients plus the excluded exams into ``out_dir``.

    The plan is :func:`virtual_contrast.workflow.plan_cohort`: patients ``vc001``...; the first
    ``extra_visits`` of them also have a later visit (sessions ``ses-01``/``ses-02``; the others have no
    session level), and ``missing_sequence`` more patients (``vcm01``...) lack one sequence. See the module
    docstring for the layout and the tables. Returns ``out_dir``.
    """
    from virtual_contrast.workflow import plan_cohort

    if n < 1 or extra_visits < 0 or missing_sequence < 0:
        raise InputError(
            f"cohort sizes must be n >= 1 and counts >= 0 (n={n}, extra_visits={extra_visits}, "
            f"missing_sequence={missing_sequence})"
        )
    _check_parameters(seed, native_voxel_mm, lesions_per_subject)
    out_dir = Path(out_dir)
    model = head_model(atlas)
    plan = plan_cohort(n, extra_visits=extra_visits, missing_sequence=missing_sequence)
    visits: dict[str, int] = {}
    for exam in plan:
        visits[exam.subject] = visits.get(exam.subject, 0) + 1
    planned = {f"sub-{s}" for s in visits}
    stale = sorted(p.name for p in out_dir.glob("sub-*") if p.is_dir() and p.name not in planned)
    if stale:
        log.warning("%s holds subject folders not in this cohort: %s", out_dir, ", ".join(stale))

    from tqdm import tqdm

    common = dict(
        model=model,
        native_voxel_mm=native_voxel_mm,
        deformation_mm=deformation_mm,
        lesions_per_subject=lesions_per_subject,
        lesion_free_fraction=lesion_free_fraction,
    )
    tables, participants = [], {}
    for exam in tqdm(plan, desc="cohort exams", unit="exam", disable=not progress):
        subject = exam.subject
        session = exam.session if visits[subject] > 1 else ""
        prefix = f"sub-{subject}" + (f"_ses-{session}" if session else "")
        folder = out_dir / f"sub-{subject}" / (f"ses-{session}" if session else "")
        paths: dict[str, Path] = {}
        for key, (kind_dir, suffix) in SEQUENCE_SUFFIX.items():
            if key not in exam.missing:
                paths[key] = folder / kind_dir / f"{prefix}_{suffix}.nii.gz"
        if "dwi" in paths:
            paths["bval"] = folder / "dwi" / f"{prefix}_dwi.bval"
            paths["bvec"] = folder / "dwi" / f"{prefix}_dwi.bvec"
        truth_dir = out_dir / "derivatives" / "truth" if truth else None
        table = make_exam(
            paths, None, subject=subject, session=session, seed=seed, truth_dir=truth_dir, **common
        )
        tables.append(table)
        participants[subject] = participant(
            subject, seed, lesion_free_fraction=lesion_free_fraction
        )
    for subject, count in visits.items():
        if count > 1:
            sessions = [f"{i:02d}" for i in range(1, count + 1)]
            rows = [
                {"session_id": f"ses-{s}", "acquisition_date": session_date(subject, s, seed)}
                for s in sessions
            ]
            write_table(
                pd.DataFrame(rows), out_dir / f"sub-{subject}" / f"sub-{subject}_sessions.tsv"
            )
    write_table(pd.DataFrame(list(participants.values())), out_dir / "participants.tsv")
    lesions = (
        pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=LESION_COLUMNS)
    )
    write_table(lesions, out_dir / "lesions.tsv")
    write_json(
        {
            "Name": "virtual-contrast embedded synthetic cohort",
            "BIDSVersion": "1.8.0",
            "DatasetType": "raw",
            "GeneratedBy": [
                {
                    "Name": "virtual-contrast cohort",
                    "Description": "physically grounded synthetic exams (see virtual_contrast.cohort)",
                }
            ],
            "Parameters": {
                "n": n,
                "seed": seed,
                "native_voxel_mm": native_voxel_mm,
                "atlas_voxel_mm": atlas.voxel_mm,
                "extra_visits": extra_visits,
                "missing_sequence": missing_sequence,
                "lesions_per_subject": list(lesions_per_subject),
                "lesion_free_fraction": lesion_free_fraction,
                "deformation_mm": deformation_mm,
            },
        },
        out_dir / "dataset_description.json",
    )
    log.info(
        "cohort of %d exams (%d patients, %d lesions) in %s",
        len(plan),
        len(visits),
        len(lesions),
        out_dir,
    )
    return out_dir


# --- Command line ----------------------------------------------------------------------------------------------------
def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """``virtual-contrast cohort``: write the embedded synthetic cohort (defaults: the config's cohort)."""
    from virtual_contrast.config import schema_defaults

    defaults = schema_defaults("cohort")
    p = subparsers.add_parser(
        "cohort",
        help="write the embedded synthetic cohort (BIDS-like, native scanner space)",
        description=(__doc__ or "").split("\n\n")[0],
    )
    p.add_argument("--n", type=int, required=True, help="number of complete patients")
    p.add_argument(
        "--seed",
        type=int,
        default=defaults["seed"],
        help="random seed (the cohort is deterministic given it; default: %(default)s)",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--voxel-mm",
        type=float,
        default=defaults["native_voxel_mm"],
        help="atlas grid the anatomy comes from (mm; default: %(default)s, as the workflow simulates it)",
    )
    p.add_argument(
        "--native-voxel-mm",
        type=float,
        default=defaults["native_voxel_mm"],
        help="T1 voxel of the synthetic scans (mm; default: %(default)s)",
    )
    p.add_argument(
        "--extra-visits",
        type=int,
        default=defaults["extra_visits"],
        help="patients with a later (excluded) visit (default: %(default)s)",
    )
    p.add_argument(
        "--missing-sequence",
        type=int,
        default=defaults["missing_sequence"],
        help="extra patients lacking one sequence (default: %(default)s)",
    )
    p.add_argument(
        "--atlas-brain-mask", type=Path, default=None, help="official ICBM 2009a brain mask"
    )
    p.add_argument(
        "--atlas-head-mask", type=Path, default=None, help="official ICBM 2009a head mask"
    )
    p.set_defaults(func=_run_cohort)


def _run_cohort(args: argparse.Namespace) -> int:
    from virtual_contrast.atlas import build_atlas

    atlas, _ = build_atlas(
        args.voxel_mm, brain_mask=args.atlas_brain_mask, head_mask=args.atlas_head_mask
    )
    out = make_cohort(
        args.out,
        n=args.n,
        seed=args.seed,
        atlas=atlas,
        native_voxel_mm=args.native_voxel_mm,
        extra_visits=args.extra_visits,
        missing_sequence=args.missing_sequence,
        progress=True,
    )
    print(f"cohort written to {out}")
    return 0
