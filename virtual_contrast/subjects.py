"""The exams of a study: a subjects table or a BIDS-like folder, and the paper's exclusion rules.

One row per *exam* (a subject's session). The paper keeps one exam per patient (the earliest; later visits are
excluded) and excludes exams that lack any of its sequences (DWI, FLAIR, T1, low-dose T1c, full-dose T1c).
Here an exam is excluded only for lacking a sequence the study needs: those of the configured input channels,
the pre-contrast T1, the full-dose T1c and the low-dose T1c unless it is simulated
(:func:`virtual_contrast.sequences.raw_columns`). Every exclusion keeps its reason, for
``results/tables/exclusions.tsv`` and the flow chart (the paper's Figure 2).

Exams come from a subjects table, a BIDS-like folder or a BraTS-style folder
(``<folder>/<case>/<case>-t1n|t1c|t2w|t2f.nii.gz``, no DWI and no low dose); a BraTS case id that is not a
valid subject id is mapped to one (:func:`brats_subject_id`), and the ``source_id`` column keeps the case's
own id.

A subjects table is checked row by row before anything else, and each problem stops the run naming the table,
the line and the value: an invalid subject id, a ``split`` value other than ``train`` or ``test`` (case does not
matter; a typo must never send a test patient into training), the same exam (subject and session) on two lines,
or a listed file that does not exist. An empty sequence cell means the sequence was not acquired: that exam is
excluded, as in the paper. A listed path that does not exist is an error rather than an exclusion, because a
typo or an unmounted disk should not quietly shrink the cohort.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from virtual_contrast.io import InputError
from virtual_contrast.layout import bids_patterns, parse_name
from virtual_contrast.sequences import BY_KEY, COLUMN_LABELS, COLUMNS
from virtual_contrast.sequences import SEQUENCES as SEQUENCE_TABLE

#: Subject ids become file-name entities (``sub-{id}_...``): BIDS labels, letters and digits only, so no path
#: separator, no ``..`` and no ``_`` that would break the entity parsing.
SUBJECT_ID_PATTERN = r"[A-Za-z0-9]+"
_SUBJECT_ID = re.compile(rf"^{SUBJECT_ID_PATTERN}$")

#: Sequence columns of a subjects table (virtual_contrast.sequences: each sequence and its companions).
SEQUENCES = COLUMNS
SEQUENCE_LABELS = COLUMN_LABELS
#: BIDS-like file patterns (relative to ``sub-X[/ses-Y]``), keyed by sequence column.
BIDS_PATTERNS = bids_patterns(SEQUENCES)
#: The columns the paper needs (every sequence of its protocol): the default of the readers below.
PAPER_COLUMNS = ("t1", "flair", "dwi", "bval", "low", "ref")


#: Values of the optional ``split`` column (compared case-insensitively, surrounding spaces ignored).
SPLIT_VALUES = ("train", "test")


@dataclass(frozen=True)
class Selection:
    """Included exams (one row per subject) and excluded exams with their reason."""

    included: pd.DataFrame
    excluded: pd.DataFrame
    n_exams: int
    n_patients: int


def check_subject_id(subject: str, *, source: str | Path | None = None) -> str:
    """Return ``subject`` if it is a valid id, else raise an :class:`InputError` saying why."""
    subject = str(subject)
    if not _SUBJECT_ID.match(subject):
        why = "contains a path separator" if ("/" in subject or "\\" in subject) else ""
        if ".." in subject:
            why = "contains '..'"
        why = why or "must be letters and digits only (BIDS label)"
        raise InputError(f"invalid subject id ({why})", subject=subject, path=source)
    return subject


def check_session_label(label: str, *, source: str = "--session") -> str:
    """Return ``label`` if it is a valid session label (letters and digits), else raise an
    :class:`InputError` saying what a session label is."""
    label = str(label)
    if _SUBJECT_ID.match(label):
        return label
    what = (
        "a session label is what follows 'ses-' in the folder name (sub-<id>/ses-<label>/): "
        "letters and digits, e.g. 01"
    )
    if label.lower().startswith("ses-") and _SUBJECT_ID.match(label[4:]):
        raise InputError(f"{source} {label!r}: {what}; give {label[4:]!r} without 'ses-'")
    raise InputError(f"{source} {label!r} is not a session label: {what}")


def discover_bids(root: Path | str) -> pd.DataFrame:
    """One row per exam found under ``root`` (``sub-*/[ses-*/]anat|dwi``); missing sequences are empty.

    A file is a sequence's when its suffix and entities are the sequence's (``*_ce-low_T1w`` is the low dose,
    never the pre-contrast ``*_T1w``); of two candidates the first by name is taken."""
    root = Path(root)
    if not root.is_dir():
        raise InputError("BIDS folder not found", path=root)
    rows = []
    for sub_dir in sorted(root.glob("sub-*")):
        if not sub_dir.is_dir():
            continue
        subject = check_subject_id(sub_dir.name[4:], source=sub_dir)
        sessions = sorted(p for p in sub_dir.glob("ses-*") if p.is_dir()) or [sub_dir]
        for ses_dir in sessions:
            row = {"subject": subject, "session": ses_dir.name[4:] if ses_dir != sub_dir else ""}
            for column, pattern in BIDS_PATTERNS.items():
                found = sorted(p for p in ses_dir.glob(pattern) if _is_sequence(p.name, column))
                row[column] = str(found[0]) if found else ""
            rows.append(row)
    if not rows:
        raise InputError("no sub-* folders found", path=root)
    return pd.DataFrame(rows)


def _is_sequence(name: str, column: str) -> bool:
    """Whether a file name found by the column's glob has exactly the entities that tell sequences apart
    (``ce``): ``sub-1_ce-low_T1w.nii.gz`` matches ``low`` and not ``t1``."""
    seq = BY_KEY.get(column) or next(s for s in SEQUENCE_TABLE if column in s.companions)
    wanted = dict(seq.entities).get("ce")
    return parse_name(name).get("ce") == wanted


#: A BraTS 2023 case id: ``BraTS-<cohort>-<patient>-<timepoint>``, e.g. ``BraTS-MET-00110-000``.
_BRATS_2023_CASE = re.compile(r"^BraTS-([A-Za-z]+)-(\d+)-(\d+)$")


def brats_subject_id(case: str) -> tuple[str, str]:
    """(subject id, session) of a BraTS-style case id: the case's letters and digits (subject ids are BIDS
    labels); a BraTS 2023 id's last number is its time point, which becomes the session, so that one exam
    per patient is kept as for any study. ``BraTS-MET-00110-000`` -> (``BraTSMET00110``, ``000``)."""
    m = _BRATS_2023_CASE.match(case)
    if m:
        return f"BraTS{m.group(1)}{m.group(2)}", m.group(3)
    subject = re.sub(r"[^A-Za-z0-9]", "", case)
    if not subject:
        raise InputError("a BraTS case folder name has no letter or digit", path=case)
    return subject, ""


def discover_brats(root: Path | str) -> pd.DataFrame:
    """One row per case folder of a BraTS-style folder: ``<root>/<case>/<case>-t1n|t1c|t2w|t2f.nii.gz``
    (BraTS 2023) or ``<case>_t1|t1ce|t2|flair.nii.gz`` (BraTS 2021); the suffixes of each sequence are in
    virtual_contrast.sequences. ``source_id`` keeps each case's own id; two cases that map to the same
    subject id and session stop the discovery, naming both folders."""
    root = Path(root)
    if not root.is_dir():
        raise InputError("BraTS folder (brats_dir) not found", path=root)
    rows, seen = [], {}
    for case_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        case = case_dir.name
        subject, session = brats_subject_id(case)
        if (subject, session) in seen:
            raise InputError(
                f"case folders {seen[(subject, session)].name!r} and {case!r} map to the same subject "
                f"id {subject!r} (session {session!r}): rename one",
                path=case_dir,
            )
        seen[(subject, session)] = case_dir
        row = {"subject": subject, "session": session, "source_id": case}
        files = sorted(p for p in case_dir.iterdir() if p.is_file())
        for column in SEQUENCES:
            seq = BY_KEY.get(column)
            found = [
                p
                for p in files
                for suffix in (seq.brats if seq else ())
                if re.fullmatch(rf".*[-_]{re.escape(suffix)}\.nii(\.gz)?", p.name, re.IGNORECASE)
            ]
            row[column] = str(found[0]) if found else ""
        rows.append(row)
    if not rows:
        raise InputError(
            "no case folders found (expected <case>/<case>-t1n.nii.gz, -t1c, -t2w, -t2f)", path=root
        )
    return pd.DataFrame(rows)


def read_subjects_table(
    path: Path | str, *, required: Iterable[str] = PAPER_COLUMNS, check_files: bool = True
) -> pd.DataFrame:
    """Read and check a subjects TSV; relative file paths are taken relative to the table's folder.

    ``required`` are the sequence columns the study needs (:func:`virtual_contrast.sequences.raw_columns`):
    a table without one of them is an error naming the column; the other sequence columns are optional and
    read as empty when absent (a standard-dose study has no ``low``, a study without ADC no ``dwi``).
    The returned frame is indexed by the line number of each row in the file (the header is line 1), so that
    later messages can point at the line. ``split`` values come back in lower case. Raises an
    :class:`InputError` naming the table and the line for an invalid subject id, a ``split`` value other than
    train/test, a duplicated (subject, session) and, with ``check_files``, a listed file that does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("subjects table not found", path=path)
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise InputError(f"cannot be read as a tab-separated table: {exc}", path=path) from exc
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in ("subject", *required) if c not in table.columns]
    if missing:
        needed = f"; the study needs {', '.join(required)}" if set(missing) - {"subject"} else ""
        raise InputError(f"subjects table lacks column(s) {', '.join(missing)}{needed}", path=path)
    for column in SEQUENCES:
        if column not in table.columns:
            table[column] = ""
    table.index = pd.RangeIndex(2, len(table) + 2, name="line")
    if "session" not in table.columns:
        table["session"] = ""
    table["subject"] = table["subject"].str.strip()
    table["session"] = table["session"].str.strip()
    for line, subject in table["subject"].items():
        try:
            check_subject_id(subject)
        except InputError as exc:
            raise InputError(f"line {line}: {exc.reason}", subject=subject, path=path) from None
    table = check_split_column(table, source=path)
    check_unique_exams(table, source=path)
    for column in SEQUENCES:
        table[column] = [
            str(p if not p or Path(p).is_absolute() else path.parent / p)
            for p in table[column].str.strip()
        ]
    if check_files:
        _check_listed_files(table, path)
    return table


