"""Does anything in the reading copies tell a low-dose case from a vir-T1c case? Simple statistics of every post
image of the reading lists, as a curious reader could compute them, and how well each one separates the two.

For each case of the key read as ``low`` or ``vir`` and for each form a reader receives it in (the NIfTI file of
the lists, the DICOM series, the bytes the reading page downloads), :func:`reading_list_statistics` records:

* of the brain's stored values (the non-zero voxels), :data:`CONTENT_STATISTICS`: the fraction at the image's
  maximum (**plateau**: what a clip leaves), the 1st and 99th percentiles (**anchors**: the reading copy puts
  them at fixed levels, so they differ by rounding only), the 99.5th and 99.9th percentiles and the maximum
  (**tail**: the image's brightest enhancement);
* **encoding** (:data:`ENCODING_STATISTICS`): data type, size in bytes, display window, and a digest of every
  header field that is not unique by design (DICOM UIDs are new for every series).

:func:`separation` gives, per statistic and form, the area under the ROC curve of telling vir from low by it (the
Mann-Whitney probability that a vir case scores higher, ties counting one half; for a text field, the most
separating of its values as an indicator). 0.5 tells nothing; a plateau or encoding statistic outside
:data:`AUC_BOUNDS` breaks the blinding (:data:`BLINDING_KINDS`). The tail is the image itself: vir-T1c
enhances like a full dose, brighter than the quarter dose it was computed from, and no encoding can equalise
that without changing what the reader is to judge; it is reported, not bounded.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from virtual_contrast.reader.protocol import CASE_IMAGE, case_folder, load_key

#: A statistic that separates low from vir with an AUC outside these bounds breaks the blinding.
AUC_BOUNDS = (0.2, 0.8)
CONTENT_STATISTICS = ("fraction_at_max", "p1", "p99", "p99_5", "p99_9", "max")
ENCODING_STATISTICS = ("dtype", "bytes", "window_centre", "window_width", "header")
#: What each statistic measures (see the module docstring).
KINDS = (
    {"fraction_at_max": "plateau", "p1": "anchor", "p99": "anchor"}
    | {s: "tail" for s in ("p99_5", "p99_9", "max")}
    | {s: "encoding" for s in ENCODING_STATISTICS}
)
#: The kinds whose AUC must lie within AUC_BOUNDS (anchors are checked against their levels instead: their
#: spread is rounding, whose AUC is chance).
BLINDING_KINDS = ("plateau", "encoding")
#: The forms a reader receives a case in.
FORMS = ("nifti", "dicom", "served")
#: DICOM attributes that differ between any two series by design (new UIDs), left out of the header digest.
_UNIQUE_PER_SERIES = {
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "FrameOfReferenceUID",
    "MediaStorageSOPInstanceUID",
    "PixelData",
}


def value_statistics(stored: np.ndarray) -> dict[str, float]:
    """:data:`CONTENT_STATISTICS` of an image's brain (its non-zero voxels)."""
    values = np.asarray(stored, dtype=np.float64)
    brain = values[values != 0]
    top = float(brain.max())
    p1, p99, p99_5, p99_9 = np.percentile(brain, [1, 99, 99.5, 99.9])
    return {
        "fraction_at_max": float(np.mean(brain == top)),
        "p1": float(p1),
        "p99": float(p99),
        "p99_5": float(p99_5),
        "p99_9": float(p99_9),
        "max": top,
    }


def nifti_statistics(raw: bytes) -> dict:
    """Statistics of the bytes of an uncompressed NIfTI image (a file of the lists, or what the page gets)."""
    img = nib.Nifti1Image.from_bytes(raw)
    header = img.header
    stored = np.asanyarray(img.dataobj.get_unscaled())
    return {
        **value_statistics(stored),
        "dtype": str(header.get_data_dtype()),
        "bytes": len(raw),
        "window_centre": float(header["cal_min"] + header["cal_max"]) / 2,
        "window_width": float(header["cal_max"] - header["cal_min"]),
        "header": hashlib.sha256(header.binaryblock).hexdigest()[:16],
    }


def dicom_statistics(folder: Path) -> dict:
    """Statistics of a DICOM series (one file per slice), its pixels stacked."""
    import pydicom

    files = sorted(folder.glob("*.dcm"))
    datasets = [pydicom.dcmread(path) for path in files]
    stored = np.stack([ds.pixel_array for ds in datasets])
    digest = hashlib.sha256()
    for ds in datasets[:1]:
        for element in [*ds.file_meta, *ds]:
            if element.keyword not in _UNIQUE_PER_SERIES:
                digest.update(f"{element.tag}{element.VR}{element.value!r}".encode())
    first = datasets[0]
    return {
        **value_statistics(stored),
        "dtype": f"{first.BitsStored} bits, representation {first.PixelRepresentation}",
        "bytes": int(sum(len(ds.PixelData) for ds in datasets)),
        "window_centre": float(first.WindowCenter),
        "window_width": float(first.WindowWidth),
        "header": digest.hexdigest()[:16],
    }


