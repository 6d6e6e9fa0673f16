"""A standard-dose study end to end: a subjects table with a T1, a T2, a FLAIR and a full-dose T1c, no DWI and
no low dose (what public data and most sites have), through the real workflow with a simulated quarter dose."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from workflow_helpers import job_counts, snakemake, tiny_study

from virtual_contrast import layout

pytestmark = pytest.mark.slow

COLUMNS = ("t1", "t2", "flair", "ref")


@pytest.fixture(scope="module")
def standard_dose_run(tiny_run, tmp_path_factory):
    """The tiny cohort's exams as a standard-dose subjects table (no `low`, `dwi`, `bval` columns), run with
    the channels such data have and a simulated low dose."""
    work = tmp_path_factory.mktemp("standard_dose")
    study = tiny_study()
    rows = []
    for subject in study.subjects:
        raw = study.raw_inputs(subject)
        rows.append({"subject": subject, **{c: str(tiny_run / raw[c]) for c in COLUMNS}})
    table = work / "subjects.tsv"
    pd.DataFrame(rows).to_csv(table, sep="\t", index=False)
    overlay = work / "standard_dose.yaml"
    overlay.write_text(
        yaml.safe_dump(
            {
                "subjects": str(table),
                "low_dose": {"simulate": True},
                "model": {"channels": ["T2w", "FLAIR", "T1w", "lowT1c"]},
            }
        )
    )
    proc = snakemake(work, "--cores", "2", overlays=("tests/tiny.yaml", overlay))
    return work, study, proc


def test_a_standard_dose_study_trains_and_predicts_without_dwi(standard_dose_run):
    work, study, proc = standard_dose_run
    counts = job_counts(proc.stdout + proc.stderr)
    table = pd.read_csv(work / "subjects.tsv", sep="\t", dtype=str)
    assert {"low", "dwi", "bval"}.isdisjoint(table.columns)
    refs = dict(zip(table["subject"], table["ref"], strict=True))
    assert "adc" not in counts  # no ADC channel: no DWI is read and no ADC computed
    assert counts["simulate_low_dose"] == len(study.subjects)
    assert counts["train"] == 2 and counts["predict"] == len(study.test_subjects)
    for subject in study.subjects:
        norm = layout.normalize_files(subject, ["T2w", "lowT1c"])
        assert (work / norm["T2w"]).exists()
        assert not (work / layout.adc_files(subject)["adc"]).exists()
        # The simulated low dose lies on the full-dose T1c's grid, and the provenance says so.
        low = nib.load(work / layout.simulated_low_dose(subject))
        ref = nib.load(refs[subject])
        assert low.shape == ref.shape and np.allclose(low.affine, ref.affine)
        provenance = json.loads((work / layout.provenance_file(subject)).read_text())
        assert provenance["low_dose"]["simulated"] is True
    for subject in study.test_subjects:
        assert (work / layout.predict_files(subject)["native"]).exists()
    table3 = (work / layout.table("table3", ".md")).read_text()
    assert table3.startswith("| | simulated low-T1c | vir-T1c |")
    exams = pd.read_csv(work / layout.table("exams"), sep="\t", dtype=str)
    assert sorted(exams["subject"]) == sorted(study.subjects)


def test_the_command_predicts_a_raw_exam_without_dwi(standard_dose_run, tmp_path, capsys):
    """`virtual-contrast predict --raw` with models of T2w, FLAIR, T1w and lowT1c: the exam is the T1, T2,
    FLAIR and low dose (no DWI); without its T2 it is one line naming the missing flag, before any work."""
    from virtual_contrast.cli import main as cli_main

    work, study, _ = standard_dose_run
    subject = study.test_subjects[0]
    table = pd.read_csv(work / "subjects.tsv", sep="\t", dtype=str).set_index("subject")
    exam = {key: table.loc[subject, key] for key in ("t1", "t2", "flair")}
    exam["low"] = str(work / layout.simulated_low_dose(subject))
    command = ["predict", "--models", str(work / "results" / "models"), "--device", "cpu"]
    command += ["--raw", "--subject", "p01", "--no-tta"]
    without_t2 = [a for k, v in exam.items() if k != "t2" for a in (f"--{k}", v)]
    assert cli_main([*command, *without_t2, "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs --t2 as well" in err
    assert not (tmp_path / "refused").exists()

    out = tmp_path / "out"
    given = [a for k, v in exam.items() for a in (f"--{k}", v)]
    assert cli_main([*command, *given, "--out", str(out)]) == 0
    native = nib.load(out / layout.predicted_name("p01", layout.NATIVE_SPACE))
    low = nib.load(exam["low"])
    assert native.shape == low.shape and np.allclose(native.affine, low.affine)
    work_dir = out / layout.exam_work_name("p01")
    provenance = json.loads((work_dir / layout.exam_provenance_name("p01")).read_text())
    assert provenance["channels"] == ["T1w", "T2w", "FLAIR", "lowT1c"]
    assert provenance["register"]["channels"]["T2w"]["aligned_on"] == "gradient"
    assert "adc" not in provenance
