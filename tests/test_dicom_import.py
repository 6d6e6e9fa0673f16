"""DICOM import: header rules, series maps and dcm2niix on real scanner series (../shared/data/dicom_dcm_qa)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from dicom_exams import build_exam, copy_series, relabel

from virtual_contrast.cli import main as cli_main
from virtual_contrast.dicom.convert import find_dcm2niix, import_exam
from virtual_contrast.dicom.rules import builtin_kind, classify, load_series_map
from virtual_contrast.dicom.scan import Series, scan_folder
from virtual_contrast.io import InputError
from virtual_contrast.layout import bids_exam_files
from virtual_contrast.preprocess.adc import adc_from_files
from virtual_contrast.preprocess.inputs import check_exam


@pytest.fixture(scope="module")
def dicom_qa(shared_data):
    return shared_data / "dicom_dcm_qa"


@pytest.fixture(scope="module")
def exam(dicom_qa, tmp_path_factory):
    """A complete exam from the real Siemens T1 and DWI (see tests/dicom_exams.py)."""
    return build_exam(dicom_qa, tmp_path_factory.mktemp("exam") / "p01")


@pytest.fixture(scope="module")
def imported(exam, tmp_path_factory):
    out = tmp_path_factory.mktemp("bids")
    targets = bids_exam_files(out, "p01", "01")
    result = import_exam(exam, targets, out / "report.tsv", subject="p01", require=("t1", "dwi"))
    return targets, result, out


def test_every_role_is_filed_under_the_bids_names_with_sidecars_and_a_report(imported):
    targets, result, out = imported
    for key in ("t1", "flair", "low", "ref", "dwi", "bval", "bvec"):
        assert targets[key].exists(), key
    assert targets["t1"].with_name("sub-p01_ses-01_T1w.json").exists()
    report = pd.read_csv(out / "report.tsv", sep="\t", dtype=str)
    used = dict(zip(report["role"], report["series_description"], strict=False))
    assert used["T1w"] == "t1_fl2d_sag"
    assert used["FLAIR"] == "t2_tirm_sag_dark-fluid"
    # Same protocol twice after contrast: the first acquisition is the quarter dose.
    low = report[report["role"] == "low-dose T1c"].iloc[0]
    ref = report[report["role"] == "full-dose T1c"].iloc[0]
    assert (low["series_number"], ref["series_number"]) == ("7", "8")
    assert "first of two" in low["reason"] and "second of two" in ref["reason"]
    assert set(report["status"]) == {"used"}
    assert not list(out.rglob(".import*"))  # no scratch left


def test_siemens_dwi_imports_as_4d_with_b0_and_b1000_that_the_adc_step_accepts(imported, tmp_path):
    targets, _, _ = imported
    dwi = nib.load(targets["dwi"])
    assert dwi.shape == (128, 128, 25, 4)
    assert np.allclose(np.loadtxt(targets["bval"]), [0, 1000, 1000, 1000])
    assert np.loadtxt(targets["bvec"]).shape == (3, 4)
    adc_from_files(targets["dwi"], targets["bval"], tmp_path / "adc.nii.gz", subject="p01")
    adc = nib.load(tmp_path / "adc.nii.gz").get_fdata()
    brain = adc[adc > 0]
    # Brain tissue ADC at 3 T: about 0.7-0.9e-3 mm2/s (grey and white matter), CSF up to 3e-3.
    assert 0.5e-3 < np.median(brain) < 1.5e-3


def test_uih_private_b_values_are_read_and_the_effective_ones_kept(dicom_qa, tmp_path):
    series, _ = scan_folder(dicom_qa / "uih_umr770_dti")
    (dti,) = series
    assert dti.bvalue_source == "UIH private (0065,100A)"
    assert dti.bvalues == [0.0, 1000.0]
    assert np.allclose(dti.bvalues_effective, [1.2513, 929.75], atol=1e-3)
    assert builtin_kind(dti)[0] == "dwi"
    targets = bids_exam_files(tmp_path, "u01")
    result = import_exam(
        dicom_qa / "uih_umr770_dti", targets, tmp_path / "report.tsv", subject="u01"
    )
    bvals = np.loadtxt(targets["bval"])
    assert bvals.shape == (17,) and np.allclose(sorted(set(np.round(bvals, 2))), [1.25, 929.75])
    assert "effective 1.25126 929.75" in result.report.loc[0, "bvalues"]
    adc_from_files(targets["dwi"], targets["bval"], tmp_path / "adc.nii.gz", subject="u01")


def test_two_post_contrast_candidates_no_rule_separates_stop_the_import_naming_both(
    dicom_qa, tmp_path, capsys
):
    exam = build_exam(dicom_qa, tmp_path / "p02", post=("t1_fl2d_sag_post_gd", "t1_fl2d_tra_post"))
    out = tmp_path / "bids"
    rc = cli_main(["import-dicom", "--dicom", str(exam), "--out", str(out), "--subject", "p02"])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1
    assert "series 7 't1_fl2d_sag_post_gd'" in err and "series 8 't1_fl2d_tra_post'" in err
    assert "series map" in err
    assert not out.exists()  # refused before converting anything
    site = tmp_path / "site.yaml"
    site.write_text(
        "series:\n"
        "  - {role: low, criteria: {SeriesDescription: '*sag_post*'}}\n"
        "  - {role: ref, criteria: {SeriesDescription: '*tra_post*', SeriesNumber: 8}}\n"
    )
    rc = cli_main(
        [
            "import-dicom",
            "--dicom",
            str(exam),
            "--out",
            str(out),
            "--subject",
            "p02",
            "--series-map",
            str(site),
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "'t1_fl2d_sag_post_gd': low-dose T1c -> sub-p02_ce-low_T1w.nii.gz" in printed
    assert (out / "sub-p02" / "anat" / "sub-p02_ce-full_T1w.nii.gz").exists()


def _series(description: str, number: int = 1, acquired: str = "", **fields) -> Series:
    fields = {"Modality": "MR", "SeriesDescription": description, "SeriesNumber": number, **fields}
    fields.setdefault("ImageType", ["ORIGINAL", "PRIMARY", "M"])
    return Series(f"1.2.{number}", "1.2.3", [f"/x/{number}.dcm"], fields, acquired=acquired)


@pytest.mark.parametrize(
    ("description", "fields", "kind"),
    [
        ("AAHead_Scout_32ch", {}, "ignore"),
        ("t1_mprage_sag_MPR_tra", {"ImageType": ["DERIVED", "PRIMARY", "MPR"]}, "ignore"),
        ("ep2d_diff_ADC", {"ImageType": ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"]}, "ignore"),
        ("Ax DWI", {}, "dwi"),
        ("Ax T2 FLAIR", {}, "flair"),
        ("t2_tirm_tra_dark-fluid", {}, "flair"),
        ("Ax T1 FLAIR", {}, "t1"),  # GE's T1-weighted FLAIR is a T1
        ("t1_mprage_sag", {}, "t1"),
        ("T1 MPRAGE +C", {}, "t1c"),
        ("3D T1 BRAVO post gd", {}, "t1c"),
        ("sag 3D T1", {"ContrastBolusAgent": "Dotarem"}, "t1c"),
        ("t2_tse_tra", {}, "t2"),
        ("Ax T2 FSE", {}, "t2"),
        ("T2* GRE axial", {}, "ignore"),  # T2*-weighted (susceptibility), not a T2w
        ("t2_star_tra", {}, "ignore"),
        ("Ax PD/T2 FSE", {}, "ignore"),  # a proton-density + T2 dual echo
        ("swi_tra", {}, "ignore"),
    ],
)
def test_builtin_rules(description, fields, kind):
    assert builtin_kind(_series(description, **fields))[0] == kind


def test_dose_words_a_lone_candidate_and_the_contrast_volume_settle_the_post_contrast_series():
    by_words = classify([_series("t1 post full", 2), _series("t1 post quarter dose", 3)]).roles
    assert (by_words["low"].number, by_words["ref"].number) == (3, 2)
    lone = classify([_series("t1 post low", 2), _series("t1 mprage post", 3)]).roles
    assert (lone["low"].number, lone["ref"].number) == (2, 3)
    volume = classify(
        [
            _series("t1 gd", 2, ContrastBolusVolume=7.5),
            _series("t1 gd", 3, ContrastBolusVolume=2.5),
        ]
    ).roles
    assert (volume["low"].number, volume["ref"].number) == (3, 2)
    # One post-contrast T1 and no hint of its dose: refused, not guessed.
    single = classify([_series("t1 mprage post", 2)])
    assert single.problems and "low-dose T1c or full-dose T1c" in single.problems[0]


def test_acquisition_order_applies_to_one_protocol_unless_the_site_says_always(tmp_path):
    a = _series("t1 post", 2, acquired="100000")
    b = _series("t1 post", 3, acquired="101000")
    assert classify([b, a]).roles["low"].number == 2
    c = _series("t1 post ax", 4, acquired="101000")
    assert classify([a, c]).problems
    site = tmp_path / "order.yaml"
    site.write_text("post_contrast_order: always\n")
    roles = classify([a, c], load_series_map(site)).roles
    assert (roles["low"].number, roles["ref"].number) == (2, 4)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("series:\n  - {role: low, criteria: {SeriesDescriptoin: x}}\n", "unknown field"),
        ("series:\n  - {role: t1c, criteria: {SeriesNumber: 3}}\n", "has role 't1c'"),
        ("series:\n  - {role: low}\n", "exactly 'role' and 'criteria'"),
        ("seires: []\n", "unknown key"),
        ("post_contrast_order: first\n", "post_contrast_order"),
    ],
)
def test_a_bad_series_map_is_refused_naming_the_file_and_the_problem(tmp_path, text, message):
    path = tmp_path / "map.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=message) as err:
        load_series_map(path)
    assert str(path) in str(err.value)


def test_a_folder_with_two_studies_is_refused(dicom_qa, tmp_path):
    with pytest.raises(InputError, match=r"\d studies"):
        import_exam(dicom_qa, bids_exam_files(tmp_path, "x"), tmp_path / "r.tsv", subject="x")


# --- refusals: each one line naming the subject or file, exit status 2, nothing written (issue 26) -----------


def _import(args: list[str], capsys) -> tuple[int, str, str]:
    rc = cli_main(["import-dicom", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err.strip()


def _one_line_refusal(rc: int, err: str, out, *names: str) -> str:
    """The refusal as the CLI prints it: status 2, one line naming ``names``, nothing written to ``out``."""
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    for name in names:
        assert name in err, (name, err)
    assert not out.exists() or not any(out.rglob("*.nii.gz")), "an image was written"
    return err


def test_a_relative_dicom_path_imports_from_any_working_directory(
    exam, tmp_path, monkeypatch, capsys
):
    """The README's `--dicom exam/`: the scratch links dcm2niix reads were relative, so they dangled."""
    monkeypatch.chdir(exam.parent)
    rc, out, err = _import(["--dicom", exam.name, "--out", "bids", "--subject", "r01"], capsys)
    assert rc == 0, err
    assert (exam.parent / "bids/sub-r01/anat/sub-r01_ce-low_T1w.nii.gz").exists()
    deeper = tmp_path / "a" / "b"
    deeper.mkdir(parents=True)
    monkeypatch.chdir(deeper)
    relative = os.path.relpath(exam, deeper)
    assert relative.startswith("..")
    rc, _, err = _import(["--dicom", relative, "--out", "bids", "--subject", "r02"], capsys)
    assert rc == 0, err
    assert (deeper / "bids/sub-r02/dwi/sub-r02_dwi.nii.gz").exists()


