"""Test DICOM exams built from real scanner headers (../shared/data/dicom_dcm_qa): the Siemens study's T1 and
DWI as acquired, plus copies of the T1 with another series description, series and instance UIDs and
acquisition time, standing in for the FLAIR and the post-contrast series (only their headers matter to the
import rules; dcm2niix converts them like the original)."""

from __future__ import annotations

import datetime
import shutil
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

T1_SERIES = "siemens_e11_t1_sag"
DWI_SERIES = "siemens_e11_dwi"
#: The first slices of the T1 (a subset that dcm2niix converts without warnings), to keep the tests small.
T1_SLICES = 5


def _shift(time: str, minutes: int) -> str:
    t = datetime.datetime.strptime(time.split(".")[0], "%H%M%S") + datetime.timedelta(
        minutes=minutes
    )
    return t.strftime("%H%M%S") + ".000000"


def copy_series(
    source: Path,
    out: Path,
    *,
    description: str | None = None,
    number: int | None = None,
    minutes: int = 0,
    n_files: int | None = None,
    **attributes,
) -> str:
    """Copy a real series into ``out`` as a new series (new series and instance UIDs); return its UID."""
    out.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    for path in sorted(source.glob("*.dcm"))[:n_files]:
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if description is not None:
            ds.SeriesDescription = ds.ProtocolName = description
        if number is not None:
            ds.SeriesNumber = number
        for key in ("AcquisitionTime", "SeriesTime", "ContentTime"):
            if key in ds:
                setattr(ds, key, _shift(str(getattr(ds, key)), minutes))
        for key, value in attributes.items():
            setattr(ds, key, value)
        ds.save_as(out / path.name)
    return series_uid


def relabel(folder: Path, **attributes) -> None:
    """Set header ``attributes`` in every DICOM file under ``folder`` (in place)."""
    for path in sorted(folder.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        for key, value in attributes.items():
            setattr(ds, key, value)
        ds.save_as(path)


def patient_attributes(patient: str) -> dict[str, str]:
    """Header attributes of another patient's exam: its ids, name, birth date and a study of its own."""
    return {
        "PatientID": f"id{patient}",
        "PatientName": f"Test^{patient}",
        "PatientBirthDate": "19800101",
        "StudyInstanceUID": generate_uid(),
    }


def build_exam(
    dicom_qa: Path,
    out: Path,
    *,
    post: tuple[str, str] = ("t1_fl2d_sag_post", "t1_fl2d_sag_post"),
    flair=True,
    patient: str | None = None,
) -> Path:
    """A complete exam: T1 (as acquired), FLAIR, DWI (as acquired), two post-contrast T1 series acquired 10
    and 15 minutes after the T1 with descriptions ``post`` (the same protocol by default, so acquisition order
    tells the doses apart), the first with a contrast agent in its header. With ``patient``, every file is
    relabelled as that patient's own study (:func:`patient_attributes`)."""
    t1 = dicom_qa / T1_SERIES
    out.mkdir(parents=True)
    copy_series(t1, out / "3_t1", n_files=T1_SLICES)
    shutil.copytree(dicom_qa / DWI_SERIES, out / "4_dwi")
    if flair:
        copy_series(
            t1,
            out / "6_flair",
            description="t2_tirm_sag_dark-fluid",
            number=6,
            minutes=3,
            n_files=T1_SLICES,
        )
    copy_series(
        t1,
        out / "7_post",
        description=post[0],
        number=7,
        minutes=10,
        n_files=T1_SLICES,
        ContrastBolusAgent="Gd",
    )
    copy_series(t1, out / "8_post", description=post[1], number=8, minutes=15, n_files=T1_SLICES)
    if patient is not None:
        relabel(out, **patient_attributes(patient))
    return out
