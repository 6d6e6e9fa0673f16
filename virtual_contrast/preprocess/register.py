"""Registration to the atlas, brain to brain: one 12-DOF transform T1→atlas, each other sequence rigidly to the T1.

Transforms follow the convention of :mod:`virtual_contrast.preprocess.transforms` (reference world → moving
world, RAS mm, "pull"). With ``A_t1`` (atlas world → T1 world) and a rigid ``R`` (T1 world → FLAIR world),
FLAIR is pulled onto the atlas grid by ``R @ A_t1``, so each image is interpolated exactly once.

The brain is extracted first, in native space (:mod:`virtual_contrast.preprocess.skull_strip`), and the
registration aligns the subject's *brain-extracted* T1 with the skull-stripped ICBM 2009a template:

1. a coarse 7-DOF match of the subject's brain mask to the atlas brain mask (their outlines), which needs no
   intensities and finds the pose even when the head is pitched by 30° or the slab cuts the head;
2. 12-DOF mutual information between the brain-extracted T1 and the template over the atlas brain mask grown
   by :data:`BRAIN_MARGIN_MM` (so that the brain's outline against the zero background counts too);
3. every other sequence rigidly (6 DOF) to the native T1, the metric restricted to the T1's brain mask grown
   by the same margin, started from the scanner's own alignment;
4. the native brain mask is carried to the atlas with the T1's transform (linear interpolation, threshold
   0.5), and the registration is scored with the quality gate's figures, each sequence's coverage of the
   atlas brain included (:mod:`virtual_contrast.preprocess.quality`); the gate itself is applied apart
   (:func:`~virtual_contrast.preprocess.quality.gate_subject`), so that its limits can change without a
   new registration.

With the skull in the moving image, a registration to the skull-stripped template fitted the skull to the
template's brain (ventricles about 1 cm off) unless the official head mask steered it; brain to brain, the
raw TCGA-FG-6692 T1 (skull, 5.5 mm oblique slices) and the skull-stripped BraTS-MET-00110 T1 both reach a
brain Dice of 0.95-0.96 with the official atlas brain mask at 1 mm, with no mask but their own.

Two backends estimate the transforms (:mod:`virtual_contrast.preprocess.registration`):

* ``fsl``: FSL FLIRT through nipype, as in the paper (:mod:`~virtual_contrast.preprocess.registration.fsl`),
  resampling with FLIRT ``-applyxfm -interp spline``;
* ``simpleitk``: the embedded one (:mod:`~virtual_contrast.preprocess.registration.sitk_backend`), Mattes
  mutual information, resampling with :func:`resample` (cubic B-spline).

``auto`` picks FSL when it is installed and says so in the log; asking for ``fsl`` without FSL fails at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from virtual_contrast.atlas import Atlas
from virtual_contrast.io import InputError, load_image, save_image, write_json
from virtual_contrast.preprocess import quality
from virtual_contrast.preprocess.options import GateOptions
from virtual_contrast.preprocess.registration import select_backend
from virtual_contrast.preprocess.registration.base import Backend, Registration
from virtual_contrast.preprocess.transforms import carry_mask, resample, save_transform, voxel_sizes
from virtual_contrast.sequences import ALIGN_FEATURES

log = logging.getLogger(__name__)

#: Margin (mm) around the brain masks that restrict the similarity measure. Brain to brain, the outline of the
#: brain against the zero background is information too: at 1 mm the carried brain mask's Dice with the official
#: atlas brain mask went from 0.945 to 0.955 (TCGA-FG-6692) and from 0.957 to 0.964 (BraTS-MET-00110) with 4 mm.
BRAIN_MARGIN_MM = 4.0


# ----------------------------------------------------------------------------------------------- masks
def dilate_mask(mask: np.ndarray, affine: np.ndarray, mm: float) -> np.ndarray:
    """``mask`` grown by ``mm`` millimetres (Euclidean, in world units)."""
    mask = np.asarray(mask) > 0.5
    if mm <= 0 or not mask.any():
        return mask
    dist = ndimage.distance_transform_edt(~mask, sampling=voxel_sizes(affine))
    return dist <= mm


# ----------------------------------------------------------------------------------------------- high level
def register_images(
    moving: nib.Nifti1Image,
    reference: nib.Nifti1Image,
    *,
    dof: int = 12,
    backend: str | Backend = "auto",
    reference_mask: np.ndarray | nib.Nifti1Image | None = None,
    moving_mask: np.ndarray | nib.Nifti1Image | None = None,
    margin_mm: float = BRAIN_MARGIN_MM,
    initial: np.ndarray | None = None,
) -> Registration:
    """Estimate the transform reference world → moving world (in memory).

    ``reference_mask`` (a brain mask, on the reference grid or as an image on any grid) restricts the
    similarity measure, grown by ``margin_mm``. With ``moving_mask`` too (on the moving grid) and no
    ``initial``, the backend starts from the match of the two brain outlines (see the module docstring).
    """
    engine = select_backend(backend) if isinstance(backend, str) else backend
    metric_mask = outline = moving_outline = None
    if reference_mask is not None:
        outline = on_grid(reference_mask, reference) > 0.5
        if not outline.any():
            raise InputError("the reference brain mask is empty")
        metric_mask = dilate_mask(outline, reference.affine, margin_mm)
    if moving_mask is not None and outline is not None and initial is None:
        moving_outline = on_grid(moving_mask, moving) > 0.5
        if not moving_outline.any():
            raise InputError("the brain mask of the moving image is empty")
    return engine.register(
        moving,
        reference,
        dof=dof,
        reference_mask=metric_mask,
        moving_outline=moving_outline,
        reference_outline=outline if moving_outline is not None else None,
        initial=initial,
    )


def on_grid(mask: np.ndarray | nib.Nifti1Image, reference: nib.Nifti1Image) -> np.ndarray:
    """A mask array on the reference grid (an image on another grid is resampled, nearest neighbour)."""
    if isinstance(mask, nib.spatialimages.SpatialImage):
        if mask.shape[:3] == reference.shape[:3] and np.allclose(
            mask.affine, reference.affine, atol=1e-3
        ):
            return np.asanyarray(mask.dataobj, dtype=np.float32)
        return resample(mask, reference.shape, reference.affine, np.eye(4), order=0)
    mask = np.asarray(mask, dtype=np.float32)
    if mask.shape[:3] != reference.shape[:3]:
        raise InputError(f"mask shape {mask.shape} differs from the image grid {reference.shape}")
    return mask


def brain_extracted(image: nib.Nifti1Image, mask: np.ndarray) -> nib.Nifti1Image:
    """``image`` set to 0 outside ``mask`` (same grid)."""
    data = np.asanyarray(image.dataobj, dtype=np.float32) * (np.asarray(mask) > 0.5)
    return nib.Nifti1Image(data.astype(np.float32), image.affine)


def field_of_view(
    image: nib.Nifti1Image, shape: tuple[int, ...], affine: np.ndarray, transform: np.ndarray
) -> np.ndarray:
    """Where ``image``'s voxels land on another grid (bool): its field of view carried by ``transform``."""
    ones = nib.Nifti1Image(np.ones(image.shape[:3], np.float32), image.affine)
    return resample(ones, shape, affine, transform, order=0) > 0.5


