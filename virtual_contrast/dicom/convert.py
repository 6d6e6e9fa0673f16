"""Convert the chosen series of an exam with ``dcm2niix`` and file them under the workflow's BIDS-like names.

Each series is converted on its own (its files linked into a scratch folder), so that one dcm2niix run gives
one NIfTI with its BIDS sidecar (and ``.bval``/``.bvec`` for the DWI); a series that dcm2niix splits (echoes,
phase, differing geometry) is refused rather than guessed at. Every check runs before any file is moved into
place: an exam either imports completely or leaves nothing.

b-values: dcm2niix writes what the headers give; for United Imaging that is the *effective* b-value (private
(0065,1009), e.g. 929.75 for a nominal 1000, and 1.25 for a nominal 0), which accounts for the imaging
gradients' own diffusion weighting. It is kept: the signal decays with the effective b-value, so it is the one
that gives the right ADC (with the nominal 1000 the ADC would come out 7 % too low). The nominal values are in
the import report.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from virtual_contrast.dicom import sidecar
from virtual_contrast.dicom.rules import ROLE_LABELS, ROLES, Classification, SeriesMap, classify
from virtual_contrast.dicom.scan import Series, other_patients, scan_folder
from virtual_contrast.io import InputError, scratch_folder, write_table
from virtual_contrast.preprocess.inputs import check_voxel_sizes

log = logging.getLogger(__name__)

#: Columns of the import report, one row per series found.
REPORT_COLUMNS = (
    "series_number",
    "series_description",
    "status",
    "role",
    "file",
    "reason",
    "n_files",
    "acquired",
    "bvalues",
    "series_uid",
)


@dataclass(frozen=True)
class Dcm2niix:
    path: str
    version: str


def find_dcm2niix() -> Dcm2niix:
    """The dcm2niix converter: the pinned PyPI package's binary when installed, else the one on PATH."""
    candidates = []
    try:
        import dcm2niix  # the PyPI wheel ships the binary inside the package

        candidates.append(str(dcm2niix.bin))
    except ImportError:
        pass
    candidates.append(shutil.which("dcm2niix") or "")
    for path in candidates:
        if path and os.access(path, os.X_OK):
            proc = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
            version = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or ["unknown"]
            return Dcm2niix(path, version[0].strip())
    raise InputError(
        "dcm2niix not found: pip install dcm2niix (or put the dcm2niix binary on PATH)"
    )


def convert_series(
    series: Series, out_dir: Path, name: str, tool: Dcm2niix, *, subject: str | None = None
) -> dict[str, Path]:
    """Run dcm2niix on one series into ``out_dir``; return its files by extension (nii.gz, json, bval, bvec)."""
    with tempfile.TemporaryDirectory(prefix="dcm-", dir=out_dir) as scratch:
        src = Path(scratch) / "in"
        src.mkdir()
        for i, path in enumerate(series.files):
            link = src / f"{i:06d}.dcm"
            try:  # absolute: a relative target would be read from the scratch folder
                os.symlink(os.path.abspath(path), link)
            except OSError:
                shutil.copyfile(path, link)
        dst = Path(scratch) / "out"
        dst.mkdir()
        cmd = [tool.path, "-b", "y", "-ba", "y", "-z", "y", "-f", name, "-o", str(dst), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        log.info("%s\n%s%s", " ".join(cmd), proc.stdout, proc.stderr)
        images = sorted(dst.glob("*.nii.gz"))
        if proc.returncode != 0 or len(images) != 1:
            what = [p.name for p in images] or "no image"
            raise InputError(
                f"dcm2niix made {what} from {series.label()} (exit {proc.returncode}), expected one image: "
                f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}",
                subject=subject,
                path=Path(series.files[0]).parent,
            )
        check_voxel_sizes(
            nib.load(images[0]).affine,
            what=f"image dcm2niix made from {series.label()}",
            subject=subject,
            path=Path(series.files[0]).parent,
        )
        files = {"nii.gz": images[0]}
        for ext in ("json", "bval", "bvec"):
            found = dst / f"{name}.{ext}"
            if found.exists():
                files[ext] = found
        kept = {}
        for ext, path in files.items():
            kept[ext] = out_dir / path.name
            os.replace(path, kept[ext])
        return kept


def check_dwi(bval: Path | None, series: Series, *, subject: str | None = None) -> np.ndarray:
    """The b-values dcm2niix wrote; refuses a DWI without a b≈0 and a b≈1000 volume (what the adc step needs)."""
    from virtual_contrast.preprocess.adc import read_bvals, select_shells

    if bval is None:
        raise InputError(
            f"dcm2niix found no b-values in {series.label()}: the DWI needs b=0 and b=1000 volumes "
            f"(b-values in the headers: {series.bvalues or 'none'})",
            subject=subject,
            path=Path(series.files[0]).parent,
        )
    bvals = read_bvals(bval, subject=subject)
    low, high = select_shells(bvals)
    if not low.any() or not high.any():
        raise InputError(
            f"{series.label()} has b-values {sorted(set(np.round(bvals, 2)))}: the DWI needs a b≈0 (≤ 50) and "
            "a b≈1000 (±150) volume",
            subject=subject,
            path=bval,
        )
    return bvals


