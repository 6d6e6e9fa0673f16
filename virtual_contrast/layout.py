"""The study's file layout: the path of every file that the workflow, its scripts and the command line read or
write, built from entities, so that each name is spelled here and nowhere else.

File names follow BIDS: ``sub-<label>[_ses-<label>][_<key>-<value>...]_<suffix><extension>``, with the entities
in the order the caller gives them (as hippunfold's ``bids()`` helper builds its paths). Every path under
``results/`` is relative to Snakemake's working directory; Snakemake wildcards pass through (``"{subject}"``
is a valid label here). ::

    results/
      atlas/res-<mm>mm/atlas_T1w.nii.gz ...              the atlas on a grid (rule atlas)
      cohort/sub-<id>/ses-<n>/{anat,dwi}/...               the embedded cohort, BIDS-like (rule cohort)
      dicom/sub-<id>/ses-<n>/{anat,dwi}/...                DICOM exams imported (rule import_dicom)
      sub-<id>/<step>/sub-<id>_<entities>_<suffix>.<ext>   one folder per step: adc, skull_strip, register,
                                                           crop, normalize, predict, metrics, lesions, ...
      sub-<id>/sub-<id>_qc.png, sub-<id>/provenance.json
      models/fold-<k>/{model.pt,train_log.tsv,loss_curve.png,checkpoint/}
      tables/<name>.tsv, figures/<name>.png, figures/<name>/sub-<id>_<name>.png
      reader_study/{reading_key.tsv,reading_lists/,detection.tsv,...}
      benchmarks/<rule>/<entities>.tsv
    logs/<rule>/<entities>.log
    readings/{lesions.csv,reads.csv,sessions/}            the readers' marks (virtual-contrast read): beside
                                                           results/, never under it

The functions return strings (patterns with wildcards are strings too), except :func:`bids_exam_files`, which
names real files under any folder.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from virtual_contrast.sequences import SEQUENCES as SEQUENCE_TABLE

#: Every output of the workflow lies under this folder (relative to Snakemake's working directory).
RESULTS = "results"
#: The rules' log files.
LOGS = "logs"
#: ``space`` entity of the atlas grid: the ICBM 2009a nonlinear symmetric template.
ATLAS_SPACE = "ICBM09a"
#: ``space`` entity of an image on the grid of the exam's own series (vir-T1c on the low-dose T1c's grid).
NATIVE_SPACE = "native"
NIFTI = ".nii.gz"

# --- names -----------------------------------------------------------------------------------------------


def bids_name(
    subject: str | None = None,
    session: str | None = None,
    *,
    suffix: str | None = None,
    extension: str = "",
    **entities: str | int | float | None,
) -> str:
    """``sub-<subject>[_ses-<session>][_<key>-<value>...][_<suffix>]<extension>``.

    Entities come in the order given; an entity whose value is None or empty is left out. A trailing
    underscore is dropped from a key, so that ``from_="T1w"`` gives ``from-T1w``.
    """
    parts = [f"sub-{subject}"] if subject not in (None, "") else []
    if session not in (None, ""):
        parts.append(f"ses-{session}")
    parts += [
        f"{key.rstrip('_')}-{value}" for key, value in entities.items() if value not in (None, "")
    ]
    if suffix:
        parts.append(suffix)
    return "_".join(parts) + extension


_ENTITY = re.compile(r"^([a-zA-Z]+)-(.+)$")


def parse_name(name: str) -> dict[str, str]:
    """The entities of a BIDS-like file name, with ``suffix`` and ``extension`` (inverse of :func:`bids_name`
    for labels without ``_``): ``sub-1_desc-norm_T1w.nii.gz`` -> ``{sub: 1, desc: norm, suffix: T1w,
    extension: .nii.gz}``."""
    stem, dot, rest = name.partition(".")
    parts = stem.split("_")
    out: dict[str, str] = {}
    for part in parts[:-1]:
        m = _ENTITY.match(part)
        if m:
            out[m.group(1)] = m.group(2)
    last = _ENTITY.match(parts[-1])
    if last:
        out[last.group(1)] = last.group(2)
    else:
        out["suffix"] = parts[-1]
    out["extension"] = dot + rest
    return out


# --- one subject's steps -------------------------------------------------------------------------------


def subject_dir(subject: str) -> str:
    """``results/sub-<subject>``: every per-subject step writes into a folder of its own under it."""
    return f"{RESULTS}/sub-{subject}"


def subject_file(
    subject: str,
    step: str,
    *,
    suffix: str,
    extension: str = NIFTI,
    root: str | Path | None = None,
    **entities: str | None,
) -> str:
    """``<root>/<step>/sub-<subject>_<entities>_<suffix><extension>``; ``root`` is the subject's folder of
    results (:func:`subject_dir`) unless given (``virtual-contrast predict`` pre-processes a raw exam into a
    folder of its own, with the same step folders and names)."""
    root = subject_dir(subject) if root is None else str(root)
    return f"{root}/{step}/{bids_name(subject, suffix=suffix, extension=extension, **entities)}"


def adc_files(subject: str, root: str | Path | None = None) -> dict[str, str]:
    """The ADC map and the mean b=0 image, on the DWI's grid (rule adc)."""
    return {
        "adc": subject_file(subject, "adc", space="dwi", suffix="ADC", root=root),
        "b0": subject_file(subject, "adc", space="dwi", desc="b0", suffix="dwi", root=root),
    }


