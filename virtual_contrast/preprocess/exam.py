"""One raw exam through the whole pre-processing chain, outside Snakemake.

``virtual-contrast predict --t1 --flair --dwi --bval --low`` uses this for an exam that arrives after the
models were trained: the same functions as the workflow's rules ``adc`` → ``register`` → ``skull_strip`` →
``crop`` → ``normalize``, in the same order and with the same options, written under one folder. There is no
full-dose T1c, so the chain handles the four input sequences only.

The models define the grid: the atlas at their voxel size, cropped to their grid shape (both are in the model
checkpoint; see :func:`virtual_contrast.model.train.train_fold`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict

from virtual_contrast.atlas import ATLAS_FILES, load_atlas, prepare_atlas
from virtual_contrast.io import InputError, write_json
from virtual_contrast.preprocess.adc import adc_from_files
from virtual_contrast.preprocess.crop import crop_images
from virtual_contrast.preprocess.normalize import normalize_image
from virtual_contrast.preprocess.register import register_subject
from virtual_contrast.preprocess.skull_strip import skull_strip

log = logging.getLogger(__name__)

#: Channels of a raw exam, in the workflow's names (virtual_contrast.model.data.INPUT_CHANNELS).
EXAM_CHANNELS = ("T1w", "FLAIR", "ADC", "lowT1c")


class PreparedExam(TypedDict):
    channels: dict[str, Path]  # channel name -> normalised, cropped atlas-space NIfTI
    mask: Path  # brain mask on the same grid
    to_native: Callable[[Path, Path], Path]  # atlas-space image -> the native low-dose T1c grid
    provenance: Path


def exam_atlas(atlas_dir: Path | str | None, voxel_mm: float, work_dir: Path | str) -> Path:
    """The atlas folder to register to: ``atlas_dir`` when given, else the ICBM 2009a template shipped
    with nilearn prepared at ``voxel_mm`` under ``work_dir`` (once; reused by later calls)."""
    if atlas_dir is not None:
        folder = Path(atlas_dir)
        missing = [name for name in ATLAS_FILES.values() if not (folder / name).exists()]
        if missing:
            raise InputError(
                f"not an atlas folder (lacks {', '.join(missing)}); the workflow writes one under "
                "results/atlas/res-<voxel>mm/",
                path=folder,
            )
        return folder
    folder = Path(work_dir) / f"atlas_res-{voxel_mm:g}mm"
    if not all((folder / name).exists() for name in ATLAS_FILES.values()):
        prepare_atlas(folder, voxel_mm)
    return folder


def preprocess_exam(
    *,
    t1: Path | str,
    flair: Path | str,
    dwi: Path | str,
    bval: Path | str,
    low: Path | str,
    out_dir: Path | str,
    subject: str,
    voxel_mm: float,
    crop_shape: tuple[int, int, int],
    atlas_dir: Path | str | None = None,
    register_backend: str = "auto",
    skull_strip_backend: str = "auto",
    hdbet_weights: Path | str | None = None,
    percentiles: tuple[float, float] = (1.0, 99.0),
) -> PreparedExam:
    """Pre-process one raw exam into ``out_dir`` (step folders named like the workflow's); see the module
    docstring. Every input problem is an :class:`InputError` naming the subject and the file."""
    from virtual_contrast.model.export import export_native

    start = time.perf_counter()
    out = Path(out_dir)
    raw = {"t1": t1, "flair": flair, "dwi": dwi, "bval": bval, "low": low}
    for key, path in raw.items():
        if not Path(path).exists():
            raise InputError(f"--{key} file not found", subject=subject, path=path)

    def step(folder: str, name: str) -> Path:
        return out / folder / f"sub-{subject}_{name}"

    adc = step("adc", "space-dwi_ADC.nii.gz")
    b0 = step("adc", "space-dwi_desc-b0_dwi.nii.gz")
    provenance: dict = {"subject": subject, "inputs": {k: str(v) for k, v in raw.items()}}
    provenance["adc"] = adc_from_files(dwi, bval, adc, b0, subject=subject)

    atlas_folder = exam_atlas(atlas_dir, voxel_mm, out)
    registered = {c: step("register", f"space-ICBM09a_{c}.nii.gz") for c in EXAM_CHANNELS}
    transforms = {c: step("register", f"from-{c}_to-ICBM09a_xfm.txt") for c in EXAM_CHANNELS}
    register = register_subject(
        Path(t1),
        {"FLAIR": (Path(flair), Path(flair)), "ADC": (adc, b0), "lowT1c": (Path(low), Path(low))},
        load_atlas(atlas_folder),
        out_images={"T1": registered["T1w"], **{c: registered[c] for c in EXAM_CHANNELS[1:]}},
        out_transforms={"T1": transforms["T1w"], **{c: transforms[c] for c in EXAM_CHANNELS[1:]}},
        backend=register_backend,
        subject=subject,
    )
    provenance["register"] = register

    atlas_mask = atlas_folder / ATLAS_FILES["brain_mask"]
    brain = step("skull_strip", "space-ICBM09a_desc-brain_mask.nii.gz")
    provenance["skull_strip"] = skull_strip(
        registered["T1w"],
        brain,
        backend=skull_strip_backend,
        atlas_brain_mask=atlas_mask,
        hdbet_weights=hdbet_weights,
        subject=subject,
    )

    cropped = {c: step("crop", f"desc-crop_{c}.nii.gz") for c in EXAM_CHANNELS}
    cropped["mask"] = step("crop", "desc-brain_mask.nii.gz")
    provenance["crop"] = crop_images(
        {**registered, "mask": brain},
        cropped,
        shape=crop_shape,
        atlas_brain_mask=atlas_mask,
        subject=subject,
    )

    normalized = {c: step("normalize", f"desc-norm_{c}.nii.gz") for c in EXAM_CHANNELS}
    lo, hi = percentiles
    ranges = {
        c: normalize_image(
            cropped[c], cropped["mask"], normalized[c], low=lo, high=hi, subject=subject
        )
        for c in EXAM_CHANNELS
    }
    provenance["normalize"] = ranges
    provenance["seconds"] = round(time.perf_counter() - start, 2)
    provenance_path = write_json(provenance, out / f"sub-{subject}_provenance.json")
    log.info(
        "sub-%s: raw exam pre-processed in %.1f s (registration %s, skull stripping %s)",
        subject,
        provenance["seconds"],
        register["backend"],
        provenance["skull_strip"]["backend"],
    )
    low_range = (ranges["lowT1c"]["low_value"], ranges["lowT1c"]["high_value"])

    def to_native(atlas_image: Path, out_path: Path) -> Path:
        return export_native(
            atlas_image,
            low,
            transforms["lowT1c"],
            out_path,
            intensity_range=low_range,
            subject=subject,
        )

    return PreparedExam(
        channels=normalized,
        mask=cropped["mask"],
        to_native=to_native,
        provenance=provenance_path,
    )
