"""Automated detection of enhancing lesions: the reader ``auto`` of the reader study.

A lesion is an enhancing blob or ring; vessels (tubes), the dura and sinuses (sheets, branching networks at the
brain's surface) and physiological enhancement (choroid plexus) are not. :func:`find_candidates` finds every
enhancing object of a post-contrast image (:mod:`virtual_contrast.evaluate.candidates`: enhancement against the
pre-contrast image, objects split at their saddles and trimmed to their half-maximum cores, shape features),
leaves out objects smaller than ``min_volume_mm3``, and labels each other with the first test it fails
(:data:`STATUS_TESTS`, in that order) or ``lesion``:

- ``surface``: no voxel at least ``min_depth_mm`` inside the brain mask (dura, sinuses, mask-edge rims);
- ``prior``: at least ``max_prior_overlap`` of its voxels in the physiological-enhancement prior (choroid
  plexus, sinuses and falx where they sit in most training subjects, :func:`normal_enhancement_mask`);
- ``elongated``: inertia axis ratio (shortest / longest) below ``min_axis_ratio``: a tube or a sheet;
- ``branching``: ``fill`` (volume over that of its inertia ellipsoid) below ``min_fill``: a vessel tree or a
  curved sheet;
- ``tubular``: Frangi tubularity at its own scale above ``max_tubularity``: a vessel segment.

A candidate that passes them is detected when its ``score`` reaches ``threshold``, the decision threshold: the
score is its peak enhancement discounted by its tubularity and its overlap with the prior,
``peak * (1 - tubularity) * (1 - prior_overlap)`` (:func:`candidates.lesion_score`; on the embedded cohort's
training subjects it separated lesions from vessels better than the peak alone at 2 mm, and as well at 4 mm).
The free-response (FROC) analysis sweeps the threshold (:mod:`virtual_contrast.evaluate.froc`). Every other
parameter is in mm or in normalised units (the post-contrast image's 1st and 99th brain percentiles mapped to 0
and 1, as the workflow's normalisation does, which does not clip the enhancement above 1) and holds from a 1 mm to a 4 mm grid. The defaults live in
the config schema (``evaluate.detector``), shared by the workflow and the command line:
:meth:`DetectorSettings.from_schema`.

Measurements of a detection (as a radiologist would report it): centre = centroid of the core (world RAS mm);
long axis = the largest in-plane extent in the axial slice where it is longest; short axis = the extent
perpendicular to it in that slice (:func:`virtual_contrast.evaluate.shape.measure_axes`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from virtual_contrast.annotations import LESION_COLUMNS, READ_COLUMNS
from virtual_contrast.evaluate import candidates as cand
from virtual_contrast.evaluate.uncertainty import lesion_uncertainty
from virtual_contrast.intensity import range_problem
from virtual_contrast.io import InputError, load_array

log = logging.getLogger(__name__)

DETECTION_COLUMNS = ("lesion_id", *cand.FEATURE_COLUMNS)
#: Status of a candidate that passes every shape test, and the tests in the order they are applied.
LESION = "lesion"
STATUS_TESTS = ("surface", "prior", "elongated", "branching", "tubular")


@dataclass(frozen=True)
class DetectorSettings:
    """Parameters of the automated reader (config ``evaluate.detector``; defaults in the config schema).

    ``threshold``: decision threshold on the lesion score (normalised units of enhancement).
    ``candidate_floor``: enhancement above which voxels belong to candidate objects (normalised units).
    ``edge_fraction``: a lesion is its voxels above this fraction of its peak (0.5: the half maximum, which
    puts the edge of a blurred step at its middle); two maxima are one object when the saddle between them
    lies above this fraction of the lower one.
    ``smoothing_mm``: Gaussian sigma applied to post and pre before subtraction, against voxel noise.
    ``min_volume_mm3``: smaller objects are no candidates. ``min_depth_mm``, ``max_prior_overlap``,
    ``min_axis_ratio``, ``min_fill``, ``max_tubularity``: the tests of a candidate (see the module's docstring).
    """

    threshold: float
    candidate_floor: float
    edge_fraction: float
    smoothing_mm: float
    min_volume_mm3: float
    min_depth_mm: float
    max_prior_overlap: float
    min_axis_ratio: float
    min_fill: float
    max_tubularity: float

    def __post_init__(self) -> None:
        if not self.threshold > 0:
            raise InputError(f"detector threshold must be positive, got {self.threshold}")
        if not 0 < self.candidate_floor:
            raise InputError(f"candidate_floor must be positive, got {self.candidate_floor}")
        if not 0 < self.edge_fraction < 1:
            raise InputError(f"edge_fraction must be in (0, 1), got {self.edge_fraction}")
        for name in ("smoothing_mm", "min_volume_mm3", "min_depth_mm"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def from_schema(cls, **overrides: float) -> DetectorSettings:
        """The config schema's defaults (``evaluate.detector``), with ``overrides``."""
        from virtual_contrast.config import schema_defaults

        return cls(**{**schema_defaults("evaluate", "detector"), **overrides})

    def replace(self, **changes: float) -> DetectorSettings:
        return DetectorSettings(**{**asdict(self), **changes})


def candidate_status(features: pd.DataFrame, settings: DetectorSettings) -> pd.Series:
    """The first shape test each candidate fails (:data:`STATUS_TESTS`), or :data:`LESION`."""
    failed = {
        "surface": features["depth_mm"] < settings.min_depth_mm,
        "prior": features["prior_overlap"] >= settings.max_prior_overlap,
        "elongated": features["axis_ratio"] < settings.min_axis_ratio,
        "branching": features["fill"] < settings.min_fill,
        "tubular": features["tubularity"] > settings.max_tubularity,
    }
    status = pd.Series(LESION, index=features.index, dtype=object)
    for name in reversed(STATUS_TESTS):
        status[failed[name].to_numpy()] = name
    return status


@dataclass(frozen=True)
class Candidates:
    """Every candidate object of one image: ``table`` (``candidate_id``, :data:`candidates.FEATURE_COLUMNS`,
    ``status``) and ``labels`` (the image of their cores, labelled by ``candidate_id``)."""

    table: pd.DataFrame
    labels: np.ndarray

    def lesions(self, threshold: float) -> pd.DataFrame:
        """The detections at a decision threshold, numbered by decreasing volume (:data:`DETECTION_COLUMNS`
        and ``candidate_id``)."""
        t = self.table
        found = t[(t["status"] == LESION) & (t["score"] >= threshold)]
        found = found.sort_values("volume_mm3", ascending=False, kind="stable")
        found = found.reset_index(drop=True).drop(columns="status")
        found.insert(0, "lesion_id", np.arange(1, len(found) + 1))
        return found

    def lesion_labels(self, threshold: float) -> np.ndarray:
        """Label image of the detections at ``threshold``, labelled by ``lesion_id`` (int16)."""
        found = self.lesions(threshold)
        lut = np.zeros(int(self.labels.max()) + 1, np.int16)
        lut[found["candidate_id"].to_numpy(int)] = found["lesion_id"].to_numpy()
        return lut[self.labels]


def check_images(post: np.ndarray, pre: np.ndarray, mask: np.ndarray, prior=None) -> None:
    shapes = {"post": np.shape(post), "pre": np.shape(pre), "mask": np.shape(mask)}
    if prior is not None:
        shapes["prior"] = np.shape(prior)
    if len(set(shapes.values())) != 1 or len(shapes["post"]) != 3:
        raise InputError(
            f"post, pre, mask (and prior) must be 3D arrays of one shape, got {shapes}"
        )


def find_candidates(
    post: np.ndarray,
    pre: np.ndarray,
    mask: np.ndarray,
    affine: np.ndarray,
    settings: DetectorSettings,
    *,
    prior: np.ndarray | None = None,
) -> Candidates:
    """Every enhancing object of ``post`` with its features and status (see the module's docstring).

    Images share one grid and are normalised (1st and 99th brain percentiles at 0 and 1); ``prior`` is a physiological-enhancement mask on the
    same grid (or None). Objects of fewer voxels than ``min_volume_mm3`` are left out of the table.
    """
    check_images(post, pre, mask, prior)
    affine = np.asarray(affine, float)
    enh = cand.calibrated_enhancement(post, pre, mask, affine, smoothing_mm=settings.smoothing_mm)
    objects = cand.split_objects(
        enh, floor=settings.candidate_floor, split_fraction=settings.edge_fraction, prior=prior
    )
    cores = cand.object_cores(enh, objects, edge_fraction=settings.edge_fraction)
    voxel_volume = float(abs(np.linalg.det(affine[:3, :3])))
    counts = np.bincount(cores.ravel())
    keep = np.flatnonzero(counts * voxel_volume >= settings.min_volume_mm3)
    keep = keep[keep > 0]
    lut = np.zeros(len(counts), np.int32)
    lut[keep] = np.arange(1, len(keep) + 1)
    cores = lut[cores]
    table = cand.object_features(enh, cores, mask, affine, prior=prior)
    table["status"] = candidate_status(table, settings)
    log.info(
        "%d candidates: %s",
        len(table),
        ", ".join(f"{k} {v}" for k, v in table["status"].value_counts().items()) or "none",
    )
    return Candidates(table, cores)


def detect_lesions(
    post: np.ndarray,
    pre: np.ndarray,
    mask: np.ndarray,
    affine: np.ndarray,
    settings: DetectorSettings | None = None,
    *,
    prior: np.ndarray | None = None,
) -> pd.DataFrame:
    """Enhancing lesions of one image at the settings' decision threshold, one row per lesion
    (:data:`DETECTION_COLUMNS`), numbered by decreasing volume; ``settings`` default to the schema's."""
    settings = DetectorSettings.from_schema() if settings is None else settings
    found = find_candidates(post, pre, mask, affine, settings, prior=prior)
    table = found.lesions(settings.threshold).drop(columns="candidate_id")
    log.info("detected %d lesions (threshold %.3g)", len(table), settings.threshold)
    return table


def normal_enhancement_mask(
    enhancements: Sequence[np.ndarray], *, threshold: float, fraction: float
) -> np.ndarray:
    """Voxels that enhance above ``threshold`` in at least ``fraction`` of the given subjects (and in two).

    Physiological enhancement (choroid plexus, venous sinuses, falx) sits at the same place in every brain once
    registered to the atlas, lesions do not: computed on the training subjects' enhancement maps in atlas space
    (:func:`candidates.calibrated_enhancement`), this is the ``prior`` of :func:`find_candidates`.
    """
    if not enhancements:
        raise InputError("normal_enhancement_mask needs at least one enhancement map")
    shapes = {np.shape(e) for e in enhancements}
    if len(shapes) != 1:
        raise InputError(f"enhancement maps must share one grid, got shapes {sorted(shapes)}")
    count = np.zeros(next(iter(shapes)), dtype=np.int32)
    for e in enhancements:
        count += np.asarray(e) > threshold
    return prior_from_counts(count, len(enhancements), fraction)


def prior_from_counts(count: np.ndarray, n_subjects: int, fraction: float) -> np.ndarray:
    """Voxels counted in at least ``fraction`` of ``n_subjects`` subjects, and in at least two: what one
    subject alone shows (its own lesion, in a small training set) is not physiological."""
    return count >= max(2, fraction * n_subjects)


def load_detection_images(
    *, post: Path, pre: Path, mask: Path, subject: str | None = None, prior: Path | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Post, pre, mask (and prior) arrays from files on one grid (the post image's), and its affine."""
    arrays, affine = {}, None
    for name, path in {"post": post, "pre": pre, "mask": mask, "prior": prior}.items():
        if path is None:
            continue
        data, aff = load_array(path, subject=subject)
        if affine is None:
            affine = aff
        elif data.shape != arrays["post"].shape or not np.allclose(aff, affine, atol=1e-3):
            raise InputError(
                f"{name} is not on the post-contrast image's grid", subject=subject, path=path
            )
        arrays[name] = data
    arrays["mask"] = arrays["mask"] > 0
    if "prior" in arrays:
        arrays["prior"] = arrays["prior"] > 0
    for name in ("post", "pre"):
        problem = range_problem(arrays[name][arrays["mask"]]) if arrays["mask"].any() else None
        if problem is not None:
            raise InputError(
                f"{name} is not normalised: {problem}; normalise it first (virtual-contrast normalize, "
                "or --normalize)",
                subject=subject,
                path={"post": post, "pre": pre}[name],
            )
    return arrays, affine


def detect_lesions_from_files(
    *,
    post: Path,
    pre: Path,
    mask: Path,
    settings: DetectorSettings | None = None,
    subject: str | None = None,
    prior: Path | None = None,
) -> pd.DataFrame:
    """:func:`detect_lesions` on image files that share one grid (the affine is the post image's)."""
    arrays, affine = load_detection_images(
        post=post, pre=pre, mask=mask, subject=subject, prior=prior
    )
    table = detect_lesions(
        arrays["post"], arrays["pre"], arrays["mask"], affine, settings, prior=arrays.get("prior")
    )
    if subject is not None:
        table.insert(0, "subject", subject)
    return table


#: Images a subject's detections are made on, in the order of the volumes of its label image.
READ_MODALITIES = ("ref", "low", "vir")


def detect_subject_reads(
    posts: Mapping[str, Path],
    *,
    pre: Path,
    mask: Path,
    settings: DetectorSettings,
    prior: Path | None = None,
    subject: str | None = None,
    uncertainty: Path | None = None,
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Detections on each post-contrast image of one subject (modality -> file, of :data:`READ_MODALITIES`).

    Returns the detections (:data:`DETECTION_COLUMNS` with ``subject`` and ``modality``), a 4D label image
    whose volumes follow :data:`READ_MODALITIES` (a modality not read stays empty) and the affine. With
    ``uncertainty`` (vir-T1c's uncertainty map, on the same grid) every detection also gets
    ``mean_uncertainty``: the map's mean over its core (on a ref or low detection: how uncertain vir-T1c is
    where that image shows a lesion).
    """
    unknown = sorted(set(posts) - set(READ_MODALITIES))
    if unknown:
        raise InputError(f"unknown modalities {unknown}; expected some of {READ_MODALITIES}")
    tables, labels, affine, unc_map = [], None, None, None
    for index, modality in enumerate(READ_MODALITIES):
        if modality not in posts:
            continue
        arrays, affine = load_detection_images(
            post=posts[modality], pre=pre, mask=mask, subject=subject, prior=prior
        )
        found = find_candidates(
            arrays["post"],
            arrays["pre"],
            arrays["mask"],
            affine,
            settings,
            prior=arrays.get("prior"),
        )
        table = found.lesions(settings.threshold).drop(columns="candidate_id")
        if labels is None:
            labels = np.zeros((*arrays["post"].shape, len(READ_MODALITIES)), np.int16)
        labels[..., index] = found.lesion_labels(settings.threshold)
        if uncertainty is not None:
            if unc_map is None:
                unc_map, unc_affine = load_array(uncertainty, subject=subject)
                if unc_map.shape != arrays["post"].shape or not np.allclose(
                    unc_affine, affine, atol=1e-3
                ):
                    raise InputError(
                        "the uncertainty map is not on the post-contrast image's grid",
                        subject=subject,
                        path=uncertainty,
                    )
            table["mean_uncertainty"] = lesion_uncertainty(
                labels[..., index], unc_map, table["lesion_id"]
            )
        table.insert(0, "modality", modality)
        table.insert(0, "subject", subject or "")
        tables.append(table)
        log.info("%s: %d lesions (threshold %.3g)", modality, len(table), settings.threshold)
    if labels is None:
        raise InputError("no post-contrast image to read", subject=subject)
    return pd.concat(tables, ignore_index=True), labels, affine


def truth_reader_tables(
    truth: pd.DataFrame, patients: Sequence[str], *, reader: str = "truth"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The true lesions as the ``ref`` reads of a reference reader (lesions and reads tables of the reader
    study), one read per patient, also for patients without lesions."""
    table = truth[truth["subject"].astype(str).isin(list(patients))]
    lesions = pd.DataFrame(
        {
            "patient": table["subject"].astype(str),
            "reader": reader,
            "modality": "ref",
            **{c: table[c].astype(float) for c in ("x_mm", "y_mm", "z_mm")},
            "long_axis_mm": table[["long_axis_mm", "short_axis_mm"]].max(axis=1).astype(float),
            "short_axis_mm": table[["long_axis_mm", "short_axis_mm"]].min(axis=1).astype(float),
        }
    )
    reads = pd.DataFrame(
        [(str(p), reader, "ref", np.nan, np.nan) for p in patients], columns=list(READ_COLUMNS)
    )
    return lesions[list(LESION_COLUMNS)].reset_index(drop=True), reads


def detections_to_reads(
    detections: pd.DataFrame, *, patient: str, modality: str, reader: str = "auto"
) -> pd.DataFrame:
    """Detections of one image as rows of the reader study's lesions CSV (reader ``auto``)."""
    out = detections[["x_mm", "y_mm", "z_mm", "long_axis_mm", "short_axis_mm"]].copy()
    out.insert(0, "modality", modality)
    out.insert(0, "reader", reader)
    out.insert(0, "patient", patient)
    return out.reset_index(drop=True)


def auto_reader_tables(
    detections: Mapping[tuple[str, str], pd.DataFrame], *, reader: str = "auto"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The reader study's lesions and reads tables of the automated reader.

    ``detections`` maps (patient, modality) to :func:`detect_lesions` outputs, with modality ``ref``, ``low``
    or ``vir``; every key is a read (also those without detection), with no quality grade or reading time.
    Feed both tables to :func:`virtual_contrast.reader.stats.reader_stats` with ``reference_reader="auto"``.
    """
    lesions = [
        detections_to_reads(table, patient=patient, modality=modality, reader=reader)
        for (patient, modality), table in detections.items()
    ]
    columns = list(LESION_COLUMNS)
    lesion_table = (
        pd.concat(lesions, ignore_index=True) if lesions else pd.DataFrame(columns=columns)
    )
    reads = pd.DataFrame(
        [(patient, reader, modality, np.nan, np.nan) for patient, modality in detections],
        columns=list(READ_COLUMNS),
    )
    return lesion_table[columns], reads