def simulate_low_dose_files(subject: str, root: str | Path | None = None) -> dict[str, str]:
    """The simulated low-dose T1c on the full-dose T1c's native grid and its provenance (rule
    simulate_low_dose)."""
    step = "low_dose"
    return {
        "low": subject_file(
            subject, step, space="native", ce="low", desc="simulated", suffix="T1w", root=root
        ),
        "provenance": subject_file(subject, step, suffix=step, extension=".json", root=root),
    }


def simulated_low_dose(subject: str) -> str:
    """The simulated low-dose T1c of one subject (:func:`simulate_low_dose_files`)."""
    return simulate_low_dose_files(subject)["low"]


def skull_strip_files(subject: str, root: str | Path | None = None) -> dict[str, str]:
    """The brain mask on the native T1's grid and the step's provenance (rule skull_strip)."""
    step = "skull_strip"
    return {
        "mask": subject_file(subject, step, space="T1w", desc="brain", suffix="mask", root=root),
        "provenance": subject_file(subject, step, suffix=step, extension=".json", root=root),
    }


def registered_image(subject: str, channel: str, root: str | Path | None = None) -> str:
    """One channel resampled onto the atlas grid (rule register)."""
    return subject_file(subject, "register", space=ATLAS_SPACE, suffix=channel, root=root)


def transform_file(subject: str, channel: str, root: str | Path | None = None) -> str:
    """The atlas -> native transform of one channel (a 4x4 world matrix as text; rule register)."""
    return subject_file(
        subject,
        "register",
        from_=channel,
        to=ATLAS_SPACE,
        suffix="xfm",
        extension=".txt",
        root=root,
    )


def register_files(
    subject: str, channels: Iterable[str], root: str | Path | None = None
) -> dict[str, str]:
    """Every channel on the atlas grid, the brain mask carried along and the provenance (rule register)."""
    files = {c: registered_image(subject, c, root) for c in channels}
    files["mask"] = subject_file(
        subject, "register", space=ATLAS_SPACE, desc="brain", suffix="mask", root=root
    )
    files["provenance"] = subject_file(
        subject, "register", suffix="register", extension=".json", root=root
    )
    return files


def registration_gate_file(subject: str, root: str | Path | None = None) -> str:
    """The registration quality gate's verdict on one subject (rule registration_gate)."""
    return subject_file(subject, "register", suffix="gate", extension=".json", root=root)


