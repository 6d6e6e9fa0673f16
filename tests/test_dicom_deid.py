"""Reading lists as de-identified DICOM: nothing of the source patient's identity or dates in any element."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pydicom
import pytest

from virtual_contrast.cli import main as cli_main
from virtual_contrast.io import save_image

#: Identifying values in the source header of the real Siemens T1 (as its SOURCES.md lists them).
SOURCE = "siemens_e11_t1_sag"
IDENTIFYING = {
    "PatientName": "HFS",
    "PatientID": "crlab",
    "PatientBirthDate": "19700606",
    "InstitutionName": "Prisma Health Richland Hospital",
}
PATIENTS = ["p01", "p02"]
#: Attributes that differ between any two series (identity, pixels); the window is the same for every copy.
PER_SERIES = {
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "FrameOfReferenceUID",
    "PatientName",
    "PatientID",
    "StudyID",
    "PixelData",
    "MediaStorageSOPInstanceUID",
}


def _elements(ds: pydicom.Dataset):
    """Every element of a dataset, inside sequences too."""
    for element in ds:
        yield element
        if element.VR == "SQ":
            for item in element.value:
                yield from _elements(item)


@pytest.fixture(scope="module")
def reading(shared_data, tmp_path_factory):
    """reading-lists with --image-format dicom for two patients, the real T1's header as the source."""
    root = tmp_path_factory.mktemp("reading")
    source = shared_data / "dicom_dcm_qa" / SOURCE
    header = pydicom.dcmread(sorted(source.glob("*.dcm"))[0], stop_before_pixels=True)
    assert str(header.PatientName) == IDENTIFYING["PatientName"]
    assert header.InstitutionName == IDENTIFYING["InstitutionName"]
    rng = np.random.default_rng(0)
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    for patient in PATIENTS:
        for modality in ("low", "vir", "pre"):
            data = rng.random((10, 12, 6)).astype(np.float32)  # normalised, as in the workflow
            save_image(data, affine, root / "images" / f"{patient}_{modality}.nii.gz")
    (root / "patients.txt").write_text("\n".join(PATIENTS) + "\n")
    rc = cli_main(
        [
            "reading-lists",
            "--patients",
            str(root / "patients.txt"),
            "--readers",
            "R1",
            "--out",
            str(root / "lists"),
            "--key",
            str(root / "key.tsv"),
            "--image-pattern",
            str(root / "images" / "{patient}_{modality}.nii.gz"),
            "--pre-pattern",
            str(root / "images" / "{patient}_pre.nii.gz"),
            "--image-format",
            "dicom",
            "--dicom-source",
            str(source),
        ]
    )
    assert rc == 0
    return root


def test_no_identifying_value_or_date_of_the_source_is_in_any_element(reading):
    files = sorted((reading / "lists").rglob("*.dcm"))
    assert (
        len(files) == 2 * 2 * len(PATIENTS) * 6
    )  # two reads per patient, post and pre, six slices
    values = [v.lower() for v in IDENTIFYING.values()]
    for path in files:
        ds = pydicom.dcmread(path)
        case_id = path.parents[1].name
        assert str(ds.PatientName) == ds.PatientID == case_id
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        assert ds.MagneticFieldStrength == 3  # kept: an acquisition attribute
        for element in [*_elements(ds.file_meta), *_elements(ds)]:
            assert not element.tag.is_private, (path, element)
            if element.VR in ("DA", "DT", "TM"):
                assert element.value in (None, ""), (path, element)
            if element.VR in ("SQ", "OB", "OW", "UN"):
                continue
            text = str(element.value).lower()
            for value in values:
                assert value not in text, (path, element)


def test_the_key_stays_apart_and_low_and_vir_cases_have_the_same_header(reading):
    key = pd.read_csv(reading / "key.tsv", sep="\t", dtype=str)
    assert set(key["patient"]) == set(PATIENTS)
    assert not list((reading / "lists").rglob("key*"))
    headers = {}
    for case in key.itertuples():
        ds = pydicom.dcmread(
            reading / "lists" / "R1" / f"phase-{case.phase}" / case.case_id / "post" / "IM0001.dcm"
        )
        headers[case.modality] = {e.keyword: e.value for e in ds if e.keyword not in PER_SERIES}
        assert case.patient not in str(ds)
    assert headers["low"] == headers["vir"]


def test_reading_copies_share_scale_and_window_and_companions_differ_per_case(reading):
    """The pixels are reading copies (virtual_contrast.reading_copy): uint16, the same window in every
    series, no plateau at the maximum, and the pre-contrast T1 of one
    patient is encoded anew for each case, so that its phase-1 and phase-2 series are not byte-identical."""
    from virtual_contrast.reading_copy import P99_LEVEL, WINDOW

    key = pd.read_csv(reading / "key.tsv", sep="\t", dtype=str)
    windows, pre_pixels = set(), {}
    for case in key.itertuples():
        folder = reading / "lists" / "R1" / f"phase-{case.phase}" / case.case_id
        for series in ("post", "pre"):
            datasets = [pydicom.dcmread(p) for p in sorted((folder / series).glob("*.dcm"))]
            stored = np.stack([ds.pixel_array for ds in datasets])
            windows |= {(float(ds.WindowCenter), float(ds.WindowWidth)) for ds in datasets}
            assert stored.dtype == np.uint16 and "RescaleSlope" not in datasets[0]
            brain = stored[stored > 0]
            assert np.mean(brain == brain.max()) < 0.01
            assert np.percentile(brain, 99) == pytest.approx(P99_LEVEL, abs=2)
            if series == "pre":
                pre_pixels.setdefault(case.patient, []).append(stored)
    assert windows == {((WINDOW[0] + WINDOW[1]) / 2, WINDOW[1] - WINDOW[0])}
    for patient, (phase1, phase2) in pre_pixels.items():
        assert phase1.tobytes() != phase2.tobytes(), patient
        assert np.abs(phase1.astype(int) - phase2.astype(int)).max() <= 1
