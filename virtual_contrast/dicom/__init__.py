"""DICOM in and out: scanner exams into the workflow's BIDS-like layout, vir-T1c back as a derived series.

* :mod:`~virtual_contrast.dicom.scan`: read the headers of an exam folder (no pixels), one record per series.
* :mod:`~virtual_contrast.dicom.rules`: which series is the T1, FLAIR, DWI, low-dose and full-dose T1c
  (built-in rules and a site's series map); refuses to guess between two candidates.
* :mod:`~virtual_contrast.dicom.convert`: ``dcm2niix`` on the chosen series, filed under BIDS-like names.
* :mod:`~virtual_contrast.dicom.study`: the workflow's ``dicom_dir`` (one folder per exam), planned at parse time.
* :mod:`~virtual_contrast.dicom.export`: a NIfTI volume as a DICOM series placed over a reference series
  (:mod:`~virtual_contrast.dicom.reference`: that series' header and slice grid;
  :mod:`~virtual_contrast.dicom.derivation`: the software and models it names).
* :mod:`~virtual_contrast.dicom.deid`: de-identified series for blinded reading (basic confidentiality profile).
"""

from __future__ import annotations

from pathlib import Path


def sidecar(image: Path | str) -> Path:
    """The BIDS JSON sidecar beside a NIfTI image (``x.nii.gz`` -> ``x.json``)."""
    image = Path(image)
    return image.with_name(image.name.removesuffix(".gz").removesuffix(".nii") + ".json")
