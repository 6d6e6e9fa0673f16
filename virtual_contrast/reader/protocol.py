"""Reading protocol of the reader study: blinded, balanced, two-phase reading lists.

As in the paper, every reader reads every exam twice, once as low-T1c and once as vir-T1c, in two phases
(two weeks apart): in phase 1 half of the exams are shown as low and half as vir, phase 2 mirrors it. The
exams are split once at random into halves A and B; readers of even rank read A as low and B as vir in phase
1, readers of odd rank the opposite, so that each exam is also balanced across readers. The order within each
phase is random per reader. The reference reader reads every ref-T1c afterwards, in a third phase.

Every read gets its own random case id (``case-NNNNNN``), so nothing in a file name or a reading list tells the
patient, the modality, or which phase-2 case is the same exam as a phase-1 case. The key (case id -> reader,
phase, patient, modality) is written to a separate file that must stay outside the folder handed to readers.

Layout handed to readers (``OUT``)::

    OUT/<reader>/reading_form.tsv               phase, order, case_id, quality, reading_time_s (to fill in)
    OUT/<reader>/phase-<k>/<case_id>.nii        the post-contrast image to read
    OUT/<reader>/phase-<k>/<case_id>_T1.nii     the pre-contrast T1 shown beside it
    OUT/<reader>/phase-<k>/<case_id>_FLAIR.nii  the FLAIR shown beside it

Every image there is a reading copy (:mod:`virtual_contrast.reading_copy`): the same scale, encoding, header and
window rule for the low-dose image and vir-T1c, and companions re-encoded for each case.

The reading tool (``virtual-contrast read``, :mod:`virtual_contrast.reader.server`) serves these folders; with 3D
Slicer instead, readers save their line markups of case ``X`` into ``ANNOTATIONS/X/`` (see
:mod:`virtual_contrast.reader.slicer`).
"""

from __future__ import annotations

import logging
import re
import string
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from virtual_contrast.io import InputError, write_table
from virtual_contrast.layout import READING_KEY
from virtual_contrast.reading_copy import NIFTI_SUFFIX, load_reading_copy, write_reading_nifti

log = logging.getLogger(__name__)

KEY_COLUMNS = ("case_id", "reader", "phase", "order", "patient", "modality")
# The workflow writes the key beside the readers' folder: results/reader_study/{reading_key.tsv,reading_lists/}.
KEY_NAME = READING_KEY
# The images of one case in the readers' folder: the post-contrast image to read and the series shown beside it.
CASE_IMAGE = "{case_id}" + NIFTI_SUFFIX
COMPANION_IMAGES = {"T1": "{case_id}_T1" + NIFTI_SUFFIX, "FLAIR": "{case_id}_FLAIR" + NIFTI_SUFFIX}
FORM_COLUMNS = ("phase", "order", "case_id", "quality", "reading_time_s")
MODALITIES = ("low", "vir", "ref")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: The placeholders each image pattern may hold, and those it must.
PATTERN_FIELDS = {
    "image": ({"patient", "modality"}, {"patient", "modality"}),
    "pre": ({"patient", "modality"}, {"patient"}),
    "flair": ({"patient", "modality"}, {"patient"}),
    "dicom_source": ({"patient"}, set()),
}