def rejected_registration(
    subject: str, extension: str = ".png", root: str | Path | None = None
) -> str:
    """The picture (``.png``) and figures (``.json``) of a registration the quality gate rejected."""
    return subject_file(
        subject, "register", desc="rejected", suffix="registration", extension=extension, root=root
    )


def crop_files(
    subject: str, channels: Iterable[str], root: str | Path | None = None
) -> dict[str, str]:
    """Every channel and the brain mask cropped to the network's grid (rule crop)."""
    files = {c: subject_file(subject, "crop", desc="crop", suffix=c, root=root) for c in channels}
    files["mask"] = subject_file(subject, "crop", desc="brain", suffix="mask", root=root)
    return files


def normalized_name(subject: str, channel: str) -> str:
    """File name of a normalised channel (rule normalize; the model's training and prediction data)."""
    return bids_name(subject, desc="norm", suffix=channel, extension=NIFTI)


def brain_mask_name(subject: str) -> str:
    """File name of the brain mask beside the normalised channels, on the network's grid."""
    return bids_name(subject, desc="brain", suffix="mask", extension=NIFTI)


def normalize_files(
    subject: str, channels: Iterable[str], root: str | Path | None = None
) -> dict[str, str]:
    """Every channel normalised to [0, 1], the brain mask and the percentile ranges (rule normalize)."""
    folder = f"{subject_dir(subject) if root is None else root}/normalize"
    files = {c: f"{folder}/{normalized_name(subject, c)}" for c in channels}
    files["mask"] = f"{folder}/{brain_mask_name(subject)}"
    files["provenance"] = subject_file(
        subject, "normalize", suffix="normalize", extension=".json", root=root
    )
    return files


def predicted_name(subject: str, space: str = ATLAS_SPACE) -> str:
    """File name of vir-T1c in ``space``: :data:`ATLAS_SPACE` (the network's grid) or :data:`NATIVE_SPACE`
    (the low-dose T1c's own grid). The workflow (rule predict) and ``virtual-contrast predict`` both use it."""
    return bids_name(subject, space=space, desc="virtual", suffix="T1c", extension=NIFTI)


def uncertainty_name(subject: str, space: str = ATLAS_SPACE) -> str:
    """File name of vir-T1c's uncertainty map in ``space`` (its expected |vir − ref|), beside vir-T1c."""
    return bids_name(subject, space=space, desc="uncertainty", suffix="T1c", extension=NIFTI)


def spread_name(subject: str) -> str:
    """File name of the raw spreads of the ensemble's passes (4D, atlas space), beside vir-T1c."""
    return bids_name(subject, space=ATLAS_SPACE, desc="spread", suffix="T1c", extension=NIFTI)


def predict_files(subject: str) -> dict[str, str]:
    """vir-T1c and its uncertainty on the atlas grid and on the native low-dose T1c's grid, and the raw
    spreads of the passes (rule predict)."""
    folder = f"{subject_dir(subject)}/predict"
    return {
        "atlas": f"{folder}/{predicted_name(subject, ATLAS_SPACE)}",
        "native": f"{folder}/{predicted_name(subject, NATIVE_SPACE)}",
        "uncertainty": f"{folder}/{uncertainty_name(subject, ATLAS_SPACE)}",
        "uncertainty_native": f"{folder}/{uncertainty_name(subject, NATIVE_SPACE)}",
        "spread": f"{folder}/{spread_name(subject)}",
    }


def out_of_fold_files(subject: str) -> dict[str, str]:
    """A training subject's vir-T1c by the one fold model it tuned (out of fold), the spread of that model's
    mirror passes (rule predict_out_of_fold) and its calibrated uncertainty (rule out_of_fold_uncertainty)."""
    return {
        "atlas": subject_file(
            subject, "out_of_fold", space=ATLAS_SPACE, desc="virtual", suffix="T1c"
        ),
        "spread": subject_file(
            subject, "out_of_fold", space=ATLAS_SPACE, desc="spread", suffix="T1c"
        ),
        "uncertainty": subject_file(
            subject, "out_of_fold", space=ATLAS_SPACE, desc="uncertainty", suffix="T1c"
        ),
    }


