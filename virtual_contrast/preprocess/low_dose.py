"""A simulated low-dose T1c from a pre-contrast T1 and a standard-dose T1c, on the standard dose's grid.

For studies without a low-dose series (public brain-tumour data: a pre-contrast T1 and a standard-dose T1c),
as published groups train dose-reduction networks (Pinetz et al. 2023, 2024; Haase et al. 2024), done so that
the result is an image like an acquisition:

1. the pre-contrast T1 is aligned rigidly to the T1c (:func:`~virtual_contrast.preprocess.register.register_images`,
   6 DOF over the head) and resampled once onto its grid (cubic spline), then matched in intensity on
   non-enhancing tissue (:func:`~virtual_contrast.preprocess.enhancement.match_intensities`);
2. the enhancement Δ = T1c − matched T1 is smoothed (:data:`ENHANCEMENT_SMOOTHING_VOX`) and weighted by the
   probability that it is contrast rather than noise (:data:`ENHANCEMENT_Z`), so that noise is not scaled as
   if it were contrast;
3. the enhancement is scaled to the dose fraction (linear, or the spoiled-gradient-echo equation when TR and
   flip angle are known: :func:`~virtual_contrast.preprocess.enhancement.scale_enhancement`) and added to the
   pre-contrast anatomy, denoised with its edges kept (:func:`~virtual_contrast.preprocess.noise.bilateral`,
   the Rician bias removed);
4. fresh noise of the T1c's level and texture (measured in the air around a raw head, or in the flattest
   tissue of the T1/T1c difference where there is no air: :mod:`virtual_contrast.preprocess.noise`) is put on
   that noise-free estimate as a scanner does (Rician, magnitude), wherever the T1c has noise: the whole field
   of view of a raw head, the brain of a skull-stripped image (its zero background stays zero).

Why not a subtraction from the standard dose: ``T1c − (1 − d) Δ`` carries the standard dose's own noise
realisation (with Δ denoised, the T1c's very noise wherever nothing enhances, the air included; with the plain
Δ = T1c − T1, a correlation of 0.35-0.4 with it in the air of the embedded cohort's exams, at 0.7 of its
level), while an acquired low dose is a separate acquisition whose noise is independent of the standard
dose's; a network trained on a shared realisation learns to copy noise from input to target. For the same
reason the pre-contrast T1's own noise is mostly removed (step 3) rather than kept: the network also sees the
pre-contrast T1, and an acquired low dose's noise is independent of it too.

Everything is deterministic given the seed (and the subject id, when given). The output is written with the
T1c's on-disk data type (an integer T1c gives a rounded integer image, as a scanner writes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from virtual_contrast.io import InputError, save_image, write_json
from virtual_contrast.preprocess import noise
from virtual_contrast.preprocess.enhancement import (
    ENHANCEMENT_SMOOTHING_VOX,
    ENHANCEMENT_Z,
    contrast_field,
    enhancement_evidence,
    match_intensities,
    scale_enhancement,
)
from virtual_contrast.preprocess.inputs import MIN_OVERLAP, check_image, fov_overlap
from virtual_contrast.preprocess.native import largest_component
from virtual_contrast.preprocess.transforms import voxel_sizes

log = logging.getLogger(__name__)

MODELS = ("auto", "linear", "spgr")
#: Voxels of pure noise (air in the field of view) needed to measure the noise there.
MIN_AIR_VOXELS = 2000
#: Depth (mm) inside a raw head from which the intensities are matched: the scalp's fat and muscle take up
#: the agent (the cohort's muscle 12 % of plasma, fat 3 %) and pulled the scale 4-6 % above the white matter's
#: ratio on training patients of the embedded cohort (1.5-2.4 % from 10 mm in).
FIT_DEPTH_MM = 10.0
#: The match's robust spread in units of the two images' noise together: from the first value on, the T1c's
#: contrast replaces the T1's at the scale of tissue regions, fully from the second. One sequence (the
#: embedded cohort's three T1 series): 1.14-1.21; BraTS-MET-00110 and BraTS-GLI-00001 (t1n, t1c): 2.7-3.6;
#: the raw TCGA-FG-6692 T1 and T1c (two spin echoes): 10.
MISMATCH_RANGE = (1.5, 2.5)
#: Gaussian σ (mm) of that contrast field, and where the differences it averages are clipped (match spreads).
CONTRAST_SMOOTHING_MM = 5.0
MISMATCH_CLIP = 2.5
#: Margin (mm) between the head and the voxels taken as air: ghosts and the head's blurred edge stay out.
AIR_MARGIN_MM = 6.0


@dataclass(frozen=True)
class LowDoseOptions:
    """What the simulation needs besides the images (config ``low_dose``; the defaults live in the schema:
    :meth:`from_config`, :func:`default_low_dose_options`). ``model`` ``auto`` becomes ``spgr`` or ``linear``
    in :meth:`resolved` from the T1c's sidecar."""

    dose_fraction: float
    model: str  # auto | linear | spgr
    t10_s: float  # pre-contrast T1 of enhancing tissue (spgr)
    seed: int
    tr_ms: float | None = None  # repetition time of the T1c (spgr); None: from its JSON sidecar
    flip_deg: float | None = None  # flip angle of the T1c (spgr); None: from its JSON sidecar

    @classmethod
    def from_config(cls, config: dict) -> LowDoseOptions:
        section = config["low_dose"]
        return cls(
            dose_fraction=float(section["dose_fraction"]),
            model=str(section["model"]),
            t10_s=float(section["t10_s"]),
            seed=int(section["seed"]),
        )

    def resolved(self, ref: Path | str, *, subject: str | None = None) -> LowDoseOptions:
        """The options checked, with ``auto`` decided and TR and flip angle read from ``ref``'s sidecar when
        the spgr model needs them and they were not given."""
        if not 0.0 < self.dose_fraction < 1.0:
            raise InputError(
                f"the dose fraction must lie strictly between 0 and 1, got {self.dose_fraction}",
                subject=subject,
            )
        if self.model not in MODELS:
            raise InputError(
                f"unknown dose model {self.model!r}; choose one of {', '.join(MODELS)}",
                subject=subject,
            )
        if self.model == "linear":
            return self
        sequence = {"tr_ms": self.tr_ms, "flip_deg": self.flip_deg}
        if None in sequence.values():
            read = sequence_from_sidecar(ref)
            sequence = {k: v if v is not None else read.get(k) for k, v in sequence.items()}
        known = None not in sequence.values()
        if self.model == "auto":
            return replace(self, model="spgr" if known else "linear", **(sequence if known else {}))
        if not known:
            raise InputError(
                "the spgr dose model needs the T1c's repetition time and flip angle: give them, or a JSON "
                "sidecar beside the T1c with RepetitionTime (s) and FlipAngle (deg)",
                subject=subject,
                path=ref,
            )
        if not (sequence["tr_ms"] > 0 and 0 < sequence["flip_deg"] < 90 and self.t10_s > 0):
            raise InputError(
                f"implausible sequence for the spgr dose model: TR {sequence['tr_ms']} ms, flip "
                f"{sequence['flip_deg']} deg, T10 {self.t10_s} s",
                subject=subject,
                path=ref,
            )
        return replace(self, **sequence)


