"""``virtual-contrast predict`` for one exam, outside the workflow (as nnU-Net's predict_from_raw_data).

Three ways to give the exam (:class:`ExamFiles`): a raw exam (the models' input sequences, the pre-contrast
T1 and the low-dose T1c; for models taking the ADC, the DWI and its b-values), pre-processed first exactly as
the workflow that trained the models did, then predicted and mapped back onto the native low-dose T1c grid; a
folder of normalised volumes; or the normalised volumes one by one. The flags are the sequence table's
(:mod:`virtual_contrast.sequences`): a raw series by its key (``--t1``, ``--t2``, ``--dwi``), a normalised
channel by :func:`~virtual_contrast.sequences.normalised_flag` (``--adc``). Every input
is checked before any work and the outputs appear in the output folder only when everything succeeded.

A model file is data, never configuration of code. ``model.pt`` records the pre-processing options of the run
that trained it (:class:`~virtual_contrast.preprocess.options.PreprocessOptions`); the numbers among them
(atlas, grid, registration gate, normalisation percentiles, HD-BET's mode) are used as recorded, so a new exam
is fed as the training subjects were. What runs code is not taken from it: the brain-extraction and
registration backends, the HD-BET 2 weights folder (which nnU-Net unpickles, i.e. runs) and FSL's executable
come from the user's command line (default: the config schema's) and this installation
(:class:`PreprocessTools`). :func:`exam_options` compares what this installation would run with what the
models record: a difference is one line (exit status 2) naming both and the flags that choose the models'
tools, unless ``--accept-preprocess-mismatch`` says to go on, which the log and the exam's provenance record.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from virtual_contrast import sequences
from virtual_contrast.config import schema_defaults
from virtual_contrast.io import InputError, staged_folder
from virtual_contrast.layout import (
    ATLAS_SPACE,
    MODEL_FILES,
    NATIVE_SPACE,
    UNCERTAINTY_CALIBRATION_NAME,
    bids_name,
    exam_work_name,
    normalized_name,
    parse_name,
    predicted_name,
    spread_name,
    uncertainty_name,
)
from virtual_contrast.preprocess.options import PreprocessOptions, brain_extraction_label

log = logging.getLogger(__name__)

#: The flag of each channel given as a normalised volume (the command line's).
CHANNEL_FLAGS = {c: sequences.normalised_flag(c) for c in sequences.INPUT_CHANNELS}
#: The files a raw exam may hold (the command line's flags, without "--"): every sequence and companion
#: but the full-dose T1c, which a new exam lacks.
RAW_FILES = tuple(c for c in sequences.COLUMNS if c != sequences.key_of(sequences.TARGET))
#: Files that exist only raw: giving one makes the exam raw (the DWI and its b-values).
ONLY_RAW = tuple(c for c in RAW_FILES if c not in {f[2:] for f in CHANNEL_FLAGS.values()})
ACCEPT_FLAG = "--accept-preprocess-mismatch"


def raw_exam_files(channels: list[str]) -> tuple[str, ...]:
    """The files of a raw exam for models taking ``channels`` (flags without "--"): ``t1 flair dwi bval
    low`` for the paper's four inputs."""
    return sequences.raw_columns(sequences.exam_channels(channels))


@dataclass(frozen=True)
class ExamFiles:
    """The exam as given on the command line: ``images`` by flag without "--" (``t1``, ``t2``, ``adc``,
    ``dwi``, ...; only those given). It is a raw exam when ``raw_exam`` is set or a file that exists only raw
    (the DWI, its b-values) is given; then every image is raw."""

    images: dict[str, Path] = field(default_factory=dict)
    raw_exam: bool = False
    channels_dir: Path | None = None
    mask: Path | None = None  # brain mask: prediction set to 0 outside

    @property
    def raw(self) -> bool:
        return self.raw_exam or any(key in self.images for key in ONLY_RAW)


@dataclass(frozen=True)
class PreprocessTools:
    """What a raw exam is pre-processed with on this installation: the user's choices (command line, the
    config schema's defaults), never a model file's (see the module docstring)."""

    skull_strip_backend: str  # auto | deepbet | hdbet | hdbet2
    hdbet2_weights: str  # HD-BET 2 weights folder; "" = none given
    register_backend: str  # auto | fsl | simpleitk
    hdbet_mode: str | None = (
        None  # None: as recorded in the models (a number of the method, not code)
    )
    atlas: Path | None = None  # the workflow's atlas folder; None: prepared from the recorded atlas
    accept_mismatch: bool = False
    override_gate: bool = (
        False  # predict despite the registration quality gate (said in the outputs)
    )


