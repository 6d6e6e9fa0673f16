"""The workflow with dicom_dir: exams planned from their headers at parse time (dry runs), one real import job."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml
from dicom_exams import build_exam
from workflow_helpers import job_counts, snakemake

from virtual_contrast.config import validate_config
from virtual_contrast.workflow import plan_study


@pytest.fixture(scope="module")
def dicom_study(shared_data, tmp_path_factory):
    """dicom_dir with 5 complete exams (links to one real-header exam), one without FLAIR and a later visit."""
    root = tmp_path_factory.mktemp("dicom_study")
    exam = build_exam(shared_data / "dicom_dcm_qa", root / "exam")
    study = root / "dicom"
    for subject in ("d01", "d02", "d03", "d04"):
        (study / subject).mkdir(parents=True)
        (study / subject / "exam").symlink_to(exam)
    for session in ("01", "02"):
        (study / "sub-d05" / f"ses-{session}").mkdir(parents=True)
        (study / "sub-d05" / f"ses-{session}" / "exam").symlink_to(exam)
    (study / "d06").mkdir()
    for series in exam.iterdir():
        if series.name != "6_flair":
            (study / "d06" / series.name).symlink_to(series)
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
    build_exam(shared_data / "dicom_dcm_qa", study / "d07", post=("t1 post gd sag", "t1 post tra"))
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
