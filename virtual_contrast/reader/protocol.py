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
    OUT/<reader>/phase-<k>/<case_id>.nii.gz     the post-contrast image to read
    OUT/<reader>/phase-<k>/<case_id>_T1.nii.gz  the pre-contrast T1 shown beside it
    OUT/<reader>/phase-<k>/<case_id>_FLAIR.nii.gz  the FLAIR shown beside it

The reading tool (``virtual-contrast read``, :mod:`virtual_contrast.reader.server`) serves these folders; with 3D
Slicer instead, readers save their line markups of case ``X`` into ``ANNOTATIONS/X/`` (see
:mod:`virtual_contrast.reader.slicer`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from virtual_contrast.io import InputError, load_image, save_image, write_table
from virtual_contrast.layout import READING_KEY

log = logging.getLogger(__name__)

KEY_COLUMNS = ("case_id", "reader", "phase", "order", "patient", "modality")
# The workflow writes the key beside the readers' folder: results/reader_study/{reading_key.tsv,reading_lists/}.
KEY_NAME = READING_KEY
# The images of one case in the readers' folder: the post-contrast image to read and the series shown beside it.
CASE_IMAGE = "{case_id}.nii.gz"
COMPANION_IMAGES = {"T1": "{case_id}_T1.nii.gz", "FLAIR": "{case_id}_FLAIR.nii.gz"}
FORM_COLUMNS = ("phase", "order", "case_id", "quality", "reading_time_s")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


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
        if not _SAFE_NAME.match(r):
            raise InputError(
                f"reader name {r!r} must be letters, digits, '.', '_' or '-' (it names a folder)"
            )
    if reference_reader is not None and reference_reader not in readers:
        raise InputError(
            f"reference reader {reference_reader!r} is not one of the readers {readers}"
        )
    if out_dir is not None and key_path is not None:
        out_abs, key_abs = Path(out_dir).resolve(), Path(key_path).resolve()
        if out_abs == key_abs.parent or out_abs in key_abs.parents:
            raise InputError(
                "the key must be kept apart from the folder handed to the readers", path=key_path
            )
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
    if key_path is not None:
        write_table(key, key_path)
    if out_dir is not None:
        for reader, group in key.groupby("reader", sort=False):
            form = group[["phase", "order", "case_id"]].assign(quality="", reading_time_s="")
            write_table(form[list(FORM_COLUMNS)], Path(out_dir) / reader / "reading_form.tsv")
    log.info(
        "reading lists: %d patients, %d readers, %d reads", len(patients), len(readers), len(key)
    )
    return key


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
    return key


ImageSource = str | Callable[[str, str], Path]


def case_folder(out_dir: Path | str, reader: str, phase: int) -> Path:
    """The folder of one reader's phase in the readers' folder ``out_dir``."""
    return Path(out_dir) / str(reader) / f"phase-{int(phase)}"


def _resolve(source: ImageSource, patient: str, modality: str) -> Path:
    if callable(source):
        return Path(source(patient, modality))
    return Path(source.format(patient=patient, modality=modality))


def export_reading_images(
    key: pd.DataFrame,
    out_dir: Path | str,
    *,
    image_pattern: ImageSource,
    pre_pattern: ImageSource | None = None,
    flair_pattern: ImageSource | None = None,
) -> list[Path]:
    """Copy each case's image (and the pre-contrast T1 and FLAIR) into the readers' folders, named by case id.

    ``image_pattern`` is a format string with ``{patient}`` and ``{modality}`` (or a function of both);
    ``pre_pattern`` and ``flair_pattern`` are called with the modality ``pre`` and ``flair``.
    Images are re-written with a fresh NIfTI header (data and affine only), which drops free-text header fields
    (description, aux file, intent name) that could carry identifying text.
    """
    companions = {
        COMPANION_IMAGES["T1"]: (pre_pattern, "pre"),
        COMPANION_IMAGES["FLAIR"]: (flair_pattern, "flair"),
    }
    written = []
    for case in key.itertuples(index=False):
        folder = case_folder(out_dir, case.reader, case.phase)
        sources = {CASE_IMAGE: (image_pattern, case.modality)} | {
            name: source for name, source in companions.items() if source[0] is not None
        }
        for name, (pattern, modality) in sources.items():
            img = load_image(_resolve(pattern, case.patient, modality), subject=case.patient)
            written.append(
                save_image(
                    np.asanyarray(img.dataobj),
                    img.affine,
                    folder / name.format(case_id=case.case_id),
                )
            )
    return written