def brain_coverage(image: nib.Nifti1Image, atlas: Atlas, transform: np.ndarray) -> float:
    """Fraction of the atlas brain inside ``image``'s field of view, carried to the atlas by ``transform``
    (atlas world → image world)."""
    brain = np.asarray(atlas.brain_mask) > 0.5
    inside = field_of_view(image, atlas.shape, atlas.affine, transform)
    return round(int((brain & inside).sum()) / max(int(brain.sum()), 1), 4)


def transform_path_for(out: Path | str, suffix: str = "_xfm.txt") -> Path:
    """A file beside an output image: ``x.nii.gz`` → ``x_xfm.txt`` (or ``x`` + ``suffix``)."""
    out = Path(out)
    stem = out.name
    for ending in (".nii.gz", ".nii", ".mnc.gz", ".mnc"):
        if stem.endswith(ending):
            stem = stem[: -len(ending)]
            break
    return out.with_name(f"{stem}{suffix}")


def register_brain_to_atlas(
    t1: nib.Nifti1Image, brain: np.ndarray, atlas: Atlas, backend: Backend
) -> Registration:
    """The 12-DOF T1 → atlas step of :func:`register_subject`: the brain-extracted T1 (``brain``, the native
    mask on the T1's grid) against the skull-stripped template, started from the two brain outlines, the
    metric over the atlas brain grown by :data:`BRAIN_MARGIN_MM`."""
    template = nib.Nifti1Image(np.asarray(atlas.t1, np.float32), atlas.affine)
    return register_brain_to_template(t1, brain, template, atlas.brain_mask, backend)


