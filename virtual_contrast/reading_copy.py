"""Reading copies: the one gate through which every image of the reader study reaches a reader.

Whatever a reader receives for a case, the NIfTI files of the reading lists, the de-identified DICOM series, the
images the reading page downloads, is made by :func:`reading_copy` and encoded by :func:`reading_nifti` or by
the DICOM writer from the copy's stored values. Nothing else writes a reader's image, so a later mode (a
non-blinded review) has to pass here as well, and whatever this module equalises holds for all of them.

A copy depends on the image's intensity statistics only through rules that are the same for the low-dose
image, vir-T1c, the full dose and the companion series:

* **Scale.** The 1st and 99th percentiles of the image's own brain (its non-zero voxels: every image of the
  study is 0 outside the brain) are mapped linearly onto the stored levels :data:`P1_LEVEL` and
  :data:`P99_LEVEL`, with nothing clipped. The normalised low-dose image once had its 99th percentile at exactly
  1 and a plateau there (the normalisation's clip) while vir-T1c had neither, and "99th percentile == 1"
  separated every low case from every vir case of the demo's lists; recomputed on each image, the anchors are
  the same numbers for every copy.
* **Encoding.** Unsigned 16-bit integers, 0 outside the brain, at least 1 inside; no rescale slope or
  intercept; the same fresh header for every copy (NIfTI: only dimensions, voxel size, affine and the display
  window; DICOM: see :mod:`virtual_contrast.dicom.deid`). A brain value that would fall outside 1-65535 is an
  error, never a clip.
* **Window.** One display window for every copy, :data:`WINDOW` (in stored levels): the 1st percentile to 1.25
  times the 1st-99th span above it, written as NIfTI cal_min/cal_max (which the viewer shows first) and as
  DICOM WindowCenter/WindowWidth. A window taken from each image's percentiles told the low dose from vir-T1c
  on every DICOM case (centres 2129-2153 against 2008-2056).
* **Per case.** A uniform dither of half a level (1/4000 of the 1st-99th span, far below anything visible) is
  added before rounding, drawn from the case id and the series name, so that the same pre-contrast T1 or
  FLAIR shown beside a phase-1 case and beside the same patient's phase-2 case is not byte-identical.
* **Size.** Stored uncompressed (NIfTI ``.nii``, DICOM without compression): a compressed size grows with the
  image's noise, and vir-T1c, smoother than the low dose, would compress better.

What cannot be equalised is the image itself: vir-T1c is smoother than the low-dose T1c (less noise, softer
edges), and its enhancement is that of a full dose; a reader may see it, and the reading study measures what
readers find in each image, not whether they can tell them apart.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from virtual_contrast.io import InputError, atomic_path, load_image

#: Stored level of the 1st and of the 99th percentile of the image's brain.
P1_LEVEL = 2000
P99_LEVEL = 4000
#: Data type of every stored copy (NIfTI and DICOM).
STORED_DTYPE = np.uint16
#: The display window of every copy, (lowest, highest) stored level: the 1st percentile to 1.25 spans above it.
WINDOW = (float(P1_LEVEL), P1_LEVEL + 1.25 * (P99_LEVEL - P1_LEVEL))
#: Amplitude of the per-case dither, in stored levels (uniform in [-DITHER, DITHER)).
DITHER = 0.5
#: File names of a reading copy end so (uncompressed NIfTI: see the module docstring).
NIFTI_SUFFIX = ".nii"


@dataclass(frozen=True)
class ReadingCopy:
    """An image as a reader receives it: stored levels (uint16, 0 outside the brain) on ``affine``."""

    stored: np.ndarray
    affine: np.ndarray

    @property
    def window_centre_width(self) -> tuple[float, float]:
        """:data:`WINDOW` as (centre, width), as DICOM writes it."""
        return (WINDOW[0] + WINDOW[1]) / 2, WINDOW[1] - WINDOW[0]


def _dither(shape: tuple[int, ...], seed: str) -> np.ndarray:
    digest = hashlib.sha256(seed.encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return rng.uniform(-DITHER, DITHER, shape)


def reading_copy(
    data: np.ndarray, affine: np.ndarray, *, seed: str, source: Path | str | None = None
) -> ReadingCopy:
    """The reading copy of ``data`` (any image of the study, 0 outside the brain): see the module docstring.

    ``seed`` names the copy (case id and series): it draws the dither. ``source`` only names the file in
    errors.
    """
    data = np.asarray(data, dtype=np.float64)
    brain = np.isfinite(data) & (data != 0)
    if not np.isfinite(data).all():
        raise InputError("the image has NaN or infinite voxels: no reading copy", path=source)
    if brain.sum() < 2:
        raise InputError("the image is empty (0 everywhere): no reading copy", path=source)
    lo, hi = np.percentile(data[brain], [1.0, 99.0])
    if not hi > lo:
        raise InputError("the image is constant inside the brain: no reading copy", path=source)
    levels = P1_LEVEL + (data - lo) * ((P99_LEVEL - P1_LEVEL) / (hi - lo))
    levels = levels + _dither(data.shape, seed)
    inside = levels[brain]
    if inside.min() < 1 or inside.max() > np.iinfo(STORED_DTYPE).max:
        # A reading copy never clips: a plateau would tell the image's range (issue 25).
        raise InputError(
            f"the image's brain values span {inside.min():.0f} to {inside.max():.0f} stored levels (1st "
            f"percentile at {P1_LEVEL}, 99th at {P99_LEVEL}), beyond the 1-65535 of a reading copy",
            path=source,
        )
    stored = np.where(brain, np.maximum(np.rint(levels), 1), 0).astype(STORED_DTYPE)
    return ReadingCopy(stored=stored, affine=np.asarray(affine, dtype=np.float64))


def load_reading_copy(path: Path | str, *, seed: str, subject: str | None = None) -> ReadingCopy:
    """:func:`reading_copy` of an image file (a pre-processed image, a prediction, or a reading copy again:
    the copy of a copy has the same levels up to the dither)."""
    img = load_image(path, subject=subject)
    try:
        return reading_copy(np.asanyarray(img.dataobj), img.affine, seed=seed, source=path)
    except InputError as exc:
        raise InputError(exc.reason, subject=subject, path=path) from exc


def reading_nifti(copy: ReadingCopy) -> nib.Nifti1Image:
    """The NIfTI image of a copy: a fresh header holding only the dimensions, voxel size, affine (qform and
    sform, code 1) and :data:`WINDOW` (cal_min, cal_max); no description, intent, slope or intercept."""
    img = nib.Nifti1Image(copy.stored, copy.affine)
    img.set_qform(copy.affine, code=1)
    img.set_sform(copy.affine, code=1)
    header = img.header
    header.set_data_dtype(STORED_DTYPE)
    header.set_xyzt_units("mm", "sec")
    header["cal_min"], header["cal_max"] = WINDOW
    return img


def reading_nifti_bytes(copy: ReadingCopy) -> bytes:
    """The uncompressed ``.nii`` bytes of :func:`reading_nifti` (what the reading page downloads)."""
    return reading_nifti(copy).to_bytes()


def write_reading_nifti(copy: ReadingCopy, path: Path | str) -> Path:
    """Write :func:`reading_nifti` to ``path`` (a ``.nii`` name), atomically."""
    path = Path(path)
    if path.name.endswith(".gz"):
        raise ValueError(f"reading copies are stored uncompressed, not as {path.name}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(reading_nifti_bytes(copy))
    return path