def _row_label(table: pd.DataFrame, index) -> str:
    """``line N`` for a table read from a file (indexed by line), else ``row N`` (1-based)."""
    if table.index.name == "line":
        return f"line {index}"
    return f"row {table.index.get_loc(index) + 1}"


def check_split_column(table: pd.DataFrame, *, source: Path | str | None = None) -> pd.DataFrame:
    """``table`` with its ``split`` column (if any) in lower case; anything but train/test is an error.

    An unknown value (``tset``, ``training``, empty) is refused rather than guessed: treating it as ``train``
    would put a held-out patient into training. Raises an :class:`InputError` naming the subject, the table
    and the row. Without a ``split`` column the workflow draws the split itself.
    """
    if "split" not in table.columns:
        return table
    values = table["split"].fillna("").astype(str).str.strip().str.lower()
    for index, value in values.items():
        if value not in SPLIT_VALUES:
            original = table.at[index, "split"]
            raise InputError(
                f"{_row_label(table, index)}: split {original!r} must be 'train' or 'test' (any case); "
                "leave the split column out to let the workflow draw the split",
                subject=str(table.at[index, "subject"]) if "subject" in table.columns else None,
                path=source,
            )
    return table.assign(split=values)


def check_unique_exams(table: pd.DataFrame, *, source: Path | str | None = None) -> None:
    """Raise an :class:`InputError` naming both rows when two rows hold the same subject and session."""
    sessions = table["session"] if "session" in table.columns else pd.Series("", index=table.index)
    seen: dict[tuple[str, str], object] = {}
    keys = zip(table["subject"].astype(str), sessions.astype(str), strict=True)
    for index, key in zip(table.index, keys, strict=True):
        if key in seen:
            session = f"session {key[1]!r}" if key[1] else "no session"
            raise InputError(
                f"{_row_label(table, seen[key])} and {_row_label(table, index)} are the same exam "
                f"({session}): one row per exam (subject and session)",
                subject=key[0],
                path=source,
            )
        seen[key] = index