def test_a_series_of_another_patient_is_refused_naming_both_patients(dicom_qa, tmp_path, capsys):
    exam = build_exam(dicom_qa, tmp_path / "p03")
    # Another patient's FLAIR in the same study (same StudyInstanceUID).
    relabel(
        exam / "6_flair",
        PatientID="other7",
        PatientName="Other^Patient",
        PatientBirthDate="19990909",
    )
    out = tmp_path / "bids"
    rc, _, err = _import(["--dicom", str(exam), "--out", str(out), "--subject", "p03"], capsys)
    _one_line_refusal(rc, err, out, "'p03'", "'other7'", "'crlab'", "'t2_tirm_sag_dark-fluid'")
    assert "another patient" in err


def test_a_slice_of_another_patient_inside_a_series_is_refused_naming_the_file(
    dicom_qa, tmp_path, capsys
):
    exam = build_exam(dicom_qa, tmp_path / "p04")
    slice_ = sorted((exam / "8_post").glob("*.dcm"))[2]
    relabel_file = pydicom.dcmread(slice_)
    relabel_file.PatientID = "other8"
    relabel_file.save_as(slice_)
    out = tmp_path / "bids"
    rc, _, err = _import(["--dicom", str(exam), "--out", str(out), "--subject", "p04"], capsys)
    _one_line_refusal(rc, err, out, slice_.name, "'other8'")