def register_brain_to_template(
    t1: nib.Nifti1Image,
    brain: np.ndarray,
    template: nib.Nifti1Image,
    template_brain: np.ndarray,
    backend: Backend,
) -> Registration:
    """:func:`register_brain_to_atlas` with any skull-stripped template and its brain mask (on its grid)."""
    return register_images(
        brain_extracted(t1, brain),
        template,
        dof=12,
        backend=backend,
        reference_mask=template_brain,
        moving_mask=brain,
    )


@dataclass(frozen=True)
class BrainAlignment:
    """A T1 aligned with a skull-stripped template, brain to brain: what the quality gate judges."""

    registration: Registration  # transform: template world -> T1 world
    image: np.ndarray  # the T1 resampled once onto the template grid
    mask: np.ndarray  # the T1's brain mask carried there (0/1)
    template_brain: np.ndarray  # the template's brain mask (bool, template grid)
    affine: np.ndarray  # the template grid's
    figures: dict  # quality.registration_figures
    resample_seconds: float


def align_brain(
    t1: nib.Nifti1Image,
    brain: np.ndarray,
    template: nib.Nifti1Image,
    template_brain: np.ndarray,
    engine: Backend,
    *,
    order: int = 3,
) -> BrainAlignment:
    """The 12-DOF step shared by :func:`register_subject` and :func:`register_pair`: register the
    brain-extracted T1 to the template (:func:`register_brain_to_template`), resample the T1 once, carry its
    brain mask (``brain``, on the T1's grid) and compute the gate's figures, the template brain compared only
    where the T1 was acquired. Judging them is :func:`gate_registration`'s."""
    template_brain = np.asarray(template_brain) > 0.5
    result = register_brain_to_template(t1, brain, template, template_brain, engine)
    shape, affine = template.shape[:3], template.affine
    start = time.perf_counter()
    image = engine.resample(t1, shape, affine, result.transform, order=order)
    seconds = round(time.perf_counter() - start, 3)
    mask = carry_mask(
        nib.Nifti1Image(np.asarray(brain, np.float32), t1.affine), shape, affine, result.transform
    )
    figures = quality.registration_figures(
        result.transform,
        image,
        mask,
        np.asanyarray(template.dataobj),
        template_brain,
        field_of_view(t1, shape, affine, result.transform),
    )
    return BrainAlignment(result, image, mask, template_brain, affine, figures, seconds)


def gate_registration(
    alignment: BrainAlignment,
    gate: GateOptions,
    *,
    subject: str | None,
    source: Path | str,
    figure: Path | None,
    evidence: Path | None = None,
    record: Mapping | None = None,
    draw_passed: bool = False,
    what: str = "T1 on the atlas",
) -> dict:
    """The registration quality gate on a T1 → template alignment; returns its verdict.

    A rejected registration is drawn to ``figure`` (when given) with ``record`` plus the figures and the
    verdict written beside it to ``evidence`` (default: ``figure`` with ``.json``), then raises
    :class:`~virtual_contrast.preprocess.quality.RegistrationRejectedError` naming the subject, ``source``
    and the figure. A passed one is drawn too with ``draw_passed`` (the single-step command's QC figure);
    otherwise a figure and evidence left by an earlier, rejected run are removed.
    """
    verdict = quality.gate_verdict(alignment.figures, gate)
    log.info(
        "sub-%s: registration quality %s: %s",
        subject,
        "passed" if verdict["passed"] else "REJECTED",
        alignment.figures,
    )
    if figure is not None:
        figure = Path(figure)
        evidence = figure.with_suffix(".json") if evidence is None else Path(evidence)
        if draw_passed or not verdict["passed"]:
            from virtual_contrast.figures import plot_registration

            plot_registration(
                alignment.image,
                alignment.template_brain,
                alignment.mask,
                alignment.figures,
                verdict,
                subject=subject,
                path=figure,
                affine=alignment.affine,
                what=what,
            )
            write_json({**(record or {}), "quality": alignment.figures, "gate": verdict}, evidence)
        else:  # left by an earlier, rejected run
            figure.unlink(missing_ok=True)
            evidence.unlink(missing_ok=True)
    quality.reject(verdict, subject=subject, figure=figure, path=source)
    return verdict


