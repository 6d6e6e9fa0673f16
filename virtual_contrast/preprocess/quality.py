"""The registration quality gate: is a T1 → atlas registration plausible?

An affine registration always returns *some* transform; a wrong one (a brain squeezed to half its size, a
skull fitted to the template's brain) used to pass silently. Every T1 → atlas registration is therefore scored
with figures that do not depend on the backend, and rejected when one is implausible:

* **scales**: the singular values of the linear part of the atlas → subject transform, i.e. the subject's
  brain size relative to the template along its principal axes. Adult brains differ from the template by
  about ±20 % along an axis; the default range 0.67-1.5 (a factor 1.5 either way) rejects squeezed or inflated
  fits such as the 0.91/0.59/0.51 one (determinant 0.27) that a skull-stripped BraTS case once received.
* **correlation**: the Pearson correlation, over the atlas brain mask, between the registered brain-extracted
  T1 (zero outside the subject's carried brain mask) and the template. Measured at 1 mm (the registrations of
  ``virtual-contrast register``, then moved on purpose): right, 0.50 (raw TCGA-FG-6692, thick slices) and 0.46
  (BraTS-MET-00110); 10° off 0.38 and 0.32; 8 mm off 0.27 and 0.27; 20°/10° and 10 mm off 0.18 and 0.17; the
  squeezed fit 0.03 and 0.10. On the embedded cohort at 4 mm, 0.73-0.85 when right. Default minimum: 0.2,
  which rejects gross failures only: an 8 mm or 10° error passes.
* **brain Dice**: Dice of the subject's brain mask carried to the atlas with the atlas brain mask: 0.96 and
  0.96 when right, 0.89 and 0.90 at 8 mm off, 0.84 at 20°/10° and 10 mm off, 0.52 and 0.51 for the squeezed
  fit (0.97-0.98 on the cohort at 4 mm). Default minimum: 0.9, halfway between right (0.95-0.98) and the
  errors the correlation lets through: a cohort head at 2.5 mm registered 36° off (correlation 0.44, Dice
  0.87) passed the earlier minimum of 0.8 silently. It also catches a brain extraction that kept the skull or
  lost part of the brain, which the registration would then fit.
* **shears and determinant** are reported (the determinant is the product of the scales, so the scale range
  bounds it).

* **brain coverage**: for every sequence, the fraction of the atlas brain inside its field of view carried
  to the atlas (``brain_coverage``). Correlation and Dice are taken within the T1's field of view (a slab that
  covers part of the brain is not a bad registration), so a 2D T1 slab covering 37 % of the brain scored a
  Dice of 0.96 and passed; the network, though, would predict the rest of the brain from nothing. Default
  minimum: 0.9 of the atlas brain in each sequence's field of view.

The limits are configurable (config ``preprocess.registration_gate``) and are applied apart from the
registration (:func:`gate_subject`; in the workflow, rule ``registration_gate`` after ``register``), so that
changing them re-registers nothing. A rejected registration is an error (:class:`RegistrationRejectedError`)
that names the subject, the figure and the limit, after drawing the registration for a person to look at;
``virtual-contrast predict --override-gate`` goes on knowingly, and its output and provenance say so.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from virtual_contrast.io import InputError
from virtual_contrast.preprocess.options import GateOptions

CORRELATION_MEASURE = "Pearson correlation of the registered brain-extracted T1 with the atlas template over the atlas brain mask"


class RegistrationRejectedError(InputError):
    """The registration quality gate rejected a T1 → atlas registration."""


def affine_figures(transform: np.ndarray) -> dict:
    """Scales (singular values, largest first), shears and determinant of a 4×4 affine's linear part.

    Shears are the off-diagonal terms of the unit upper-triangular factor U of M = Q · D · U (Q orthogonal,
    D diagonal positive): 0 for any rotation times axis scaling. Order: xy, xz, yz.
    """
    m = np.asarray(transform, float)[:3, :3]
    scales = np.linalg.svd(m, compute_uv=False)
    _, r = np.linalg.qr(m)
    r = r * np.sign(np.diag(r))[:, None]  # positive diagonal
    shears = [r[0, 1] / r[0, 0], r[0, 2] / r[0, 0], r[1, 2] / r[1, 1]]
    return {
        "scales": [round(float(s), 4) for s in scales],
        "shears": [round(float(s), 4) for s in shears],
        "determinant": round(float(np.linalg.det(m)), 4),
    }


def brain_correlation(
    t1_atlas: np.ndarray, mask_atlas: np.ndarray, template: np.ndarray, atlas_brain: np.ndarray
) -> float:
    """:data:`CORRELATION_MEASURE`; ``nan`` when either side is constant there."""
    region = np.asarray(atlas_brain) > 0.5
    subject = (np.asarray(t1_atlas, np.float64) * (np.asarray(mask_atlas) > 0.5))[region]
    reference = np.asarray(template, np.float64)[region]
    if subject.size < 2 or subject.std() == 0 or reference.std() == 0:
        return float("nan")
    return float(np.corrcoef(subject, reference)[0, 1])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two masks (1.0 for two empty masks)."""
    a, b = np.asarray(a) > 0.5, np.asarray(b) > 0.5
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def registration_figures(
    transform: np.ndarray,
    t1_atlas: np.ndarray,
    mask_atlas: np.ndarray,
    template: np.ndarray,
    atlas_brain: np.ndarray,
    field_of_view: np.ndarray | None = None,
) -> dict:
    """Every figure of the gate for one T1 → atlas registration (see the module docstring).

    ``field_of_view`` (atlas grid) marks where the subject's T1 was acquired: the atlas brain is compared only
    there, so that a slab which covers part of the brain is not taken for a bad registration.
    """
    whole = np.asarray(atlas_brain) > 0.5
    inside = (
        np.ones(whole.shape, bool) if field_of_view is None else np.asarray(field_of_view) > 0.5
    )
    seen, mask = whole & inside, (np.asarray(mask_atlas) > 0.5) & inside
    return {
        **affine_figures(transform),
        "correlation": round(brain_correlation(t1_atlas, mask, template, seen), 4),
        "correlation_measure": CORRELATION_MEASURE,
        "brain_dice": round(dice(mask, seen), 4),
        "brain_volume_ratio": round(int(mask.sum()) / max(int(seen.sum()), 1), 4),
        "atlas_brain_in_field_of_view": round(int(seen.sum()) / max(int(whole.sum()), 1), 4),
    }


