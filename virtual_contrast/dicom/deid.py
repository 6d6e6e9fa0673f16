"""De-identified DICOM series for blinded reading (the reader study's cases in any DICOM viewer).

The DICOM Basic Application Level Confidentiality Profile (PS3.15 Annex E, Table E.1-1, without its retain
options) is applied as an **allow list**: a case's header is built from scratch, and of the source exam's
header (when one is given) only the acquisition attributes in :data:`KEPT` are copied, none of which the
profile asks to remove or replace. So, as the profile requires:

* Patient's Name and Patient ID are replaced by the case id (action D); birth date, sex, age, size, weight
  and every other patient attribute are absent or empty (Z/X);
* study, series, instance and frame-of-reference UIDs are new random UIDs (U), unrelated to the source's;
* dates and times (study, series, acquisition, content) are absent or empty (Z/X; no longitudinal option);
* institution, department, station, device serial number, physicians', operators' and referring names,
  accession number, study id and every description and comment of the source are absent (X/Z/D), and the
  series are described only by their role in the reading ("post-contrast T1", "pre-contrast T1");
* private attributes and references to other instances are not copied (X).

Patient Identity Removed is YES, with De-identification Method and its code (DCM 113100, "Basic Application
Confidentiality Profile"). The key from case id to patient stays in the study's separate key file.

For blinding, a case's header says nothing that differs between its low-dose and virtual versions: both are
``DERIVED\\SECONDARY`` images with the same description, written from the same source header, and their
intensities are mapped onto 0-4095 without rescale attributes (a rescale slope would tell the image's range,
which differs between a normalised low-dose image, clipped at exactly 1, and a prediction).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from virtual_contrast.dicom.export import LPS, new_folder, slice_datasets, strict_writing
from virtual_contrast.dicom.scan import list_files, read_header
from virtual_contrast.io import InputError, load_image

log = logging.getLogger(__name__)

#: Acquisition attributes copied from the source header: technical, not identifying, and kept by the basic
#: profile (they are not in PS3.15 Table E.1-1).
KEPT = (
    "MagneticFieldStrength",
    "ScanningSequence",
    "SequenceVariant",
    "MRAcquisitionType",
    "RepetitionTime",
    "EchoTime",
    "InversionTime",
    "FlipAngle",
)
PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")
METHOD = "PS3.15 E.1 basic profile, allow list (virtual-contrast)"


@strict_writing()
def deidentified_base(
    source: Dataset | None, case_id: str, *, study_uid: str, frame_uid: str
) -> Dataset:
    """Patient, study and equipment attributes of a case: the case id and nothing from ``source`` but KEPT."""
    base = Dataset()
    base.SpecificCharacterSet = "ISO_IR 100"
    if source is not None:
        for keyword in KEPT:
            if keyword in source and source[keyword].value not in (None, ""):
                base[keyword] = source[keyword]
    base.ScanningSequence = base.get("ScanningSequence") or "RM"
    base.SequenceVariant = base.get("SequenceVariant") or "NONE"
    for keyword in (
        "ScanOptions",
        "MRAcquisitionType",
        "EchoTime",
        "EchoTrainLength",
        "SequenceName",
    ):
        if keyword not in base:
            setattr(base, keyword, None)
    base.PatientName = case_id
    base.PatientID = case_id
    for keyword in (
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
    ):
        setattr(base, keyword, None)  # type 2: present and empty
    base.AccessionNumber = None
    base.StudyID = case_id[-16:]
    base.StudyInstanceUID = study_uid
    base.FrameOfReferenceUID = frame_uid
    base.PositionReferenceIndicator = None
    base.StudyDescription = "reading case"
    base.Modality = "MR"
    base.Manufacturer = "virtual-contrast"
    base.ImageType = ["DERIVED", "SECONDARY"]
    base.BurnedInAnnotation = "NO"
    base.PatientIdentityRemoved = "YES"
    base.LongitudinalTemporalInformationModified = "REMOVED"
    base.DeidentificationMethod = METHOD
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = PROFILE_CODE
    base.DeidentificationMethodCodeSequence = Sequence([code])
    return base


def _radiological(image: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    """Data and LPS affine with axes running to the patient's left, posterior and superior: axial slices
    shown as radiologists expect (the patient's right on the screen's left, anterior at the top)."""
    current = nib.orientations.io_orientation(image.affine)
    wanted = nib.orientations.axcodes2ornt(("L", "P", "S"))
    transform = nib.orientations.ornt_transform(current, wanted)
    data = nib.orientations.apply_orientation(np.asanyarray(image.dataobj), transform)
    affine = image.affine @ nib.orientations.inv_ornt_aff(transform, image.shape)
    return np.ascontiguousarray(data, dtype=np.float64), LPS @ affine


def write_case_series(
    image: Path | str,
    out: Path | str,
    base: Dataset,
    *,
    series_number: int,
    description: str,
    subject: str | None = None,
) -> list[Path]:
    """Write one image of a case as a de-identified axial series in ``out`` (a new folder)."""
    data, affine_lps = _radiological(load_image(image, subject=subject))
    written = []
    with new_folder(out) as scratch, strict_writing():
        series = Dataset()
        series.update(base)
        series.SeriesNumber = series_number
        series.SeriesDescription = description
        for name, ds in slice_datasets(
            data, affine_lps, series, series_uid=generate_uid(), display=True
        ):
            for keyword in ("ContentDate", "ContentTime"):
                setattr(ds, keyword, None)  # no dates in a de-identified series
            ds.save_as(scratch / name, enforce_file_format=True)
            written.append(Path(out) / name)
    return written


def source_header(path: Path | str, *, subject: str | None = None) -> Dataset:
    """The header of a DICOM file, or of the first DICOM file found under a folder."""
    path = Path(path)
    candidates = [path / rel for rel, _, _ in list_files(path)] if path.is_dir() else [path]
    for candidate in candidates:
        header = read_header(candidate)
        if header is not None:
            return header
    raise InputError(
        "no DICOM image found to take the acquisition attributes from", subject=subject, path=path
    )


def export_reading_dicom(
    key: pd.DataFrame,
    out_dir: Path | str,
    image_of: Callable[[str, str], Path | str],
    *,
    pre_of: Callable[[str], Path | str] | None = None,
    source_of: Callable[[str], Path | str | None] | None = None,
) -> list[Path]:
    """Each case of the reading ``key`` as a de-identified DICOM study under
    ``out_dir/<reader>/phase-<k>/<case_id>/``: ``post/`` (the image to read) and, with ``pre_of``, ``pre/``.

    ``image_of(patient, modality)`` and ``pre_of(patient)`` give NIfTI paths; ``source_of(patient)`` gives a
    DICOM file of the patient's exam whose acquisition attributes are kept (see :data:`KEPT`), or None.
    """
    written = []
    for case in key.itertuples(index=False):
        source_path = source_of(case.patient) if source_of else None
        source = source_header(source_path, subject=case.patient) if source_path else None
        base = deidentified_base(
            source, case.case_id, study_uid=generate_uid(), frame_uid=generate_uid()
        )
        folder = Path(out_dir) / str(case.reader) / f"phase-{case.phase}" / case.case_id
        written += write_case_series(
            image_of(case.patient, case.modality),
            folder / "post",
            base,
            series_number=1,
            description="post-contrast T1",
            subject=case.patient,
        )
        if pre_of is not None:
            written += write_case_series(
                pre_of(case.patient),
                folder / "pre",
                base,
                series_number=2,
                description="pre-contrast T1",
                subject=case.patient,
            )
    log.info("%d de-identified DICOM files for %d cases under %s", len(written), len(key), out_dir)
    return written
