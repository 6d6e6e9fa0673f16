"""One validation layer: values checked against their meaning before any work is done.

The config schema checks each value alone (types, ranges, closed objects). What it cannot say, because it
relates two values or needs the data, is checked here: ordered percentile pairs, a crop shape the UNet can
process at the configured depth, as many training subjects as folds, configured files that exist, file names
of the right kind. The workflow calls :func:`check_config` and :func:`check_study` at parse time (a dry run
stops on them), and each command-line subcommand calls the same functions on its arguments before it reads
or writes anything.

The study's checks belong to the rules that need them (:data:`RULE_NEEDS`): the workflow asks
:func:`requested_checks` which ones the requested targets need (``snakemake results/...``, ``--until``), so
that ``--until exclusions`` or ``--until qc`` runs on any study, even one whose every exam is excluded, while
a study that cannot complete what was asked (one test patient when the reading lists are requested) stops
before the first job. Every problem is an :class:`~virtual_contrast.io.InputError` with one line saying which
value is wrong and why.

No heavy imports here (no torch, no image libraries): the workflow imports this module while it parses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from virtual_contrast.io import InputError

#: File name endings of NIfTI images, the format every step writes.
NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: Voxel sizes accepted in an exam (mm, each axis; DICOM pixel spacings too): brain MRI has voxels of about 0.1
#: to 10 mm; a size outside this range is a broken header (a pixel spacing of 0, -1 or 1e6), not an acquisition.
VOXEL_MM_RANGE = (0.05, 20.0)


def check_percentiles(low: float, high: float, *, what: str = "percentiles") -> tuple[float, float]:
    """Return ``(low, high)`` if ``0 <= low < high <= 100``, else raise an :class:`InputError`."""
    low, high = float(low), float(high)
    if not (0.0 <= low <= 100.0 and 0.0 <= high <= 100.0):
        raise InputError(f"{what} must lie in [0, 100], got low {low:g} and high {high:g}")
    if not low < high:
        raise InputError(
            f"{what}: the low percentile ({low:g}) must be below the high one ({high:g})"
        )
    return low, high


def check_shape(shape: Sequence[Any], *, what: str = "shape") -> tuple[int, int, int]:
    """Return ``shape`` as three positive integers, else raise an :class:`InputError`."""
    values = tuple(shape)
    if len(values) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise InputError(f"{what} must be three integers (X Y Z voxels), got {list(values)}")
    if min(values) < 1:
        raise InputError(f"{what} must be three positive numbers of voxels, got {list(values)}")
    return values  # type: ignore[return-value]


def max_depth_for_grid(shape: Sequence[int]) -> int:
    """The deepest UNet that a grid allows: 1 + the smallest power of 2 dividing every dimension."""
    depth = 1
    while all(s % 2**depth == 0 and s // 2**depth >= 1 for s in shape):
        depth += 1
    return depth


def check_grid(shape: Sequence[int], depth: int) -> None:
    """Raise :class:`InputError` if a UNet of ``depth`` levels cannot process a grid of ``shape``.

    Each of the ``depth - 1`` stride-2 convolutions halves the grid, and each transposed convolution doubles it,
    so the output matches the input only when every dimension is a multiple of ``2 ** (depth - 1)``.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise InputError(f"the UNet needs a 3D grid, got shape {shape}")
    factor = 2 ** (depth - 1)
    bad = sorted({s for s in shape if s % factor != 0 or s < factor})
    if not bad:
        return
    grid = "×".join(map(str, shape))
    nearest = "×".join(str(max(factor, round(s / factor) * factor)) for s in shape)
    raise InputError(
        f"a depth-{depth} UNet cannot process a {grid} grid: every dimension must be a positive multiple of "
        f"2**(depth-1) = {factor} ({' and '.join(map(str, bad))} {'is' if len(bad) == 1 else 'are'} not). "
        f"Crop or pad to e.g. {nearest}, or use depth <= {max_depth_for_grid(shape)}."
    )


def check_folds(folds: int, n_train: int, *, what: str = "folds") -> None:
    """Raise :class:`InputError` unless ``2 <= folds <= n_train`` (every fold needs a tuning subject)."""
    if folds < 2:
        raise InputError(f"{what} = {folds}: cross-validation needs at least 2 folds")
    if n_train < folds:
        raise InputError(
            f"{what} = {folds} but there are only {n_train} training subject(s): each fold needs at least "
            f"one (lower the number of folds or add training subjects)"
        )