def brain_coverage(figures: dict) -> dict[str, float]:
    """Fraction of the atlas brain in each sequence's field of view (the T1's alone for figures that only
    score a T1, as ``virtual-contrast register`` writes)."""
    if "brain_coverage" in figures:
        return dict(figures["brain_coverage"])
    if "atlas_brain_in_field_of_view" in figures:
        return {"T1": figures["atlas_brain_in_field_of_view"]}
    return {}


def gate_failures(figures: dict, gate: GateOptions) -> list[str]:
    """One sentence per figure outside its limit (empty when the registration passes)."""
    low, high = gate.scale_range
    failures = [
        f"scale {s:.2f} (a singular value of the atlas -> subject affine) is outside [{low:g}, {high:g}]"
        for s in figures["scales"]
        if not low <= s <= high
    ]
    corr = figures["correlation"]
    if not corr >= gate.min_correlation:  # also catches nan
        failures.append(
            f"correlation with the template {corr:.2f} is below {gate.min_correlation:g} ({CORRELATION_MEASURE})"
        )
    if not figures["brain_dice"] >= gate.min_brain_dice:
        failures.append(
            f"brain-mask Dice with the atlas brain mask {figures['brain_dice']:.2f} is below "
            f"{gate.min_brain_dice:g}"
        )
    for name, covered in brain_coverage(figures).items():
        if not covered >= gate.min_brain_coverage:
            failures.append(
                f"the {name}'s field of view holds {100 * covered:.0f} % of the atlas brain, below "
                f"{100 * gate.min_brain_coverage:.0f} % (min_brain_coverage)"
            )
    return failures


def gate_verdict(figures: dict, gate: GateOptions) -> dict:
    """The verdict recorded in ``register.json``: passed, the failures and the limits applied."""
    failures = gate_failures(figures, gate)
    return {"passed": not failures, "failures": failures, "limits": _plain(asdict(gate))}


