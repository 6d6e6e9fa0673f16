"""One exam of the cohort on disk: :func:`make_exam` simulates it and writes the sequences asked for (NIfTI
with BIDS-like JSON sidecars, FSL-style .bval/.bvec), its true lesions (:func:`lesion_table`) and, when asked,
its truth maps on the T1 grid. The workflow's ``cohort`` rule calls it exam by exam."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial.transform import Rotation

from virtual_contrast import layout
from virtual_contrast.atlas import Atlas
from virtual_contrast.cohort import kinetics
from virtual_contrast.cohort.acquisition import (
    DSEG_LABELS,
    T1_STREAMS,
    Exam,
    acquire,
    bias_field,
    fit_grid,
    make_exam_state,
    moved_pose,
    resample_signal,
    simulate,
    subject_to_world,
    t1_series,
)
from virtual_contrast.cohort.anatomy import (
    Anatomy,
    HeadModel,
    head_model,
    make_anatomy,
    subject_to_atlas,
)
from virtual_contrast.cohort.physics import (
    DWI,
    DWI_BVALS,
    DWI_DIRECTIONS,
    DWI_VOXEL_FACTOR,
    FLAIR,
    FLAIR_SLICE_FACTOR,
    NOISE,
    R1_RELAXIVITY,
    T1W,
    T2W,
    flair_ti,
    reference_wm,
)
from virtual_contrast.cohort.plan import session_index, subject_rng
from virtual_contrast.io import InputError, save_image, write_json, write_table, write_text

log = logging.getLogger(__name__)

LESION_COLUMNS = [
    "subject",
    "session",
    "lesion_id",
    "x_mm",
    "y_mm",
    "z_mm",
    "long_axis_mm",
    "short_axis_mm",
    "diameter_mm",
    "kind",
    "atlas_x_mm",
    "atlas_y_mm",
    "atlas_z_mm",
]


def _sidecar(kind: str, extra: dict | None = None) -> dict:
    base = {"MagneticFieldStrength": 3, "Manufacturer": "virtual-contrast synthetic cohort"}
    if kind == "t1":
        base.update(
            RepetitionTime=T1W["tr"],
            EchoTime=T1W["te"],
            FlipAngle=T1W["flip_deg"],
            MRAcquisitionType="3D",
        )
        base["ScanningSequence"] = "GR"
        base["SequenceVariant"] = "SP"
    elif kind == "flair":
        base.update(
            RepetitionTime=FLAIR["tr"],
            EchoTime=FLAIR["te"],
            InversionTime=round(flair_ti(), 4),
            MRAcquisitionType="2D",
        )
    elif kind == "t2":
        base.update(RepetitionTime=T2W["tr"], EchoTime=T2W["te"], MRAcquisitionType="2D")
        base["ScanningSequence"] = "SE"
    else:
        base.update(RepetitionTime=DWI["tr"], EchoTime=DWI["te"], MRAcquisitionType="2D")
    base.update(extra or {})
    return base


def make_exam(
    paths: Mapping[str, Path | str],
    lesions_path: Path | str | None,
    *,
    subject: str,
    session: str,
    seed: int,
    atlas: Atlas | None = None,
    model: HeadModel | None = None,
    native_voxel_mm: float = 2.0,
    deformation_mm: float = 4.0,
    lesions_per_subject: tuple[int, int] = (1, 4),
    lesion_free_fraction: float = 0.3,
    truth_dir: Path | str | None = None,
) -> pd.DataFrame:
    """Simulate one exam and write the sequences named in ``paths``; return (and write) its true lesions.

    ``paths`` maps sequence keys (``t1``, ``t2``, ``flair``, ``low``, ``ref``, ``dwi``, ``bval``, ``bvec``) to files;
    a key left out is not acquired (an incomplete exam). ``lesions_path`` receives the lesion table (see the
    module docstring for the columns; ``session`` is written as given). ``truth_dir`` receives the truth maps
    on the T1 grid. Give ``model`` (from :func:`head_model`) to reuse the atlas preparation across exams.
    The result depends only on (seed, subject, session) and the keyword parameters.
    """
    if model is None:
        if atlas is None:
            raise InputError("make_exam needs the atlas (or a prepared head model)")
        model = head_model(atlas)
    check_parameters(seed, native_voxel_mm, lesions_per_subject)
    unknown = set(paths) - set(layout.BIDS_SEQUENCES)
    if unknown:
        raise InputError(f"unknown sequence key(s) {sorted(unknown)} for subject {subject}")
    anat = make_anatomy(
        model,
        subject,
        seed,
        deformation_mm=deformation_mm,
        lesions_per_subject=lesions_per_subject,
        lesion_free_fraction=lesion_free_fraction,
    )
    exam = make_exam_state(anat, subject, session, seed)
    v = float(native_voxel_mm)
    index = session_index(session)

    def rng_for(sequence: int) -> np.random.Generator:
        """One random stream per sequence, so each is the same whichever others are written."""
        return subject_rng(seed, subject, 6, index, sequence)

    head_world = subject_to_world(exam, (model.surface - model.centre) / anat.scale)
    head_centre = head_world.mean(0)
    # The receive coil's profile is shared by the exam's sequences; each adds a little of its own.
    coil = rng_for(0).normal(0.0, 0.1, 9)

    def bias_for(affine, shape, rng):
        return bias_field(head_centre, affine, shape, coil + rng.normal(0.0, 0.03, 9))

    t1_affine, t1_shape = fit_grid(
        head_world,
        np.diag([-1.0, 1.0, 1.0]),  # LAS, like many DICOM converters
        np.array([0.9375 * v, 0.9375 * v, v]),
        margin_mm=6.0 + v,
        jitter=rng_for(4).uniform(-4, 4, 3),
    )
    streams = {key: rng_for(stream) for key, stream in T1_STREAMS.items()}
    series = t1_series(exam, streams)
    sig = simulate(
        model,
        anat,
        series["t1"],
        t1_affine,
        t1_shape,
        pv_mm=v,
        other_sequences=True,
        truth=truth_dir is not None,
    )
    # One receive field for the three T1 series (same coil, same sequence), fixed in the scanner: the head's
    # movement between series moves the anatomy through it.
    t1_bias = bias_for(t1_affine, t1_shape, streams["t1"])
    for key, acquisition in series.items():
        if key not in paths:
            continue
        rng = streams[key]
        signal = sig["t1"]
        if key != "t1":  # the head lay elsewhere and the agent had spread: simulated on its own
            signal = simulate(model, anat, acquisition, t1_affine, t1_shape, pv_mm=v)["t1"]
        sigma = NOISE["t1"] * reference_wm("t1") * exam.gains["t1"]
        data = acquire(signal, t1_bias, exam.gains["t1"], sigma, rng)
        extra = {}
        if key != "t1":
            dose = kinetics.FULL_DOSE_MMOL_KG * (
                kinetics.LOW_DOSE_FRACTION if key == "low" else 1.0
            )
            extra = {
                "ContrastBolusIngredient": "GADOLINIUM",
                "ContrastDose_mmol_per_kg": dose,
                "ContrastRelaxivity_r1_per_mM_s": R1_RELAXIVITY,
            }
        _write_nifti(data, t1_affine, paths[key], _sidecar("t1", extra))

    if "flair" in paths:
        rng = rng_for(2)
        moved = moved_pose(exam, rng)
        tilt = Rotation.from_euler("x", rng.uniform(-12, 12), degrees=True).as_matrix()
        zooms = np.array([v, v, FLAIR_SLICE_FACTOR * v])
        affine, shape = fit_grid(head_world, tilt, zooms, 6.0 + v, rng.uniform(-4, 4, 3))
        flair = resample_signal(sig["flair"], t1_affine, exam, affine, shape, moved)
        sigma = NOISE["flair"] * reference_wm("flair") * exam.gains["flair"]
        data = acquire(flair, bias_for(affine, shape, rng), exam.gains["flair"], sigma, rng)
        _write_nifti(data, affine, paths["flair"], _sidecar("flair"))

    if "t2" in paths:  # a 2D axial spin echo of its own pose, before the injection (stream 7)
        rng = rng_for(7)
        moved = moved_pose(exam, rng)
        tilt = Rotation.from_euler("y", rng.uniform(-8, 8), degrees=True).as_matrix()
        zooms = np.array([v, v, FLAIR_SLICE_FACTOR * v])
        affine, shape = fit_grid(head_world, tilt, zooms, 6.0 + v, rng.uniform(-4, 4, 3))
        t2 = resample_signal(sig["t2"], t1_affine, exam, affine, shape, moved)
        sigma = NOISE["t2"] * reference_wm("t2") * exam.gains["t2"]
        data = acquire(t2, bias_for(affine, shape, rng), exam.gains["t2"], sigma, rng)
        _write_nifti(data, affine, paths["t2"], _sidecar("t2"))

    if "dwi" in paths:
        rng = rng_for(3)
        moved = moved_pose(exam, rng)
        tilt = Rotation.from_euler("xz", rng.uniform(-12, 12, 2), degrees=True).as_matrix()
        zooms = np.full(3, DWI_VOXEL_FACTOR * v)
        affine, shape = fit_grid(head_world, tilt, zooms, 6.0 + v, rng.uniform(-4, 4, 3))
        b0 = resample_signal(sig["b0"], t1_affine, exam, affine, shape, moved)
        b1000 = resample_signal(sig["b1000"], t1_affine, exam, affine, shape, moved)
        bias = bias_for(affine, shape, rng)
        sigma = NOISE["dwi"] * reference_wm("dwi") * exam.gains["dwi"]
        vols = [
            acquire(b0 if b == 0 else b1000, bias, exam.gains["dwi"], sigma, rng) for b in DWI_BVALS
        ]
        _write_nifti(np.stack(vols, axis=-1), affine, paths["dwi"], _sidecar("dwi"))
        _write_gradients(Path(paths["dwi"]), paths)

    table = lesion_table(model, anat, series["ref"].pose, subject, session)
    if lesions_path is not None:
        write_table(table, lesions_path)
    if truth_dir is not None:
        _write_truth(Path(truth_dir), subject, session, sig, t1_affine, model, anat, series)
    log.info(
        "exam sub-%s%s: %d lesion(s), T1 grid %s at %.2f mm",
        subject,
        f" ses-{session}" if session else "",
        len(table),
        t1_shape,
        v,
    )
    return table


def check_parameters(
    seed: int, native_voxel_mm: float, lesions_per_subject: tuple[int, int]
) -> None:
    if int(seed) < 0:
        raise InputError(f"the cohort seed must be >= 0, got {seed}")
    if not native_voxel_mm > 0:
        raise InputError(f"native_voxel_mm must be positive, got {native_voxel_mm}")
    lo, hi = lesions_per_subject
    if not 0 <= lo <= hi:
        raise InputError(
            f"lesions_per_subject must be (min, max) with 0 <= min <= max, got {lesions_per_subject}"
        )


def _write_gradients(dwi_path: Path, paths: Mapping[str, Path | str]) -> None:
    """FSL-style .bval (one row) and .bvec (three rows, unit vectors; zeros for b = 0)."""
    bvecs, d = [], 0
    for b in DWI_BVALS:
        if b == 0:
            bvecs.append(np.zeros(3))
        else:
            bvecs.append(DWI_DIRECTIONS[d % len(DWI_DIRECTIONS)])
            d += 1
    write_text(
        " ".join(str(b) for b in DWI_BVALS) + "\n",
        paths.get("bval", _with_suffix(dwi_path, ".bval")),
    )
    rows = np.asarray(bvecs).T
    text = "\n".join(" ".join(f"{x:.6f}" for x in row) for row in rows) + "\n"
    write_text(text, paths.get("bvec", _with_suffix(dwi_path, ".bvec")))


def _with_suffix(path: Path, suffix: str) -> Path:
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    return path.with_name(name + suffix)


def _write_nifti(data: np.ndarray, affine: np.ndarray, path: Path | str, sidecar: dict) -> None:
    save_image(data, affine, path, dtype=data.dtype)
    write_json(sidecar, _with_suffix(Path(path), ".json"))


def lesion_table(
    model: HeadModel, anat: Anatomy, exam: Exam, subject: str, session: str
) -> pd.DataFrame:
    """True lesions of one exam (columns :data:`LESION_COLUMNS`), world mm of the T1c grid as the head lay in
    ``exam`` (the full-dose series, for the table make_exam writes)."""
    rows = []
    for les in exam.lesions:
        centre_w = subject_to_world(exam, les.centre)
        centre_a = subject_to_atlas(model, anat, les.centre[None])[0]
        # Ellipsoid (s - c)^T Q (s - c) <= 1 with s - c = R (w - c_w): Q_w = R^T Q R. The T1 grid is
        # axis-aligned, so its axial plane is the world x-y plane; the central section is the largest.
        q = les.axes @ np.diag(1 / les.radii**2) @ les.axes.T
        q_world = exam.rotation.T @ q @ exam.rotation
        eig = np.linalg.eigvalsh(q_world[:2, :2])
        rows.append(
            {
                "subject": subject,
                "session": session,
                "lesion_id": les.lesion_id,
                "x_mm": round(float(centre_w[0]), 3),
                "y_mm": round(float(centre_w[1]), 3),
                "z_mm": round(float(centre_w[2]), 3),
                "long_axis_mm": round(float(2 / np.sqrt(eig[0])), 3),
                "short_axis_mm": round(float(2 / np.sqrt(eig[1])), 3),
                "diameter_mm": round(les.diameter_mm, 3),
                "kind": les.kind,
                "atlas_x_mm": round(float(centre_a[0]), 3),
                "atlas_y_mm": round(float(centre_a[1]), 3),
                "atlas_z_mm": round(float(centre_a[2]), 3),
            }
        )
    return pd.DataFrame(rows, columns=LESION_COLUMNS)


def _write_truth(folder, subject, session, t1, affine, model, anat, series) -> None:
    exam = series["t1"].pose
    prefix = f"sub-{subject}" + (f"_ses-{session}" if session else "")
    base = folder / f"sub-{subject}" / (f"ses-{session}" if session else "") / "anat"
    save_image(t1["dseg"], affine, base / f"{prefix}_space-T1w_dseg.nii.gz", dtype=np.uint8)
    save_image(
        t1["brain"], affine, base / f"{prefix}_space-T1w_desc-brain_mask.nii.gz", dtype=np.uint8
    )
    save_image(
        t1["lesions"], affine, base / f"{prefix}_space-T1w_desc-lesions_dseg.nii.gz", dtype=np.int16
    )
    # world -> atlas, affine part (the smooth warp of a few mm comes on top): a = c + S R (w - t)
    sr = np.diag(anat.scale) @ exam.rotation
    to_atlas = np.eye(4)
    to_atlas[:3, :3] = sr
    to_atlas[:3, 3] = model.centre - sr @ exam.translation
    write_json(
        {
            "world_to_atlas_affine": to_atlas,
            "head_scale": anat.scale,
            "rotation": exam.rotation,
            "translation_mm": exam.translation,
            "max_deformation_mm": float(np.sqrt((anat.warp**2).sum(0)).max()),
            "contrast_timeline": exam.timeline.to_dict(),
            "series": {
                key: {
                    "rotation": s.pose.rotation,
                    "translation_mm": s.pose.translation,
                    "plasma_mM": s.plasma_mm,
                    "tumour_mM": {str(k): c for k, c in s.tumour_mm.items()},
                }
                for key, s in series.items()
            },
            "indication": anat.indication,
            "dseg_labels": DSEG_LABELS,
        },
        base / f"{prefix}_desc-truth.json",
    )