#: Scale (mm) of the Gaussian derivative in :func:`gradient_magnitude`: a few voxels of the usual 1 mm
#: grids, the thickness of cortex and ventricle walls, above the noise's scale.
GRADIENT_SIGMA_MM = 2.0


def gradient_magnitude(
    image: nib.Nifti1Image, sigma_mm: float = GRADIENT_SIGMA_MM
) -> nib.Nifti1Image:
    """The image's Gaussian gradient magnitude (``sigma_mm`` in mm along each voxel axis), same grid."""
    data = np.asanyarray(image.dataobj, dtype=np.float32)
    sigma = sigma_mm / np.maximum(voxel_sizes(image.affine), 1e-6)
    magnitude = ndimage.gaussian_gradient_magnitude(data, sigma=sigma)
    return nib.Nifti1Image(magnitude.astype(np.float32), image.affine)


def register_rigid(
    moving: nib.Nifti1Image,
    reference: nib.Nifti1Image,
    reference_brain: np.ndarray | nib.Nifti1Image,
    engine: Backend,
    *,
    feature: str = ALIGN_FEATURES[0],
) -> Registration:
    """6 DOF, two sequences of one exam: the whole moving image aligned with the reference within the
    reference's brain grown by :data:`BRAIN_MARGIN_MM`, started from the scanner's own alignment.

    ``feature`` ``"gradient"`` compares the two images' gradient magnitudes (:func:`gradient_magnitude`)
    instead of their intensities. Within a T1's brain, a T2's intensities send mutual information astray
    (the cohort's T2, aligned by construction, was moved 23° and 45 mm; the raw TCGA-FG-6692 T2 about
    30 mm), while its edges, where T1 and T2 both change, align it (the cohort's T2 to 1.2° and 1 mm; the
    TCGA T2 as when its bright CSF is clipped first). FLAIR and the T1c series align the same either way
    (within 0.5°), and keep their intensities."""
    if feature not in ALIGN_FEATURES:
        raise ValueError(f"feature must be one of {ALIGN_FEATURES}, not {feature!r}")
    if feature == "gradient":
        moving, reference = gradient_magnitude(moving), gradient_magnitude(reference)
    return register_images(
        moving, reference, dof=6, backend=engine, reference_mask=reference_brain, initial=np.eye(4)
    )