def default_low_dose_options() -> LowDoseOptions:
    """The options of the config schema's defaults (for callers without a config)."""
    from virtual_contrast.config import schema_defaults

    return LowDoseOptions.from_config({"low_dose": schema_defaults("low_dose")})


def subject_rng(seed: int, subject: str | None = None) -> np.random.Generator:
    """The random stream of one simulation: from ``seed`` and, when given, the subject id."""
    if subject is None:
        return np.random.default_rng(int(seed))
    digest = hashlib.sha256(str(subject).encode()).digest()
    return np.random.default_rng([int(seed), int.from_bytes(digest[:8], "little")])


def sequence_from_sidecar(image: Path | str) -> dict:
    """TR (ms) and flip angle (deg) from the BIDS JSON sidecar beside ``image`` (``{}`` when absent)."""
    image = Path(image)
    stem = image.name.removesuffix(".gz").removesuffix(".nii")
    sidecar = image.with_name(stem + ".json")
    if not sidecar.exists():
        return {}
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"unreadable JSON sidecar: {exc}", path=sidecar) from exc
    out = {}
    if isinstance(meta.get("RepetitionTime"), int | float):
        out["tr_ms"] = round(1000.0 * float(meta["RepetitionTime"]), 6)  # BIDS: seconds
    if isinstance(meta.get("FlipAngle"), int | float):
        out["flip_deg"] = float(meta["FlipAngle"])
    return out


