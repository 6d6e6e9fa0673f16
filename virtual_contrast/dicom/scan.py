"""Read the headers of every DICOM file under an exam folder (pixels are never read) and group them by series.

Each series becomes a :class:`Series` whose ``fields`` hold the header attributes the import rules look at,
named by their DICOM keyword (the names dcm2niix's BIDS sidecars use too, e.g. ``SeriesDescription``,
``ProtocolName``, ``ImageType``). The rules read headers rather than dcm2niix's sidecars because the
sidecars leave out the contrast-agent attributes (measured with dcm2niix 1.0.20260724: a series with
``ContrastBolusAgent`` set gives no contrast field in its JSON), and because reading headers first lets an
exam with two candidates for one role fail before anything is converted.

Diffusion b-values are read from the standard attribute (0018,9087) or, where a vendor keeps them private,
from Siemens (0019,100C), GE (0043,1039), Philips (2001,1003) and United Imaging (0065,100A) (nominal; the
effective value, which accounts for the imaging gradients, is in (0065,1009)).

What the scan refuses (an :class:`InputError` naming the file), rather than dropping or passing on: a file that
is a DICOM file (the ``DICM`` marker of Part 10, or a name ending in .dcm or .ima) but cannot be read, lacks its series UID or is shorter than
its pixel data (dcm2niix would leave that slice out of the volume); a pixel spacing outside
:data:`PIXEL_MM_RANGE`; a series whose files name two patients; a symbolic link that points back into the
folder (a loop) or nowhere. Paths are made absolute, so that an exam given relative to the working directory
gives the same series, files and manifest as the same exam given absolutely.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from virtual_contrast.checks import VOXEL_MM_RANGE
from virtual_contrast.io import InputError

log = logging.getLogger(__name__)

#: Header attributes recorded per series (from its first file), available to the rules and series maps.
FIELDS = (
    "Modality",
    "SOPClassUID",
    "Manufacturer",
    "SeriesDescription",
    "ProtocolName",
    "SequenceName",
    "PulseSequenceName",
    "ImageType",
    "ScanningSequence",
    "SequenceVariant",
    "MRAcquisitionType",
    "EchoTime",
    "RepetitionTime",
    "InversionTime",
    "ContrastBolusAgent",
    "ContrastBolusVolume",
    "ContrastBolusTotalDose",
    "ContrastBolusIngredient",
    "SeriesNumber",
    "BodyPartExamined",
)
#: Private b-value attributes: (group, element) -> vendor, for scanners that do not fill (0018,9087).
PRIVATE_BVALUES = {
    (0x0019, 0x100C): "Siemens",
    (0x0043, 0x1039): "GE",
    (0x2001, 0x1003): "Philips",
    (0x0065, 0x100A): "UIH",
}
UIH_EFFECTIVE_BVALUE = (0x0065, 0x1009)
#: SOP classes of images that dcm2niix converts and the rules consider; everything else is ignored.
IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image Storage",
}
_MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"
#: Pixel spacings accepted (mm): the voxel sizes the exam check accepts. 0, a negative value or 1e6 is a
#: broken header, which dcm2niix would turn into a wrong voxel size (or 1 mm) without a word.
PIXEL_MM_RANGE = VOXEL_MM_RANGE
#: Header attributes that say whose exam a series is: two series of one exam must agree on all of them.
PATIENT_FIELDS = ("PatientID", "PatientName", "PatientBirthDate")


@dataclass
class Series:
    """One DICOM series of an exam, as read from its headers."""

    uid: str
    study_uid: str
    files: list[str]  # absolute paths, in InstanceNumber order
    fields: dict[str, Any]
    acquired: str = (
        ""  # earliest date and time of acquisition, YYYYMMDDHHMMSS.ffffff ("" when unknown)
    )
    frames: int = 0
    bvalues: list[float] = field(default_factory=list)  # distinct nominal b-values (s/mm2)
    bvalues_effective: list[float] = field(
        default_factory=list
    )  # distinct effective ones, where given
    bvalue_source: str = ""
    #: PATIENT_FIELDS of the series' files (as text, "" when absent).
    patient: dict[str, str] = field(default_factory=dict)

    @property
    def number(self) -> int | None:
        value = self.fields.get("SeriesNumber")
        return None if value in (None, "") else int(value)

    @property
    def description(self) -> str:
        return str(self.fields.get("SeriesDescription") or self.fields.get("ProtocolName") or "")

    def label(self) -> str:
        """How a person recognises the series: number, description and UID."""
        return f"series {self.number if self.number is not None else '?'} {self.description!r} ({self.uid})"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Series:
        return cls(**values)


def list_files(folder: Path | str, *, subject: str | None = None) -> list[tuple[str, int, int]]:
    """(path relative to ``folder``, size, mtime in ns) of every file below it, sorted; hidden files skipped.

    Symbolic links are followed; one that leads nowhere, or back to a folder it lies in (a loop), is an
    :class:`InputError` naming it, as is a folder that cannot be read."""
    root = Path(os.path.abspath(folder))
    found: list[tuple[str, int, int]] = []

    def refuse(reason: str, path: str) -> InputError:
        return InputError(reason, subject=subject, path=path)

    def walk(directory: str, ancestors: tuple[str, ...]) -> None:
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            raise refuse(f"cannot list this folder: {exc.strerror or exc}", directory) from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = entry.path
            try:
                st = os.stat(path)  # follows links
            except OSError as exc:
                if entry.is_symlink():
                    raise refuse(
                        f"symbolic link to {os.readlink(path)!r}, which does not exist", path
                    ) from None
                raise refuse(f"cannot be read: {exc.strerror or exc}", path) from None
            if stat.S_ISDIR(st.st_mode):
                real = os.path.realpath(path)
                if real in ancestors:
                    raise refuse(
                        f"symbolic link loop: it leads back to {real!r}, a folder it lies in", path
                    )
                walk(path, (*ancestors, real))
            elif stat.S_ISREG(st.st_mode):
                found.append((os.path.relpath(path, root), st.st_size, st.st_mtime_ns))

    walk(str(root), (os.path.realpath(root),))
    return sorted(found)


def signature(files: list[tuple[str, int, int]]) -> str:
    """A digest of a file listing: changes when a file is added, removed, rewritten or touched."""
    digest = hashlib.sha256()
    for rel, size, mtime in files:
        digest.update(f"{rel}\0{size}\0{mtime}\n".encode())
    return digest.hexdigest()


def _value(element_value: Any) -> Any:
    """A JSON-friendly copy of a header value (multi-values as lists, numbers as numbers)."""
    if isinstance(element_value, pydicom.multival.MultiValue | list | tuple):
        return [_value(v) for v in element_value]
    if isinstance(element_value, pydicom.valuerep.DSfloat | pydicom.valuerep.IS | float | int):
        return float(element_value) if not float(element_value).is_integer() else int(element_value)
    if isinstance(element_value, bytes):
        return element_value.decode("ascii", "replace").strip("\0 ")
    return str(element_value)


def _number(value: Any) -> float | None:
    """First number of a (possibly multi-valued, possibly undecoded) header value."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace").strip("\0 ").split("\\")[0]
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        value = value[0] if len(value) else None
    try:
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def _bvalues(ds: pydicom.Dataset) -> tuple[list[float], list[float], str]:
    """Nominal b-values of one file (one per frame of a multi-frame file), effective ones, and their source."""
    frames = ds.get("PerFrameFunctionalGroupsSequence")
    if frames:
        values = [
            float(item.MRDiffusionSequence[0].DiffusionBValue)
            for item in frames
            if "MRDiffusionSequence" in item and "DiffusionBValue" in item.MRDiffusionSequence[0]
        ]
        if values:
            return values, [], "standard (0018,9087) per frame"
    if "DiffusionBValue" in ds:
        return [float(ds.DiffusionBValue)], [], "standard (0018,9087)"
    for tag, vendor in PRIVATE_BVALUES.items():
        if tag in ds:
            b = _number(ds[tag].value)
            if b is None:
                continue
            if vendor == "GE" and b >= 1e9:  # GE adds 1e9 to flag the b-value's encoding
                b -= 1e9
            effective = []
            if vendor == "UIH" and UIH_EFFECTIVE_BVALUE in ds:
                eff = _number(ds[UIH_EFFECTIVE_BVALUE].value)
                effective = [eff] if eff is not None else []
            tag_text = f"({tag[0]:04X},{tag[1]:04X})"
            return [b], effective, f"{vendor} private {tag_text}"
    return [], [], ""