def check_nifti_output(path: Path | str, *, what: str = "--out") -> Path:
    """Return ``path`` if its name ends in .nii or .nii.gz (every image output is NIfTI), else raise."""
    path = Path(path)
    if not path.name.lower().endswith(NIFTI_SUFFIXES) or path.name.lower() in NIFTI_SUFFIXES:
        raise InputError(
            f"{what} must be a NIfTI file name ending in .nii.gz or .nii (images are written as NIfTI)",
            path=path,
        )
    return path


def check_positive(value: float, *, what: str) -> float:
    """Return ``value`` if it is a finite number above 0, else raise an :class:`InputError`."""
    if not value > 0 or value == float("inf"):
        raise InputError(f"{what} must be a positive number, got {value:g}")
    return value


# --- the workflow's config --------------------------------------------------------------------------------

#: Config keys that name a file or folder which must exist when set (empty means "not used" or "default").
CONFIG_PATHS = {
    ("subjects",): "subjects table",
    ("bids_dir",): "BIDS folder",
    ("brats_dir",): "BraTS folder",
    ("dicom_dir",): "DICOM folder",
    ("dicom", "series_map"): "DICOM series map",
    ("atlas", "t1"): "atlas T1",
    ("atlas", "brain_mask"): "atlas brain mask",
    ("atlas", "head_mask"): "atlas head mask",
    ("preprocess", "hdbet2_weights"): "HD-BET 2 weights folder",
    ("reader_study", "lesions"): "reader lesions CSV",
    ("reader_study", "reads"): "reader reads CSV",
}


def check_config(config: Mapping[str, Any]) -> None:
    """The checks of a schema-validated config that relate values or need the file system.

    Raises an :class:`InputError` naming the key (``section.key``), its value and what is wrong.
    """
    low, high = config["preprocess"]["normalize_percentiles"]
    key = "preprocess.normalize_percentiles"
    try:
        check_percentiles(low, high, what=f"config {key} = [{low:g}, {high:g}]")
    except InputError as exc:
        raise InputError(f"{exc} (e.g. [1, 99])") from None

    shape, depth = config["grid"]["crop_shape"], config["model"]["depth"]
    try:
        check_grid(shape, depth)
    except InputError as exc:
        raise InputError(
            f"config grid.crop_shape = {list(shape)} with model.depth = {depth}: {exc}"
        ) from None

    for keys, label in CONFIG_PATHS.items():
        value = _lookup(config, keys)
        if value and not Path(value).exists():
            raise InputError(f"config {'.'.join(keys)}: {label} not found", path=value)
    sources = [key for key in ("subjects", "bids_dir", "brats_dir", "dicom_dir") if config.get(key)]
    if len(sources) > 1:
        raise InputError(
            f"config: set one of subjects (a table), bids_dir, brats_dir or dicom_dir (folders), not {' and '.join(sources)}: "
            "which exams to use would be ambiguous"
        )
    reader = config["reader_study"]
    if reader["reads"] and not reader["lesions"]:
        raise InputError(
            "config reader_study.reads is set but reader_study.lesions is empty: the reads are only used "
            "with the readers' lesions"
        )


# --- the study, as far as the requested targets need it ---------------------------------------------------

