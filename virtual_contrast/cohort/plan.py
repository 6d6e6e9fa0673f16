"""The cohort's patients and exams, decided from the config alone (no image is needed): who is in it
(:func:`plan_cohort`), their demographics (:func:`participant`, the paper's Table 1 variables) and the dates of
their exams, and the seeded random stream each patient draws from (:func:`subject_rng`).

The workflow plans the embedded cohort with this module at parse time; the simulation draws from the same
streams, so that adding patients never changes existing ones.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from virtual_contrast import layout
from virtual_contrast.io import InputError
from virtual_contrast.sequences import exam_files

INDICATIONS = ("metastases", "glioma", "other")  # "other": no enhancing lesion (33 % in the paper)
FIRST_DATE, LAST_DATE = dt.date(2019, 11, 1), dt.date(2020, 2, 29)  # the paper's acquisition window
#: Sequences a cohort exam may lack (to exercise the exclusions), in the order they are dropped.
DROPPABLE = ("flair", "dwi", "low")


@dataclass(frozen=True)
class CohortExam:
    """One planned exam of the embedded cohort."""

    subject: str
    session: str  # "01" for the first visit, "02" for a later one
    missing: tuple[str, ...] = ()

    def files(self, root: Path | str = layout.COHORT_DIR) -> dict[str, Path]:
        """Path of each sequence file of this exam (those in ``missing`` are not written)."""
        absent = set(exam_files(self.missing))
        files = layout.bids_exam_files(root, self.subject, self.session)
        return {key: path for key, path in files.items() if key not in absent}


def cohort_subject_id(index: int) -> str:
    """Id of the ``index``-th (1-based) cohort patient."""
    return f"vc{index:03d}"


def plan_cohort(n: int, *, extra_visits: int, missing_sequence: int) -> list[CohortExam]:
    """The exams of the embedded cohort, decided from the config alone (no image is needed).

    ``n`` patients with a complete first exam (``vc001``...), of which the first ``extra_visits`` also have a
    later visit (excluded), plus ``missing_sequence`` patients (``vcm01``...) whose exam lacks one sequence
    (excluded). Growing ``n`` only adds patients: every existing exam, and so every computed result, stays.
    """
    exams = []
    for i in range(n):
        subject = cohort_subject_id(i + 1)
        exams.append(CohortExam(subject, "01"))
        if i < extra_visits:
            exams.append(CohortExam(subject, "02"))
    for i in range(missing_sequence):
        exams.append(CohortExam(f"vcm{i + 1:02d}", "01", (DROPPABLE[i % len(DROPPABLE)],)))
    return exams


def subject_rng(seed: int, subject: str, *stream: int) -> np.random.Generator:
    """The random stream ``stream`` of one subject: depends on (seed, subject id) only."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), *subject.encode(), *stream]))


def participant(subject: str, seed: int, *, lesion_free_fraction: float = 0.3) -> dict:
    """Demographics of a cohort patient (the paper's Table 1 variables) and the date of its first exam."""
    rng = subject_rng(seed, subject, 1)
    sex = "F" if rng.random() < 0.55 else "M"
    age = int(np.clip(np.round(rng.normal(57, 14)), 18, 90))
    weight = float(np.clip(rng.normal(64 if sex == "F" else 78, 15), 40, 150))
    u = rng.random()
    # Lesion-free patients are "other"; of the others 70 % have metastases (66 vs 30 gliomas in the paper).
    if u < lesion_free_fraction:
        indication = INDICATIONS[2]
    elif u < lesion_free_fraction + (1 - lesion_free_fraction) * 0.7:
        indication = INDICATIONS[0]
    else:
        indication = INDICATIONS[1]
    span = (LAST_DATE - FIRST_DATE).days
    first = FIRST_DATE + dt.timedelta(days=int(rng.integers(0, span + 1)))
    return {
        "participant_id": f"sub-{subject}",
        "age": age,
        "sex": sex,
        "weight_kg": round(weight, 1),
        "indication": indication,
        "acquisition_date": first.isoformat(),
    }


def session_date(subject: str, session: str, seed: int) -> str:
    """Acquisition date (YYYY-MM-DD) of an exam: the first one, or 2-12 weeks after the previous visit."""
    date = dt.date.fromisoformat(participant(subject, seed)["acquisition_date"])
    for visit in range(2, session_index(session) + 1):
        date += dt.timedelta(days=int(subject_rng(seed, subject, 2, visit).integers(14, 85)))
    return date.isoformat()


def session_index(session: str) -> int:
    """1 for the first exam ("" or "01"), 2 for "02", ..."""
    if not session:
        return 1
    if not session.isdigit() or int(session) < 1:
        raise InputError(f"cohort sessions are numbered 01, 02, ...; got {session!r}")
    return int(session)