@dataclass(frozen=True)
class Prediction:
    """Where :func:`predict_exam` wrote vir-T1c."""

    atlas_space: Path
    native: Path | None = None  # raw exam only: on the native low-dose T1c grid
    work_dir: Path | None = None  # raw exam only: every intermediate and the provenance
    gate_failures: tuple[
        str, ...
    ] = ()  # raw exam only: why the quality gate rejected it (overridden)
    rejected_figure: Path | None = (
        None  # raw exam only, gate overridden: the registration to look at
    )
    uncertainty: Path | None = None  # atlas space: the expected |vir - ref| (or the passes' spread)
    uncertainty_native: Path | None = None  # raw exam only
    calibration: Path | None = None  # the calibration applied; None: the map is the passes' std

    @property
    def gate_overridden(self) -> bool:
        return bool(self.gate_failures)


def find_models(paths: list[Path]) -> list[Path]:
    """``model.pt`` files given directly or found (recursively) in the given folders, sorted."""
    found: list[Path] = []
    for p in paths:
        if p.is_dir():
            hits = sorted(p.rglob(MODEL_FILES["model"]))
            if not hits:
                raise InputError(f"no {MODEL_FILES['model']} found in this folder", path=p)
            found.extend(hits)
        elif p.exists():
            found.append(p)
        else:
            raise InputError("model not found", path=p)
    return found


def find_calibration(models: list[Path], given: Path | None) -> Path | None:
    """The uncertainty calibration: ``given``, else the workflow's file beside the fold folders
    (``models/uncertainty_calibration.json`` next to ``models/fold-*/model.pt``), else None."""
    if given is not None:
        if not given.exists():
            raise InputError("uncertainty calibration not found", path=given)
        return given
    folders = {m.resolve().parent.parent for m in models}
    found = [f / UNCERTAINTY_CALIBRATION_NAME for f in folders]
    found = [f for f in found if f.exists()]
    return found[0] if len(found) == 1 else None


def recorded_options(models: list[Path]) -> PreprocessOptions:
    """The pre-processing options stored in the models (all must agree)."""
    from virtual_contrast.model.checkpoint import load_checkpoint

    stored = []
    for path in models:
        ckpt = load_checkpoint(path)
        if "preprocess" not in ckpt:
            raise InputError(
                "this model.pt does not record the pre-processing options it was trained with (written "
                "by an older version, or trained outside the workflow): pre-process the exam with the "
                "workflow and pass the normalised volumes (--channels-dir)",
                path=path,
            )
        stored.append(ckpt["preprocess"])
    if any(s != stored[0] for s in stored[1:]):
        raise InputError(
            "the models were trained on differently pre-processed volumes: give models of one run",
            path=models[0],
        )
    return PreprocessOptions.from_dict(stored[0], source=f"pre-processing options in {models[0]}")


def exam_options(
    recorded: PreprocessOptions, tools: PreprocessTools, *, source: Path | None = None
) -> tuple[PreprocessOptions, dict]:
    """The options a raw exam is pre-processed with, and the record of the check (for its provenance).

    The recorded options with this installation's tools (:class:`PreprocessTools`): backends resolved here
    (``auto`` as the workflow resolves it), the user's HD-BET 2 weights folder (the recorded one is never
    used), HD-BET's mode as recorded unless given. What the models record is resolved the same way (a
    recorded ``auto`` brain extraction by the recorded configuration, a recorded ``auto`` registration as
    here) and compared: a difference raises an :class:`InputError` (one line, naming ``source``) unless
    ``tools.accept_mismatch``.
    """
    from virtual_contrast.preprocess.registration import resolve_backend as resolve_registration
    from virtual_contrast.preprocess.skull_strip import resolve_backend as resolve_extraction

    strip, strip_reason = resolve_extraction(tools.skull_strip_backend, tools.hdbet2_weights)
    register, register_reason = resolve_registration(tools.register_backend)
    # The mode given, else the models' (when they were trained on HD-BET v1), else the schema's default.
    mode = (
        tools.hdbet_mode
        or recorded.skull_strip.hdbet_mode
        or schema_defaults("preprocess", "hdbet_mode")
    )
    # The recorded folder's name only tells what a recorded `auto` meant; nothing is read from it.
    trained_strip, _ = resolve_extraction(
        recorded.skull_strip.backend, recorded.skull_strip.hdbet2_weights
    )
    trained_register = (
        register if recorded.register.backend == "auto" else recorded.register.backend
    )
    trained = {
        "brain_extraction": brain_extraction_label(
            {"backend": trained_strip, "mode": recorded.skull_strip.hdbet_mode}
        ),
        "registration": trained_register,
    }
    here = {
        "brain_extraction": brain_extraction_label({"backend": strip, "mode": mode}),
        "registration": register,
    }
    reasons = {"brain_extraction": strip_reason, "registration": register_reason}
    flags = {
        "brain_extraction": f"--skull-strip-backend {trained_strip}"
        + (
            f" --hdbet-mode {recorded.skull_strip.hdbet_mode}"
            if trained_strip == "hdbet" and mode != recorded.skull_strip.hdbet_mode
            else ""
        )
        + (" --hdbet2-weights <your HD-BET 2 weights folder>" if trained_strip == "hdbet2" else ""),
        "registration": f"--register-backend {trained_register}",
    }
    differ = [step for step in trained if trained[step] != here[step]]
    check = {
        "trained_with": trained,
        "this_run": here,
        "reasons": reasons,
        "differences": differ,
        "accepted": bool(differ) and tools.accept_mismatch,
    }
    if differ and not tools.accept_mismatch:
        steps = " and ".join(f"{s.replace('_', ' ')} {trained[s]}" for s in differ)
        ours = " and ".join(f"{here[s]} ({reasons[s]})" for s in differ)
        raise InputError(
            f"the models were trained on volumes pre-processed with {steps}, but this run would use "
            f"{ours}: choose the models' tools with {' '.join(flags[s] for s in differ)}, or pass "
            f"{ACCEPT_FLAG} to predict with these tools anyway",
            path=source,
        )
    for step in differ:
        log.warning(
            "pre-processing: %s with %s, not %s as the models were trained (%s)",
            step.replace("_", " "),
            here[step],
            trained[step],
            ACCEPT_FLAG,
        )
    options = replace(
        recorded,
        skull_strip=replace(
            recorded.skull_strip,
            backend=strip,
            hdbet_mode=mode,
            hdbet2_weights=tools.hdbet2_weights,
        ),
        register=replace(recorded.register, backend=register),
    )
    return options, check