def exam_work_name(subject: str) -> str:
    """Folder of every intermediate of a raw exam pre-processed by ``virtual-contrast predict``."""
    return bids_name(subject, suffix="work")


def exam_provenance_name(subject: str) -> str:
    """Provenance of a raw exam pre-processed outside the workflow (in its work folder)."""
    return bids_name(subject, suffix="provenance", extension=".json")


def export_dicom_dir(subject: str) -> str:
    """The folder of the DICOM series of vir-T1c (rule export_dicom)."""
    return subject_file(subject, "export_dicom", desc="virtual", suffix="T1c", extension="")


def export_dicom_uncertainty_dir(subject: str) -> str:
    """The folder of the DICOM series of vir-T1c's uncertainty map (rule export_dicom)."""
    return subject_file(subject, "export_dicom", desc="uncertainty", suffix="T1c", extension="")


def metrics_files(subject: str) -> dict[str, str]:
    """Voxel metrics and ROC curve of one test subject (rule metrics)."""
    return {
        "metrics": subject_file(subject, "metrics", suffix="voxel_metrics", extension=".tsv"),
        "roc": subject_file(subject, "metrics", suffix="roc", extension=".tsv"),
    }


def lesion_files(subject: str) -> dict[str, str]:
    """The automated reader's detections and their label image (rule detect_lesions)."""
    return {
        "detections": subject_file(subject, "lesions", suffix="detections", extension=".tsv"),
        "labels": subject_file(subject, "lesions", desc="detections", suffix="dseg"),
    }


def qc_figure(subject: str) -> str:
    """The subject's pre-processing QC figure (rule qc)."""
    return f"{subject_dir(subject)}/{bids_name(subject, suffix='qc', extension='.png')}"


def provenance_file(subject: str) -> str:
    """The subject's provenance: options, backends, registration figures (rule qc)."""
    return f"{subject_dir(subject)}/provenance.json"


# --- the atlas -------------------------------------------------------------------------------------------

#: Files of an atlas folder (written by ``virtual_contrast.atlas.prepare_atlas``).
ATLAS_FILES = {
    "t1": "atlas_T1w.nii.gz",
    "brain_mask": "atlas_desc-brain_mask.nii.gz",
    "head_mask": "atlas_desc-head_mask.nii.gz",
    "gm": "atlas_label-GM_probseg.nii.gz",
    "wm": "atlas_label-WM_probseg.nii.gz",
    "csf": "atlas_label-CSF_probseg.nii.gz",
}
#: The atlas folder's record of its sources.
ATLAS_PROVENANCE = "provenance.json"


def atlas_dir(voxel_mm: float | str) -> str:
    """The atlas on an isotropic grid of ``voxel_mm`` (rule atlas)."""
    return f"{RESULTS}/atlas/res-{voxel_mm}mm"


def atlas_files(voxel_mm: float | str) -> dict[str, str]:
    """Each atlas volume on the grid of ``voxel_mm`` (:data:`ATLAS_FILES`)."""
    return {key: f"{atlas_dir(voxel_mm)}/{name}" for key, name in ATLAS_FILES.items()}


# --- exams in BIDS-like folders: the embedded cohort, imported DICOM, a user's data -----------------------


def _bids_sequences() -> dict[str, tuple[str, dict[str, str], str, str]]:
    files = {}
    for seq in SEQUENCE_TABLE:
        entities = dict(seq.entities)
        files[seq.key] = (seq.datatype, entities, seq.suffix, NIFTI)
        for key in (*seq.companions, *seq.extra_files):
            files[key] = (seq.datatype, entities, seq.suffix, f".{key}")
    return files