def reading_list_statistics(
    lists_dir: Path | str, key_path: Path | str, *, forms: tuple[str, ...] = FORMS
) -> pd.DataFrame:
    """One row per (low or vir case, form) with the statistics of its post image; a form absent from the
    lists (no DICOM series) is left out. ``served``: the bytes the reading server sends for the case."""
    lists_dir = Path(lists_dir)
    key = load_key(key_path)
    key = key[key["modality"].isin(["low", "vir"])]
    rows = []
    for case in key.itertuples(index=False):
        folder = case_folder(lists_dir, case.reader, case.phase)
        ident = {
            "case_id": case.case_id,
            "reader": case.reader,
            "phase": int(case.phase),
            "patient": case.patient,
            "modality": case.modality,
        }
        nifti = folder / CASE_IMAGE.format(case_id=case.case_id)
        if "nifti" in forms and nifti.exists():
            rows.append(ident | {"form": "nifti"} | nifti_statistics(nifti.read_bytes()))
        dicom = folder / case.case_id / "post"
        if "dicom" in forms and dicom.is_dir():
            rows.append(ident | {"form": "dicom"} | dicom_statistics(dicom))
    if "served" in forms:
        rows += _served_rows(lists_dir, Path(key_path), key)
    return pd.DataFrame(rows)


def _served_rows(lists_dir: Path, key_path: Path, key: pd.DataFrame) -> list[dict]:
    """What the reading server sends for each post image (its own encoder, as a session would run it)."""
    from virtual_contrast.reader.server import ImageCache
    from virtual_contrast.reader.session import ReadingSession

    rows = []
    with tempfile.TemporaryDirectory(prefix="blinding-") as out:
        for (reader, phase), _ in key.groupby(["reader", "phase"]):
            session = ReadingSession(lists_dir, key_path, reader, Path(out), phase=int(phase))
            cache = ImageCache(session)
            try:
                for case in session.cases:
                    raw = cache.get(case.case_id, "post")
                    rows.append(
                        {
                            "case_id": case.case_id,
                            "reader": reader,
                            "phase": int(phase),
                            "patient": case.patient,
                            "modality": case.modality,
                            "form": "served",
                        }
                        | nifti_statistics(raw)
                    )
            finally:
                cache.close()
    return rows


def auc_vir_above_low(low: np.ndarray, vir: np.ndarray) -> float:
    """P(a vir value > a low value) + half P(tie): the ROC area of telling vir from low by the value."""
    low, vir = np.asarray(low, float), np.asarray(vir, float)
    greater = (vir[:, None] > low[None, :]).mean()
    ties = (vir[:, None] == low[None, :]).mean()
    return float(greater + 0.5 * ties)


def _median(values: pd.Series) -> float:
    return float(values.median()) if pd.api.types.is_numeric_dtype(values) else float("nan")


def separation(table: pd.DataFrame) -> pd.DataFrame:
    """Per form and statistic: the AUC of telling vir from low by it, the numbers of cases, and whether it
    lies within :data:`AUC_BOUNDS`."""
    rows = []
    for form, group in table.groupby("form", sort=False):
        is_vir = (group["modality"] == "vir").to_numpy()
        for statistic in (*CONTENT_STATISTICS, *ENCODING_STATISTICS):
            values = group[statistic]
            if pd.api.types.is_numeric_dtype(values):
                auc = auc_vir_above_low(values[~is_vir], values[is_vir])
            else:  # a text field: each of its values as an indicator, the most separating one
                aucs = [
                    auc_vir_above_low(
                        (values[~is_vir] == v).astype(float), (values[is_vir] == v).astype(float)
                    )
                    for v in values.unique()
                ]
                auc = max(aucs, key=lambda a: abs(a - 0.5))
            rows.append(
                {
                    "form": form,
                    "statistic": statistic,
                    "kind": KINDS[statistic],
                    "auc": auc,
                    "n_low": int((~is_vir).sum()),
                    "n_vir": int(is_vir.sum()),
                    "low_median": _median(values[~is_vir]),
                    "vir_median": _median(values[is_vir]),
                    "distinct_values": int(values.nunique()),
                    "within_bounds": AUC_BOUNDS[0] <= auc <= AUC_BOUNDS[1],
                }
            )
    return pd.DataFrame(rows)
