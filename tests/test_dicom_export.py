"""vir-T1c as a derived DICOM series: round trip through dcm2niix on real reference headers, and validity."""

from __future__ import annotations

import subprocess

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom import config as pydicom_config

from virtual_contrast import __version__
from virtual_contrast.dicom.convert import find_dcm2niix
from virtual_contrast.dicom.export import SYNTHETIC_DESCRIPTION, export_series
from virtual_contrast.io import InputError, save_image

#: Attributes the MR Image IOD requires (type 1) in the modules this series fills.
TYPE1 = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "Modality",
    "ImageType",
    "ScanningSequence",
    "SequenceVariant",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PixelData",
)
TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime")
TYPE2 += ("ReferringPhysicianName", "StudyID", "AccessionNumber", "SeriesNumber", "InstanceNumber")
TYPE2 += ("ScanOptions", "MRAcquisitionType", "EchoTime", "EchoTrainLength", "SliceThickness")


def _convert(dicom_dir, out_dir, name="image"):
    tool = find_dcm2niix()
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [tool.path, "-z", "y", "-b", "n", "-f", name, "-o", str(out_dir), str(dicom_dir)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # dcm2niix tunes its conversion to the scanner vendor; a derived series names this software instead.
    warnings = [
        line
        for line in (proc.stdout + proc.stderr).splitlines()
        if "Warning" in line and "Unable to determine manufacturer" not in line
    ]
    assert not warnings, proc.stdout + proc.stderr
    (image,) = out_dir.glob(f"{name}*.nii.gz")
    return nib.load(image)


def _read_strict(path):
    settings = pydicom_config.settings
    previous = settings.reading_validation_mode
    settings.reading_validation_mode = pydicom_config.RAISE
    try:
        return pydicom.dcmread(path)
    finally:
        settings.reading_validation_mode = previous


@pytest.mark.parametrize("series", ["siemens_e11_t1_sag", "siemens_xa30_t1w_mprage"])
def test_round_trip_through_dcm2niix_keeps_the_grid_and_the_intensities(
    shared_data, tmp_path, series
):
    reference = shared_data / "dicom_dcm_qa" / series
    acquired = _convert(reference, tmp_path / "acquired")
    rng = np.random.default_rng(0)
    vir = np.clip(acquired.get_fdata() * 1.37 + rng.normal(0, 3, acquired.shape), 0, None)
    image = save_image(vir.astype(np.float32), acquired.affine, tmp_path / "vir.nii.gz")
    written = export_series(
        image, reference, tmp_path / "vir_dcm", derivation=f"virtual-contrast {__version__}"
    )
    back = _convert(tmp_path / "vir_dcm", tmp_path / "back")
    assert back.shape == acquired.shape
    assert np.abs(back.affine - acquired.affine).max() < 0.01  # mm
    # Stored as integers in the image's own units: off by at most the rounding, 0.5.
    assert np.abs(back.get_fdata() - nib.load(image).get_fdata()).max() <= 0.5 + 1e-3

    ref_first = pydicom.dcmread(sorted(reference.glob("*.dcm"))[0], stop_before_pixels=True)
    ref_instances = {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        for p in reference.glob("*.dcm")
    }
    series_uids, instances = set(), set()
    for path in written:
        ds = _read_strict(path)
        for keyword in TYPE1:
            assert ds.get(keyword) not in (None, ""), keyword
        for keyword in TYPE2:
            assert keyword in ds, keyword
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
        assert (
            ds.SeriesDescription == SYNTHETIC_DESCRIPTION
            and "NOT FOR DIAGNOSIS" in ds.SeriesDescription
        )
        assert ds.StudyInstanceUID == ref_first.StudyInstanceUID
        assert ds.FrameOfReferenceUID == ref_first.FrameOfReferenceUID
        assert ds.PatientID == ref_first.PatientID
        assert ds.DerivationDescription == f"virtual-contrast {__version__}"
        assert {item.ReferencedSOPInstanceUID for item in ds.SourceImageSequence} == ref_instances
        assert float(ds.WindowWidth) > 0
        series_uids.add(ds.SeriesInstanceUID)
        instances.add(ds.SOPInstanceUID)
    assert len(series_uids) == 1 and series_uids.isdisjoint({ref_first.SeriesInstanceUID})
    assert len(instances) == len(written) and instances.isdisjoint(ref_instances)


def test_a_normalised_image_is_rescaled_and_comes_back_within_half_a_step(shared_data, tmp_path):
    reference = shared_data / "dicom_dcm_qa" / "siemens_e11_t1_sag"
    acquired = _convert(reference, tmp_path / "acquired")
    unit = acquired.get_fdata() / acquired.get_fdata().max()
    image = save_image(unit.astype(np.float32), acquired.affine, tmp_path / "unit.nii.gz")
    written = export_series(image, reference, tmp_path / "unit_dcm")
    step = float(pydicom.dcmread(written[0]).RescaleSlope)
    back = _convert(tmp_path / "unit_dcm", tmp_path / "back")
    assert np.abs(back.get_fdata() - nib.load(image).get_fdata()).max() <= step / 2 + 1e-6


def test_an_image_off_the_reference_grid_keeps_its_own_geometry(shared_data, tmp_path):
    reference = shared_data / "dicom_dcm_qa" / "siemens_e11_t1_sag"
    acquired = _convert(reference, tmp_path / "acquired")
    crop = acquired.slicer[20:200, 30:220, 2:12]
    image = save_image(crop.get_fdata().astype(np.float32), crop.affine, tmp_path / "crop.nii.gz")
    export_series(image, reference, tmp_path / "crop_dcm")
    # Written in the image's own voxel order, which dcm2niix may flip on the way back: compare in world space.
    back = nib.as_closest_canonical(_convert(tmp_path / "crop_dcm", tmp_path / "back"))
    crop = nib.as_closest_canonical(nib.load(image))
    assert back.shape == crop.shape
    assert np.abs(back.affine - crop.affine).max() < 0.01
    assert np.abs(back.get_fdata() - crop.get_fdata()).max() <= 0.5 + 1e-3


def test_export_refuses_a_folder_with_several_series_without_a_uid_and_a_filled_output(
    shared_data, tmp_path
):
    qa = shared_data / "dicom_dcm_qa"
    image = save_image(np.ones((4, 4, 4), np.float32), np.eye(4), tmp_path / "x.nii.gz")
    with pytest.raises(InputError, match="expected one MR image series"):
        export_series(image, qa, tmp_path / "out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        export_series(image, qa / "siemens_e11_t1_sag", tmp_path / "full")
