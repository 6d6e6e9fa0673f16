"""The workflow's ``dicom_dir``: one folder per exam, planned at parse time from the DICOM headers.

Layout: ``DICOM_DIR/<subject>/`` is one exam (session ``01``), or ``DICOM_DIR/<subject>/ses-<digits>/`` one
exam per session; ``<subject>`` may carry a ``sub-`` prefix; the DICOM files may lie in any sub-folders.

What must be known when Snakemake parses the workflow is which exams have all five sequences (the
exclusions, the split, the jobs), so every exam's headers are read at parse time (:func:`scan_folder`, no
pixels) and classified by the import rules; an exam with two candidates for one role stops the run there,
with every such exam listed. The result is kept per exam in a *manifest* (JSON) beside the imported files:
the series, their files and roles, and a signature of the folder's listing (names, sizes, modification
times). A later parse only lists the folder and compares the signature, so a dry run reads headers only of
exams that changed. The manifest is the ``import_dicom`` rule's input and is rewritten only when its content
changes, so a changed DICOM file reruns that exam's import and everything downstream, and nothing else.
A manifest is reused only for the same folder, given by its absolute path (the files it lists are absolute
too), so an exam given relative to the working directory cannot leave a manifest that fails later.

Checks of the study as a whole, before anything is imported: each exam folder holds one patient's series;
no two exam folders hold the same study (StudyInstanceUID), and no patient (same PatientID, PatientName and
PatientBirthDate) appears under two subject ids, where one could train and the other test the model; the
workflow's own outputs must not lie inside ``dicom_dir`` (a working directory there would make its
``results/`` and ``logs/`` look like exams).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from virtual_contrast.dicom.rules import ROLES, SeriesMap, classify
from virtual_contrast.dicom.scan import (
    Series,
    describe_patient,
    list_files,
    other_patients,
    scan_folder,
    signature,
)
from virtual_contrast.io import InputError, write_json

log = logging.getLogger(__name__)

MANIFEST_VERSION = 2  # 2: absolute exam folder and files, the patient of each series
DEFAULT_SESSION = "01"


def exam_folders(root: Path | str) -> list[tuple[str, str, Path]]:
    """(subject, session, folder) of every exam under ``root`` (see the module docstring)."""
    from virtual_contrast.subjects import check_subject_id

    root = Path(os.path.abspath(root))
    if not root.is_dir():
        raise InputError("DICOM folder (dicom_dir) not found", path=root)
    exams = []
    for sub_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        subject = check_subject_id(sub_dir.name.removeprefix("sub-"), source=sub_dir)
        sessions = sorted(p for p in sub_dir.iterdir() if p.is_dir() and p.name.startswith("ses-"))
        if not sessions:
            exams.append((subject, DEFAULT_SESSION, sub_dir))
            continue
        for ses_dir in sessions:
            label = ses_dir.name.removeprefix("ses-")
            if not re.fullmatch(r"\d+", label):
                raise InputError(
                    "session folders must be named ses-<digits> (e.g. ses-01)", path=ses_dir
                )
            exams.append((subject, label, ses_dir))
    if not exams:
        raise InputError("no exam folders found (expected one folder per subject)", path=root)
    return exams


def load_series(
    folder: Path, manifest: Path, *, subject: str | None = None
) -> tuple[list[Series], str, int, dict | None]:
    """The exam's series: from the manifest when the folder's listing is unchanged, else from its headers.

    Returns (series, signature of the listing, number of files that are not DICOM images, the manifest's
    content when it was reused, else None).
    """
    folder = Path(os.path.abspath(folder))
    listing = list_files(folder, subject=subject)
    digest = signature(listing)
    if manifest.exists():
        try:
            saved = json.loads(manifest.read_text())
            if (
                saved.get("version") == MANIFEST_VERSION
                and saved.get("signature") == digest
                and saved.get("exam") == str(folder)
            ):
                return (
                    [Series.from_dict(s) for s in saved["series"]],
                    digest,
                    saved["skipped"],
                    saved,
                )
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable manifest: scan again
    log.info("reading the DICOM headers of %s (%d files)", folder, len(listing))
    series, skipped = scan_folder(folder, subject=subject)
    return series, digest, len(skipped), None


def plan_exam(
    folder: Path, manifest: Path, series_map: SeriesMap, *, subject: str
) -> tuple[dict, list[str]]:
    """The manifest of one exam (written when it changed) and its problems (ambiguous roles)."""
    folder = Path(os.path.abspath(folder))
    series, digest, skipped, saved = load_series(folder, manifest, subject=subject)
    studies = sorted({s.study_uid for s in series})
    problems = []
    if len(studies) > 1:
        problems.append(f"{len(studies)} studies in one exam folder; give one folder per exam")
    problems += other_patients(series)
    result = classify(series, series_map)
    problems += result.problems
    content = {
        "version": MANIFEST_VERSION,
        "exam": str(folder),
        "signature": digest,
        "skipped": skipped,
        "series_map": series_map.source,
        "roles": {role: s.uid for role, s in result.roles.items()},
        "series": saved["series"] if saved else [s.to_dict() for s in series],
    }
    if content != saved:  # same listing, map and roles: the manifest stays as it is (no rerun)
        write_json(content, manifest)
    return content, problems


def discover_dicom(
    root: Path | str,
    *,
    files_of: Callable[[str, str], dict[str, Path]],
    manifest_of: Callable[[str, str], Path],
    series_map: SeriesMap,
) -> tuple[pd.DataFrame, dict[tuple[str, str], Path]]:
    """One row per exam (subject, session and the file each role's import will write, "" when the exam has
    no such series) and the manifest of each exam. Raises one :class:`InputError` listing every exam whose
    series the rules cannot settle."""
    rows, manifests, problems = [], {}, []
    check_outputs_outside(root, manifest_of("x", DEFAULT_SESSION))
    planned = []
    for subject, session, folder in exam_folders(root):
        manifest = manifest_of(subject, session)
        content, found = plan_exam(folder, manifest, series_map, subject=subject)
        planned.append((subject, folder, content))
        problems += [f"subject {subject!r}, folder {str(folder)!r}: {p}" for p in found]
        files = files_of(subject, session)
        roles = content["roles"] if not found else {}
        row = {"subject": subject, "session": session}
        row.update({role: str(files[role]) if role in roles else "" for role in ROLES})
        row["bval"] = str(files["bval"]) if "dwi" in roles else ""
        rows.append(row)
        manifests[(subject, session)] = manifest
    if problems:
        raise InputError(f"{len(problems)} problem(s) with DICOM exams: " + " | ".join(problems))
    check_distinct_patients(planned)
    return pd.DataFrame(rows), manifests


def check_outputs_outside(root: Path | str, output: Path | str) -> None:
    """Refuse a working directory that puts the workflow's ``output`` inside the DICOM folder ``root``: its
    ``results/`` and ``logs/`` would be taken for exams on the next run."""
    root, output = Path(os.path.realpath(root)), Path(os.path.realpath(output))
    if output.is_relative_to(root):
        raise InputError(
            f"the working directory {os.getcwd()!r} lies inside the DICOM folder (dicom_dir): the "
            "workflow would write its results/ and logs/ among the exams; run it from a folder outside",
            path=root,
        )


def check_distinct_patients(exams: list[tuple[str, Path, dict]]) -> None:
    """Refuse two exam folders of one study, and one patient under two subject ids (see the module
    docstring). ``exams``: (subject, folder, manifest content) of each exam."""
    by_study: dict[str, list[tuple[str, Path]]] = {}
    by_patient: dict[tuple, list[tuple[str, Path]]] = {}
    for subject, folder, content in exams:
        series = [Series.from_dict(s) for s in content["series"]]
        for study in sorted({s.study_uid for s in series if s.study_uid}):
            by_study.setdefault(study, []).append((subject, folder))
        patient = series[0].patient if series else {}
        if patient.get("PatientID"):
            by_patient.setdefault(tuple(sorted(patient.items())), []).append((subject, folder))
    problems = []
    for study, where in by_study.items():
        if len(where) > 1:
            problems.append(
                f"StudyInstanceUID {study} is in {len(where)} exam folders: "
                + ", ".join(f"{str(folder)!r} (subject {subject!r})" for subject, folder in where)
            )
    for patient, where in by_patient.items():
        if len({subject for subject, _ in where}) > 1:
            problems.append(
                f"one patient ({describe_patient(dict(patient))}) under {len({s for s, _ in where})} "
                "subject ids: "
                + ", ".join(f"{str(folder)!r} (subject {subject!r})" for subject, folder in where)
            )
    if problems:
        raise InputError(
            "the same exam or patient in several folders would let the model be tested on a patient it "
            "was trained on: "
            + " | ".join(problems)
            + " (one subject folder per patient, one ses-<digits> folder per exam; de-identified "
            "patients need distinct PatientIDs)"
        )


def read_manifest(path: Path | str) -> tuple[Path, list[Series], dict[str, Series]]:
    """The exam folder, its series and the series of each role, from a manifest written by :func:`plan_exam`."""
    content = json.loads(Path(path).read_text())
    series = [Series.from_dict(s) for s in content["series"]]
    by_uid = {s.uid: s for s in series}
    return (
        Path(content["exam"]),
        series,
        {role: by_uid[uid] for role, uid in content["roles"].items()},
    )


def low_dose_file(manifest: Path | str) -> str:
    """The first file of an exam's low-dose T1c series (its header describes the acquisition)."""
    return read_manifest(manifest)[2]["low"].files[0]
