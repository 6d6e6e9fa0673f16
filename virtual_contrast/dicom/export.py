"""A NIfTI volume as a DICOM series that a viewer places exactly over a reference series (e.g. vir-T1c over
the low-dose T1c it was predicted from).

The series joins the reference's study and frame of reference (same patient, study and frame of reference
UIDs), with new series and instance UIDs, ImageType ``DERIVED\\SECONDARY``, a series description that says it
is synthetic and not for diagnosis, the software and model in DerivationDescription, the reference images in
SourceImageSequence, and a window from the image's own 1st-99.5th percentiles. Geometry comes from the image's
affine, slice by slice (ImagePositionPatient, ImageOrientationPatient, PixelSpacing). The image must lie on
the reference's grid (as an image converted from it by dcm2niix does, up to axis order and flips: every voxel
centre within :data:`GRID_TOLERANCE_VOXELS` of the reference's); its voxels are written in the reference's
row, column and slice order, so both series scroll together slice by slice. An image on another grid (another
patient's, or the atlas-space one) is refused: it would enter this patient's study and frame of reference.
Classic MR Image Storage, one file per slice, whatever the reference's own storage (classic or enhanced).

Intensities are stored as integers in the image's own units when they fit 16 bits with at least 256 grey
levels (rounding error ≤ 0.5, the scanner's own quantisation: the native vir-T1c is on the low-dose series'
scale); otherwise (e.g. images normalised to [0, 1]) they are mapped onto 0-65535 and RescaleSlope/Intercept
give the original values back, within half a step: (max - min) / 131070.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from virtual_contrast import __version__
from virtual_contrast.dicom.reference import Reference, from_groups, read_reference
from virtual_contrast.dicom.scan import Series
from virtual_contrast.io import InputError, load_image, scratch_name

log = logging.getLogger(__name__)

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # NIfTI world is RAS, DICOM's is LPS
SYNTHETIC_DESCRIPTION = "vir-T1c SYNTHETIC - NOT FOR DIAGNOSIS"
UNCERTAINTY_DESCRIPTION = "vir-T1c UNCERTAINTY - NOT FOR DIAGNOSIS"
#: What each kind of derived series is: its default description, its ImageComments and the offset of its
#: SeriesNumber from the reference's (vir-T1c and its uncertainty map are two series of one study).
DERIVED_KINDS = {
    "synthetic": (
        SYNTHETIC_DESCRIPTION,
        "Synthetic image computed by a neural network from a reduced-dose exam. Not for diagnostic use.",
        1000,
    ),
    "uncertainty": (
        UNCERTAINTY_DESCRIPTION,
        "Uncertainty map of the synthetic vir-T1c series: its expected absolute error, in its intensity "
        "units, from the ensemble of the neural network. Not for diagnostic use.",
        2000,
    ),
}
#: Reference attributes copied into the derived series: patient, study, frame of reference, acquisition.
COPIED = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "PatientWeight",
    "PatientSize",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    "BodyPartExamined",
    "PatientPosition",
    "ScanningSequence",
    "SequenceVariant",
    "ScanOptions",
    "MRAcquisitionType",
    "SequenceName",
    "RepetitionTime",
    "EchoTime",
    "InversionTime",
    "EchoTrainLength",
    "FlipAngle",
    "MagneticFieldStrength",
)
#: MR Image module attributes of type 2 (present, possibly empty) that an enhanced reference lacks.
MR_TYPE2 = ("ScanOptions", "MRAcquisitionType", "EchoTime", "EchoTrainLength", "SequenceName")


#: How far (in voxels) each voxel centre of an exported image may lie from the reference series' voxel
#: centre it stands for: an image on another grid (another patient's, the atlas-space one) is refused.
GRID_TOLERANCE_VOXELS = 0.01


def _onto_reference(
    data: np.ndarray, affine_lps: np.ndarray, ref: Reference, tol: float = GRID_TOLERANCE_VOXELS
) -> tuple[np.ndarray, np.ndarray] | str:
    """``data`` re-ordered into the reference's (column, row, slice) order with its new affine, when the image
    lies on the reference's grid up to axis order and flips (every voxel centre within ``tol`` voxels of the
    reference's); else a sentence saying how the two grids differ."""
    index = np.linalg.solve(
        ref.affine_lps, affine_lps
    )  # image voxel index -> reference voxel index
    perm = np.abs(index[:3, :3]).argmax(axis=1)  # reference axis a <- image axis perm[a]
    signs = np.sign(index[np.arange(3), perm])
    if sorted(perm) != [0, 1, 2] or tuple(data.shape[p] for p in perm) != ref.shape:
        return (
            f"the image's grid is {_grid_text(data.shape, affine_lps)}, the reference's "
            f"{_grid_text(ref.shape, ref.affine_lps)}"
        )
    expected = np.eye(4)
    expected[:3, :3] = 0
    expected[np.arange(3), perm] = signs
    expected[:3, 3] = np.where(signs < 0, np.array(ref.shape) - 1, 0)
    corners = np.array(
        [[i, j, k, 1.0] for i in (0, data.shape[0] - 1) for j in (0, data.shape[1] - 1)
         for k in (0, data.shape[2] - 1)]
    ).T  # fmt: skip
    off = np.abs((index - expected) @ corners)[:3].max()
    if not off <= tol:
        mm = np.linalg.norm((ref.affine_lps[:3, :3] @ ((index - expected) @ corners)[:3]), axis=0)
        return (
            f"its voxel centres lie up to {mm.max():.3g} mm ({off:.3g} voxels) off the reference's "
            f"(same size, {_grid_text(ref.shape, ref.affine_lps)})"
        )
    out = np.transpose(data, perm)
    for axis in range(3):
        if signs[axis] < 0:
            out = np.flip(out, axis)
    # The same voxels' world positions in the new order, computed from the image's own affine.
    to_image = np.zeros((4, 4))
    to_image[3, 3] = 1.0
    for a in range(3):
        to_image[perm[a], a] = signs[a]
        to_image[perm[a], 3] = 0 if signs[a] > 0 else data.shape[perm[a]] - 1
    return np.ascontiguousarray(out), affine_lps @ to_image


