"""The reference series of an export: its header and the grid of its slices (classic or enhanced MR)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from virtual_contrast.dicom.scan import IMAGE_SOP_CLASSES, Series, scan_folder
from virtual_contrast.io import InputError


@dataclass
class Reference:
    """The reference series: its first header and the grid of its slices."""

    header: Dataset
    series: Series
    affine_lps: np.ndarray  # (column, row, slice) index -> LPS mm
    shape: tuple[int, int, int]  # columns, rows, slices
    sop_instances: list[tuple[str, str]]  # (SOP class, SOP instance) of each file


def from_groups(ds: Dataset, sequence: str, keyword: str, frame: int = 0):
    """``keyword`` inside a functional-group ``sequence`` (shared first, then frame ``frame``), or None."""
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        items = ds.get(groups)
        if not items:
            continue
        item = items[0] if groups.startswith("Shared") else items[frame]
        if sequence in item and keyword in item[sequence][0]:
            return item[sequence][0][keyword].value
    return None


def _planes(ds: Dataset) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(position, orientation, pixel spacing) of each frame of one file."""
    n = int(ds.get("NumberOfFrames") or 1)
    if "PerFrameFunctionalGroupsSequence" in ds:
        return [
            (
                np.array(
                    from_groups(ds, "PlanePositionSequence", "ImagePositionPatient", f), float
                ),
                np.array(
                    from_groups(ds, "PlaneOrientationSequence", "ImageOrientationPatient", f),
                    float,
                ),
                np.array(from_groups(ds, "PixelMeasuresSequence", "PixelSpacing", f), float),
            )
            for f in range(n)
        ]
    return [
        (
            np.array(ds.ImagePositionPatient, float),
            np.array(ds.ImageOrientationPatient, float),
            np.array(ds.PixelSpacing, float),
        )
    ]


def read_reference(like: Path | str | Series, series_uid: str | None = None) -> Reference:
    """The reference series (a :class:`Series`, or the one image series in a folder, or ``series_uid`` there)
    and the grid of its slices."""
    if isinstance(like, Series):
        return _reference(like)
    folder = Path(like)
    found, _ = scan_folder(folder)
    images = [s for s in found if str(s.fields.get("SOPClassUID", "")) in IMAGE_SOP_CLASSES]
    if series_uid:
        images = [s for s in images if s.uid == series_uid]
        if not images:
            raise InputError(f"no MR image series with UID {series_uid}", path=folder)
    if len(images) != 1:
        names = ", ".join(s.label() for s in images) or "none"
        raise InputError(
            f"expected one MR image series, found {names}: give --series-uid", path=folder
        )
    return _reference(images[0])


def _reference(series: Series) -> Reference:
    planes, sops = [], []
    header = None
    for path in series.files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        header = header or ds
        planes += _planes(ds)
        sops.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
    orientation, spacing = planes[0][1], planes[0][2]
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    # Slices in the reference's own order (instance, then frame) when it runs monotonically through the
    # volume, so that instance numbers of both series correspond; else sorted along the normal.
    positions = [p for p, _, _ in planes]
    depth = np.diff([float(p @ normal) for p in positions])
    if not (np.all(depth > 0) or np.all(depth < 0)):
        positions.sort(key=lambda p: float(p @ normal))
    step = (positions[-1] - positions[0]) / (len(positions) - 1) if len(positions) > 1 else normal
    thickness = float(header.get("SliceThickness") or 0) or float(np.linalg.norm(step))
    if len(positions) == 1:
        step = normal * thickness
    affine = np.eye(4)
    affine[:3, 0] = row_dir * spacing[1]
    affine[:3, 1] = col_dir * spacing[0]
    affine[:3, 2] = step
    affine[:3, 3] = positions[0]
    shape = (int(header.Columns), int(header.Rows), len(positions))
    return Reference(header, series, affine, shape, sops)
