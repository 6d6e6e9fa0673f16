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


@pytest.mark.parametrize("grid", ["cropped", "shifted", "atlas"])
def test_an_image_off_the_reference_grid_is_refused_and_nothing_written(
    shared_data, tmp_path, capsys, grid
):
    """It used to be written into the reference patient's study and frame of reference with exit 0 and a log
    warning: a cropped image, another patient's (the same grid 3 mm off), an atlas-space one."""
    from virtual_contrast.cli import main as cli_main

    reference = shared_data / "dicom_dcm_qa" / "siemens_e11_t1_sag"
    acquired = _convert(reference, tmp_path / "acquired")
    data = acquired.get_fdata().astype(np.float32)
    if grid == "cropped":
        crop = acquired.slicer[20:200, 30:220, 2:12]
        data, affine = crop.get_fdata().astype(np.float32), crop.affine
    elif grid == "shifted":
        affine = acquired.affine.copy()
        affine[:3, 3] += [0.0, 3.0, 0.0]
    else:
        data, affine = np.ones((40, 48, 40), np.float32), np.diag([4.0, 4.0, 4.0, 1.0])
    image = save_image(data, affine, tmp_path / "vir.nii.gz")
    out = tmp_path / "vir_dcm"
    rc = cli_main(
        ["export-dicom", "--image", str(image), "--like", str(reference), "--out", str(out)]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert str(image) in err and "not on the grid of the reference series" in err
    assert "0.01 voxel" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_an_image_within_the_tolerance_of_the_grid_is_placed_on_it(shared_data, tmp_path):
    reference = shared_data / "dicom_dcm_qa" / "siemens_e11_t1_sag"
    acquired = _convert(reference, tmp_path / "acquired")
    affine = acquired.affine.copy()
    affine[:3, 3] += [0.0, 0.004, 0.0]  # 0.004 mm: within 0.01 voxel of 1 mm
    image = save_image(acquired.get_fdata().astype(np.float32), affine, tmp_path / "vir.nii.gz")
    written = export_series(image, reference, tmp_path / "vir_dcm")
    ref_positions = sorted(
        float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[0])
        for p in reference.glob("*.dcm")
    )
    positions = sorted(float(pydicom.dcmread(p).ImagePositionPatient[0]) for p in written)
    assert np.allclose(positions, ref_positions, atol=0.01)


def test_the_model_digest_is_the_same_for_the_same_weights_saved_twice(tmp_path):
    """The file's bytes differ (torch.save names the archive's folder after the random temporary file), the
    digest of the weights and options does not; another weight changes it."""
    import torch

    from virtual_contrast.dicom.derivation import describe_models
    from virtual_contrast.model.checkpoint import model_checkpoint, save_checkpoint
    from virtual_contrast.model.config import TrainConfig
    from virtual_contrast.model.digest import model_digest
    from virtual_contrast.model.unet import UNet3D

    cfg = TrainConfig.from_dict({"width": 2, "depth": 2})
    torch.manual_seed(0)
    model = UNet3D(cfg.spec)
    ckpt = model_checkpoint(
        model, cfg, (8, 8, 8), affine=np.eye(4), epoch=1, train_loss=0.1, tune_loss=0.2,
        train_ids=["a"], tune_ids=["b"], preprocess={"voxel_mm": 4.0},
    )  # fmt: skip
    first, second = tmp_path / "a" / "model.pt", tmp_path / "b" / "model.pt"
    save_checkpoint(ckpt, first)
    save_checkpoint(ckpt, second)
    assert first.read_bytes() != second.read_bytes()
    assert model_digest(first) == model_digest(second)
    assert describe_models([first], tta=True) == describe_models([second], tta=True)
    assert model_digest(first)[:12] in describe_models([first], tta=True)
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    changed = tmp_path / "c" / "model.pt"
    save_checkpoint(model_checkpoint(
        model, cfg, (8, 8, 8), affine=np.eye(4), epoch=1, train_loss=0.1, tune_loss=0.2,
        train_ids=["a"], tune_ids=["b"], preprocess={"voxel_mm": 4.0},
    ), changed)  # fmt: skip
    assert model_digest(changed) != model_digest(first)
    other_options = tmp_path / "d" / "model.pt"
    save_checkpoint({**ckpt, "preprocess": {"voxel_mm": 1.0}}, other_options)
    assert model_digest(other_options) != model_digest(first)
    same_weights_other_run = tmp_path / "e" / "model.pt"
    save_checkpoint({**ckpt, "epoch": 7, "tune_loss": 0.05}, same_weights_other_run)
    assert model_digest(same_weights_other_run) == model_digest(first)


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


def test_the_uncertainty_map_is_its_own_series_that_says_what_it_is(shared_data, tmp_path, capsys):
    from virtual_contrast.cli import main as cli_main
    from virtual_contrast.dicom.export import UNCERTAINTY_DESCRIPTION

    reference = shared_data / "dicom_dcm_qa" / "siemens_e11_t1_sag"
    acquired = _convert(reference, tmp_path / "acquired")
    rng = np.random.default_rng(1)
    spread = np.abs(rng.normal(0, 20, acquired.shape)).astype(np.float32)
    image = save_image(spread, acquired.affine, tmp_path / "unc.nii.gz")
    vir = export_series(image, reference, tmp_path / "vir_dcm")
    args = ["export-dicom", "--image", str(image), "--like", str(reference), "--uncertainty"]
    assert cli_main([*args, "--out", str(tmp_path / "unc_dcm")]) == 0
    written = sorted((tmp_path / "unc_dcm").glob("*.dcm"))
    ds, first_vir = _read_strict(written[0]), pydicom.dcmread(vir[0])
    assert (
        ds.SeriesDescription == UNCERTAINTY_DESCRIPTION == "vir-T1c UNCERTAINTY - NOT FOR DIAGNOSIS"
    )
    assert "Uncertainty map" in ds.ImageComments and "Not for diagnostic use" in ds.ImageComments
    # Beside vir-T1c in the same study: another series number and UID.
    assert ds.StudyInstanceUID == first_vir.StudyInstanceUID
    assert ds.SeriesNumber != first_vir.SeriesNumber
    assert ds.SeriesInstanceUID != first_vir.SeriesInstanceUID
    back = _convert(tmp_path / "unc_dcm", tmp_path / "back")
    assert np.abs(back.get_fdata() - spread).max() <= 0.5 + 1e-3
