"""The atlas as a head model, and each patient's anatomy: the atlas scaled and bent by a smooth random
deformation, a lesion texture, and the lesions placed in the brain (near the grey-white junction, where
metastases favour); with the maps between subject space (mm around the head centre) and atlas space.

Normal vessels (sinus, choroid plexus, cortical veins) are a small part of the brain mask (cortical veins
0.4 %, :data:`CORTICAL_VEIN_FRACTION`). With 1.2 % the 99th percentile of a full-dose brain sat on enhancing
blood while the low dose's sat on tissue, and after the percentile normalisation the two doses disagreed over
the whole brain (PSNR 21 dB at 1 mm against the paper's 27.4). Measured after the workflow's pre-processing at
1 mm (``benchmarks/cohort_fidelity.py``), low vs full now lands in the paper's band (README, "Embedded cohort").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from virtual_contrast.atlas import Atlas
from virtual_contrast.cohort.lesions import Lesion
from virtual_contrast.cohort.physics import HEMATOCRIT
from virtual_contrast.cohort.plan import participant, subject_rng
from virtual_contrast.io import InputError

log = logging.getLogger(__name__)

SCALP_MM = 5.0  # outer layer of the head: scalp (fat and muscle)
RIM_MM = 2.0  # extra-axial CSF between brain and skull
SKULL_MAX_MM = 14.0  # beyond this distance from the brain (face, neck): soft tissue, not bone
# Subject-space grids (warp, texture) cover [-136, 136] mm around the head centre.
_S_ORIGIN = -136.0
_WARP_SPACING, TEXTURE_SPACING = 8.0, 3.0


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


@dataclass(frozen=True)
class Anatomy:
    """A patient: head scaling and deformation of the atlas, lesion texture and lesions (first visit)."""

    scale: np.ndarray  # atlas = centre + scale * s + warp(s)
    warp: np.ndarray  # (3, X, Y, Z) displacement (mm) on the subject-space grid of _WARP_SPACING
    texture: np.ndarray  # (X, Y, Z) smooth N(0, 1) field on the grid of TEXTURE_SPACING
    lesions: tuple[Lesion, ...]
    indication: str


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
    rng = subject_rng(seed, subject, 3)
    scale = rng.uniform(0.92, 1.06) * rng.uniform(0.97, 1.03, size=3)
    warp = _smooth_field(rng, _WARP_SPACING, 3, sigma_mm=20.0)
    peak = float(np.sqrt((warp**2).sum(0)).max())
    warp *= deformation_mm / max(peak, 1e-6)
    texture = _smooth_field(rng, TEXTURE_SPACING, 1, sigma_mm=3.0)[0]
    texture /= max(float(texture.std()), 1e-6)
    indication = participant(subject, seed, lesion_free_fraction=lesion_free_fraction)["indication"]
    partial = Anatomy(scale, warp, texture, (), indication)
    lesions = _sample_lesions(
        model,
        partial,
        subject_rng(seed, subject, 4),
        subject_rng(seed, subject, 7),
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
        # Extended Tofts parameters (ranges in virtual_contrast.cohort.kinetics): blood volume 3-10 %, ve 0.15-0.45,
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


def sample_volume(volume: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """Linear interpolation of a 3D ``volume`` at voxel coordinates ``ijk`` (3, N); nearest value outside."""
    return ndimage.map_coordinates(volume, ijk, order=1, mode="nearest", output=np.float32)


def grid_index(s: np.ndarray, spacing: float) -> np.ndarray:
    """Voxel coordinates (3, N) on a subject-space grid of points ``s`` (N, 3)."""
    return ((s - _S_ORIGIN) / spacing).T


def _warp_at(anat: Anatomy, s: np.ndarray) -> np.ndarray:
    ijk = grid_index(s, _WARP_SPACING)
    return np.stack([sample_volume(anat.warp[c], ijk) for c in range(3)], axis=1)


def subject_to_atlas(model: HeadModel, anat: Anatomy, s: np.ndarray) -> np.ndarray:
    """Atlas mm of subject-space points: centre + scale * s + warp(s)."""
    return model.centre + s * anat.scale + _warp_at(anat, s)


def _atlas_to_subject(model: HeadModel, anat: Anatomy, a: np.ndarray) -> np.ndarray:
    """Inverse of :func:`subject_to_atlas` by fixed-point iteration (the warp is small and smooth)."""
    a = np.atleast_2d(a)
    s = (a - model.centre) / anat.scale
    for _ in range(20):
        s = (a - model.centre - _warp_at(anat, s)) / anat.scale
    return s[0] if len(s) == 1 else s