def check_reader_name(name: str, *, path: Path | str | None = None) -> str:
    """``name`` if it can name a reader (letters, digits, '.', '_' or '-', starting with a letter or digit: it
    names folders and session files), else an :class:`InputError`."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name):
        raise InputError(
            f"reader name {name!r} must be letters, digits, '.', '_' or '-', starting with a letter or "
            "digit (it names a folder)",
            path=path,
        )
    return name


def check_pattern(pattern: str, role: str, *, flag: str | None = None) -> str:
    """A path pattern of ``role`` (image, pre, flair, dicom_source) whose placeholders are known: checked before
    anything is written, so that a bad one cannot stop an export half-way."""
    allowed, required = PATTERN_FIELDS[role]
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(pattern) if name is not None}
    except ValueError as exc:
        raise InputError(
            f"{flag or role} pattern {pattern!r} is not a valid pattern: {exc}"
        ) from exc
    unknown, missing = fields - allowed, required - fields
    if unknown or missing or "" in fields:
        raise InputError(
            f"{flag or role} pattern {pattern!r}: "
            + "; ".join(
                part
                for part in (
                    f"unknown placeholder(s) {sorted(unknown)}" if unknown else "",
                    f"needs {sorted('{' + m + '}' for m in missing)}" if missing else "",
                    "an empty {} placeholder" if "" in fields else "",
                )
                if part
            )
            + f" (it may hold {', '.join('{' + a + '}' for a in sorted(allowed))})"
        )
    return pattern


def read_patients(path: Path | str, *, split: str | None = None) -> list[str]:
    """Patient ids from a text file (one per line, ``#`` comments) or a TSV with a ``subject``/``patient``
    column (rows of ``split`` only, when given and the table has a ``split`` column)."""
    path = Path(path)
    if not path.exists():
        raise InputError("patients file not found", path=path)
    text = path.read_text().splitlines()
    header = text[0].split("\t") if text else []
    if "subject" in header or "patient" in header:
        table = pd.read_csv(path, sep="\t", dtype=str)
        column = "patient" if "patient" in table.columns else "subject"
        if split is not None and "split" in table.columns:
            table = table[table["split"] == split]
        return table[column].dropna().str.strip().tolist()
    return [line.strip() for line in text if line.strip() and not line.lstrip().startswith("#")]


def _case_ids(n: int, patients: Sequence[str], rng: np.random.Generator) -> list[str]:
    """``n`` distinct random ids ``case-NNNNNN`` that contain no patient id."""
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < n:
        for number in rng.choice(900_000, size=n, replace=False) + 100_000:
            cid = f"case-{number:06d}"
            if cid in seen or any(p in cid for p in patients):
                continue
            seen.add(cid)
            ids.append(cid)
            if len(ids) == n:
                break
    return ids


def make_reading_lists(
    patients: Sequence[str],
    readers: Sequence[str],
    *,
    out_dir: Path | str | None = None,
    key_path: Path | str | None = None,
    reference_reader: str | None = None,
    seed: int = 0,
    modalities: tuple[str, str] = ("low", "vir"),
) -> pd.DataFrame:
    """Build the blinded reading lists; return the key (:data:`KEY_COLUMNS`) and, when paths are given, write
    the key to ``key_path`` and one reading form per reader under ``out_dir``."""
    patients = [str(p) for p in patients]
    readers = [str(r) for r in readers]
    if len(patients) < 2:
        raise InputError(f"a reading study needs at least 2 patients, got {len(patients)}")
    if len(set(patients)) != len(patients):
        dup = sorted({p for p in patients if patients.count(p) > 1})
        raise InputError(f"patient ids are repeated: {', '.join(dup)}")
    if not readers or len(set(readers)) != len(readers):
        raise InputError(f"readers must be one or more distinct names, got {readers}")
    for r in readers:
        check_reader_name(r)
    if reference_reader is not None and reference_reader not in readers:
        raise InputError(
            f"reference reader {reference_reader!r} is not one of the readers {readers}"
        )
    if out_dir is not None and key_path is not None:
        check_key_apart(out_dir, key_path)
    rng = np.random.default_rng(seed)
    order = [patients[i] for i in rng.permutation(len(patients))]
    half_a = set(order[: (len(order) + 1) // 2])
    first, second = modalities
    rows = []
    for rank, reader in enumerate(readers):
        phase1 = {p: (first if (p in half_a) == (rank % 2 == 0) else second) for p in patients}
        phases = [
            (1, [(p, phase1[p]) for p in patients]),
            (2, [(p, second if phase1[p] == first else first) for p in patients]),
        ]
        if reader == reference_reader:
            phases.append((3, [(p, "ref") for p in patients]))
        for phase, reads in phases:
            for k, i in enumerate(rng.permutation(len(reads)), start=1):
                patient, modality = reads[i]
                rows.append(
                    {
                        "reader": reader,
                        "phase": phase,
                        "order": k,
                        "patient": patient,
                        "modality": modality,
                    }
                )
    key = pd.DataFrame(rows)
    key.insert(0, "case_id", _case_ids(len(key), patients, rng))
    key = key[list(KEY_COLUMNS)]
    write_reading_lists(key, out_dir=out_dir, key_path=key_path)
    log.info(
        "reading lists: %d patients, %d readers, %d reads", len(patients), len(readers), len(key)
    )
    return key


def check_key_apart(out_dir: Path | str, key_path: Path | str) -> None:
    """The key must not lie in the folder handed to the readers (or under it)."""
    out_abs, key_abs = Path(out_dir).resolve(), Path(key_path).resolve()
    if out_abs == key_abs.parent or out_abs in key_abs.parents:
        raise InputError(
            "the key must be kept apart from the folder handed to the readers", path=key_path
        )


def write_reading_lists(
    key: pd.DataFrame, *, out_dir: Path | str | None = None, key_path: Path | str | None = None
) -> None:
    """Write the ``key`` to ``key_path`` and one reading form per reader under ``out_dir`` (each when given)."""
    if key_path is not None:
        write_table(key, key_path)
    if out_dir is not None:
        for reader, group in key.groupby("reader", sort=False):
            form = group[["phase", "order", "case_id"]].assign(quality="", reading_time_s="")
            write_table(form[list(FORM_COLUMNS)], Path(out_dir) / reader / "reading_form.tsv")


def load_key(path: Path | str) -> pd.DataFrame:
    """Read a key written by :func:`make_reading_lists` and check its columns."""
    path = Path(path)
    if not path.exists():
        raise InputError("key file not found", path=path)
    key = pd.read_csv(
        path, sep="\t", dtype={"case_id": str, "reader": str, "patient": str, "modality": str}
    )
    missing = [c for c in KEY_COLUMNS if c not in key.columns]
    if missing:
        raise InputError(f"key lacks column(s) {', '.join(missing)}", path=path)
    if key["case_id"].duplicated().any():
        raise InputError("key has repeated case ids", path=path)
    # Readers and case ids name folders and files of the readings: a row could otherwise write anywhere.
    for row, (reader, case_id, modality) in enumerate(
        zip(key["reader"], key["case_id"], key["modality"], strict=True), start=2
    ):
        try:
            check_reader_name(reader)
        except InputError as exc:
            raise InputError(f"line {row}: {exc.reason}", path=path) from None
        if not isinstance(case_id, str) or not _SAFE_NAME.match(case_id):
            raise InputError(f"line {row}: case id {case_id!r} cannot name a file", path=path)
        if modality not in MODALITIES:
            raise InputError(
                f"line {row}: modality {modality!r} is not one of {', '.join(MODALITIES)}",
                path=path,
            )
    return key


ImageSource = str | Callable[[str, str], Path]


def case_folder(out_dir: Path | str, reader: str, phase: int) -> Path:
    """The folder of one reader's phase in the readers' folder ``out_dir``."""
    return Path(out_dir) / str(reader) / f"phase-{int(phase)}"


def _resolve(source: ImageSource, patient: str, modality: str) -> Path:
    if callable(source):
        return Path(source(patient, modality))
    return Path(source.format(patient=patient, modality=modality))


def case_sources(
    key: pd.DataFrame,
    *,
    image_pattern: ImageSource,
    pre_pattern: ImageSource | None = None,
    flair_pattern: ImageSource | None = None,
) -> list[tuple[object, dict[str, Path]]]:
    """Each case of ``key`` with its source images by series (``post``, ``T1``, ``FLAIR``), every file checked
    to exist before anything is written.

    ``image_pattern`` is a format string with ``{patient}`` and ``{modality}`` (or a function of both);
    ``pre_pattern`` and ``flair_pattern`` (``{patient}``, and ``{modality}`` if wanted) are filled with the
    modality ``pre`` and ``flair``.
    """
    patterns = {"post": (image_pattern, "image"), "T1": (pre_pattern, "pre")}
    patterns["FLAIR"] = (flair_pattern, "flair")
    for pattern, role in patterns.values():
        if isinstance(pattern, str):
            check_pattern(pattern, role)
    cases = []
    for case in key.itertuples(index=False):
        sources = {}
        for series, (pattern, _) in patterns.items():
            if pattern is None:
                continue
            modality = (
                case.modality if series == "post" else {"T1": "pre", "FLAIR": "flair"}[series]
            )
            path = _resolve(pattern, case.patient, modality)
            if not path.exists():
                raise InputError(
                    f"case {case.case_id}: the {series} image is missing",
                    subject=case.patient,
                    path=path,
                )
            sources[series] = path
        cases.append((case, sources))
    return cases


def export_reading_images(
    key: pd.DataFrame,
    out_dir: Path | str,
    *,
    image_pattern: ImageSource,
    pre_pattern: ImageSource | None = None,
    flair_pattern: ImageSource | None = None,
) -> list[Path]:
    """Write each case's image (and the pre-contrast T1 and FLAIR) into the readers' folders as reading copies
    (:mod:`virtual_contrast.reading_copy`), named by case id; the sources are those of :func:`case_sources`."""
    names = {"post": CASE_IMAGE} | COMPANION_IMAGES
    written = []
    cases = case_sources(
        key, image_pattern=image_pattern, pre_pattern=pre_pattern, flair_pattern=flair_pattern
    )
    for case, sources in cases:
        folder = case_folder(out_dir, case.reader, case.phase)
        for series, path in sources.items():
            copy = load_reading_copy(path, seed=f"{case.case_id}/{series}", subject=case.patient)
            written.append(
                write_reading_nifti(copy, folder / names[series].format(case_id=case.case_id))
            )
    return written
