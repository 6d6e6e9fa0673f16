"""Reading protocol: balance of the two phases, pseudonymisation, the separate key, exported images."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from virtual_contrast.cli import main
from virtual_contrast.io import InputError, save_image
from virtual_contrast.reader import protocol

PATIENTS = [f"vc{i:03d}" for i in range(1, 12)]  # 11 patients: halves of 6 and 5


def test_each_reader_reads_every_exam_once_per_phase_half_low_half_vir() -> None:
    key = protocol.make_reading_lists(PATIENTS, ["R1", "R2", "R3"], reference_reader="R1", seed=4)
    for _, group in key.groupby("reader"):
        for phase in (1, 2):
            ph = group[group["phase"] == phase]
            assert sorted(ph["patient"]) == sorted(PATIENTS)
            counts = ph["modality"].value_counts()
            assert sorted(counts.to_dict().items()) in (
                [("low", 5), ("vir", 6)],
                [("low", 6), ("vir", 5)],
            )
            assert sorted(ph["order"]) == list(range(1, len(PATIENTS) + 1))
        # phase 2 mirrors phase 1
        m1 = group[group["phase"] == 1].set_index("patient")["modality"].sort_index()
        m2 = group[group["phase"] == 2].set_index("patient")["modality"].sort_index()
        assert ((m1 == "low") == (m2 == "vir")).all()
    # the reference reader reads every ref image in a third phase, nobody else does
    ref = key[key["modality"] == "ref"]
    assert (
        set(ref["reader"]) == {"R1"}
        and sorted(ref["patient"]) == PATIENTS
        and set(ref["phase"]) == {3}
    )
    # across readers 1 and 2 each exam is shown as low in phase 1 by exactly one of them
    p1 = key[key["phase"] == 1].pivot(index="patient", columns="reader", values="modality")
    assert (p1["R1"] != p1["R2"]).all() and (p1["R1"] == p1["R3"]).all()


def test_orders_are_random_and_the_seed_reproduces_them() -> None:
    a = protocol.make_reading_lists(PATIENTS, ["R1", "R2"], seed=1)
    b = protocol.make_reading_lists(PATIENTS, ["R1", "R2"], seed=1)
    c = protocol.make_reading_lists(PATIENTS, ["R1", "R2"], seed=2)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)
    first = a[(a["reader"] == "R1") & (a["phase"] == 1)].sort_values("order")["patient"].tolist()
    assert first != sorted(first)  # not the input order


def test_case_ids_are_unique_and_reveal_nothing(tmp_path) -> None:
    patients = [
        "123456",
        "P2",
        "P3",
        "P4",
    ]  # an all-digit id must not appear inside a case id either
    key = protocol.make_reading_lists(
        patients,
        ["R1", "R2"],
        out_dir=tmp_path / "reading",
        key_path=tmp_path / "key" / "key.tsv",
        seed=0,
    )
    assert key["case_id"].is_unique
    assert key["case_id"].str.fullmatch(r"case-\d{6}").all()
    for cid in key["case_id"]:
        assert not any(p in cid for p in patients)
    # the forms handed to the readers name no patient and no modality
    for reader in ("R1", "R2"):
        form = (tmp_path / "reading" / reader / "reading_form.tsv").read_text()
        assert not any(p in form for p in patients)
        assert "low" not in form and "vir" not in form
        assert pd.read_csv(
            tmp_path / "reading" / reader / "reading_form.tsv", sep="\t"
        ).columns.tolist() == list(protocol.FORM_COLUMNS)
    # the key is a separate file, outside the readers' folder, and reads back
    assert protocol.load_key(tmp_path / "key" / "key.tsv").equals(key)
    assert not list((tmp_path / "reading").rglob("key*"))


def test_key_inside_the_readers_folder_is_refused(tmp_path) -> None:
    with pytest.raises(InputError, match="kept apart"):
        protocol.make_reading_lists(
            PATIENTS, ["R1"], out_dir=tmp_path, key_path=tmp_path / "R1" / "key.tsv"
        )


def test_bad_protocol_inputs_are_errors() -> None:
    with pytest.raises(InputError, match="at least 2 patients"):
        protocol.make_reading_lists(["P1"], ["R1"])
    with pytest.raises(InputError, match="repeated"):
        protocol.make_reading_lists(["P1", "P1", "P2"], ["R1"])
    with pytest.raises(InputError, match="names a folder"):
        protocol.make_reading_lists(PATIENTS, ["../R1"])
    with pytest.raises(InputError, match="not one of the readers"):
        protocol.make_reading_lists(PATIENTS, ["R1"], reference_reader="R9")


def test_cli_exports_pseudonymised_images(tmp_path, capsys) -> None:
    rng = np.random.default_rng(0)
    patients = ["vc001", "vc002"]
    (tmp_path / "patients.txt").write_text("# test sample\n" + "\n".join(patients) + "\n")
    for p in patients:
        for m in ("low", "vir", "ref", "pre", "flair"):
            img = nib.Nifti1Image(rng.random((4, 4, 4), np.float32) + 0.5, np.eye(4))
            img.header["descrip"] = f"patient {p}".encode()  # identifying header text
            path = tmp_path / "data" / f"sub-{p}_{m}.nii.gz"
            path.parent.mkdir(exist_ok=True)
            nib.save(img, path)
    code = main(
        [
            "reading-lists",
            "--patients",
            str(tmp_path / "patients.txt"),
            "--readers",
            "R1",
            "R2",
            "--reference-reader",
            "R1",
            "--out",
            str(tmp_path / "reading"),
            "--key",
            str(tmp_path / "key.tsv"),
            "--image-pattern",
            str(tmp_path / "data" / "sub-{patient}_{modality}.nii.gz"),
            "--pre-pattern",
            str(tmp_path / "data" / "sub-{patient}_{modality}.nii.gz"),
            "--flair-pattern",
            str(tmp_path / "data" / "sub-{patient}_{modality}.nii.gz"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    images = sorted((tmp_path / "reading").rglob("*.nii"))
    key = protocol.load_key(tmp_path / "key.tsv")
    assert len(images) == 3 * len(key)  # each case, its pre-contrast T1 and its FLAIR
    case = key.iloc[0]
    folder = protocol.case_folder(tmp_path / "reading", case.reader, case.phase)
    assert sorted(p.name for p in folder.glob(f"{case.case_id}*")) == sorted(
        n.format(case_id=case.case_id)
        for n in (protocol.CASE_IMAGE, *protocol.COMPANION_IMAGES.values())
    )
    for path in images:
        rel = str(path.relative_to(tmp_path / "reading"))
        assert not any(p in rel for p in patients) and "low" not in rel and "vir" not in rel
        assert b"vc00" not in bytes(nib.load(path).header["descrip"])
    assert (tmp_path / "reading" / "R1" / "phase-3").is_dir()


def test_missing_image_is_a_clear_error(tmp_path) -> None:
    key = protocol.make_reading_lists(["A1", "A2"], ["R1"], seed=0)
    save_image(np.zeros((2, 2, 2)), np.eye(4), tmp_path / "A1_low.nii.gz")
    with pytest.raises(InputError, match="the post image is missing"):
        protocol.export_reading_images(
            key, tmp_path / "out", image_pattern=str(tmp_path / "{patient}_{modality}.nii.gz")
        )


def test_read_patients_from_a_subjects_table(tmp_path) -> None:
    path = tmp_path / "subjects.tsv"
    pd.DataFrame({"subject": ["a", "b", "c"], "split": ["train", "test", "test"]}).to_csv(
        path, sep="\t", index=False
    )
    assert protocol.read_patients(path, split="test") == ["b", "c"]
    assert protocol.read_patients(path) == ["a", "b", "c"]


def _exam_images(folder, patients, rng) -> None:
    for p in patients:
        for m in ("low", "vir", "ref", "pre", "flair"):
            save_image(
                rng.random((6, 6, 4), np.float32) + 0.5, np.eye(4), folder / f"{p}_{m}.nii.gz"
            )


def test_cli_both_formats_with_a_modality_pre_pattern(tmp_path, capsys) -> None:
    """--image-format both with a {modality} pre-contrast pattern once wrote the NIfTI copies and then stopped
    with a KeyError in the DICOM half (issue 25): both halves take the pre and FLAIR patterns alike."""
    patients = ["vc001", "vc002"]
    (tmp_path / "patients.txt").write_text("\n".join(patients) + "\n")
    _exam_images(tmp_path / "data", patients, np.random.default_rng(1))
    pattern = str(tmp_path / "data" / "{patient}_{modality}.nii.gz")
    args = ["reading-lists", "--patients", str(tmp_path / "patients.txt"), "--readers", "R1"]
    args += ["--out", str(tmp_path / "reading"), "--key", str(tmp_path / "key.tsv")]
    args += ["--image-pattern", pattern, "--pre-pattern", pattern, "--flair-pattern", pattern]
    assert main([*args, "--image-format", "both"]) == 0, capsys.readouterr().err
    key = protocol.load_key(tmp_path / "key.tsv")
    for case in key.itertuples():
        folder = protocol.case_folder(tmp_path / "reading", case.reader, case.phase)
        assert (folder / protocol.CASE_IMAGE.format(case_id=case.case_id)).exists()
        for series in ("post", "pre", "flair"):
            assert len(list((folder / case.case_id / series).glob("*.dcm"))) == 4, series


@pytest.mark.parametrize(
    ("flag", "pattern", "message"),
    [
        ("--pre-pattern", "{patient}_{sequence}.nii.gz", "unknown placeholder"),
        ("--image-pattern", "{patient}.nii.gz", "needs"),
        ("--flair-pattern", "{patient}_{}.nii.gz", "empty"),
        ("--dicom-source", "{patient}/{modality}", "unknown placeholder"),
        ("--image-pattern", "{patient}_{modality}_missing.nii.gz", "post image is missing"),
    ],
)
def test_cli_checks_every_pattern_and_file_before_writing_anything(
    tmp_path, capsys, flag, pattern, message
) -> None:
    patients = ["vc001", "vc002"]
    (tmp_path / "patients.txt").write_text("\n".join(patients) + "\n")
    _exam_images(tmp_path / "data", patients, np.random.default_rng(2))
    good = str(tmp_path / "data" / "{patient}_{modality}.nii.gz")
    patterns = {
        "--image-pattern": good,
        "--pre-pattern": good,
        "--flair-pattern": good,
        "--dicom-source": "",
    }
    patterns[flag] = pattern if flag == "--dicom-source" else str(tmp_path / "data" / pattern)
    args = ["reading-lists", "--patients", str(tmp_path / "patients.txt"), "--readers", "R1"]
    args += ["--out", str(tmp_path / "reading"), "--key", str(tmp_path / "key.tsv")]
    args += [part for item in patterns.items() if item[1] for part in item]
    assert main([*args, "--image-format", "both"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "reading").exists() and not (tmp_path / "key.tsv").exists()
