"""Out-of-fold predictions of the training subjects, and the uncertainty calibration fitted on them.

Each training subject tuned exactly one fold model (:func:`~virtual_contrast.model.folds.fold_members`): that
model never trained on it, so its prediction has a test subject's kind of error, and costs one model's 8
mirror passes. The uncertainty calibration (:mod:`virtual_contrast.model.uncertainty`) is fitted on these
only, never on test patients; the per-lesion comparison of the training subjects reads them too.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from virtual_contrast.io import InputError, load_image, save_image
from virtual_contrast.model.folds import read_folds
from virtual_contrast.model.predict import FlipSpec, predict_subject
from virtual_contrast.model.uncertainty import (
    SPREAD_VOLUMES,
    Calibration,
    draw_voxels,
    fit_calibration,
    uncertainty_map,
    voxel_features,
    voxel_quota,
)

log = logging.getLogger(__name__)


def fold_of(folds_path: Path | str, subject: str) -> int:
    """The fold whose tuning set holds ``subject`` (a training subject)."""
    folds = read_folds(folds_path)
    row = folds[folds["subject"].astype(str) == str(subject)]
    if row.empty:
        raise InputError(
            "not a training subject of the folds table", subject=subject, path=folds_path
        )
    return int(row["fold"].iloc[0])


def predict_out_of_fold(
    models: Mapping[int, Path | str],
    folds_path: Path | str,
    subject: str,
    channel_paths: Mapping[str, Path | str],
    out_path: Path | str,
    spread_path: Path | str,
    *,
    mask_path: Path | str | None = None,
    device: str = "auto",
    flips: FlipSpec = "all8",
) -> int:
    """vir-T1c of a training subject by the fold model it tuned, and the spread of that model's passes;
    returns the fold."""
    fold = fold_of(folds_path, subject)
    if fold not in models:
        raise InputError(f"no model of fold {fold}", subject=subject, path=folds_path)
    predict_subject(
        [models[fold]],
        dict(channel_paths),
        out_path,
        device=device,
        flips=flips,
        mask_path=mask_path,
        subject=subject,
        spread_path=spread_path,
    )
    log.info("sub-%s: out of fold, by the model of fold %d", subject, fold)
    return fold


def _array(path: Path | str, subject: str, ndim: int = 3) -> np.ndarray:
    return np.asanyarray(load_image(path, subject=subject, ndim=ndim).dataobj, dtype=np.float32)


def subject_features(
    *, vir: Path, spread: Path, low: Path, pre: Path, mask: Path, subject: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(voxel features of the brain voxels, vir array, brain mask) of one subject from its files."""
    spreads = _array(spread, subject, ndim=4)
    if spreads.shape[-1] != len(SPREAD_VOLUMES):
        raise InputError(
            f"expected {len(SPREAD_VOLUMES)} spread volumes {SPREAD_VOLUMES}",
            subject=subject,
            path=spread,
        )
    inside = _array(mask, subject) > 0.5
    vir_data = _array(vir, subject)
    features = voxel_features(
        vir_data,
        _array(low, subject),
        _array(pre, subject),
        spreads[..., SPREAD_VOLUMES.index("std_mirrors")],
        inside,
    )
    return features, vir_data, inside


def fit_from_files(
    subjects: Sequence[Mapping[str, Path | str]], out: Path | str, *, threads: int | None = None
) -> Calibration:
    """Fit the calibration on training subjects' out-of-fold files (each a mapping with ``subject``,
    ``vir``, ``spread``, ``low``, ``pre``, ``ref``, ``mask``) on ``threads`` threads and write it to
    ``out``."""
    samples, ids, n_voxels = [], [], 0
    quota = voxel_quota(len(subjects))
    for i, item in enumerate(subjects):
        subject = str(item["subject"])
        features, vir, inside = subject_features(
            **{k: Path(item[k]) for k in ("vir", "spread", "low", "pre", "mask")}, subject=subject
        )
        error = np.abs(vir - _array(item["ref"], subject))[inside]
        n_voxels += len(error)
        samples.append(draw_voxels(features, error, quota, i))  # what the fit draws: memory bounded
        ids.append(subject)
    calibration = fit_calibration(samples, ids, threads=threads, n_voxels=n_voxels)
    calibration.save(out)
    return calibration


def uncertainty_from_files(
    calibration: Path | str,
    *,
    vir: Path,
    spread: Path,
    low: Path,
    pre: Path,
    mask: Path,
    out: Path | str,
    subject: str,
) -> Path:
    """The calibrated uncertainty map of a prediction already written with its spreads (out of fold)."""
    cal = Calibration.load(calibration)
    spreads = _array(spread, subject, ndim=4)
    image = load_image(vir, subject=subject)
    unc, _ = uncertainty_map(
        cal,
        vir=np.asanyarray(image.dataobj, dtype=np.float32),
        low=_array(low, subject),
        pre=_array(pre, subject),
        std_passes=spreads[..., 0],
        std_mirrors=spreads[..., SPREAD_VOLUMES.index("std_mirrors")],
        mask=_array(mask, subject),
    )
    return save_image(unc, image.affine, out)