def predict_exam(
    model_paths: list[Path],
    files: ExamFiles,
    out: Path,
    *,
    tools: PreprocessTools,
    subject: str | None = None,
    device: str = "auto",
    tta: bool = True,
    batch: int | None = None,
    calibration: Path | None = None,
) -> Prediction:
    """vir-T1c of one exam with the fold models (``model.pt`` files or folders holding them): the exam
    checked (:func:`_exam_inputs`), a raw one pre-processed (:func:`_preprocess_raw_exam`), every fold
    model's 8 mirror configurations averaged (none with ``tta=False``), all written to ``out`` at once.

    Beside vir-T1c, in both spaces: its uncertainty map, the expected |vir - ref| of ``calibration`` (default:
    the workflow's, found beside the fold folders, :func:`find_calibration`), or without one the standard
    deviation over the passes (the log says which); and the raw spreads of the passes (atlas space)."""
    from virtual_contrast.model.checkpoint import load_checkpoint
    from virtual_contrast.model.predict import predict_subject
    from virtual_contrast.model.uncertainty import Calibration
    from virtual_contrast.subjects import check_subject_id

    if subject is not None:
        check_subject_id(subject)
    if tools.override_gate and not files.raw:
        raise InputError(
            "--override-gate applies to a raw exam (--raw): the registration quality gate runs when "
            "predict pre-processes the exam"
        )
    models = find_models(model_paths)
    channels = list(load_checkpoint(models[0])["channels"])
    calibration = find_calibration(models, calibration)
    fitted = Calibration.load(calibration) if calibration is not None else None
    subject, given = _exam_inputs(files, channels, subject)
    options = check = None
    if files.raw:
        options, check = exam_options(recorded_options(models), tools, source=models[0])

    atlas_name = predicted_name(subject, ATLAS_SPACE)
    native_name = predicted_name(subject, NATIVE_SPACE)
    uncertainty_names = {
        space: uncertainty_name(subject, space) for space in (ATLAS_SPACE, NATIVE_SPACE)
    }
    work_dir = exam_work_name(subject)
    with staged_folder(out) as stage:
        mask, to_native = files.mask, None
        if files.raw:
            prepared = _preprocess_raw_exam(
                files, channels, stage / work_dir, out, subject, options, check, tools
            )
            channel_paths = dict(prepared["channels"])
            mask = mask or prepared["mask"]
            to_native = prepared["to_native"]
        elif files.channels_dir:
            from virtual_contrast.model.data import find_subject_volumes

            sv = find_subject_volumes(files.channels_dir, subject, channels, target=False)
            channel_paths, mask = dict(sv.channels), mask or sv.mask
        else:
            channel_paths = {c: given[c] for c in channels}
        predict_subject(
            models,
            channel_paths,
            stage / atlas_name,
            device=device,
            flips="all8" if tta else "none",
            mask_path=mask,
            subject=subject,
            batch=batch,
            uncertainty_path=stage / uncertainty_names[ATLAS_SPACE],
            spread_path=stage / spread_name(subject),
            calibration=fitted,
            pre_path=channel_paths.get(sequences.ANCHOR) or given.get(sequences.ANCHOR),
        )
        if to_native is not None:
            to_native(stage / atlas_name, stage / native_name)
            prepared["uncertainty_to_native"](
                stage / uncertainty_names[ATLAS_SPACE], stage / uncertainty_names[NATIVE_SPACE]
            )
    uncertainty = {"uncertainty": out / uncertainty_names[ATLAS_SPACE], "calibration": calibration}
    if to_native is None:
        return Prediction(out / atlas_name, **uncertainty)
    gate = prepared["gate"]
    overridden = tuple(gate["failures"]) if gate.get("overridden") else ()
    return Prediction(
        out / atlas_name,
        out / native_name,
        out / work_dir,
        gate_failures=overridden,
        rejected_figure=_rejected_figure(out, subject) if overridden else None,
        uncertainty_native=out / uncertainty_names[NATIVE_SPACE],
        **uncertainty,
    )