def _grid_text(shape: tuple[int, ...], affine: np.ndarray) -> str:
    sizes = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    return f"{'x'.join(str(int(n)) for n in shape[:3])} voxels of {'x'.join(f'{v:.3g}' for v in sizes)} mm"


def encode_intensities(data: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(stored integers, slope, intercept) with ``value ≈ stored * slope + intercept`` (see module docstring)."""
    lo, hi = float(data.min()), float(data.max())
    if hi - lo >= 255 and lo >= 0 and hi <= 65535:
        return np.round(data).astype(np.uint16), 1.0, 0.0
    if hi - lo >= 255 and lo >= -32768 and hi <= 32767:
        return np.round(data).astype(np.int16), 1.0, 0.0
    slope = (hi - lo) / 65535 if hi > lo else 1.0
    return np.round((data - lo) / slope).astype(np.uint16), slope, lo


def window(values: np.ndarray) -> tuple[float, float]:
    """(centre, width) spanning the 1st-99.5th percentiles of the non-background voxels."""
    body = values[values > values.min()] if np.any(values > values.min()) else values.ravel()
    lo, hi = np.percentile(body, [1.0, 99.5])
    width = max(float(hi - lo), 1e-6)
    return float(lo + hi) / 2, width


def _ds_number(value: float) -> str:
    """A decimal string (VR DS, at most 16 characters)."""
    text = f"{value:.10g}"
    return text if len(text) <= 16 else f"{value:.6e}"


@contextmanager
def strict_writing() -> Iterator[None]:
    """Make pydicom raise on any value that breaks its VR (length, characters). pydicom checks a value when
    it is set, so datasets are built under this too (it also works as a decorator), not only written."""
    settings = pydicom_config.settings
    previous = settings.reading_validation_mode, settings.writing_validation_mode
    # A value is checked against the reading mode when it is set, and against the writing mode when written.
    settings.reading_validation_mode = settings.writing_validation_mode = pydicom_config.RAISE
    try:
        yield
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = previous


@contextmanager
def new_folder(out: Path | str) -> Iterator[Path]:
    """A scratch folder beside ``out``, renamed onto it when the block succeeds (``out`` must be empty)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise InputError("output folder exists and is not empty", path=out)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = scratch_name(out.parent, f".{out.name}", directory=True)
    try:
        yield scratch
        os.replace(scratch, out)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch)


