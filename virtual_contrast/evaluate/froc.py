"""Validation and tuning of the automated reader against known lesions (the embedded cohort's truth).

- :func:`validate_detector`: sensitivity and PPV per size bin of the long axis, as the reader statistics
  count them (a true lesion's bin is its true long axis, a false positive's its own measured long axis).
- :func:`froc_table`: the free-response operating characteristic, sensitivity per size bin against false
  positives per patient, at each decision threshold of a grid (:func:`threshold_grid`).
- :func:`choose_operating_point`: the lowest threshold (the most sensitive) whose false positives per patient
  stay within the target; tuned on training subjects only, then frozen for the test subjects.
- :func:`tune_detector`: all of it from the training subjects' images: each subject is read with a
  physiological-enhancement prior built from the *other* training subjects, as a test subject's prior is built
  from training subjects it is not part of, so the training FROC is not flattered by a subject's own vessels
  being in its prior.
- :func:`truth_in_atlas`: true lesion centres (native world mm of the full-dose T1c) moved to atlas space.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from virtual_contrast.evaluate import candidates as cand
from virtual_contrast.evaluate.lesions import (
    LESION,
    DetectorSettings,
    find_candidates,
    prior_from_counts,
)
from virtual_contrast.io import InputError
from virtual_contrast.matching import MatchRule, match_lesions

log = logging.getLogger(__name__)

TRUTH_COLUMNS = ("subject", "x_mm", "y_mm", "z_mm", "long_axis_mm", "short_axis_mm")
#: Size bins (long axis, mm) of the validation and the FROC: [0, 5), [5, 10) and [10, inf), the bins of the
#: detector's goals (sensitivity >= 75 % for 5-10 mm and >= 90 % for lesions of 10 mm or more).
DEFAULT_SIZE_BINS = (0.0, 5.0, 10.0, float("inf"))


def _bin_labels(bins: Sequence[float]) -> list[str]:
    return [f"[{lo:g}, {hi:g})" for lo, hi in zip(bins[:-1], bins[1:], strict=True)]


def validate_detector(
    detections: pd.DataFrame,
    truth: pd.DataFrame,
    *,
    subjects: Sequence[str] | None = None,
    bins: Sequence[float] = DEFAULT_SIZE_BINS,
    rule: MatchRule = "both",
) -> pd.DataFrame:
    """Sensitivity and PPV of the detector against true lesions, per size bin of the long axis.

    Both tables have ``subject, x_mm, y_mm, z_mm, long_axis_mm, short_axis_mm`` (the cohort's ``lesions.tsv``
    and :func:`detect_lesions_from_files` outputs, concatenated). Matching is
    :func:`virtual_contrast.matching.match_lesions` per subject, on all lesions. As in the reader
    statistics, a true lesion's bin is its true long axis (for sensitivity and true positives) and a false
    positive's bin is its own measured long axis; PPV = TP / (TP + FP) in the bin. ``subjects`` defaults to
    every subject in either table; pass the full list so that ``n_subjects`` counts subjects with neither.
    The last row, ``all``, pools every bin.
    """
    for name, df in (("detections", detections), ("truth", truth)):
        missing = [c for c in TRUTH_COLUMNS if c not in df.columns]
        if missing:
            raise InputError(f"{name} table lacks columns {missing}")
    if subjects is None:
        subjects = sorted(
            set(truth["subject"].astype(str)) | set(detections["subject"].astype(str))
        )
    truth = truth.assign(subject=truth["subject"].astype(str))
    detections = detections.assign(subject=detections["subject"].astype(str))
    true_rows, fp_rows = [], []
    for subject in subjects:
        t = truth[truth["subject"] == subject].reset_index(drop=True)
        d = detections[detections["subject"] == subject].reset_index(drop=True)
        ref_to_det, det_to_ref = match_lesions(t, d, rule=rule)
        true_rows.append(pd.DataFrame({"long": t["long_axis_mm"], "detected": ref_to_det >= 0}))
        fp_rows.append(pd.DataFrame({"long": d["long_axis_mm"][det_to_ref < 0]}))
    hits = (
        pd.concat(true_rows, ignore_index=True)
        if true_rows
        else pd.DataFrame(columns=["long", "detected"])
    )
    fps = pd.concat(fp_rows, ignore_index=True) if fp_rows else pd.DataFrame(columns=["long"])
    edges = list(bins)
    rows = []
    for label, lo, hi in [
        *zip(_bin_labels(edges), edges[:-1], edges[1:], strict=True),
        ("all", edges[0], edges[-1]),
    ]:
        in_bin = hits[(hits["long"] >= lo) & (hits["long"] < hi)]
        fp = int(((fps["long"] >= lo) & (fps["long"] < hi)).sum())
        tp = int(in_bin["detected"].sum())
        n_true = len(in_bin)
        rows.append(
            {
                "size_bin": label,
                "min_long_axis_mm": lo,
                "max_long_axis_mm": hi,
                "n_true": n_true,
                "true_positives": tp,
                "false_positives": fp,
                "n_detections": tp + fp,
                "sensitivity": tp / n_true if n_true else np.nan,
                "ppv": tp / (tp + fp) if tp + fp else np.nan,
                "n_subjects": len(subjects),
            }
        )
    return pd.DataFrame(rows)


def threshold_grid(first: float, last: float, step: float) -> np.ndarray:
    """Decision thresholds from ``first`` to ``last`` (included) by ``step``."""
    if not 0 < first <= last or step <= 0:
        raise InputError(
            f"FROC thresholds need 0 < min <= max and step > 0, got {first}, {last}, {step}"
        )
    return np.round(np.arange(first, last + step / 2, step), 6)


def froc_table(
    candidates: pd.DataFrame,
    truth: pd.DataFrame,
    *,
    subjects: Sequence[str],
    thresholds: Iterable[float],
    bins: Sequence[float] = DEFAULT_SIZE_BINS,
) -> pd.DataFrame:
    """Sensitivity per size bin and false positives per patient at each decision threshold.

    ``candidates`` has a ``subject`` column and the columns of
    :attr:`virtual_contrast.evaluate.lesions.Candidates.table`; a candidate is detected at threshold t when its
    status is ``lesion`` and its ``score`` reaches t. One row per (threshold, size bin) with the columns
    of :func:`validate_detector`, plus ``threshold`` and ``fp_per_patient`` (false positives of every size
    per patient: the FROC's abscissa, the same in every bin of a threshold).
    """
    kept = candidates[candidates["status"] == LESION]
    tables = []
    for t in thresholds:
        found = kept[kept["score"] >= t]
        table = validate_detector(found, truth, subjects=subjects, bins=bins)
        total = table.loc[table["size_bin"] == "all", "false_positives"].iloc[0]
        table.insert(0, "threshold", float(t))
        table["fp_per_patient"] = total / len(subjects) if len(subjects) else np.nan
        tables.append(table)
    return pd.concat(tables, ignore_index=True)


def choose_operating_point(froc: pd.DataFrame, *, max_fp_per_patient: float) -> dict:
    """The lowest threshold of the FROC whose false positives per patient are at most the target.

    When no threshold reaches the target, the highest threshold (fewest false positives), with
    ``meets_target`` false. Returns the threshold, its false positives per patient and sensitivity per bin.
    """
    overall = froc[froc["size_bin"] == "all"].sort_values("threshold")
    if overall.empty:
        raise InputError("the FROC table is empty")
    within = overall[overall["fp_per_patient"] <= max_fp_per_patient]
    meets = not within.empty
    threshold = float(within["threshold"].iloc[0] if meets else overall["threshold"].iloc[-1])
    at = froc[np.isclose(froc["threshold"], threshold)]
    return {
        "threshold": threshold,
        "max_fp_per_patient": float(max_fp_per_patient),
        "meets_target": meets,
        "fp_per_patient": float(at["fp_per_patient"].iloc[0]),
        "sensitivity": {
            row.size_bin: (None if not np.isfinite(row.sensitivity) else float(row.sensitivity))
            for row in at.itertuples()
        },
        "n_true": {row.size_bin: int(row.n_true) for row in at.itertuples()},
    }


def truth_in_atlas(truth: pd.DataFrame, transforms: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """True lesions of the given subjects with centres moved to atlas space.

    ``transforms`` maps subject -> the registration's 4x4 atlas-to-native world transform of the image the
    truth was measured in (the full-dose T1c); its inverse brings native centres to the atlas. Axes are kept
    (the transform is close to a rigid one).
    """
    out = truth[truth["subject"].astype(str).isin(list(transforms))].copy()
    out["subject"] = out["subject"].astype(str)
    for subject, transform in transforms.items():
        rows = out["subject"] == subject
        native = np.c_[out.loc[rows, ["x_mm", "y_mm", "z_mm"]].to_numpy(float), np.ones(rows.sum())]
        atlas = (np.linalg.inv(np.asarray(transform, float)) @ native.T).T[:, :3]
        out.loc[rows, ["x_mm", "y_mm", "z_mm"]] = atlas
    return out.reset_index(drop=True)


#: One training subject's images on the atlas grid: post (full-dose T1c), pre, brain mask, affine.
SubjectImages = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def tune_detector(
    load: Callable[[str], SubjectImages],
    subjects: Sequence[str],
    truth: pd.DataFrame,
    settings: DetectorSettings,
    *,
    prior_enhancement: float,
    prior_fraction: float,
    thresholds: Iterable[float],
    max_fp_per_patient: float,
) -> tuple[pd.DataFrame, dict, pd.DataFrame]:
    """FROC of the training ``subjects`` against their ``truth`` (atlas space) and the operating point.

    ``load(subject)`` returns that subject's images (they are loaded twice, to keep one subject in memory at
    a time). Each subject is read with a leave-one-out prior: the voxels enhancing above ``prior_enhancement``
    in at least ``prior_fraction`` of the other subjects, and in two (as
    :func:`lesions.normal_enhancement_mask`). Returns the FROC table, the operating point
    (:func:`choose_operating_point`, with the subjects it was tuned on) and every candidate (with
    ``subject``).
    """
    if len(subjects) < 2:
        raise InputError(
            f"tuning the detector needs at least 2 training subjects, got {len(subjects)}"
        )
    count = None
    for subject in subjects:
        post, pre, mask, affine = load(subject)
        enhancing = _enhancing(post, pre, mask, affine, settings, prior_enhancement)
        count = enhancing.astype(np.int32) if count is None else count + enhancing
    tables = []
    for subject in subjects:
        post, pre, mask, affine = load(subject)
        own = _enhancing(post, pre, mask, affine, settings, prior_enhancement)
        others = len(subjects) - 1
        prior = prior_from_counts(count - own, others, prior_fraction)
        found = find_candidates(post, pre, mask, affine, settings, prior=prior)
        tables.append(found.table.assign(subject=subject))
        log.info(
            "%s: %d candidates, %d pass the shape tests",
            subject,
            len(found.table),
            int((found.table["status"] == LESION).sum()),
        )
    candidates = pd.concat(tables, ignore_index=True)
    froc = froc_table(candidates, truth, subjects=subjects, thresholds=thresholds)
    point = choose_operating_point(froc, max_fp_per_patient=max_fp_per_patient)
    point["subjects"] = list(subjects)
    return froc, point, candidates


def _enhancing(post, pre, mask, affine, settings: DetectorSettings, threshold: float) -> np.ndarray:
    enh = cand.calibrated_enhancement(post, pre, mask, affine, smoothing_mm=settings.smoothing_mm)
    return enh > threshold


def read_operating_point(path) -> float:
    """The decision threshold of an operating point written by the ``detector_froc`` rule (JSON)."""
    import json
    from pathlib import Path

    path = Path(path)
    try:
        return float(json.loads(path.read_text())["threshold"])
    except FileNotFoundError as exc:
        raise InputError("operating point not found", path=path) from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(
            f"not an operating point (JSON with a threshold): {exc}", path=path
        ) from exc


def validate_by_split(
    detections: pd.DataFrame, truth: pd.DataFrame, split: Mapping[str, str]
) -> pd.DataFrame:
    """:func:`validate_detector` for each split (train, test) of the subjects in ``split``, with a
    ``split`` column."""
    tables = []
    for name in sorted(set(split.values()), key=lambda n: (n != "train", n)):
        subjects = [s for s, v in split.items() if v == name]
        tables.append(validate_detector(detections, truth, subjects=subjects).assign(split=name))
    out = pd.concat(tables, ignore_index=True)
    return out[["split", *[c for c in out.columns if c != "split"]]]