@dataclass
class ImportResult:
    files: dict[str, Path]  # key of the workflow's BIDS_FILES -> written file
    report: pd.DataFrame
    classification: Classification
    dcm2niix: Dcm2niix


def import_series(
    series: list[Series],
    targets: dict[str, Path],
    report_path: Path,
    *,
    series_map: SeriesMap | None = None,
    subject: str | None = None,
    exam: Path | str | None = None,
    require: tuple[str, ...] = (),
) -> ImportResult:
    """Classify ``series``, convert the used ones and move them onto ``targets`` (raw keys of
    virtual_contrast.sequences: t1, t2, flair, dwi, low, ref, and the DWI's bval, bvec; the JSON sidecar goes
    beside each image). A series whose role has no target (a sequence the study does not use) is reported
    but not converted.

    Refuses (before converting anything) an exam with two candidates for one role, several studies, series
    of several patients, or a missing role listed in ``require``; and (before moving anything into place) a
    converted image whose voxel sizes are out of bounds. Writes the report of every series to ``report_path``.
    """
    studies = sorted({s.study_uid for s in series})
    if len(studies) > 1:
        raise InputError(
            f"the folder holds {len(studies)} studies ({', '.join(studies)}); give one folder per exam",
            subject=subject,
            path=exam,
        )
    others = other_patients(series)
    if others:
        raise InputError("; ".join(others), subject=subject, path=exam)
    result = classify(series, series_map)
    result.raise_if_ambiguous(subject=subject, path=exam)
    roles = result.roles
    missing = [ROLE_LABELS[r] for r in require if r not in roles]
    if missing:
        raise InputError(f"no series found for {', '.join(missing)}", subject=subject, path=exam)
    tool = find_dcm2niix()
    report_path.parent.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    with scratch_folder(report_path.parent, ".import") as scratch:
        staged: dict[str, tuple[Path, Path]] = {}  # key -> (converted file, target)
        for role in ROLES:
            if role not in roles or role not in targets:
                continue
            got = convert_series(roles[role], Path(scratch), role, tool, subject=subject)
            staged[role] = (got["nii.gz"], targets[role])
            if "json" in got:
                staged[f"{role}.json"] = (got["json"], sidecar(targets[role]))
            if role == "dwi":
                check_dwi(got.get("bval"), roles[role], subject=subject)
                staged.update(
                    {ext: (got[ext], targets[ext]) for ext in ("bval", "bvec") if ext in got}
                )
        for key, (src, dst) in staged.items():  # every conversion and check passed: move into place
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(src), dst)
            written[key] = dst
    report = _report(result, targets)
    write_table(report, report_path)
    for row in report.itertuples():
        log.info(
            "series %s %r: %s %s %s",
            row.series_number,
            row.series_description,
            row.status,
            row.role,
            row.reason,
        )
    return ImportResult(written, report, result, tool)


def _report(result: Classification, targets: dict[str, Path]) -> pd.DataFrame:
    rows = []
    for d in result.decisions:
        s = d.series
        bvalues = " ".join(f"{b:g}" for b in s.bvalues)
        if s.bvalues_effective:
            bvalues += " (effective " + " ".join(f"{b:g}" for b in s.bvalues_effective) + ")"
        rows.append(
            {
                "series_number": s.number if s.number is not None else "",
                "series_description": s.description,
                "status": d.status,
                "role": "/".join(ROLE_LABELS[r] for r in d.role.split("/")) if d.role else "",
                "file": targets[d.role].name if d.status == "used" and d.role in targets else "",
                "reason": d.reason,
                "n_files": len(s.files),
                "acquired": s.acquired,
                "bvalues": bvalues,
                "series_uid": s.uid,
            }
        )
    return pd.DataFrame(rows, columns=list(REPORT_COLUMNS))


def import_exam(
    folder: Path | str,
    targets: dict[str, Path],
    report_path: Path,
    *,
    series_map: SeriesMap | None = None,
    subject: str | None = None,
    require: tuple[str, ...] = (),
) -> ImportResult:
    """Scan ``folder`` and import it (see :func:`import_series`)."""
    series, _ = scan_folder(folder, subject=subject)
    return import_series(
        series,
        targets,
        report_path,
        series_map=series_map,
        subject=subject,
        exam=folder,
        require=require,
    )