def reject(verdict: dict, *, subject: str | None, figure: str | None, path=None) -> None:
    """Raise :class:`RegistrationRejectedError` for a failed ``verdict``, naming the subject and the figure."""
    if verdict["passed"]:
        return
    look = f"; look at {figure}" if figure else ""
    raise RegistrationRejectedError(
        "T1 -> atlas registration rejected by the quality gate: "
        + "; ".join(verdict["failures"])
        + look
        + " (limits: config preprocess.registration_gate)",
        subject=subject,
        path=path,
    )


def gate_subject(
    figures: dict,
    gate: GateOptions,
    *,
    subject: str | None,
    t1_atlas: Path | str,
    mask_atlas: Path | str,
    atlas_brain_mask: Path | str,
    rejected_figure: Path | str | None,
    path: Path | str | None = None,
    override: bool = False,
) -> dict:
    """Apply ``gate`` to one subject's registration ``figures`` (as :func:`registration_figures` and
    :func:`~virtual_contrast.preprocess.register.register_subject` give them); return the verdict.

    A rejected registration is drawn to ``rejected_figure`` (the registered T1 ``t1_atlas`` with the carried
    brain mask ``mask_atlas`` and the atlas brain) with the figures and verdict beside it (same name,
    ``.json``), then raises :class:`RegistrationRejectedError`, unless ``override``: the verdict then says
    ``overridden`` and a warning is logged. A registration that passes removes the figure an earlier
    rejection left.
    """
    import logging

    verdict = gate_verdict(figures, gate)
    evidence = None if rejected_figure is None else Path(rejected_figure).with_suffix(".json")
    if verdict["passed"]:
        if rejected_figure is not None:  # left by an earlier rejection
            Path(rejected_figure).unlink(missing_ok=True)
            evidence.unlink(missing_ok=True)
        return verdict
    if override:
        verdict["overridden"] = True
    if rejected_figure is not None:
        from virtual_contrast.figures import plot_registration
        from virtual_contrast.io import load_array, write_json

        plot_registration(
            load_array(t1_atlas, subject=subject)[0],
            load_array(atlas_brain_mask)[0],
            load_array(mask_atlas, subject=subject)[0],
            figures,
            verdict,
            subject=subject,
            path=rejected_figure,
        )
        write_json({"subject": subject, "quality": figures, "gate": verdict}, evidence)
    if not override:
        reject(verdict, subject=subject, figure=rejected_figure, path=path)
    logging.getLogger(__name__).warning(
        "sub-%s: registration REJECTED by the quality gate (%s), gone on with as asked (override)",
        subject,
        "; ".join(verdict["failures"]),
    )
    return verdict


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def quality_row(subject: str, provenance: dict, gate: GateOptions) -> dict:
    """One row of the study's registration-quality table: a subject's figures (its ``register.json``) and
    the verdict of ``gate`` on them."""
    figures = provenance["quality"]
    verdict = gate_verdict(figures, gate)
    coverage = brain_coverage(figures)
    return {
        "subject": subject,
        "backend": provenance["backend"],
        "passed": verdict["passed"],
        "failures": "; ".join(verdict["failures"]),
        "scales": " ".join(f"{v:.3f}" for v in figures["scales"]),
        "shears": " ".join(f"{v:.3f}" for v in figures["shears"]),
        "determinant": figures["determinant"],
        "correlation": figures["correlation"],
        "brain_dice": figures["brain_dice"],
        "brain_volume_ratio": figures["brain_volume_ratio"],
        "least_brain_coverage": min(coverage.values()) if coverage else float("nan"),
        "brain_coverage": " ".join(f"{k} {v:.3f}" for k, v in coverage.items()),
        "limits": "; ".join(f"{k} {v}" for k, v in verdict["limits"].items()),
    }


def rejected_registrations(evidence: dict[str, Path | str]) -> list[dict]:
    """Subjects whose registration the gate rejected, from the JSON written beside each rejected figure
    (``evidence`` maps subject → that file; absent files are subjects that were not rejected)."""
    rows = []
    for subject, path in evidence.items():
        path = Path(path)
        if path.is_file():
            record = json.loads(path.read_text())
            rows.append(
                {
                    "subject": subject,
                    "failures": "; ".join(record["gate"]["failures"]),
                    "figure": str(path.with_suffix(".png")),
                }
            )
    return rows