#: Each file of an exam in a BIDS-like folder, by raw key (virtual_contrast.sequences, companions such as
#: the DWI's ``bval`` and ``bvec`` included): (datatype folder, entities, suffix, extension).
BIDS_SEQUENCES: dict[str, tuple[str, dict[str, str], str, str]] = _bids_sequences()
#: The embedded synthetic cohort (rule cohort) and its true lesions (rule cohort_truth).
COHORT_DIR = f"{RESULTS}/cohort"
COHORT_TRUTH = f"{COHORT_DIR}/lesions.tsv"
#: Where the exams of ``dicom_dir`` are imported (rule import_dicom), in the BIDS-like layout.
DICOM_DIR = f"{RESULTS}/dicom"


def exam_dir(root: Path | str, subject: str, session: str = "") -> Path:
    """``<root>/sub-<subject>[/ses-<session>]``."""
    folder = Path(root) / f"sub-{subject}"
    return folder / f"ses-{session}" if session else folder


def bids_exam_files(root: Path | str, subject: str, session: str = "") -> dict[str, Path]:
    """Path of each sequence file of an exam (:data:`BIDS_SEQUENCES`) under ``sub-X[/ses-Y]`` of ``root``."""
    folder = exam_dir(root, subject, session)
    return {
        key: folder / datatype / bids_name(subject, session, suffix=suffix, extension=ext, **ent)
        for key, (datatype, ent, suffix, ext) in BIDS_SEQUENCES.items()
    }


def bids_patterns(keys: Iterable[str]) -> dict[str, str]:
    """Glob pattern of each sequence in ``keys``, relative to an exam folder, for discovering a user's BIDS
    folder: any label, ``.nii`` or ``.nii.gz`` (e.g. ``anat/*_ce-low_T1w.nii*``)."""
    patterns = {}
    for key in keys:
        datatype, entities, suffix, extension = BIDS_SEQUENCES[key]
        name = bids_name(
            suffix=suffix, extension=".nii*" if extension == NIFTI else extension, **entities
        )
        patterns[key] = f"{datatype}/*_{name}"
    return patterns


def exam_record(root: Path | str, subject: str, session: str, suffix: str) -> Path:
    """A file about a whole exam beside its sequence folders: ``sub-X/ses-Y/sub-X_ses-Y_<suffix>``."""
    return exam_dir(root, subject, session) / bids_name(subject, session, suffix=suffix)


def cohort_lesion_table(subject: str, session: str) -> Path:
    """The true lesions of one exam of the embedded cohort (rule cohort)."""
    return exam_record(COHORT_DIR, subject, session, "lesions.tsv")


def dicom_exam_record(subject: str, session: str, kind: str) -> Path:
    """A record of one DICOM exam's import: ``series.json`` (the manifest, written at parse time) or
    ``dicom.tsv`` (the import report: every series, used or ignored, and why)."""
    return exam_record(DICOM_DIR, subject, session, kind)


# --- the model -------------------------------------------------------------------------------------------

MODELS_DIR = f"{RESULTS}/models"
#: Files of one fold's training folder (written by ``virtual_contrast.model.train.train_fold``).
MODEL_FILES = {"model": "model.pt", "log": "train_log.tsv", "curve": "loss_curve.png"}
#: The training checkpoints inside a fold's folder (not a declared output: a preempted job resumes from it).
CHECKPOINT_DIR = "checkpoint"


def model_dir(fold: int | str) -> str:
    """One fold's training folder."""
    return f"{MODELS_DIR}/fold-{fold}"


def model_files(fold: int | str) -> dict[str, str]:
    """The fold's model, training log and loss curve (rule train)."""
    return {key: f"{model_dir(fold)}/{name}" for key, name in MODEL_FILES.items()}


def checkpoint_dir(fold: int | str) -> str:
    return f"{model_dir(fold)}/{CHECKPOINT_DIR}"