# ----------------------------------------------------------------------------------------------- regions
def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` (histogram of ``bins`` bins)."""
    hist, edges = np.histogram(np.asarray(values, np.float64), bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = ((hist * centres).sum() - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


def noise_support(ref: np.ndarray) -> np.ndarray:
    """Where the image has signal or noise: all but its exactly-zero background (a skull-stripped image's
    outside; single zero voxels of dark noise stay in)."""
    zero = ndimage.binary_opening(np.asarray(ref) == 0, structure=np.ones((3, 3, 3)))
    return ~zero


def head_and_air(
    ref: np.ndarray, support: np.ndarray, voxel_mm: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The head (Otsu's foreground, holes filled) and the air (the support beyond :data:`AIR_MARGIN_MM` of it).

    With fewer than :data:`MIN_AIR_VOXELS` of air (a skull-stripped image, a tight field of view) there is
    none, and the head is the whole support.
    """
    smooth = ndimage.gaussian_filter(np.asarray(ref, np.float32), 1.0)
    values = smooth[support]
    if values.size == 0:
        return support.copy(), np.zeros_like(support)
    foreground = (smooth > 0.5 * otsu_threshold(values)) & support
    head = ndimage.binary_fill_holes(largest_component(foreground))
    distance = ndimage.distance_transform_edt(~head, sampling=voxel_mm)
    air = support & (distance > AIR_MARGIN_MM)
    if air.sum() < MIN_AIR_VOXELS:
        return support.copy(), np.zeros_like(support)
    return head & support, air


def fit_region(tissue: np.ndarray, air: np.ndarray, voxel_mm: np.ndarray) -> np.ndarray:
    """Where the intensities are matched: the tissue of a raw head (with air around it) from
    :data:`FIT_DEPTH_MM` in, all of a skull-stripped image's; the whole tissue when that leaves too little."""
    if not air.any():
        return tissue
    deep = tissue & (ndimage.distance_transform_edt(tissue, sampling=voxel_mm) > FIT_DEPTH_MM)
    return deep if deep.sum() >= 1000 else tissue


# ----------------------------------------------------------------------------------------------- simulation
def simulate_arrays(
    pre: np.ndarray,
    ref: np.ndarray,
    covered: np.ndarray,
    voxel_mm: np.ndarray,
    options: LowDoseOptions,
    rng: np.random.Generator,
) -> tuple[np.ndarray, dict]:
    """The simulation on arrays of one grid: ``pre`` (aligned, resampled), ``ref`` (the T1c), ``covered`` (where
    the pre-contrast T1 has data). Returns the low dose (float32) and what was measured (module docstring)."""
    ref = np.asarray(ref, np.float32)
    pre = np.asarray(pre, np.float32)
    support = noise_support(ref)
    head, air = head_and_air(ref, support, voxel_mm)
    tissue = head & covered
    if tissue.sum() < 100:
        raise ValueError("the pre-contrast T1 covers too little of the T1c's head")
    match = match_intensities(pre, ref, fit_region(tissue & (ref > 0), air, voxel_mm))
    matched = match.apply(pre)
    delta, probability, smoothed_std = _enhancement(ref, matched, covered, support, tissue)

    pre_air = air & covered
    if pre_air.sum() >= MIN_AIR_VOXELS:
        ref_noise = noise.estimate_from_air(ref, air)
        # Resampling keeps the Rayleigh mean (1.2533 σ) of the pre-contrast T1's air; in the T1c's units
        # through the intensity match's scale.
        pre_sigma = float(match.scale * pre[pre_air].mean() / noise.RAYLEIGH_MEAN)
    else:  # no air (skull-stripped): the difference over flat, non-enhancing tissue, alike in both
        ref_noise = noise.estimate_from_difference(delta, ref, tissue & (probability < 0.05))
        pre_sigma = ref_noise.sigma
    # Two different sequences (public data's t1n and t1c) leave a contrast difference that the match's line
    # does not take out: the T1c's contrast at the scale of tissue regions then replaces the T1's.
    mismatch = match.residual_std / max(float(np.hypot(ref_noise.sigma, pre_sigma)), 1e-12)
    weight = float(np.clip((mismatch - MISMATCH_RANGE[0]) / np.ptp(MISMATCH_RANGE), 0.0, 1.0))
    if weight > 0:
        quiet = tissue & ~ndimage.binary_dilation(probability > 0.5)
        field = contrast_field(
            delta,
            quiet,
            tissue,
            CONTRAST_SMOOTHING_MM / np.asarray(voxel_mm),
            clip=MISMATCH_CLIP * match.residual_std,
        )
        matched = matched + weight * field
        delta, probability, smoothed_std = _enhancement(ref, matched, covered, support, tissue)
    # The enhancement kept is the voxel's own, not the smoothed one: smoothing took 10-25 % of the lesions'
    # enhancement (rings' thin walls most) on training patients of the embedded cohort.
    enhancement = probability * np.maximum(delta, 0.0)

    # The anatomy the fresh noise goes on: the matched pre-contrast T1 denoised (edges kept), its Rician floor
    # removed (E[M²] = S² + 2σ²), and nothing in the air; the T1c itself where the pre-contrast T1 has no data.
    smoothed_pre = noise.bilateral(matched, covered & support, pre_sigma)
    residual = pre_sigma * noise.residual_fraction(ref_noise.kernel, noise.bilateral)
    base = np.sqrt(np.maximum(smoothed_pre * smoothed_pre - 2.0 * pre_sigma**2, 0.0))
    uncovered = support & ~covered
    if uncovered.any():
        ref_base = noise.bilateral(ref, support, ref_noise.sigma)
        ref_base = np.sqrt(np.maximum(ref_base * ref_base - 2.0 * ref_noise.sigma**2, 0.0))
        base = np.where(uncovered, ref_base, base)
    base = np.where(head, base, 0.0).astype(np.float32)
    scaled = scale_enhancement(
        base,
        enhancement,
        options.dose_fraction,
        model=options.model,
        tr_ms=options.tr_ms,
        flip_deg=options.flip_deg,
        t10_s=options.t10_s,
        min_baseline=5.0 * ref_noise.sigma,
    )
    signal = np.maximum(base + scaled, 0.0)
    # Fresh noise makes up the T1c's level: all of it in the air, what the base's residual noise leaves in
    # the head.
    fresh_sigma = float(np.sqrt(max(ref_noise.sigma**2 - residual**2, 0.0)))
    sigma_map = np.where(head, fresh_sigma, ref_noise.sigma).astype(np.float32)
    low = noise.rician(signal, sigma_map, ref_noise.kernel, rng)
    low[~support] = 0.0

    enhancing = probability > 0.5
    ratio = scaled[enhancing] / np.maximum(enhancement[enhancing], 1e-6)
    measured = {
        "intensity_match": {
            **match.summary(),
            "contrast_mismatch": round(float(mismatch), 3),
            "contrast_field_weight": round(weight, 3),
        },
        "noise": {
            **ref_noise.summary(),
            "pre_sigma": round(float(pre_sigma), 4),
            "base_residual_sigma": round(float(residual), 4),
            "fresh_sigma": round(fresh_sigma, 4),
        },
        "enhancement": {
            "smoothing_vox": ENHANCEMENT_SMOOTHING_VOX,
            "z": ENHANCEMENT_Z,
            "noise_std": round(smoothed_std, 4),
            "enhancing_voxels": int(enhancing.sum()),
            "kept_fraction_median": round(float(np.median(ratio)), 4) if ratio.size else None,
        },
        "base_denoising": "bilateral 3x3x3, 1 voxel, range 2.83 sigma",
        "air_voxels": int(air.sum()),
        "support_fraction": round(float(support.mean()), 4),
        "uncovered_fraction": round(float(uncovered.sum() / max(support.sum(), 1)), 4),
    }
    return low.astype(np.float32), measured


def _enhancement(
    ref: np.ndarray,
    matched: np.ndarray,
    covered: np.ndarray,
    support: np.ndarray,
    tissue: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, float]:
    """T1c − matched T1, the probability that it is contrast (its smoothing against its own noise), and the
    smoothed difference's noise."""
    delta = np.where(covered & support, ref - matched, 0.0).astype(np.float32)
    probability, smoothed_std = enhancement_evidence(delta, tissue)
    return delta, probability, smoothed_std


def align_pre_contrast(
    pre_img: nib.Nifti1Image, ref_img: nib.Nifti1Image, engine
) -> tuple[np.ndarray, np.ndarray, object]:
    """The pre-contrast T1 aligned rigidly to the T1c over the T1c's head and resampled once onto its grid
    (cubic spline). Returns it, where it has data (bool), and the registration."""
    from virtual_contrast.preprocess.register import field_of_view, register_images

    ref_data = np.asanyarray(ref_img.dataobj, dtype=np.float32)
    head, _ = head_and_air(ref_data, noise_support(ref_data), voxel_sizes(ref_img.affine))
    registration = register_images(
        pre_img, ref_img, dof=6, backend=engine, reference_mask=head, initial=np.eye(4)
    )
    pre = engine.resample(pre_img, ref_img.shape, ref_img.affine, registration.transform, order=3)
    covered = field_of_view(pre_img, ref_img.shape, ref_img.affine, registration.transform)
    return pre, covered, registration


def simulate_low_dose(
    t1: Path | str,
    ref: Path | str,
    out: Path | str,
    *,
    options: LowDoseOptions | None = None,
    subject: str | None = None,
    backend: str = "auto",
    sidecar: Path | str | None = None,
) -> dict:
    """Write the simulated low-dose T1c of ``t1`` (pre-contrast) and ``ref`` (standard dose) to ``out``.

    ``out`` lies on ``ref``'s grid (whole field of view). The provenance is returned (and written to
    ``sidecar`` when given): it says *simulated*, the dose model, the registration, the intensity match, the
    noise measured and put on. Bad input (a missing, 4D, blank or non-finite image; a pre-contrast T1 that does
    not overlap the T1c in world space) raises :class:`~virtual_contrast.io.InputError` naming the file before
    any work.
    """
    from virtual_contrast.preprocess.registration import select_backend

    start = time.perf_counter()
    requested = options or default_low_dose_options()
    options = requested.resolved(ref, subject=subject)
    pre_img = check_image(t1, what="pre-contrast T1", subject=subject)
    ref_img = check_image(ref, what="standard-dose T1c", subject=subject)
    overlap = fov_overlap(pre_img, ref_img)
    if overlap < MIN_OVERLAP:
        raise InputError(
            f"the pre-contrast T1 does not overlap the standard-dose T1c in world space (only "
            f"{100 * overlap:.0f} % of the smaller field of view lies inside the other; at least "
            f"{100 * MIN_OVERLAP:.0f} % is needed): a file of another exam, or a header without the scanner "
            "position?",
            subject=subject,
            path=t1,
        )
    # One thread: the embedded backend's metric sums per-thread histograms, so its transform (and a few
    # voxels of the result) changed from run to run with the default thread count.
    engine = select_backend(backend, threads=1)
    ref_data = np.asanyarray(ref_img.dataobj, dtype=np.float32)
    try:
        pre, covered, registration = align_pre_contrast(pre_img, ref_img, engine)
    except InputError as exc:
        raise InputError(
            f"pre-contrast T1 -> T1c registration: {exc.reason}", subject=subject, path=t1
        ) from exc
    voxel_mm = voxel_sizes(ref_img.affine)
    try:
        low, measured = simulate_arrays(
            pre, ref_data, covered, voxel_mm, options, subject_rng(options.seed, subject)
        )
    except ValueError as exc:
        raise InputError(str(exc), subject=subject, path=t1) from exc
    dtype = nib.load(str(ref)).get_data_dtype()
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        low = np.clip(np.round(low), info.min, info.max)
    else:
        dtype = np.float32
    save_image(low, ref_img.affine, out, dtype=dtype)
    provenance = {
        "image": "simulated low-dose T1c",
        "simulated": True,
        "pre_contrast": str(t1),
        "standard_dose": str(ref),
        "dose_fraction": options.dose_fraction,
        "dose_model": options.model,
        "dose_model_requested": requested.model,
        "tr_ms": options.tr_ms,
        "flip_deg": options.flip_deg,
        "t10_s": options.t10_s if options.model == "spgr" else None,
        "seed": options.seed,
        "subject": subject,
        "registration": registration.summary(),
        "overlap": round(overlap, 3),
        **measured,
        "seconds": round(time.perf_counter() - start, 2),
    }
    if sidecar is not None:
        write_json(provenance, sidecar)
    log.info(
        "%ssimulated low-dose T1c (d = %g, %s) -> %s in %.1f s",
        f"{subject}: " if subject else "",
        options.dose_fraction,
        options.model,
        out,
        provenance["seconds"],
    )
    return provenance
