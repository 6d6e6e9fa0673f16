"""Each exam's acquisitions and the simulation of their images.

Each T1 series is an acquisition of its own, as in the paper's protocol (pre-contrast T1, FLAIR and DWI; 0.025
mmol/kg and the low-dose T1c; 0.075 mmol/kg more and the reference T1c, a median 6 min later):

* its own head position: a rigid movement from the pre-contrast pose of about 1 mm and 1 deg (root mean square;
  the FLAIR and the DWI move the same way), simulated afresh, not resampled;
* its own noise, at the T1 sequence's SNR of 40 in white matter (:data:`~virtual_contrast.cohort.physics.NOISE`),
  and the same receive field, fixed in the scanner, through which the moved head passes;
* the agent's concentrations of its time (:mod:`virtual_contrast.cohort.kinetics`): plasma after the two boluses
  (Weinmann's biexponential curve) and, in each lesion, the extended Tofts model with its own Ktrans, ve and
  blood volume, so the tumour's low/full ratio is not the plasma's and varies from lesion to lesion.

The head lies in the scanner with a random rigid pose per exam (:func:`make_exam_state`). A series is simulated
on the T1 grid, every voxel mapped to subject space and given its compartment fractions, with partial volumes
at the lesions (:func:`simulate`); the coarser FLAIR and DWI grids are resampled from it as a thicker voxel
averages (:func:`resample_signal`); a bias field and Rician noise finish each image (:func:`acquire`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from virtual_contrast.cohort import kinetics
from virtual_contrast.cohort.anatomy import (
    RIM_MM,
    SCALP_MM,
    SKULL_MAX_MM,
    TEXTURE_SPACING,
    Anatomy,
    HeadModel,
    grid_index,
    sample_volume,
    subject_to_atlas,
)
from virtual_contrast.cohort.lesions import Lesion
from virtual_contrast.cohort.physics import (
    COMPARTMENTS,
    R1_RELAXIVITY,
    R2_RELAXIVITY,
    T1W,
    TARGET_WM,
    TISSUES,
    compartment_signals,
    reference_wm,
    spgr_signal,
)
from virtual_contrast.cohort.plan import session_index, subject_rng

MAX_ROTATION_DEG = (15.0, 8.0, 8.0)  # pitch (about L-R), roll, yaw of the head in the scanner
MAX_TRANSLATION_MM = 20.0
#: Head motion between two series of one exam: standard deviation per axis, so that the rotation and the
#: translation are about 1 deg and 1 mm (root mean square).
MOTION_DEG, MOTION_MM = 1 / np.sqrt(3), 1 / np.sqrt(3)
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
_CHUNK = 600_000  # points simulated at once: keeps memory modest at 1 mm


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


def make_exam_state(anat: Anatomy, subject: str, session: str, seed: int) -> Exam:
    """The pose, lesion growth and contrast of one visit."""
    index = session_index(session)
    rng = subject_rng(seed, subject, 5, index)
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
    # The T2 came after the other sequences: its gain has a stream of its own, so that adding it changed
    # no draw of the pose, gains and timeline that every existing exam was made with.
    families = [k for k in TARGET_WM if k != "t2"]
    gains = {k: float(rng.uniform(0.8, 1.25)) * TARGET_WM[k] / reference_wm(k) for k in families}
    t2_rng = subject_rng(seed, subject, 5, index, 1)
    gains["t2"] = float(t2_rng.uniform(0.8, 1.25)) * TARGET_WM["t2"] / reference_wm("t2")
    return Exam(
        rotation=rotation,
        translation=translation,
        lesions=lesions,
        timeline=kinetics.draw_timeline(rng),
        gains=gains,
    )


def subject_to_world(exam: Exam, s: np.ndarray) -> np.ndarray:
    return s @ exam.rotation + exam.translation


def moved_pose(exam: Exam, rng: np.random.Generator) -> Exam:
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
            moved_pose(exam, streams[key]),
            kinetics.plasma_mm(timeline, t_min),
            {les.lesion_id: les.concentration_mm(timeline, t_min) for les in exam.lesions},
        )
    return out


def fit_grid(
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
    a = subject_to_atlas(model, anat, s)
    inv = np.linalg.inv(model.affine)
    ijk = (inv[:3, :3] @ a.T + inv[:3, 3:4]).astype(np.float32)
    gm, wm, csf, to_brain, depth, blood = (sample_volume(c, ijk) for c in model.channels)
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
        tex = sample_volume(anat.texture, grid_index(s[near], TEXTURE_SPACING))
        tex2 = sample_volume(anat.texture, grid_index(s[near] + 37.0, TEXTURE_SPACING))
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


def simulate(
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

    Returns ``t1`` (the T1 with the series' concentrations); with ``other_sequences`` also flair, t2, b0 and b1000
    (acquired before the injection, in the same pose), and dseg, brain, lesions when ``truth``. The FLAIR and
    DWI grids are coarser: they are resampled from these (see :func:`resample_signal`), which is the partial-volume
    average a thicker voxel makes, at a fraction of the cost of simulating them on their own.
    """
    exam = series.pose
    table = compartment_signals(series.plasma_mm)
    table["t1"][COMPARTMENTS.index("tumour")] = (
        0.0  # depends on each point's concentration: added below
    )
    names = ["t1", *(("flair", "t2", "b0", "b1000") if other_sequences else ())]
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


def resample_signal(
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


def bias_field(centre: np.ndarray, affine: np.ndarray, shape, coeffs: np.ndarray) -> np.ndarray:
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


def acquire(signal: np.ndarray, bias: np.ndarray, gain: float, sigma: float, rng) -> np.ndarray:
    """Scanner image: bias x gain x signal plus complex Gaussian noise, magnitude, int16."""
    s = signal * bias * gain
    re = s + rng.standard_normal(s.shape, dtype=np.float32) * sigma
    im = rng.standard_normal(s.shape, dtype=np.float32) * sigma
    return np.clip(np.round(np.sqrt(re * re + im * im)), 0, 32767).astype(np.int16)
