"""The automated reader in the tiny workflow: the FROC on the training subjects, an operating point that no
test subject can move, detections with label images, overlays, and Table 5 with the truth as reference."""

from __future__ import annotations

import json
import re
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from workflow_helpers import job_counts, snakemake, tiny_study

from virtual_contrast.evaluate.lesions import READ_MODALITIES

pytestmark = pytest.mark.slow


def test_the_froc_and_its_operating_point_come_from_the_training_subjects(tiny_run):
    study = tiny_study()
    tables = tiny_run / "results" / "tables"
    froc = pd.read_csv(tables / "detector_froc.tsv", sep="\t")
    assert set(froc["size_bin"]) == {"[0, 5)", "[5, 10)", "[10, inf)", "all"}
    assert (froc["n_subjects"] == len(study.train_subjects)).all()
    overall = froc[froc["size_bin"] == "all"].sort_values("threshold")
    assert overall["fp_per_patient"].is_monotonic_decreasing
    point = json.loads((tables / "detector_operating_point.json").read_text())
    assert point["subjects"] == study.train_subjects
    assert point["threshold"] in set(overall["threshold"])
    assert (tiny_run / "results" / "figures" / "detector_froc.png").stat().st_size > 10_000
    # Every subject's detections used the frozen operating point.
    for subject in study.subjects:
        log = (tiny_run / "logs" / "detect_lesions" / f"sub-{subject}.log").read_text()
        assert f"decision threshold {point['threshold']:.4g}" in log


def test_changing_a_test_subject_never_moves_the_operating_point(tiny_run, tmp_path):
    work = tmp_path / "run"
    shutil.copytree(tiny_run, work, symlinks=True)
    study = tiny_study()

    def rerun_after_changing(subject):
        path = (
            work
            / "results"
            / f"sub-{subject}"
            / "normalize"
            / f"sub-{subject}_desc-norm_refT1c.nii.gz"
        )
        img = nib.load(path)
        data = np.asanyarray(img.dataobj).astype(np.float32)
        nib.save(nib.Nifti1Image(np.clip(data * 1.2, 0, 1), img.affine, img.header), path)
        return snakemake(work, "-n", "--cores", "2")

    proc = rerun_after_changing(study.test_subjects[0])
    counts = job_counts(proc.stdout)
    assert counts.get("detect_lesions") == 1 and counts.get("detection_overlay") == 1
    assert "detector_froc" not in counts and "enhancement_prior" not in counts
    assert set(re.findall(r"wildcards: .*subject=(\w+)", proc.stdout)) == {study.test_subjects[0]}
    # A training subject's image, on the contrary, is part of the tuning.
    counts = job_counts(rerun_after_changing(study.train_subjects[0]).stdout)
    assert counts.get("detector_froc") == 1 and counts.get("enhancement_prior") == 1
    assert counts.get("detect_lesions") == len(study.subjects)


def test_detections_label_images_and_overlays_of_the_test_subjects(tiny_run):
    study = tiny_study()
    for subject in study.subjects:
        folder = tiny_run / "results" / f"sub-{subject}" / "lesions"
        table = pd.read_csv(
            folder / f"sub-{subject}_detections.tsv", sep="\t", dtype={"subject": str}
        )
        expected = {"ref", "low", "vir"} if subject in study.test_subjects else {"ref", "low"}
        labels = np.asanyarray(
            nib.load(folder / f"sub-{subject}_desc-detections_dseg.nii.gz").dataobj
        )
        assert labels.shape[-1] == len(READ_MODALITIES)
        for k, modality in enumerate(READ_MODALITIES):
            ids = set(table.loc[table["modality"] == modality, "lesion_id"])
            assert set(np.unique(labels[..., k])) - {0} == ids
        assert set(table["modality"]) <= expected
    for subject in study.test_subjects:
        figure = tiny_run / "results" / "figures" / "detections" / f"sub-{subject}_detections.png"
        assert figure.stat().st_size > 10_000


def test_table5_with_the_truth_as_reference_lists_the_true_lesions_of_the_test_patients(tiny_run):
    study = tiny_study()
    truth = pd.read_csv(
        tiny_run / "results" / "cohort" / "lesions.tsv", sep="\t", dtype={"subject": str}
    )
    n_true = int(truth["subject"].isin(study.test_subjects).sum())
    folder = tiny_run / "results" / "reader_study" / "reference-truth"
    detection = pd.read_csv(folder / "detection.tsv", sep="\t")
    assert set(detection["reader"]) == {"auto"} and set(detection["modality"]) == {
        "ref",
        "low",
        "vir",
    }
    everything = detection[detection["min_long_axis_mm"] == 0]
    assert (everything["n_reference"] == n_true).all()
    assert (everything["n_patients"] == len(study.test_subjects)).all()
    table5 = (folder / "table5.md").read_text()
    assert "auto low-T1c" in table5 and "auto vir-T1c" in table5
    # The auto-vs-auto table is still there, beside it.
    assert (tiny_run / "results" / "reader_study" / "table5.md").exists()