#: The study's checks: ``folds`` (as many training subjects as folds: split, training and all that uses the
#: models), ``test`` (a test subject: the evaluation's aggregates), ``reading`` (two test patients: the
#: blinded reading lists), ``detector`` (training subjects for the automated reader's enhancement prior and,
#: with the embedded cohort, its FROC-tuned threshold).
STUDY_CHECKS = ("folds", "test", "reading", "detector")
#: The checks each rule of the workflow needs: its own and those of every rule it depends on (a test keeps
#: this monotone along Snakemake's rule graph). Rules not listed need none.
RULE_NEEDS: dict[str, frozenset[str]] = {
    "split": frozenset({"folds"}),
    "train": frozenset({"folds"}),
    "predict_out_of_fold": frozenset({"folds"}),
    "calibrate_uncertainty": frozenset({"folds"}),
    "out_of_fold_uncertainty": frozenset({"folds"}),
    "predict": frozenset({"folds"}),
    "metrics": frozenset({"folds"}),
    "export_dicom": frozenset({"folds"}),
    "voxel_metrics": frozenset({"folds", "test"}),
    "uncertainty_calibration": frozenset({"folds", "test"}),
    "enhancement_prior": frozenset({"detector"}),
    "detector_froc": frozenset({"detector"}),
    "detect_lesions": frozenset({"folds", "detector"}),
    "detection_overlay": frozenset({"folds", "detector"}),
    "detector_validation": frozenset({"folds", "detector"}),
    "uncertainty_lesions": frozenset({"folds", "detector"}),
    "reader_stats": frozenset({"folds", "detector", "test"}),
    "reader_stats_truth": frozenset({"folds", "detector", "test"}),
    "reading_lists": frozenset({"folds", "test", "reading"}),
    "all": frozenset(STUDY_CHECKS),
}


def requested_checks(targets: Sequence[str], until: Sequence[str] = ()) -> frozenset[str]:
    """The study checks that a run of the rules ``targets`` needs, restricted by ``--until`` to the rules
    ``until`` (both as rule names; the workflow maps file targets to the rules that make them). ``--omit-from``
    is not taken into account: every check of the targets stays."""
    needs = frozenset().union(*(RULE_NEEDS.get(rule, frozenset()) for rule in targets))
    if until:
        needs &= frozenset().union(*(RULE_NEEDS.get(rule, frozenset()) for rule in until))
    return needs


def check_study(
    config: Mapping[str, Any],
    *,
    n_train: int,
    n_test: int,
    source: str,
    checks: Sequence[str] | frozenset[str] = STUDY_CHECKS,
    embedded: bool = False,
    excluded: Sequence[tuple[str, str]] = (),
) -> None:
    """Checks of the study as planned from the config (those of ``checks``, see :data:`STUDY_CHECKS`):
    enough training subjects for the folds and the automated reader, a test set, two test patients for the
    reading lists.

    ``source`` says where the subjects come from (the table, the BIDS folder or the embedded cohort), and
    ``excluded`` ((exam, reason) of each excluded exam) why there are so few, for the message.
    """
    unknown = sorted(set(checks) - set(STUDY_CHECKS))
    if unknown:
        raise ValueError(f"unknown study checks {unknown}")
    why = f"{source}{exclusion_summary(excluded)}"
    if checks and n_train + n_test == 0:
        raise InputError(
            f"no exam is included ({why}): nothing to train or evaluate; `--until exclusions` writes the "
            "exclusions table"
        )
    if "folds" in checks:
        try:
            check_folds(config["split"]["folds"], n_train, what="config split.folds")
        except InputError as exc:
            raise InputError(f"{exc} ({why})") from None
    if "test" in checks and n_test < 1:
        raise InputError(
            f"no test subject ({why}): the evaluation needs at least one; mark some as test in the "
            "split column or raise split.test_fraction"
        )
    if "reading" in checks and n_test < 2:
        raise InputError(
            f"the reading lists need at least 2 test patients, there are {n_test} ({why}): add test "
            "subjects, or ask only for what does not need them (e.g. --until voxel_metrics)"
        )
    least = 2 if embedded else 1
    if "detector" in checks and n_train < least:
        raise InputError(
            f"the automated reader learns its enhancement prior{' and threshold' if embedded else ''} on "
            f"the training subjects: it needs at least {least}, there are {n_train} ({why})"
        )


def exclusion_summary(excluded: Sequence[tuple[str, str]], *, shown: int = 5) -> str:
    """``; N exams excluded: <exam>: <reason>, ...`` (the first ``shown``), or "" when none is excluded."""
    if not excluded:
        return ""
    items = [f"{exam}: {reason}" for exam, reason in excluded[:shown]]
    more = f", and {len(excluded) - shown} more" if len(excluded) > shown else ""
    return f"; {len(excluded)} exam(s) excluded: " + ", ".join(items) + more


def _lookup(config: Mapping[str, Any], keys: Sequence[str]) -> Any:
    value: Any = config
    for key in keys:
        value = value.get(key, "") if isinstance(value, Mapping) else ""
    return value
