"""One raw exam through the whole pre-processing chain, outside Snakemake.

``virtual-contrast predict --raw`` (or ``--dwi --bval``) uses this for an exam that arrives after the models
were trained: the same step functions as the workflow's rules (``register`` checks the exam, then ``adc``
when the ADC is a channel, ``skull_strip``, ``register``, ``crop``, ``normalize``), in the same order, with
the same :class:`~virtual_contrast.preprocess.options.PreprocessOptions` (those the models store, with the
tools of this installation: ``virtual_contrast.model.predict_exam.exam_options``), written under one folder.
The exam holds the models' input sequences, the pre-contrast T1 and the low-dose T1c
(:func:`virtual_contrast.sequences.exam_channels`); there is no full-dose T1c.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TypedDict

from virtual_contrast import layout, sequences
from virtual_contrast.atlas import ATLAS_FILES, load_atlas, prepare_atlas
from virtual_contrast.io import InputError, write_json
from virtual_contrast.preprocess.adc import adc_from_files
from virtual_contrast.preprocess.crop import crop_images
from virtual_contrast.preprocess.inputs import check_exam
from virtual_contrast.preprocess.native import (
    NativeGrid,
    native_grid,
    prediction_to_native,
    uncertainty_to_native,
)
from virtual_contrast.preprocess.normalize import normalize_images
from virtual_contrast.preprocess.options import PreprocessOptions
from virtual_contrast.preprocess.quality import gate_subject
from virtual_contrast.preprocess.register import register_subject
from virtual_contrast.preprocess.skull_strip import skull_strip

log = logging.getLogger(__name__)

ANCHOR, LOW_DOSE = sequences.ANCHOR, sequences.LOW_DOSE


class PreparedExam(TypedDict):
    channels: dict[str, Path]  # channel name -> normalised, cropped atlas-space NIfTI
    mask: Path  # brain mask on the same grid
    to_native: Callable[[Path, Path], Path]  # atlas-space image -> the native low-dose T1c grid
    uncertainty_to_native: Callable[[Path, Path], Path]  # its uncertainty map, the same way
    provenance: Path
    gate: dict  # the registration quality gate's verdict (``overridden`` when predicted despite it)


def exam_atlas(
    atlas_dir: Path | str | None, options: PreprocessOptions, work_dir: Path | str
) -> Path:
    """The atlas folder to register to: ``atlas_dir`` when given, else the atlas the options name (the
    template shipped with nilearn unless the workflow was given other files) prepared at their voxel size
    under ``work_dir``."""
    if atlas_dir is not None:
        folder = Path(atlas_dir)
        missing = [name for name in ATLAS_FILES.values() if not (folder / name).exists()]
        if missing:
            raise InputError(
                f"not an atlas folder (lacks {', '.join(missing)}); the workflow writes one under "
                f"{layout.atlas_dir('<voxel>')}/",
                path=folder,
            )
        return folder
    for key, path in (("t1", options.atlas_t1), ("brain_mask", options.atlas_brain_mask)):
        if path and not Path(path).exists():
            raise InputError(
                f"the models were pre-processed with atlas {key} {path}, which is not on this machine: "
                "pass the workflow's atlas folder with --atlas",
                path=path,
            )
    folder = Path(work_dir) / f"atlas_res-{options.voxel_mm:g}mm"
    prepare_atlas(
        folder,
        options.voxel_mm,
        t1=options.atlas_t1 or None,
        brain_mask=options.atlas_brain_mask or None,
    )
    return folder


def preprocess_exam(
    *,
    exam: Mapping[str, Path | str],
    channels: Iterable[str],
    out_dir: Path | str,
    subject: str,
    options: PreprocessOptions,
    atlas_dir: Path | str | None = None,
    rejected_figure: Path | None = None,
    device: str = "cpu",
    override_gate: bool = False,
    tools_check: dict | None = None,
) -> PreparedExam:
    """Pre-process one raw exam into ``out_dir`` (step folders named like the workflow's) for a model taking
    ``channels``; see the module docstring. ``exam`` maps raw keys (subjects-table columns: ``t1``,
    ``flair``, ``dwi``, ``bval``, ``low``, ...) to files and holds those the channels need
    (:func:`virtual_contrast.sequences.raw_columns`). Every input problem is an :class:`InputError` naming the subject and the file, raised before
    any work; a registration rejected by the quality gate (the models' ``options.register.gate``, coverage of
    the atlas brain by every sequence included) draws ``rejected_figure`` and raises, unless
    ``override_gate``: the exam then goes on, and the provenance's ``register.gate`` says ``overridden``.
    ``tools_check`` (how the tools compare with those the models were trained with) goes into the
    provenance."""
    start = time.perf_counter()
    out = Path(out_dir)
    exam_channels = sequences.exam_channels(channels)
    needed = sequences.raw_columns(exam_channels)
    missing = [key for key in needed if exam.get(key) is None]
    if missing:
        labels = ", ".join(sequences.COLUMN_LABELS[key] for key in missing)
        raise InputError(
            f"the raw exam lacks {labels} (needed for {list(exam_channels)})", subject=subject
        )
    raw = {key: Path(exam[key]) for key in needed}
    # The images checked as images; the DWI is checked with its b-values.
    images = {
        k: p for k, p in raw.items() if k in sequences.BY_KEY and not sequences.BY_KEY[k].computed
    }
    provenance: dict = {
        "subject": subject,
        "channels": list(exam_channels),
        "inputs": {k: str(v) for k, v in raw.items()},
        "options": options.to_dict(),
        **({"tools_check": tools_check} if tools_check is not None else {}),
        "checks": check_exam(images, subject=subject, dwi=raw.get("dwi"), bval=raw.get("bval")),
    }

    def files(names: dict[str, str]) -> dict[str, Path]:
        return {key: Path(path) for key, path in names.items()}

    # Each channel's image to resample and the image its alignment with the T1 is estimated on.
    alignment = {c: (raw[sequences.key_of(c)],) * 2 for c in exam_channels if c != ANCHOR}
    if "ADC" in exam_channels:  # computed from the DWI on its grid, aligned through its mean b0
        adc_outputs = files(layout.adc_files(subject, out))
        adc, b0 = adc_outputs["adc"], adc_outputs["b0"]
        provenance["adc"] = adc_from_files(raw["dwi"], raw["bval"], adc, b0, subject=subject)
        alignment["ADC"] = (adc, b0)
    t1, low = raw[sequences.key_of(ANCHOR)], raw[sequences.key_of(LOW_DOSE)]

    native_mask = files(layout.skull_strip_files(subject, out))["mask"]
    provenance["skull_strip"] = skull_strip(
        t1, native_mask, options.skull_strip, device=device, subject=subject
    )

    atlas_folder = exam_atlas(atlas_dir, options, out)
    registered = files(layout.register_files(subject, exam_channels, out))
    brain = registered.pop("mask")
    del registered["provenance"]  # the exam's provenance is one file (below)
    transforms = {c: Path(layout.transform_file(subject, c, out)) for c in exam_channels}
    register = register_subject(
        t1,
        native_mask,
        alignment,
        load_atlas(atlas_folder),
        out_images={"T1": registered[ANCHOR], **{c: registered[c] for c in alignment}},
        out_transforms={"T1": transforms[ANCHOR], **{c: transforms[c] for c in alignment}},
        out_mask=brain,
        backend=options.register.backend,
        subject=subject,
        align_features={c: sequences.BY_CHANNEL[c].align_feature for c in alignment},
    )
    register["gate"] = gate_subject(
        register["quality"],
        options.register.gate,
        subject=subject,
        t1_atlas=registered[ANCHOR],
        mask_atlas=brain,
        atlas_brain_mask=atlas_folder / ATLAS_FILES["brain_mask"],
        rejected_figure=rejected_figure,
        path=t1,
        override=override_gate,
    )
    provenance["register"] = register

    atlas_mask = atlas_folder / ATLAS_FILES["brain_mask"]
    cropped = files(layout.crop_files(subject, exam_channels, out))
    provenance["crop"] = crop_images(
        {**registered, "mask": brain},
        cropped,
        shape=options.crop_shape,
        atlas_brain_mask=atlas_mask,
        subject=subject,
    )

    normalized = files(layout.normalize_files(subject, exam_channels, out))
    normalized = {c: normalized[c] for c in exam_channels}  # the mask stays with the crop
    ranges = normalize_images(
        {c: cropped[c] for c in exam_channels},
        cropped["mask"],
        normalized,
        percentiles=options.normalize_percentiles,
        subject=subject,
    )
    provenance["normalize"] = ranges
    provenance["seconds"] = round(time.perf_counter() - start, 2)
    provenance_path = write_json(provenance, out / layout.exam_provenance_name(subject))
    log.info(
        "sub-%s: raw exam pre-processed in %.1f s (skull stripping %s, registration %s)",
        subject,
        provenance["seconds"],
        provenance["skull_strip"]["backend"],
        register["backend"],
    )
    low_range = (ranges[LOW_DOSE]["low_value"], ranges[LOW_DOSE]["high_value"])

    # Built once, and only when a prediction comes back (the gate may refuse the exam first).
    @functools.cache
    def grid() -> NativeGrid:
        return native_grid(
            low,
            transforms[LOW_DOSE],
            t1_mask=native_mask,
            t1_transform=transforms[ANCHOR],
            intensity_range=low_range,
            subject=subject,
            t1=t1,
        )

    return PreparedExam(
        channels=normalized,
        mask=cropped["mask"],
        to_native=lambda atlas_image, out_path: prediction_to_native(atlas_image, grid(), out_path),
        uncertainty_to_native=lambda atlas_image, out_path: uncertainty_to_native(
            atlas_image, grid(), out_path
        ),
        provenance=provenance_path,
        gate=register["gate"],
    )