def _check_listed_files(table: pd.DataFrame, source: Path) -> None:
    missing = [
        (index, column, value)
        for column in SEQUENCES
        for index, value in table[column].items()
        if value and not os.path.exists(value)
    ]
    if missing:
        index, column, value = min(missing)  # the first line with a missing file
        more = (
            f" (and {len(missing) - 1} more listed files that do not exist)"
            if len(missing) > 1
            else ""
        )
        raise InputError(
            f"line {index}: the {column} file {value!r} does not exist{more}; leave the cell empty "
            "for a sequence that was not acquired",
            subject=str(table.at[index, "subject"]),
            path=source,
        )


def select_exams(
    exams: pd.DataFrame,
    *,
    required: Iterable[str] = PAPER_COLUMNS,
    check_files: bool = True,
    hints: dict[str, str] | None = None,
) -> Selection:
    """Apply the paper's exclusions: missing sequences first, then one exam per patient (the earliest).

    An exam is excluded for lacking one of the ``required`` columns (the sequences the study needs);
    ``hints`` adds a remedy to the reason of a missing column (e.g. how to simulate a low dose).
    ``check_files`` also treats a listed but absent file as missing (off for the embedded cohort, whose files
    are made by the workflow). Sessions sort as strings, so use sortable labels (``01``, ``02`` or dates).
    """
    exams = exams.copy()
    required = tuple(required)
    hints = hints or {}
    for subject in exams["subject"]:
        check_subject_id(subject)
    if "session" not in exams.columns:
        exams["session"] = ""
    for column in SEQUENCES:
        if column not in exams.columns:
            exams[column] = ""
    exams = check_split_column(exams)
    check_unique_exams(exams)
    n_exams, n_patients = len(exams), exams["subject"].nunique()
    excluded = []

    def missing_of(row) -> list[str]:
        return [
            SEQUENCE_LABELS[c] + (f" ({hints[c]})" if c in hints else "")
            for c in required
            if not row[c] or (check_files and not Path(row[c]).exists())
        ]

    # One exam per patient: the earliest session is the patient's exam (the paper excluded later visits).
    keep = []
    for _, group in exams.sort_values(["subject", "session"]).groupby("subject", sort=True):
        first, later = group.iloc[0], group.iloc[1:]
        for _, row in later.iterrows():
            excluded.append(
                {
                    "subject": row["subject"],
                    "session": row["session"],
                    "step": "later visit",
                    "reason": f"later visit (session {row['session']}); kept session {first['session']}",
                }
            )
        missing = missing_of(first)
        if missing:
            excluded.append(
                {
                    "subject": first["subject"],
                    "session": first["session"],
                    "step": "missing sequence",
                    "reason": "missing " + ", ".join(missing),
                }
            )
        else:
            keep.append(first)
    included = pd.DataFrame(keep).reset_index(drop=True) if keep else exams.iloc[:0].copy()
    excluded_df = pd.DataFrame(excluded, columns=["subject", "session", "step", "reason"])
    return Selection(included, excluded_df, n_exams=n_exams, n_patients=n_patients)


