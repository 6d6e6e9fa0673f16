"""The whole embedded cohort as a BIDS-like tree: :func:`make_cohort` writes every planned exam
(:func:`~virtual_contrast.cohort.exam.make_exam`), the participants, the sessions and the dataset description.

Layout written by :func:`make_cohort` (BIDS-like)::

    participants.tsv     participant_id (sub-vc001), age, sex, weight_kg, indication, acquisition_date
                         (the date of the patient's first exam, YYYY-MM-DD)
    lesions.tsv          one row per true lesion and exam: subject (vc001), session ("" when the patient has a
                         single exam, else 01/02), lesion_id, x_mm y_mm z_mm (centre, world RAS mm of the
                         full-dose T1c; the other series' head positions differ by about 1 mm), long_axis_mm short_axis_mm (largest axial cross-section of the lesion
                         through its centre, as a RANO reader measures it), diameter_mm (equivalent sphere),
                         kind (nodule|ring), atlas_x_mm atlas_y_mm atlas_z_mm (centre in atlas space)
    sub-vc001/ses-01/anat/sub-vc001_ses-01_{T1w,T2w,FLAIR,ce-low_T1w,ce-full_T1w}.nii.gz (+ .json sidecars)
    sub-vc001/ses-01/dwi/sub-vc001_ses-01_dwi.{nii.gz,bval,bvec}    (ses-02 the same: a later visit)
    sub-vc001/sub-vc001_sessions.tsv    session_id, acquisition_date (patients with several visits only)
    sub-vc002/anat/sub-vc002_T1w.nii.gz ...   (patients with one exam: no session level)
    sub-vcm01/...        patients whose exam lacks one sequence (FLAIR first, then DWI, then low-dose T1c)
    derivatives/truth/sub-*/[ses-*/]anat/*_space-T1w_{dseg,desc-brain_mask,desc-lesions_dseg}.nii.gz
                         the true tissue classes (see ``DSEG_LABELS``), brain mask and lesion ids on the T1
                         grid (the pre-contrast T1's), and *_desc-truth.json (pose of each series, head
                         scaling, contrast timeline, plasma and lesion concentrations of each series)

The exams planned (who has a later visit, who lacks a sequence) are those of
:func:`virtual_contrast.cohort.plan.plan_cohort`, so the tree equals what the workflow builds exam by exam with
:func:`~virtual_contrast.cohort.exam.make_exam`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from virtual_contrast import layout
from virtual_contrast.atlas import Atlas
from virtual_contrast.cohort.anatomy import head_model
from virtual_contrast.cohort.exam import (
    LESION_COLUMNS,
    check_parameters,
    make_exam,
)
from virtual_contrast.cohort.plan import participant, plan_cohort, session_date
from virtual_contrast.io import InputError, write_json, write_table
from virtual_contrast.sequences import exam_files

log = logging.getLogger(__name__)


def make_cohort(
    out_dir: Path | str,
    *,
    n: int,
    seed: int,
    atlas: Atlas,
    native_voxel_mm: float = 2.0,
    extra_visits: int = 1,
    missing_sequence: int = 1,
    lesions_per_subject: tuple[int, int] = (1, 4),
    lesion_free_fraction: float = 0.3,
    deformation_mm: float = 4.0,
    truth: bool = True,
    progress: bool = False,
) -> Path:
    """Write a BIDS-like cohort of ``n`` complete patients plus the excluded exams into ``out_dir``.

    The plan is :func:`virtual_contrast.cohort.plan.plan_cohort`: patients ``vc001``...; the first
    ``extra_visits`` of them also have a later visit (sessions ``ses-01``/``ses-02``; the others have no
    session level), and ``missing_sequence`` more patients (``vcm01``...) lack one sequence. See the module
    docstring for the layout and the tables. Returns ``out_dir``.
    """
    if n < 1 or extra_visits < 0 or missing_sequence < 0:
        raise InputError(
            f"cohort sizes must be n >= 1 and counts >= 0 (n={n}, extra_visits={extra_visits}, "
            f"missing_sequence={missing_sequence})"
        )
    check_parameters(seed, native_voxel_mm, lesions_per_subject)
    out_dir = Path(out_dir)
    model = head_model(atlas)
    plan = plan_cohort(n, extra_visits=extra_visits, missing_sequence=missing_sequence)
    visits: dict[str, int] = {}
    for exam in plan:
        visits[exam.subject] = visits.get(exam.subject, 0) + 1
    planned = {f"sub-{s}" for s in visits}
    stale = sorted(p.name for p in out_dir.glob("sub-*") if p.is_dir() and p.name not in planned)
    if stale:
        log.warning("%s holds subject folders not in this cohort: %s", out_dir, ", ".join(stale))

    from tqdm import tqdm

    common = dict(
        model=model,
        native_voxel_mm=native_voxel_mm,
        deformation_mm=deformation_mm,
        lesions_per_subject=lesions_per_subject,
        lesion_free_fraction=lesion_free_fraction,
    )
    tables, participants = [], {}
    for exam in tqdm(plan, desc="cohort exams", unit="exam", disable=not progress):
        subject = exam.subject
        session = exam.session if visits[subject] > 1 else ""
        absent = set(exam_files(exam.missing))
        paths = {
            key: path
            for key, path in layout.bids_exam_files(out_dir, subject, session).items()
            if key not in absent
        }
        truth_dir = out_dir / "derivatives" / "truth" if truth else None
        table = make_exam(
            paths, None, subject=subject, session=session, seed=seed, truth_dir=truth_dir, **common
        )
        tables.append(table)
        participants[subject] = participant(
            subject, seed, lesion_free_fraction=lesion_free_fraction
        )
    for subject, count in visits.items():
        if count > 1:
            sessions = [f"{i:02d}" for i in range(1, count + 1)]
            rows = [
                {"session_id": f"ses-{s}", "acquisition_date": session_date(subject, s, seed)}
                for s in sessions
            ]
            write_table(
                pd.DataFrame(rows), out_dir / f"sub-{subject}" / f"sub-{subject}_sessions.tsv"
            )
    write_table(pd.DataFrame(list(participants.values())), out_dir / "participants.tsv")
    lesions = (
        pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=LESION_COLUMNS)
    )
    write_table(lesions, out_dir / "lesions.tsv")
    write_json(
        {
            "Name": "virtual-contrast embedded synthetic cohort",
            "BIDSVersion": "1.8.0",
            "DatasetType": "raw",
            "GeneratedBy": [
                {
                    "Name": "virtual-contrast cohort",
                    "Description": "physically grounded synthetic exams (see virtual_contrast.cohort)",
                }
            ],
            "Parameters": {
                "n": n,
                "seed": seed,
                "native_voxel_mm": native_voxel_mm,
                "atlas_voxel_mm": atlas.voxel_mm,
                "extra_visits": extra_visits,
                "missing_sequence": missing_sequence,
                "lesions_per_subject": list(lesions_per_subject),
                "lesion_free_fraction": lesion_free_fraction,
                "deformation_mm": deformation_mm,
            },
        },
        out_dir / "dataset_description.json",
    )
    log.info(
        "cohort of %d exams (%d patients, %d lesions) in %s",
        len(plan),
        len(visits),
        len(lesions),
        out_dir,
    )
    return out_dir