def _acquired(ds: pydicom.Dataset) -> str:
    """Date and time the file was acquired, as one sortable string ('' when the header has none)."""
    if ds.get("AcquisitionDateTime"):
        return str(ds.AcquisitionDateTime)
    for date_key, time_key in (
        ("AcquisitionDate", "AcquisitionTime"),
        ("SeriesDate", "SeriesTime"),
        ("ContentDate", "ContentTime"),
    ):
        if ds.get(time_key):
            date = str(ds.get(date_key) or ds.get("StudyDate") or "")
            return f"{date if date.isdigit() else ''}{ds.get(time_key)}"
    return ""


#: File name endings that only DICOM files carry: such a file that is not readable DICOM is damaged.
DICOM_SUFFIXES = (".dcm", ".ima")


def has_dicom_marker(path: Path | str) -> bool:
    """Whether a file starts as a DICOM Part 10 file does (128-byte preamble, then ``DICM``)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def read_header(path: Path | str, *, subject: str | None = None) -> pydicom.Dataset | None:
    """The header of a DICOM image file (pixels not read), or None for a file that is not DICOM or not an
    image (a DICOMDIR). A DICOM file that is damaged (see the module docstring) is an :class:`InputError`."""
    try:
        # Every element is read but the large ones (the pixels, CSA headers), whose offset and length are kept.
        ds = pydicom.dcmread(str(path), defer_size="16 KB")
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, AttributeError) as exc:
        if has_dicom_marker(path) or str(path).lower().endswith(DICOM_SUFFIXES):
            reason = (
                "no 'DICM' marker after the 128-byte preamble"
                if isinstance(exc, InvalidDicomError)
                else " ".join(str(exc).split())[:200] or type(exc).__name__
            )
            raise InputError(
                f"damaged DICOM file: its header cannot be read ({reason})",
                subject=subject,
                path=path,
            ) from None
        return None
    meta_class = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
    if meta_class == _MEDIA_DIRECTORY:
        return None
    if "SeriesInstanceUID" not in ds:
        raise InputError(
            "damaged DICOM file: its header has no SeriesInstanceUID", subject=subject, path=path
        )
    if str(ds.get("SOPClassUID", meta_class)) in IMAGE_SOP_CLASSES:
        _check_pixels(ds, Path(path), subject)
    return ds


def _check_pixels(ds: pydicom.Dataset, path: Path, subject: str | None) -> None:
    """Refuse an image whose pixel data the file does not hold in full, or whose pixel spacing is absurd."""
    element = ds._dict.get(0x7FE00010)  # noqa: SLF001 - the raw element keeps where its value lies
    if element is None:
        raise InputError("damaged DICOM image: no pixel data", subject=subject, path=path)
    length = getattr(element, "length", None)
    tell = getattr(element, "value_tell", None)
    if tell is not None and length is not None and length != 0xFFFFFFFF:
        size = path.stat().st_size
        if tell + length > size:
            raise InputError(
                f"damaged DICOM image: the file ends {tell + length - size} bytes before the end of its "
                f"pixel data ({length} bytes)",
                subject=subject,
                path=path,
            )
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is not None and not syntax.is_compressed:
            frames = int(_number(ds.get("NumberOfFrames")) or 1)
            samples = int(_number(ds.get("SamplesPerPixel")) or 1)
            bits = int(_number(ds.get("BitsAllocated")) or 16)
            needed = int(_number(ds.get("Rows")) or 0) * int(_number(ds.get("Columns")) or 0)
            needed = needed * frames * samples * bits // 8
            if length < needed:
                raise InputError(
                    f"damaged DICOM image: {length} bytes of pixel data where Rows, Columns, "
                    f"NumberOfFrames and BitsAllocated need {needed}",
                    subject=subject,
                    path=path,
                )
    low, high = PIXEL_MM_RANGE
    for where, spacing in _pixel_spacings(ds):
        values = [_number(v) for v in (spacing if isinstance(spacing, list | tuple) else [spacing])]
        if len(values) != 2 or not all(v is not None and low <= v <= high for v in values):
            shown = [str(v) for v in (spacing if isinstance(spacing, list | tuple) else [spacing])]
            raise InputError(
                f"PixelSpacing {'/'.join(shown) or 'empty'} mm{where}: a pixel must measure between "
                f"{low:g} and {high:g} mm (a damaged or edited header?)",
                subject=subject,
                path=path,
            )


def _pixel_spacings(ds: pydicom.Dataset) -> list[tuple[str, Any]]:
    """(where, PixelSpacing) of a classic image, or of each functional group of an enhanced one."""
    found = []
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and "PixelMeasuresSequence" in shared[0]:
        found.append(
            (" (shared functional groups)", shared[0].PixelMeasuresSequence[0].get("PixelSpacing"))
        )
    for i, item in enumerate(ds.get("PerFrameFunctionalGroupsSequence") or []):
        if "PixelMeasuresSequence" in item:
            found.append((f" (frame {i + 1})", item.PixelMeasuresSequence[0].get("PixelSpacing")))
    if not found:
        found.append(("", ds.get("PixelSpacing")))
    return [(where, list(value) if value is not None else []) for where, value in found]


def scan_folder(
    folder: Path | str, *, subject: str | None = None
) -> tuple[list[Series], list[str]]:
    """Every series under ``folder`` (sorted by series number and acquisition), and the files that are not
    DICOM (skipped). Raises :class:`InputError` when the folder is missing or holds no DICOM at all, and for
    a damaged file (see the module docstring)."""
    folder = Path(os.path.abspath(folder))
    if not folder.is_dir():
        raise InputError("DICOM folder not found", subject=subject, path=folder)
    groups: dict[str, list[tuple[int, str, pydicom.Dataset]]] = {}
    skipped = []
    for rel, _, _ in list_files(folder, subject=subject):
        path = folder / rel
        ds = read_header(path, subject=subject)
        if ds is None:
            skipped.append(rel)
            continue
        number = _number(ds.get("InstanceNumber"))
        groups.setdefault(str(ds.SeriesInstanceUID), []).append(
            (int(number) if number is not None else 0, str(path), ds)
        )
    if not groups:
        raise InputError(
            "no DICOM files found (searched every sub-folder)", subject=subject, path=folder
        )
    series = [
        _series(uid, sorted(members, key=lambda m: m[:2]), subject=subject)
        for uid, members in groups.items()
    ]
    series.sort(
        key=lambda s: (s.acquired or "~", s.number if s.number is not None else 1 << 30, s.uid)
    )
    if skipped:
        log.info("%s: %d files are not DICOM images (skipped)", folder, len(skipped))
    return series, skipped


def patient_of(ds: pydicom.Dataset) -> dict[str, str]:
    """:data:`PATIENT_FIELDS` of a header, as text ("" when absent)."""
    return {key: str(ds.get(key) or "").strip() for key in PATIENT_FIELDS}


def describe_patient(patient: dict[str, str]) -> str:
    """How a message names a patient: the attributes that are set."""
    shown = [f"{key} {value!r}" for key, value in patient.items() if value]
    return ", ".join(shown) or "no patient attributes"


def other_patients(series: list[Series]) -> list[str]:
    """One sentence per series of ``series`` that is of another patient than the first (empty when every
    series agrees on :data:`PATIENT_FIELDS`): a series of another patient's exam filed in this one."""
    if not series:
        return []
    first = series[0]
    return [
        f"{s.label()} is of another patient ({describe_patient(s.patient)}) than {first.label()} "
        f"({describe_patient(first.patient)}); an exam folder must hold one patient's series"
        for s in series[1:]
        if s.patient != first.patient
    ]