def flowchart_counts(selection: Selection) -> list[tuple[str, int]]:
    """The boxes of the flow chart, top to bottom: (label, count)."""
    ex = selection.excluded
    n_later = int((ex["step"] == "later visit").sum())
    n_missing = int((ex["step"] == "missing sequence").sum())
    return [
        ("exams", selection.n_exams),
        ("later visits excluded", n_later),
        ("patients (one exam each)", selection.n_patients),
        ("excluded: missing sequence", n_missing),
        ("included patients", len(selection.included)),
    ]


def assign_split(subjects: list[str], *, test_fraction: float, seed: int) -> dict[str, str]:
    """Hold out about ``test_fraction`` of subjects as ``test``, the rest ``train``.

    Each subject's split depends only on (seed, subject id), through a hash mapped to [0, 1): adding subjects
    never moves an existing one between train and test, so a held-out subject stays held out (the paper kept its
    test set untouched until everything was fixed). With few subjects the fraction is approximate; at least
    one subject is held out and at least two are kept for training when there are three or more.
    """
    import hashlib

    def u(subject: str) -> float:
        digest = hashlib.sha256(f"{seed}:{subject}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    scores = {s: u(s) for s in subjects}
    split = {s: ("test" if scores[s] < test_fraction else "train") for s in subjects}
    ranked = sorted(subjects, key=scores.get)
    if len(subjects) >= 3 and test_fraction > 0:
        if "test" not in split.values():
            split[ranked[0]] = "test"
        while sum(v == "train" for v in split.values()) < 2:
            split[max((s for s in subjects if split[s] == "test"), key=scores.get)] = "train"
    return split