#: The training volumes converted once for all folds (one array per subject).
TRAINING_CACHE = f"{MODELS_DIR}/cache"
#: Where physiological enhancement is expected (atlas grid, from the training subjects).
ENHANCEMENT_PRIOR = f"{MODELS_DIR}/normal_enhancement_mask{NIFTI}"
#: The uncertainty map's calibration (virtual_contrast.model.uncertainty.Calibration), fitted on the training
#: subjects' out-of-fold predictions; ``virtual-contrast predict`` finds it beside the fold folders.
UNCERTAINTY_CALIBRATION_NAME = "uncertainty_calibration.json"
UNCERTAINTY_CALIBRATION = f"{MODELS_DIR}/{UNCERTAINTY_CALIBRATION_NAME}"


# --- study-level tables and figures ----------------------------------------------------------------------


def table(name: str, extension: str = ".tsv") -> str:
    """``results/tables/<name><extension>``."""
    return f"{RESULTS}/tables/{name}{extension}"


def figure(name: str, subject: str | None = None) -> str:
    """``results/figures/<name>.png``, or one subject's ``results/figures/<name>/sub-<id>_<name>.png``."""
    if subject is None:
        return f"{RESULTS}/figures/{name}.png"
    return f"{RESULTS}/figures/{name}/{bids_name(subject, suffix=name, extension='.png')}"


# --- the reader study ------------------------------------------------------------------------------------

READER_STUDY = f"{RESULTS}/reader_study"
#: The key of the reading lists (case id -> patient, modality), kept beside the readers' folder.
READING_KEY = "reading_key.tsv"
#: The folder handed to the readers.
READING_LISTS = "reading_lists"
#: Where ``virtual-contrast read`` writes the readers' marks by default: ``readings/`` beside ``results/``, never
#: under it, so that neither ``make clean`` nor a rerun of the workflow can delete a radiologist's answers.
READINGS = "readings"
#: Files of the reader statistics (``virtual_contrast.reader.stats.reader_stats``), by table.
READER_STATS_FILES = {
    "detection": "detection.tsv",
    "comparisons": "comparisons.tsv",
    "quality": "quality.tsv",
    "reading_times": "reading_times.tsv",
    "table5": "table5.html",
    "table5_md": "table5.md",
}


def reader_stats_files(folder: str = READER_STUDY) -> dict[str, str]:
    """The reader statistics written into ``folder`` (:data:`READER_STATS_FILES`)."""
    return {key: f"{folder}/{name}" for key, name in READER_STATS_FILES.items()}


def reading_files(folder: str = READER_STUDY) -> dict[str, str]:
    """The reading lists' key and the readers' folder (:data:`READING_KEY`, :data:`READING_LISTS`) in
    ``folder``, and the readers' marks (:data:`READINGS`, beside ``results/``)."""
    return {
        "key": f"{folder}/{READING_KEY}",
        "lists": f"{folder}/{READING_LISTS}",
        "readings": READINGS,
    }


def default_readings_folder(lists_dir: Path | str) -> Path:
    """Where the marks of a session on the reading lists ``lists_dir`` go by default: ``readings/`` beside the
    ``results/`` folder that holds the lists (the workflow's layout), else beside the lists folder itself."""
    lists_dir = Path(lists_dir).absolute()
    for folder in lists_dir.parents:
        if folder.name == RESULTS:
            return folder.parent / READINGS
    return lists_dir.parent / READINGS


# --- logs and benchmarks of the rules --------------------------------------------------------------------


def _job_file(top: str, rule: str, subject, session, extension: str, entities) -> str:
    name = bids_name(subject, session, **entities)
    return f"{top}/{rule}/{name}{extension}" if name else f"{top}/{rule}{extension}"


def log(rule: str, subject: str | None = None, session: str | None = None, **entities: str) -> str:
    """``logs/<rule>/<entities>.log``, or ``logs/<rule>.log`` for a rule that runs once."""
    return _job_file(LOGS, rule, subject, session, ".log", entities)


def benchmark(
    rule: str, subject: str | None = None, session: str | None = None, **entities: str
) -> str:
    """``results/benchmarks/<rule>/<entities>.tsv`` (Snakemake's time and memory record of each job)."""
    return _job_file(f"{RESULTS}/benchmarks", rule, subject, session, ".tsv", entities)