def _rejected_figure(out: Path, subject: str) -> Path:
    return out / bids_name(subject, desc="rejected", suffix="registration", extension=".png")


def _exam_inputs(
    files: ExamFiles, channels: list[str], subject: str | None
) -> tuple[str, dict[str, Path | None]]:
    """Which way the exam was given, checked before any work: the subject id and the normalised files by
    channel (when given one by one)."""
    from virtual_contrast.subjects import check_subject_id

    given = {c: files.images.get(flag[2:]) for c, flag in CHANNEL_FLAGS.items()}
    if files.raw:
        needed = raw_exam_files(channels)
        extra = sorted(set(files.images) - set(needed))
        if extra or files.channels_dir:
            not_raw = [f"--{k}" for k in extra] + (["--channels-dir"] if files.channels_dir else [])
            raise InputError(
                f"a raw exam for models taking {channels} is --{' --'.join(needed)}: "
                f"{' '.join(not_raw)} cannot be part of it"
            )
        missing = [k for k in needed if k not in files.images]
        if missing:
            raise InputError(
                f"a raw exam needs --{' --'.join(missing)} as well (the models take {channels})"
            )
        return subject or "exam", given
    if files.channels_dir:
        if any(given.values()):
            raise InputError(
                "give either --channels-dir or the normalised volumes "
                f"{' '.join(CHANNEL_FLAGS[c] for c in channels)}, not both"
            )
        return check_subject_id(subject or subject_in_dir(files.channels_dir)), given
    if "ADC" in channels and given["ADC"] is None and any(given.values()):
        raise InputError(
            "no ADC: a raw exam needs --dwi and --bval (the ADC is computed from the DWI); to "
            "predict from normalised volumes, give the normalised ADC with --adc"
        )
    missing = [CHANNEL_FLAGS[c] for c in channels if given.get(c) is None]
    if missing:
        raise InputError(
            f"the models take {channels}: pass {' '.join(missing)} (or --channels-dir, or a raw "
            f"exam with --raw --{' --'.join(raw_exam_files(channels))})"
        )
    subject = subject or "exam"
    check_normalised({c: given[c] for c in channels}, subject)
    return subject, given


def _preprocess_raw_exam(
    files: ExamFiles,
    channels: list[str],
    work_dir: Path,
    out: Path,
    subject: str,
    options: PreprocessOptions,
    check: dict,
    tools: PreprocessTools,
):
    """The raw exam through the workflow's pre-processing (``preprocess_exam``), into ``work_dir``; a
    registration rejected by the stored gate leaves its figure in ``out`` (which then holds nothing else)."""
    from virtual_contrast.preprocess.exam import preprocess_exam

    return preprocess_exam(
        exam=files.images,
        channels=channels,
        out_dir=work_dir,
        subject=subject,
        options=options,
        atlas_dir=tools.atlas,
        rejected_figure=_rejected_figure(out, subject),
        tools_check=check,
        override_gate=tools.override_gate,
    )


def subject_in_dir(folder: Path) -> str:
    """The one subject whose normalised volumes lie in ``folder``."""
    pattern = normalized_name("*", "*").removesuffix(".gz") + "*"  # .nii or .nii.gz
    ids = sorted({parse_name(f.name)["sub"] for f in folder.rglob(pattern)})
    if len(ids) != 1:
        raise InputError(
            f"cannot tell the subject: found {ids or 'no normalised volumes'}; pass --subject",
            path=folder,
        )
    return ids[0]


def check_normalised(paths: dict[str, Path], subject: str) -> None:
    """Normalised volumes lie within the normalised scale; a raw image given instead is an error."""
    from virtual_contrast.intensity import range_problem
    from virtual_contrast.io import load_image

    for channel, path in paths.items():
        problem = range_problem(np.asanyarray(load_image(path, subject=subject).dataobj))
        if problem is not None:
            raise InputError(
                f"{channel} is not a normalised volume: {problem}; for a raw exam pass --raw (it is then "
                "pre-processed first)",
                subject=subject,
                path=path,
            )
