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
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

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


def list_files(folder: Path | str) -> list[tuple[str, int, int]]:
    """(path relative to ``folder``, size, mtime in ns) of every file below it, sorted; hidden files skipped."""
    folder = Path(folder)
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            st = os.stat(os.path.join(dirpath, name))
            found.append(
                (os.path.relpath(os.path.join(dirpath, name), folder), st.st_size, st.st_mtime_ns)
            )
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


def read_header(path: Path | str) -> pydicom.Dataset | None:
    """The header of a DICOM file (no pixels), or None for a file that is not a DICOM image."""
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, defer_size="16 KB")
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, AttributeError):
        return None
    meta_class = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
    if meta_class == _MEDIA_DIRECTORY or "SeriesInstanceUID" not in ds:
        return None
    return ds


def scan_folder(
    folder: Path | str, *, subject: str | None = None
) -> tuple[list[Series], list[str]]:
    """Every series under ``folder`` (sorted by series number and acquisition), and the files that are not
    DICOM (skipped). Raises :class:`InputError` when the folder is missing or holds no DICOM at all."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError("DICOM folder not found", subject=subject, path=folder)
    groups: dict[str, list[tuple[int, str, pydicom.Dataset]]] = {}
    skipped = []
    for rel, _, _ in list_files(folder):
        path = folder / rel
        ds = read_header(path)
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
    series = [_series(uid, sorted(members, key=lambda m: m[:2])) for uid, members in groups.items()]
    series.sort(
        key=lambda s: (s.acquired or "~", s.number if s.number is not None else 1 << 30, s.uid)
    )
    if skipped:
        log.info("%s: %d files are not DICOM images (skipped)", folder, len(skipped))
    return series, skipped


def _series(uid: str, members: list[tuple[int, str, pydicom.Dataset]]) -> Series:
    first = members[0][2]
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
    )