def slice_datasets(
    data: np.ndarray,
    affine_lps: np.ndarray,
    base: Dataset,
    *,
    series_uid: str,
    display: tuple[float, float] | None = None,
) -> Iterator[tuple[str, Dataset]]:
    """One classic MR Image Storage dataset per slice (third axis) of ``data``: ``base`` (patient, study,
    series attributes) plus the slice's geometry, pixels and window. Yields (file name, dataset).

    ``display``: the (centre, width) window of a reading copy (:mod:`virtual_contrast.reading_copy`), whose
    ``data`` are its stored uint16 levels, written as they are with no rescale attributes and that window,
    the same for every copy; without it the values are kept (:func:`encode_intensities`) and the window is the
    image's own (:func:`window`).
    """
    columns = affine_lps[:3, 0]
    rows = affine_lps[:3, 1]
    col_spacing, row_spacing = np.linalg.norm(columns), np.linalg.norm(rows)
    row_dir, col_dir = columns / col_spacing, rows / row_spacing
    if abs(float(row_dir @ col_dir)) > 1e-4:
        raise InputError(
            "the image's in-plane axes are not orthogonal (sheared affine): no DICOM geometry"
        )
    normal = np.cross(row_dir, col_dir)
    if display is None:
        stored, slope, intercept = encode_intensities(data)
        centre, width = window(data)
    else:
        if np.asarray(data).dtype != np.uint16:
            raise ValueError("a reading copy's stored levels are uint16")
        stored, slope, intercept = np.asarray(data), 1.0, 0.0
        centre, width = display
    step = float(np.linalg.norm(affine_lps[:3, 2]))
    now = datetime.datetime.now()
    for k in range(data.shape[2]):
        ds = Dataset()
        ds.update(base)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = MRImageStorage
        ds.SeriesInstanceUID = series_uid
        ds.InstanceNumber = k + 1
        ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
        position = (affine_lps @ np.array([0.0, 0.0, k, 1.0]))[:3]
        ds.ImagePositionPatient = [_ds_number(v) for v in position]
        ds.ImageOrientationPatient = [_ds_number(v) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [_ds_number(row_spacing), _ds_number(col_spacing)]
        ds.SliceThickness = _ds_number(step)
        ds.SpacingBetweenSlices = _ds_number(step)
        ds.SliceLocation = _ds_number(float(position @ normal))
        pixels = stored[
            :, :, k
        ].T  # DICOM rows run along the image's second axis, columns along its first
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if stored.dtype == np.int16 else 0
        if slope != 1.0 or intercept != 0.0:
            ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = (
                _ds_number(slope),
                _ds_number(intercept),
                "US",
            )
        ds.WindowCenter, ds.WindowWidth = _ds_number(centre), _ds_number(width)
        ds.WindowCenterWidthExplanation = "1st-99.5th percentile" if display is None else "reading"
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        yield f"IM{k + 1:04d}.dcm", ds


@strict_writing()
def _derived_base(
    ref: Reference, description: str, derivation: str, kind: str = "synthetic"
) -> Dataset:
    header = ref.header
    base = Dataset()
    for keyword in COPIED:
        if keyword in header:
            base[keyword] = header[keyword]
    if (
        "ScanningSequence" not in base
    ):  # an enhanced reference keeps the sequence in functional groups
        pulse = str(header.get("EchoPulseSequence", ""))
        base.ScanningSequence = {"SPIN": "SE", "GRADIENT": "GR"}.get(pulse, "RM")
        base.SequenceVariant = "NONE"
        for keyword, sequence, inner in (
            ("EchoTime", "MREchoSequence", "EffectiveEchoTime"),
            ("RepetitionTime", "MRTimingAndRelatedParametersSequence", "RepetitionTime"),
            ("FlipAngle", "MRTimingAndRelatedParametersSequence", "FlipAngle"),
            ("EchoTrainLength", "MRTimingAndRelatedParametersSequence", "EchoTrainLength"),
        ):
            value = from_groups(header, sequence, inner)
            if value is not None and keyword not in base:
                setattr(base, keyword, value)
    for keyword in MR_TYPE2:
        if keyword not in base:
            setattr(base, keyword, None)
    base.Modality = "MR"
    base.ImageType = ["DERIVED", "SECONDARY"]
    base.SeriesDescription = description[:64]
    number = header.get("SeriesNumber")
    _, comments, offset = DERIVED_KINDS[kind]
    base.SeriesNumber = (int(number) if number not in (None, "") else 0) + offset
    now = datetime.datetime.now()
    base.SeriesDate, base.SeriesTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    base.InstanceCreationDate, base.InstanceCreationTime = base.SeriesDate, base.SeriesTime
    base.Manufacturer = "virtual-contrast"
    base.ManufacturerModelName = "vir-T1c"
    base.SoftwareVersions = f"virtual-contrast {__version__}"
    base.DerivationDescription = derivation[:1024]
    base.ImageComments = comments
    base.BurnedInAnnotation = "NO"
    base.LossyImageCompression = "00"
    sources = []
    for sop_class, sop_instance in ref.sop_instances:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_instance
        purpose = Dataset()
        purpose.CodeValue, purpose.CodingSchemeDesignator = "121322", "DCM"
        purpose.CodeMeaning = "Source image for image processing operation"
        item.PurposeOfReferenceCodeSequence = Sequence([purpose])
        sources.append(item)
    base.SourceImageSequence = Sequence(sources)
    return base


def export_series(
    image: Path | str,
    like: Path | str | Series,
    out: Path | str,
    *,
    series_uid: str | None = None,
    description: str | None = None,
    derivation: str = f"virtual-contrast {__version__}",
    kind: str = "synthetic",
) -> list[Path]:
    """Write ``image`` (NIfTI, 3D) as a derived DICOM series in ``out`` over the reference series ``like`` (a
    folder holding it, or a scanned :class:`Series`). Refuses (before writing anything) an image that is not
    on the reference's grid (see the module docstring) and an output folder that is not empty. ``kind``
    (:data:`DERIVED_KINDS`): vir-T1c itself, or its uncertainty map (its own series, description
    :data:`UNCERTAINTY_DESCRIPTION` by default)."""
    if kind not in DERIVED_KINDS:
        raise InputError(f"unknown kind of derived series {kind!r}: {sorted(DERIVED_KINDS)}")
    description = description or DERIVED_KINDS[kind][0]
    if Path(out).exists() and any(Path(out).iterdir()):
        raise InputError("output folder exists and is not empty", path=out)
    ref = read_reference(like, series_uid)
    img = load_image(image)
    data = np.asanyarray(img.dataobj, dtype=np.float64)
    affine_lps = LPS @ img.affine
    placed = _onto_reference(data, affine_lps, ref)
    if isinstance(placed, str):
        raise InputError(
            f"not on the grid of the reference series ({ref.series.label()}): {placed}; the series would "
            "join that patient's study and frame of reference, so the image must lie on its grid (every "
            f"voxel centre within {GRID_TOLERANCE_VOXELS:g} voxel of the reference's, up to axis order and "
            "flips): export the native-space image predicted from that series",
            path=image,
        )
    data, affine_lps = placed
    base = _derived_base(ref, description, derivation, kind)
    written = []
    with new_folder(out) as scratch, strict_writing():
        for name, ds in slice_datasets(data, affine_lps, base, series_uid=generate_uid()):
            ds.save_as(scratch / name, enforce_file_format=True)
            written.append(Path(out) / name)
    log.info("%d slices of %s written to %s over %s", len(written), image, out, ref.series.label())
    return written