def register_subject(
    t1: Path,
    t1_mask: Path,
    others: Mapping[str, tuple[Path, Path]],
    atlas: Atlas,
    out_images: Mapping[str, Path],
    out_transforms: Mapping[str, Path],
    out_mask: Path,
    backend: str | Backend,
    *,
    order: int = 3,
    subject: str | None = None,
    align_features: Mapping[str, str] | None = None,
) -> dict:
    """All of one subject's sequences onto the atlas grid, each interpolated once; see the module docstring.

    * T1 → atlas: 12 DOF, brain to brain (``t1_mask``: the native brain mask on the T1's grid);
    * each channel of ``others`` (name → (image to resample, image to estimate the alignment from), e.g.
      ``"ADC": (adc, b0)``, ``"FLAIR": (flair, flair)``) → native T1: rigid (6 DOF) within the T1's brain,
      on the feature ``align_features`` names for it (:func:`register_rigid`; default intensities); low/ref
      T1c are registered too (a patient moves between series even when the headers agree);
    * channel ``c`` is pulled onto the atlas grid by ``R_c @ A_t1``; the brain mask goes to ``out_mask``.

    ``out_images``/``out_transforms`` name ``"T1"`` and every channel of ``others``; ``"T1"`` gets ``A_t1``
    (atlas world → T1 world), a channel its composed transform. Returns the provenance: backend, stages,
    transforms and the quality gate's figures (``quality``, with ``brain_coverage``: the fraction of the
    atlas brain in each sequence's field of view). The gate is not applied here (see the module docstring).
    """
    t_start = time.perf_counter()
    names = ["T1", *others]
    for mapping, what in ((out_images, "out_images"), (out_transforms, "out_transforms")):
        missing = [n for n in names if n not in mapping]
        if missing:
            raise InputError(f"{what} lacks {missing}", subject=subject)
    features = dict(align_features or {})
    unknown = sorted(set(features) - set(others))
    if unknown:
        raise InputError(f"align_features names {unknown}, which are not among {list(others)}")
    engine = select_backend(backend) if isinstance(backend, str) else backend
    t1_img = load_image(t1, subject=subject)
    mask_img = load_image(t1_mask, subject=subject)
    if mask_img.shape != t1_img.shape or not np.allclose(mask_img.affine, t1_img.affine, atol=1e-3):
        raise InputError(
            f"the brain mask (shape {mask_img.shape}) is not on the T1's grid (shape {t1_img.shape})",
            subject=subject,
            path=t1_mask,
        )
    brain = np.asanyarray(mask_img.dataobj) > 0.5
    if not brain.any():
        raise InputError("the native brain mask is empty", subject=subject, path=t1_mask)

    template = nib.Nifti1Image(np.asarray(atlas.t1, np.float32), atlas.affine)
    try:
        aligned = align_brain(t1_img, brain, template, atlas.brain_mask, engine, order=order)
    except InputError as exc:
        raise InputError(f"T1 -> atlas registration: {exc}", subject=subject, path=t1) from exc
    t1_reg, a_t1, t1_atlas, mask_atlas = (
        aligned.registration,
        aligned.registration.transform,
        aligned.image,
        aligned.mask,
    )
    figures = aligned.figures
    figures["brain_coverage"] = {"T1": figures["atlas_brain_in_field_of_view"]}
    save_image(t1_atlas, atlas.affine, out_images["T1"])
    save_image(mask_atlas, atlas.affine, out_mask, dtype=np.uint8)
    save_transform(a_t1, out_transforms["T1"], note=f"moving: {t1} (T1)\nreference: atlas grid")
    provenance: dict = {
        "backend": engine.name,
        "convention": "reference (atlas) world -> moving world, RAS mm",
        "atlas_shape": list(atlas.shape),
        "atlas_voxel_mm": atlas.voxel_mm,
        "interpolation_order": order,
        "brain_margin_mm": BRAIN_MARGIN_MM,
        "quality": figures,
        "channels": {
            "T1": {
                "registration": t1_reg.summary(),
                "source": str(t1),
                "brain_mask": str(t1_mask),
                "resample_seconds": aligned.resample_seconds,
            }
        },
    }

    for name, (image, estimate_from) in others.items():
        img = load_image(image, subject=subject)
        same = Path(estimate_from) == Path(image)
        est = img if same else load_image(estimate_from, subject=subject)
        try:
            rigid = register_rigid(
                est, t1_img, mask_img, engine, feature=features.get(name, ALIGN_FEATURES[0])
            )
        except InputError as exc:
            raise InputError(
                f"{name} -> T1 registration: {exc}", subject=subject, path=estimate_from
            ) from exc
        composed = rigid.transform @ a_t1
        figures["brain_coverage"][name] = brain_coverage(img, atlas, composed)
        t0 = time.perf_counter()
        data = engine.resample(img, atlas.shape, atlas.affine, composed, order=order)
        save_image(data, atlas.affine, out_images[name])
        save_transform(
            composed,
            out_transforms[name],
            note=f"moving: {image} ({name}), rigid {name}->T1 (estimated from {estimate_from}) composed "
            f"with the affine T1->atlas\nrigid part, T1 world -> {name} world: "
            f"{np.round(rigid.transform, 6).tolist()}",
        )
        provenance["channels"][name] = {
            "registration": rigid.summary(),
            "aligned_on": features.get(name, ALIGN_FEATURES[0]),
            "source": str(image),
            "estimated_from": str(estimate_from),
            "composed_transform": np.round(composed, 8).tolist(),
            "resample_seconds": round(time.perf_counter() - t0, 3),
        }
    provenance["seconds"] = round(time.perf_counter() - t_start, 3)
    log.info(
        "subject %s registered with %s in %.1f s; quality figures: %s",
        subject or t1,
        engine.name,
        provenance["seconds"],
        figures,
    )
    return provenance


