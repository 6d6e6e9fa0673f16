"""The study's file layout: names built from entities in one module, which the workflow follows."""

from __future__ import annotations

import re
import subprocess
import sys

from workflow_helpers import snakemake_command

from virtual_contrast import layout


def test_names_are_built_from_entities_and_parsed_back():
    name = layout.bids_name(
        "vc001", "01", space="ICBM09a", desc="", suffix="T1w", extension=".nii.gz"
    )
    assert name == "sub-vc001_ses-01_space-ICBM09a_T1w.nii.gz"  # an empty entity is left out
    assert layout.bids_name("7", from_="ADC", to="ICBM09a", suffix="xfm", extension=".txt") == (
        "sub-7_from-ADC_to-ICBM09a_xfm.txt"
    )
    assert layout.parse_name(layout.normalized_name("p01", "lowT1c")) == {
        "sub": "p01",
        "desc": "norm",
        "suffix": "lowT1c",
        "extension": ".nii.gz",
    }
    assert (
        layout.log("cohort", "{subject}", "{session}")
        == "logs/cohort/sub-{subject}_ses-{session}.log"
    )
    assert layout.log("split") == "logs/split.log"


def test_the_layout_of_one_subject():
    """The names a user browses in results/, pinned: a change here is a change of every run's files."""
    assert layout.predict_files("vc001") == {
        "atlas": "results/sub-vc001/predict/sub-vc001_space-ICBM09a_desc-virtual_T1c.nii.gz",
        "native": "results/sub-vc001/predict/sub-vc001_space-native_desc-virtual_T1c.nii.gz",
        "uncertainty": "results/sub-vc001/predict/sub-vc001_space-ICBM09a_desc-uncertainty_T1c.nii.gz",
        "uncertainty_native": (
            "results/sub-vc001/predict/sub-vc001_space-native_desc-uncertainty_T1c.nii.gz"
        ),
        "spread": "results/sub-vc001/predict/sub-vc001_space-ICBM09a_desc-spread_T1c.nii.gz",
    }
    assert layout.out_of_fold_files("vc002")["atlas"] == (
        "results/sub-vc002/out_of_fold/sub-vc002_space-ICBM09a_desc-virtual_T1c.nii.gz"
    )
    assert layout.transform_file("vc001", "lowT1c") == (
        "results/sub-vc001/register/sub-vc001_from-lowT1c_to-ICBM09a_xfm.txt"
    )
    assert layout.normalize_files("vc001", ["T1w"]) == {
        "T1w": "results/sub-vc001/normalize/sub-vc001_desc-norm_T1w.nii.gz",
        "mask": "results/sub-vc001/normalize/sub-vc001_desc-brain_mask.nii.gz",
        "provenance": "results/sub-vc001/normalize/sub-vc001_normalize.json",
    }
    # A raw exam pre-processed by `virtual-contrast predict` has the same step folders and names.
    assert layout.adc_files("x", root="work")["b0"] == "work/adc/sub-x_space-dwi_desc-b0_dwi.nii.gz"
    files = layout.bids_exam_files("bids", "p01", "02")
    assert str(files["low"]) == "bids/sub-p01/ses-02/anat/sub-p01_ses-02_ce-low_T1w.nii.gz"
    assert str(files["bval"]) == "bids/sub-p01/ses-02/dwi/sub-p01_ses-02_dwi.bval"
    assert str(layout.dicom_exam_record("p01", "01", "dicom.tsv")) == (
        "results/dicom/sub-p01/ses-01/sub-p01_ses-01_dicom.tsv"
    )


_RENAMED_RUN = """
import sys

import virtual_contrast.layout as layout
from snakemake.cli import main

layout.ATLAS_SPACE = "MNI152NLin2009aSym"
sys.argv = ["snakemake", *sys.argv[1:]]
main()
"""


def test_renaming_an_entity_in_the_layout_renames_the_workflow_files(tmp_path):
    """The atlas space is spelled once: renamed there, the dry run plans every file under the new name and
    none under the old one (registration, prediction, the models' inputs, the reading lists' inputs)."""
    command = snakemake_command(tmp_path, "-n")
    proc = subprocess.run(
        [sys.executable, "-c", _RENAMED_RUN, *command[3:]],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert re.search(r"sub-\w+_space-MNI152NLin2009aSym_desc-virtual_T1c\.nii\.gz", out)
    assert re.search(r"sub-\w+_from-refT1c_to-MNI152NLin2009aSym_xfm\.txt", out)
    assert "ICBM09a" not in out


def test_the_readers_answers_live_beside_results_and_make_clean_never_deletes_them(tmp_path):
    """`make clean` deleted results/, and with it results/reader_study/readings/ (the radiologists' answers):
    they now go to readings/ beside results/, and clean refuses while a readings/ folder lies under results/."""
    from workflow_helpers import REPO

    lists = tmp_path / layout.reading_files()["lists"]
    assert layout.default_readings_folder(lists) == tmp_path / layout.READINGS
    assert layout.RESULTS not in layout.reading_files()["readings"].split("/")
    elsewhere = tmp_path / "study" / "reading_lists"
    assert layout.default_readings_folder(elsewhere) == tmp_path / "study" / layout.READINGS

    answers = tmp_path / layout.READINGS / "lesions.csv"
    answers.parent.mkdir(parents=True)
    answers.write_text("patient,reader\n")
    lists.mkdir(parents=True)

    def clean() -> subprocess.CompletedProcess:
        return subprocess.run(
            ["make", "-s", "-f", str(REPO / "Makefile"), "-C", str(tmp_path), "clean"],
            capture_output=True,
            text=True,
        )

    done = clean()
    assert done.returncode == 0, done.stderr
    assert answers.exists() and not (tmp_path / layout.RESULTS).exists()
    # an older layout (or --out under results/) kept them in results/: clean stops and deletes nothing
    old = tmp_path / layout.READER_STUDY / layout.READINGS / "sessions" / "R1_phase-1" / "case.json"
    old.parent.mkdir(parents=True)
    old.write_text("{}")
    refused = clean()
    assert refused.returncode != 0 and "readers' answers" in refused.stderr
    assert old.exists()