def _last_slice(series: Path) -> Path:
    return max(
        series.glob("*.dcm"),
        key=lambda p: int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber),
    )


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda blob: blob[:2000], "damaged DICOM file"),  # header cut short
        (lambda blob: blob[:400] + b"\xff" * 300 + blob[700:], "damaged DICOM file"),  # garbled
        (lambda blob: blob[: len(blob) - 40_000], "before the end of its pixel data"),
    ],
    ids=["truncated-header", "garbled-header", "truncated-pixels"],
)
def test_a_damaged_slice_is_refused_naming_the_file_not_dropped(
    dicom_qa, tmp_path, capsys, damage, message
):
    """It used to be skipped as 'not DICOM': the T1 came out with 4 of its 5 slices, exit status 0."""
    exam = build_exam(dicom_qa, tmp_path / "p05")
    last = _last_slice(exam / "3_t1")
    last.write_bytes(damage(last.read_bytes()))
    out = tmp_path / "bids"
    rc, _, err = _import(["--dicom", str(exam), "--out", str(out), "--subject", "p05"], capsys)
    _one_line_refusal(rc, err, out, last.name, message)


@pytest.mark.parametrize("spacing", ["0", "-1", "1e6"])
def test_an_absurd_pixel_spacing_is_refused_naming_the_file(dicom_qa, tmp_path, capsys, spacing):
    exam = build_exam(dicom_qa, tmp_path / "p06")
    relabel(exam / "6_flair", PixelSpacing=[spacing, spacing])
    out = tmp_path / "bids"
    rc, _, err = _import(["--dicom", str(exam), "--out", str(out), "--subject", "p06"], capsys)
    _one_line_refusal(rc, err, out, "6_flair", "PixelSpacing", "between 0.05 and 20 mm")


