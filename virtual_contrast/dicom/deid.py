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
``DERIVED\\SECONDARY`` images with the same description, written from the same source header, and their pixels
are the stored levels of their reading copies (:mod:`virtual_contrast.reading_copy`: the same scale rule, uint16,
no rescale attributes, one window for every copy, companions re-encoded for each case). A case holds ``post/``
(the image read), ``pre/`` (the pre-contrast T1) and ``flair/`` when those are given.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

from virtual_contrast.dicom.export import LPS, new_folder, slice_datasets, strict_writing
from virtual_contrast.dicom.scan import list_files, read_header
from virtual_contrast.io import InputError
from virtual_contrast.reading_copy import ReadingCopy, load_reading_copy

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
    base.DeidentificationMethodCodeSequence = DicomSequence([code])
    return base


def _radiological(copy: ReadingCopy) -> tuple[np.ndarray, np.ndarray]:
    """Stored levels and LPS affine with axes running to the patient's left, posterior and superior: axial
    slices shown as radiologists expect (the patient's right on the screen's left, anterior at the top)."""
    current = nib.orientations.io_orientation(copy.affine)
    wanted = nib.orientations.axcodes2ornt(("L", "P", "S"))
    transform = nib.orientations.ornt_transform(current, wanted)
    data = nib.orientations.apply_orientation(copy.stored, transform)
    affine = copy.affine @ nib.orientations.inv_ornt_aff(transform, copy.stored.shape)
    return np.ascontiguousarray(data), LPS @ affine


def write_case_series(
    copy: ReadingCopy,
    out: Path | str,
    base: Dataset,
    *,
    series_number: int,
    description: str,
) -> list[Path]:
    """Write one reading copy of a case as a de-identified axial series in ``out`` (a new folder)."""
    data, affine_lps = _radiological(copy)
    written = []
    with new_folder(out) as scratch, strict_writing():
        series = Dataset()
        series.update(base)
        series.SeriesNumber = series_number
        series.SeriesDescription = description
        for name, ds in slice_datasets(
            data, affine_lps, series, series_uid=generate_uid(), display=copy.window_centre_width
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


#: The series of a case: (folder, series number, description) by the series name of the reading lists.
CASE_SERIES = {
    "post": ("post", 1, "post-contrast T1"),
    "T1": ("pre", 2, "pre-contrast T1"),
    "FLAIR": ("flair", 3, "FLAIR"),
}


def export_reading_dicom(
    cases: Sequence[tuple[object, Mapping[str, Path]]],
    out_dir: Path | str,
    *,
    source_of: Callable[[str], Path | str | None] | None = None,
) -> list[Path]:
    """Each case as a de-identified DICOM study under ``out_dir/<reader>/phase-<k>/<case_id>/``: ``post/`` (the
    image to read), ``pre/`` and ``flair/`` (:data:`CASE_SERIES`), each a reading copy.

    ``cases`` pairs each row of the reading key (case_id, reader, phase, patient) with its source NIfTI files by
    series (``post``, ``T1``, ``FLAIR``; :func:`virtual_contrast.reader.protocol.case_sources`);
    ``source_of(patient)`` gives a DICOM file of the patient's exam whose acquisition attributes are kept
    (see :data:`KEPT`), or None.
    """
    written = []
    for case, sources in cases:
        source_path = source_of(case.patient) if source_of else None
        source = source_header(source_path, subject=case.patient) if source_path else None
        base = deidentified_base(
            source, case.case_id, study_uid=generate_uid(), frame_uid=generate_uid()
        )
        folder = Path(out_dir) / str(case.reader) / f"phase-{case.phase}" / case.case_id
        for series, path in sources.items():
            name, number, description = CASE_SERIES[series]
            copy = load_reading_copy(path, seed=f"{case.case_id}/{series}", subject=case.patient)
            written += write_case_series(
                copy, folder / name, base, series_number=number, description=description
            )
    log.info(
        "%d de-identified DICOM files for %d cases under %s", len(written), len(cases), out_dir
    )
    return written