def _series(
    uid: str, members: list[tuple[int, str, pydicom.Dataset]], *, subject: str | None = None
) -> Series:
    first = members[0][2]
    patient = patient_of(first)
    for _, path, ds in members[1:]:
        if patient_of(ds) != patient:
            raise InputError(
                f"this file of series {uid} is of another patient ({describe_patient(patient_of(ds))}) "
                f"than the series' first file {Path(members[0][1]).name!r} ({describe_patient(patient)})",
                subject=subject,
                path=path,
            )
    fields = {key: _value(first.get(key)) for key in FIELDS if first.get(key) not in (None, "")}
    if "ContrastBolusAgent" not in fields and first.get("ContrastBolusAgentSequence"):
        fields["ContrastBolusAgent"] = "(ContrastBolusAgentSequence)"
    bvalues: set[float] = set()
    effective: set[float] = set()
    source = ""
    frames = 0
    times = []
    for _, _, ds in members:
        b, eff, src = _bvalues(ds)
        bvalues.update(b)
        effective.update(eff)
        source = source or src
        frames += int(_number(ds.get("NumberOfFrames")) or 1)
        if acquired := _acquired(ds):
            times.append(acquired)
    return Series(
        uid=uid,
        study_uid=str(first.get("StudyInstanceUID", "")),
        files=[path for _, path, _ in members],
        fields=fields,
        acquired=min(times) if times else "",
        frames=frames,
        bvalues=sorted(bvalues),
        bvalues_effective=sorted(effective),
        bvalue_source=source,
        patient=patient,
    )
