"""The workflow with dicom_dir: exams planned from their headers at parse time (dry runs), one real import job."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from dicom_exams import build_exam
from workflow_helpers import job_counts, snakemake

from virtual_contrast.config import validate_config
from virtual_contrast.workflow import plan_study


@pytest.fixture(scope="module")
def dicom_study(shared_data, tmp_path_factory):
    """dicom_dir with 5 complete exams of 5 patients (real headers relabelled), one without FLAIR and a later
    visit of one patient."""
    root = tmp_path_factory.mktemp("dicom_study")
    qa = shared_data / "dicom_dcm_qa"
    study = root / "dicom"
    for n, subject in enumerate(("d01", "d02", "d03", "d04"), start=1):
        build_exam(qa, study / subject / "exam", patient=str(n))
    for session in ("01", "02"):  # one patient, two studies
        build_exam(qa, study / "sub-d05" / f"ses-{session}" / "exam", patient="5")
    build_exam(qa, study / "d06", patient="6", flair=False)
    overlay = root / "dicom.yaml"
    overlay.write_text(yaml.safe_dump({"dicom_dir": str(study)}))
    return root, overlay


def test_dry_run_plans_imports_exclusions_and_the_dicom_export_of_test_subjects(
    dicom_study, tmp_path
):
    root, overlay = dicom_study
    proc = snakemake(tmp_path, "-n", overlays=("tests/tiny.yaml", overlay))
    counts = job_counts(proc.stdout)
    assert (
        counts["import_dicom"] == 5
    )  # d01-d05's first visit; d06 lacks a FLAIR, d05's second visit is later
    config = yaml.safe_load(overlay.read_text()) | {
        "split": {"test_fraction": 0.25, "seed": 2021},
        "dicom": {"series_map": ""},
    }
    study = plan_study(validate_config(config | {"dicom_dir": config["dicom_dir"]}))
    assert counts["export_dicom"] == len(study.test_subjects) >= 1
    assert counts["predict"] == len(study.test_subjects)
    excluded = study.selection.excluded.set_index("subject")
    assert "FLAIR" in excluded.loc["d06", "reason"]
    assert excluded.loc["d05", "step"] == "later visit"
    manifest = tmp_path / "results/dicom/sub-d01/ses-01/sub-d01_ses-01_series.json"
    mtime = manifest.stat().st_mtime_ns
    snakemake(tmp_path, "-n", overlays=("tests/tiny.yaml", overlay))
    assert (
        manifest.stat().st_mtime_ns == mtime
    )  # unchanged headers: the manifest is reused, not rewritten


def test_an_exam_the_rules_cannot_settle_stops_the_dry_run_naming_it(
    dicom_study, shared_data, tmp_path
):
    root, _ = dicom_study
    study = tmp_path / "dicom"
    build_exam(
        shared_data / "dicom_dcm_qa",
        study / "d07",
        post=("t1 post gd sag", "t1 post tra"),
        patient="7",
    )
    overlay = tmp_path / "dicom.yaml"
    overlay.write_text(yaml.safe_dump({"dicom_dir": str(study)}))
    proc = snakemake(tmp_path, "-n", overlays=("tests/tiny.yaml", overlay), check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "'d07'" in out and "'t1 post gd sag'" in out and "'t1 post tra'" in out
    assert "Job stats" not in out


def test_import_dicom_rule_writes_the_bids_layout_and_the_report(dicom_study, tmp_path):
    _, overlay = dicom_study
    target = "results/dicom/sub-d01/ses-01/anat/sub-d01_ses-01_ce-low_T1w.nii.gz"
    snakemake(tmp_path, "--cores", "1", target, overlays=("tests/tiny.yaml", overlay))
    folder = tmp_path / "results/dicom/sub-d01/ses-01"
    for name in (
        "anat/sub-d01_ses-01_T1w.nii.gz",
        "anat/sub-d01_ses-01_FLAIR.json",
        "dwi/sub-d01_ses-01_dwi.bval",
    ):
        assert (folder / name).exists(), name
    report = pd.read_csv(folder / "sub-d01_ses-01_dicom.tsv", sep="\t", dtype=str)
    assert sorted(report["role"]) == sorted(
        ["T1w", "FLAIR", "DWI", "low-dose T1c", "full-dose T1c"]
    )
    log = (tmp_path / "logs/import_dicom/sub-d01_ses-01.log").read_text()
    assert "dcm2niix" in log and "v1.0." in log


def _manifest(work, subject="d01", session="01"):
    return (
        work / f"results/dicom/sub-{subject}/ses-{session}/sub-{subject}_ses-{session}_series.json"
    )


def test_a_relative_dicom_dir_imports_and_a_manifest_of_a_relative_path_does_not_stick(
    dicom_study, tmp_path
):
    """The scratch links of dcm2niix pointed at relative paths (every import failed), and the manifest kept
    the relative file list, so that the absolute path failed too until results/dicom/ was deleted."""
    root, absolute_overlay = dicom_study
    work = tmp_path / "work"
    work.mkdir()
    relative = os.path.relpath(root / "dicom", work)
    overlay = tmp_path / "relative.yaml"
    overlay.write_text(yaml.safe_dump({"dicom_dir": relative}))
    target = "results/dicom/sub-d01/ses-01/anat/sub-d01_ses-01_ce-low_T1w.nii.gz"
    snakemake(work, "--cores", "1", target, overlays=("tests/tiny.yaml", overlay))
    assert (work / target).exists()
    manifest = json.loads(_manifest(work).read_text())
    assert manifest["exam"] == str(root / "dicom" / "d01")
    assert all(Path(f).is_absolute() for s in manifest["series"] for f in s["files"])
    # A manifest as the earlier version wrote it for the relative path: the same listing, relative files.
    for series in manifest["series"]:
        series["files"] = [os.path.relpath(f, work) for f in series["files"]]
    manifest["exam"] = os.path.relpath(manifest["exam"], work)
    _manifest(work).write_text(json.dumps(manifest))
    (work / target).unlink()
    snakemake(work, "--cores", "1", target, overlays=("tests/tiny.yaml", absolute_overlay))
    assert (work / target).exists()
    assert json.loads(_manifest(work).read_text())["exam"] == str(root / "dicom" / "d01")


def _planning_error(proc) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Traceback" not in out and "Job stats" not in out, out[-3000:]
    lines = [
        line for line in proc.stderr.splitlines() if "virtual-contrast workflow: error:" in line
    ]
    assert len(lines) == 1, out[-3000:]
    return lines[0]


def test_one_patient_under_two_subject_ids_stops_the_planning_naming_the_folders(
    shared_data, tmp_path
):
    qa = shared_data / "dicom_dcm_qa"
    study = tmp_path / "dicom"
    exam = build_exam(qa, study / "a01", patient="9")
    shutil.copytree(exam, study / "a02")  # the same exam again
    build_exam(qa, study / "a03", patient="9")  # the same patient, another study
    build_exam(qa, study / "a04", patient="4")
    overlay = tmp_path / "dicom.yaml"
    overlay.write_text(yaml.safe_dump({"dicom_dir": str(study)}))
    work = tmp_path / "work"
    work.mkdir()
    line = _planning_error(
        snakemake(work, "-n", overlays=("tests/tiny.yaml", overlay), check=False)
    )
    assert "StudyInstanceUID" in line and "one patient" in line
    for name in ("a01", "a02", "a03"):
        assert f"{str(study / name)!r} (subject {name!r})" in line, line
    assert "a04" not in line


@pytest.mark.parametrize("problem", ["loop", "workdir"])
def test_a_link_loop_or_a_working_directory_inside_dicom_dir_is_one_line(
    shared_data, tmp_path, problem
):
    study = tmp_path / "dicom"
    exam = build_exam(shared_data / "dicom_dcm_qa", study / "b01", patient="1")
    work = tmp_path / "work"
    if problem == "loop":
        (exam / "3_t1" / "again").symlink_to(exam)
    else:
        work = study / "work"
    work.mkdir()
    overlay = tmp_path / "dicom.yaml"
    overlay.write_text(yaml.safe_dump({"dicom_dir": str(study)}))
    line = _planning_error(
        snakemake(work, "-n", overlays=("tests/tiny.yaml", overlay), check=False)
    )
    assert len(line) < 500, line
    if problem == "loop":
        assert "subject 'b01'" in line and str(exam / "3_t1" / "again") in line and "loop" in line
    else:
        assert "working directory" in line and "inside the DICOM folder" in line
        assert not (work / "results").exists() and not (work / "logs").exists()