def test_the_exam_check_bounds_voxel_sizes(dicom_qa, tmp_path):
    """dcm2niix turns PixelSpacing 1e6 into 1e6 mm voxels, which the exam check used to pass."""
    series = tmp_path / "t1"
    copy_series(dicom_qa / "siemens_e11_t1_sag", series, n_files=5)
    relabel(series, PixelSpacing=["1e6", "1e6"])
    converted = tmp_path / "nifti"
    converted.mkdir()
    tool = find_dcm2niix()
    subprocess.run([tool.path, "-z", "y", "-f", "t1", "-o", str(converted), str(series)], check=True,
                   capture_output=True)  # fmt: skip
    t1 = converted / "t1.nii.gz"
    assert np.allclose(nib.load(t1).header.get_zooms()[:2], 1e6)
    with pytest.raises(InputError, match=r"between 0.05 and 20 mm") as err:
        check_exam({"t1": t1}, subject="v01")
    assert "'v01'" in str(err.value) and str(t1) in str(err.value)


@pytest.mark.parametrize("link", ["loop", "dangling"])
def test_a_symbolic_link_loop_or_dangling_link_is_one_line(exam, tmp_path, capsys, link):
    folder = tmp_path / "p07"
    shutil.copytree(exam, folder)
    if link == "loop":
        (folder / "3_t1" / "again").symlink_to(folder)
    else:
        (folder / "3_t1" / "gone.dcm").symlink_to(tmp_path / "nowhere.dcm")
    out = tmp_path / "bids"
    rc, _, err = _import(["--dicom", str(folder), "--out", str(out), "--subject", "p07"], capsys)
    _one_line_refusal(rc, err, out, "'p07'", "again" if link == "loop" else "gone.dcm")
    assert len(err) < 400, err
    assert ("loop" if link == "loop" else "does not exist") in err


def test_a_session_given_with_its_prefix_is_told_what_a_session_label_is(exam, tmp_path, capsys):
    out = tmp_path / "bids"
    rc, _, err = _import(
        ["--dicom", str(exam), "--out", str(out), "--subject", "p08", "--session", "ses-01"], capsys
    )
    _one_line_refusal(rc, err, out, "--session 'ses-01'", "session label", "'01'")
    assert "subject id" not in err
    rc, _, err = _import(
        ["--dicom", str(exam), "--out", str(out), "--subject", "p08", "--session", "a_b"], capsys
    )
    _one_line_refusal(rc, err, out, "--session 'a_b'", "letters and digits")
