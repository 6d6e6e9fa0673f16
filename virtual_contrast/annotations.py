"""The annotation tables of a reader study: what a reader marked and what they read.

Two tables, written by a person with the reading tool (:mod:`virtual_contrast.reader.session`) or 3D Slicer,
by the automated reader (:mod:`virtual_contrast.evaluate.lesions`) or from a cohort's true lesions, and read by
the statistics (:mod:`virtual_contrast.reader.stats`):

- lesions, one row per marked lesion: ``patient, reader, modality, x_mm, y_mm, z_mm, long_axis_mm,
  short_axis_mm`` with modality ``ref`` (the reference standard), ``low`` or ``vir``; centres in world mm;
- reads, one row per read image: ``patient, reader, modality, quality, reading_time_s`` (quality on a 1-5 Likert
  scale, both may be empty). The reads say which images were read, so that a read without lesions still counts
  one patient in the false detection rate.

This module holds their columns and their checks, so that the parts that write them and the parts that read
them depend on it and not on each other.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from virtual_contrast.io import InputError

log = logging.getLogger(__name__)

MODALITIES = ("ref", "low", "vir")
LESION_COLUMNS = (
    "patient",
    "reader",
    "modality",
    "x_mm",
    "y_mm",
    "z_mm",
    "long_axis_mm",
    "short_axis_mm",
)
READ_COLUMNS = ("patient", "reader", "modality", "quality", "reading_time_s")


def _read_csv(path: Path | str, what: str) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} file not found", path=path)
    sep = "\t" if path.suffix.lower() in {".tsv", ".tab", ".txt"} else ","
    try:
        return pd.read_csv(path, sep=sep, dtype={"patient": str, "reader": str, "modality": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot be read as a {what} table: {exc}", path=path) from exc


def _rows(index: pd.Index | np.ndarray, limit: int = 8) -> str:
    """Line numbers in the file (header is line 1) of the given 0-based data rows."""
    lines = [str(int(i) + 2) for i in list(index)[:limit]]
    more = len(index) - limit
    return ", ".join(lines) + (f" and {more} more" if more > 0 else "")


def _check_columns(df: pd.DataFrame, required: Sequence[str], what: str, source: object) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(
            f"{what} table lacks column(s) {', '.join(missing)}; expected header: {','.join(required)}",
            path=source,
        )


def _check_ids_and_modality(df: pd.DataFrame, what: str, source: object) -> pd.DataFrame:
    df = df.copy()
    for col in ("patient", "reader", "modality"):
        df[col] = df[col].astype("string").str.strip()
        empty = df.index[df[col].isna() | (df[col] == "")]
        if len(empty):
            raise InputError(f"{what}: empty {col} on line(s) {_rows(empty)}", path=source)
    df["modality"] = df["modality"].str.lower()
    bad = df.index[~df["modality"].isin(MODALITIES)]
    if len(bad):
        values = sorted(set(df.loc[bad, "modality"]))
        raise InputError(
            f"{what}: unknown modality {', '.join(map(repr, values))} on line(s) {_rows(bad)}; "
            f"expected one of {', '.join(MODALITIES)}",
            path=source,
        )
    return df.astype({"patient": str, "reader": str, "modality": str})


def validate_lesions(df: pd.DataFrame, *, source: Path | str | None = None) -> pd.DataFrame:
    """Check a lesions table and return it with clean types; :class:`InputError` names the bad lines."""
    _check_columns(df, LESION_COLUMNS, "lesions", source)
    df = _check_ids_and_modality(df[list(LESION_COLUMNS)], "lesions", source)
    for col in LESION_COLUMNS[3:]:
        values = pd.to_numeric(df[col], errors="coerce")
        bad = df.index[~np.isfinite(values.to_numpy(float))]
        if len(bad):
            raise InputError(
                f"lesions: {col} is missing or not a number on line(s) {_rows(bad)}", path=source
            )
        df[col] = values.astype(float)
    for col in ("long_axis_mm", "short_axis_mm"):
        bad = df.index[df[col] < 0]
        if len(bad):
            raise InputError(f"lesions: negative {col} on line(s) {_rows(bad)}", path=source)
    bad = df.index[df["long_axis_mm"] <= 0]
    if len(bad):
        raise InputError(f"lesions: long_axis_mm must be > 0 on line(s) {_rows(bad)}", path=source)
    bad = df.index[df["short_axis_mm"] > df["long_axis_mm"] + 1e-9]
    if len(bad):
        raise InputError(
            f"lesions: short_axis_mm exceeds long_axis_mm on line(s) {_rows(bad)} (columns swapped?)",
            path=source,
        )
    return df.reset_index(drop=True)


def validate_reads(df: pd.DataFrame, *, source: Path | str | None = None) -> pd.DataFrame:
    """Check a reads table (one row per read image; quality 1-5 or empty, time >= 0 or empty)."""
    _check_columns(df, READ_COLUMNS, "reads", source)
    df = _check_ids_and_modality(df[list(READ_COLUMNS)], "reads", source)
    for col in ("quality", "reading_time_s"):
        raw = df[col]
        values = pd.to_numeric(raw, errors="coerce")
        bad = df.index[values.isna() & raw.notna() & (raw.astype(str).str.strip() != "")]
        if len(bad):
            raise InputError(f"reads: {col} is not a number on line(s) {_rows(bad)}", path=source)
        df[col] = values.astype(float)
    bad = df.index[df["quality"].notna() & ~df["quality"].isin([1, 2, 3, 4, 5])]
    if len(bad):
        raise InputError(
            f"reads: quality must be an integer grade 1-5 on line(s) {_rows(bad)}", path=source
        )
    bad = df.index[df["reading_time_s"] < 0]
    if len(bad):
        raise InputError(f"reads: negative reading_time_s on line(s) {_rows(bad)}", path=source)
    dup = df.index[df.duplicated(["patient", "reader", "modality"], keep="first")]
    if len(dup):
        raise InputError(
            f"reads: the same (patient, reader, modality) is read twice, line(s) {_rows(dup)}",
            path=source,
        )
    return df.reset_index(drop=True)


def load_lesions(path: Path | str) -> pd.DataFrame:
    """Read and validate a lesions CSV (comma-separated; tab-separated for .tsv)."""
    return validate_lesions(_read_csv(path, "lesions"), source=path)


def load_reads(path: Path | str) -> pd.DataFrame:
    """Read and validate a reads CSV (comma-separated; tab-separated for .tsv)."""
    return validate_reads(_read_csv(path, "reads"), source=path)


def reads_from_lesions(lesions: pd.DataFrame) -> pd.DataFrame:
    """Reads implied by a lesions table when no reads table exists.

    Every reader is assumed to have read, in each modality they marked lesions in, every patient of the
    lesions table. Patients without any marked lesion are unknown and do not count in the FDR.
    """
    patients = sorted(lesions["patient"].unique())
    pairs = lesions[["reader", "modality"]].drop_duplicates().itertuples(index=False)
    rows = [(p, r, m) for r, m in pairs for p in patients]
    log.warning(
        "no reads table: assuming each reader read all %d patients of the lesions table in each modality "
        "they annotated; patients with no lesion at all are not counted",
        len(patients),
    )
    out = pd.DataFrame(rows, columns=["patient", "reader", "modality"])
    out["quality"] = np.nan
    out["reading_time_s"] = np.nan
    return out


def check_consistency(
    lesions: pd.DataFrame, reads: pd.DataFrame, reference_reader: str | None
) -> str:
    """Check that every lesion belongs to a read and every read patient has a reference read.

    Returns the reference reader (the only reader with ``ref`` reads unless given).
    """
    read_keys = set(reads[["patient", "reader", "modality"]].itertuples(index=False, name=None))
    orphan = [
        (i, key)
        for i, key in enumerate(
            lesions[["patient", "reader", "modality"]].itertuples(index=False, name=None)
        )
        if key not in read_keys
    ]
    if orphan:
        shown = "; ".join(
            f"patient {p!r}, reader {r!r}, modality {m!r}" for _, (p, r, m) in orphan[:5]
        )
        raise InputError(
            f"{len(orphan)} lesion(s) belong to no read in the reads table (lesions line(s) "
            f"{_rows([i for i, _ in orphan])}): {shown}; add the read (patient, reader, modality) to the reads"
        )
    ref_readers = sorted(reads.loc[reads["modality"] == "ref", "reader"].unique())
    if reference_reader is None:
        if not ref_readers:
            raise InputError(
                "no reader read any ref image: the reference standard (ref reads) is missing"
            )
        if len(ref_readers) > 1:
            raise InputError(
                f"several readers read ref images ({', '.join(ref_readers)}); choose one with --reference-reader"
            )
        reference_reader = ref_readers[0]
    elif reference_reader not in ref_readers:
        raise InputError(
            f"reference reader {reference_reader!r} has no ref read; readers with ref reads: {ref_readers or 'none'}"
        )
    ref_patients = set(
        reads.loc[(reads["modality"] == "ref") & (reads["reader"] == reference_reader), "patient"]
    )
    evaluated = reads[~((reads["modality"] == "ref") & (reads["reader"] == reference_reader))]
    missing = sorted(set(evaluated["patient"]) - ref_patients)
    if missing:
        raise InputError(
            f"patient(s) {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''} have reads but no ref "
            f"read by the reference reader {reference_reader!r}, so they have no reference lesions"
        )
    return reference_reader