def register_pair(
    moving: Path,
    reference: Path,
    out: Path,
    *,
    moving_mask: Path | None,
    reference_mask: Path,
    dof: int = 12,
    backend: str | Backend = "auto",
    gate: GateOptions | None = None,
    order: int = 3,
    subject: str | None = None,
) -> dict:
    """Register ``moving`` to ``reference`` and write it resampled once on the reference grid (the command
    ``virtual-contrast register``): the steps of :func:`register_subject` for one image.

    With 12 DOF, the moving image's brain (``moving_mask``, on any grid) is aligned with the skull-stripped
    reference (:func:`align_brain`) and ``gate`` is applied (:func:`gate_registration`); with 6 DOF the whole
    moving image is aligned with the reference within the reference's brain (:func:`register_rigid`; no gate:
    the sequences' contrasts differ). ``reference_mask`` may lie on any grid. Writes ``out`` (float32), the
    transform (``<out>_xfm.txt``), ``<out>_register.json`` (provenance, figures), ``<out>_qc.png`` and, with 12
    DOF, the moving brain mask carried to the reference grid (``<out>_desc-brain_mask.nii.gz``). A rejected
    registration writes only the figure and the JSON, then raises
    :class:`~virtual_contrast.preprocess.quality.RegistrationRejectedError`.
    """
    engine = select_backend(backend) if isinstance(backend, str) else backend
    mov = load_image(moving, subject=subject)
    ref = load_image(reference, subject=subject)
    ref_brain = on_grid(load_image(reference_mask, subject=subject), ref) > 0.5
    figure, record_path = (
        transform_path_for(out, "_qc.png"),
        transform_path_for(out, "_register.json"),
    )
    what = f"{Path(moving).name} on {Path(reference).name}"
    if dof == 12:
        if moving_mask is None:
            raise InputError("a 12-DOF registration needs the moving image's brain mask")
        mov_brain = on_grid(load_image(moving_mask, subject=subject), mov) > 0.5
        aligned = align_brain(mov, mov_brain, ref, ref_brain, engine, order=order)
        result, data, carried = aligned.registration, aligned.image, aligned.mask
        record = {
            "registration": result.summary(),
            "moving": str(moving),
            "reference": str(reference),
        }
        if gate is None:
            provenance = {**record, "quality": aligned.figures}
            _plot_pair(data, ref_brain, carried, provenance, ref, figure, subject, what)
        else:
            verdict = gate_registration(
                aligned, gate, subject=subject, source=moving, figure=figure,
                evidence=record_path, record=record, draw_passed=True, what=what,
            )  # fmt: skip
            provenance = {**record, "quality": aligned.figures, "gate": verdict}
    else:
        result = register_rigid(mov, ref, ref_brain, engine)
        data = engine.resample(mov, ref.shape, ref.affine, result.transform, order=order)
        carried = None
        # Within one exam the contrasts differ, so only the rigid transform's own figures apply.
        provenance = {
            "registration": result.summary(),
            "moving": str(moving),
            "reference": str(reference),
            "quality": quality.affine_figures(result.transform),
        }
        _plot_pair(data, ref_brain, None, provenance, ref, figure, subject, what)
    if "gate" not in provenance:
        write_json(provenance, record_path)
    save_image(data, ref.affine, out)
    if carried is not None:
        save_image(
            carried, ref.affine, transform_path_for(out, "_desc-brain_mask.nii.gz"), dtype=np.uint8
        )
    save_transform(
        result.transform,
        transform_path_for(out),
        note=f"moving: {moving}\nreference: {reference}\nbackend: {engine.name}, dof {dof}",
    )
    log.info(
        "registered %s to %s with %s in %.1f s", moving, reference, engine.name, result.seconds
    )
    return provenance


def _plot_pair(data, ref_brain, carried, provenance, ref, figure, subject, what) -> None:
    from virtual_contrast.figures import plot_registration

    plot_registration(
        data, ref_brain, carried, provenance["quality"], None,
        subject=subject, path=figure, affine=ref.affine, what=what,
    )  # fmt: skip
