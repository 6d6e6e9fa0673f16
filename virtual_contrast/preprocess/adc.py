"""Apparent diffusion coefficient (ADC) map from a b=0 / b=1000 diffusion series.

The paper computes ``ADC = ln(S0 / S1000) / 1000`` (mm²/s). Here:

* ``S0`` is the mean of every b≈0 volume (b ≤ ``b_low_max``): repeated b0 acquisitions only add SNR.
* ``S1000`` is the mean of every b≈1000 volume (|b - ``b_high``| ≤ ``b_tol``), and the division uses the mean
  of their actual b-values (scanners write 990-1005 for a nominal 1000; dividing by the nominal value would
  bias the ADC by up to 1 %). The default arithmetic mean over directions follows the paper's formula; the
  scanner's "trace" image is the geometric mean of the directions (``high_average="geometric"``), which gives
  exactly the mean of the per-direction ADCs (the mean diffusivity) and is a few percent higher in strongly
  anisotropic white matter.
* Voxels without signal get 0: ``S0`` at or below ``noise_fraction`` × the 99th percentile of ``S0`` (the
  zero-filled background and the outside of the field of view; a percentile rather than Otsu because a
  tissue-only field of view has no background mode and Otsu would then cut through the tissue). Rician noise
  of the air above that level keeps a meaningless clipped ADC there; the brain mask removes it later.
* ``S1000 ≤ 0`` where ``S0`` has signal means the signal decayed completely: the ADC is set to ``adc_max``.
* The result is clipped to ``[0, adc_max]`` (4e-3 mm²/s is above free water at body temperature, 3e-3).

Degenerate series are refused, because their ADC is mostly or wholly 0 and nothing downstream would notice
(:func:`assess_adc`): no positive b0 signal (an all-zero or negated series), more than 1 % negative voxels
(magnitude images are never negative: a sign or integer-overflow problem), or b≈1000 at least as bright as b0
in most tissue voxels (b-values in the wrong order, or the wrong volumes). ``allow_degenerate=True`` turns these
errors into logged warnings; milder signs (some negative voxels, b≈1000 ≥ b0 in more than 5 % of the tissue) are
always warnings. Each finding is logged and listed in the provenance.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from virtual_contrast.io import InputError, load_image, save_image

log = logging.getLogger(__name__)


def read_bvals(path: Path | str, *, subject: str | None = None) -> np.ndarray:
    """Read b-values (s/mm²) from an FSL ``.bval`` file: numbers separated by whitespace (one row)."""
    path = Path(path)
    if not path.exists():
        raise InputError("b-value file not found", subject=subject, path=path)
    try:
        tokens = path.read_text().split()
        bvals = np.array([float(t) for t in tokens], dtype=np.float64)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(
            f"cannot be read as FSL b-values (numbers separated by spaces): {exc}",
            subject=subject,
            path=path,
        ) from exc
    if bvals.size == 0:
        raise InputError("b-value file is empty", subject=subject, path=path)
    if not np.all(np.isfinite(bvals)) or np.any(bvals < 0):
        raise InputError(
            f"b-values must be finite and non-negative, got {_format_bvals(bvals)}",
            subject=subject,
            path=path,
        )
    return bvals


def select_shells(
    bvals: np.ndarray, *, b_low_max: float = 50.0, b_high: float = 1000.0, b_tol: float = 150.0
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks of the b≈0 and b≈``b_high`` volumes."""
    bvals = np.asarray(bvals, dtype=np.float64)
    return bvals <= b_low_max, np.abs(bvals - b_high) <= b_tol


def compute_adc(
    dwi: np.ndarray,
    bvals: np.ndarray,
    *,
    b_low_max: float = 50.0,
    b_high: float = 1000.0,
    b_tol: float = 150.0,
    adc_max: float = 4e-3,
    noise_fraction: float = 0.02,
    high_average: str = "arithmetic",
) -> tuple[np.ndarray, np.ndarray]:
    """ADC (mm²/s) and mean b0 from a 4D series (X×Y×Z×N) and its N b-values; see the module docstring.

    Raises ``ValueError`` (an :class:`InputError` without file) when the series lacks a b≈0 or a b≈1000 volume
    or its length does not match the b-values.
    """
    dwi = np.asarray(dwi)
    bvals = np.asarray(bvals, dtype=np.float64).ravel()
    if dwi.ndim != 4:
        raise InputError(f"the DWI series must be 4D, got shape {tuple(dwi.shape)}")
    if dwi.shape[-1] != bvals.size:
        raise InputError(
            f"the DWI series has {dwi.shape[-1]} volumes but there are {bvals.size} b-values"
        )
    if high_average not in ("arithmetic", "geometric"):
        raise ValueError(f"high_average must be 'arithmetic' or 'geometric', not {high_average!r}")
    low, high = select_shells(bvals, b_low_max=b_low_max, b_high=b_high, b_tol=b_tol)
    if not low.any():
        raise InputError(
            f"no b≈0 volume (b ≤ {b_low_max:g}; b-values found: {_format_bvals(bvals)})"
        )
    if not high.any():
        raise InputError(
            f"no b≈{b_high:g} volume (|b - {b_high:g}| ≤ {b_tol:g}; "
            f"b-values found: {_format_bvals(bvals)})"
        )

    s0 = dwi[..., low].mean(axis=-1, dtype=np.float64)
    if high_average == "geometric":
        # The geometric mean of zero signals is zero: those voxels end at adc_max like below.
        with np.errstate(divide="ignore"):
            s1 = np.exp(np.log(np.maximum(dwi[..., high], 0.0)).mean(axis=-1, dtype=np.float64))
    else:
        s1 = dwi[..., high].mean(axis=-1, dtype=np.float64)
    b_mean = float(bvals[high].mean())

    threshold = noise_fraction * float(np.percentile(s0, 99)) if s0.size else 0.0
    signal = s0 > max(threshold, 0.0)
    adc = np.zeros(s0.shape, dtype=np.float64)
    decayed = signal & (s1 <= 0)
    ok = signal & ~decayed
    adc[ok] = np.log(s0[ok] / s1[ok]) / b_mean
    adc[decayed] = adc_max
    np.clip(adc, 0.0, adc_max, out=adc)
    log.debug(
        "ADC: %d b0 and %d b≈%g volumes (mean b %.1f), %d of %d voxels with signal",
        int(low.sum()),
        int(high.sum()),
        b_high,
        b_mean,
        int(signal.sum()),
        signal.size,
    )
    return adc.astype(np.float32), s0.astype(np.float32)


#: Tissue voxels for the checks: mean b0 above this fraction of its 99th percentile. The signal mask above
#: (2 %) also holds noisy scalp and air, where b≈1000 above b0 is normal: on the embedded cohort 16-24 % of
#: those voxels had a zero ADC, against 0.0-0.1 % of the voxels above 10 %; 0 % on the real dipy DWI crop.
TISSUE_FRACTION = 0.1
#: Fraction of tissue voxels with a zero ADC (b≈1000 ≥ b0) above which the map is degenerate ("mostly zero").
DEGENERATE_ZERO_FRACTION = 0.5
#: ... and above which it is suspicious (a warning).
SUSPICIOUS_ZERO_FRACTION = 0.05
#: Fraction of the non-zero DWI voxels that may be negative before the series is degenerate.
DEGENERATE_NEGATIVE_FRACTION = 0.01


@dataclass(frozen=True)
class AdcAssessment:
    """What :func:`assess_adc` found: statistics, and problems that are errors or warnings."""

    tissue_voxels: int
    zero_fraction: float  # of tissue voxels whose ADC is 0 (b≈1000 at least as bright as b0)
    negative_fraction: float  # of non-zero voxels of the series
    median_adc: float  # mm²/s over the tissue voxels, zeros included
    degenerate: tuple[str, ...]  # errors unless allowed
    warnings: tuple[str, ...]

    def provenance(self) -> dict:
        return {
            "tissue_voxels": self.tissue_voxels,
            "adc_zero_fraction": self.zero_fraction,
            "dwi_negative_fraction": self.negative_fraction,
            "adc_median_mm2_s": self.median_adc,
            "problems": [*self.degenerate, *self.warnings],
        }


def assess_adc(dwi: np.ndarray, adc: np.ndarray, b0: np.ndarray) -> AdcAssessment:
    """Check a DWI series and the ADC (and mean b0) computed from it for degenerate or suspicious data."""
    dwi, adc, b0 = np.asarray(dwi), np.asarray(adc), np.asarray(b0)
    nonzero = int(np.count_nonzero(dwi))
    negative = int((dwi < 0).sum())
    negative_fraction = negative / nonzero if nonzero else 0.0
    top = float(np.percentile(b0, 99)) if b0.size else 0.0
    tissue = b0 > TISSUE_FRACTION * top if top > 0 else np.zeros(b0.shape, dtype=bool)
    n_tissue = int(tissue.sum())
    zero_fraction = float((adc[tissue] <= 0).mean()) if n_tissue else 1.0
    median = float(np.median(adc[tissue])) if n_tissue else 0.0
    degenerate, warnings = [], []
    if n_tissue == 0:
        degenerate.append(
            "the b≈0 volumes have no positive signal (an all-zero or negated series): the ADC would be 0 "
            "everywhere"
        )
    elif zero_fraction > DEGENERATE_ZERO_FRACTION:
        degenerate.append(
            f"b≈1000 is at least as bright as b≈0 in {100 * zero_fraction:.0f} % of the tissue voxels, so the "
            "ADC is mostly 0 (b-values in the wrong order, or the wrong volumes?)"
        )
    elif zero_fraction > SUSPICIOUS_ZERO_FRACTION:
        warnings.append(
            f"b≈1000 is at least as bright as b≈0 in {100 * zero_fraction:.0f} % of the tissue voxels (ADC 0 "
            "there): check the series"
        )
    if negative_fraction > DEGENERATE_NEGATIVE_FRACTION:
        degenerate.append(
            f"{100 * negative_fraction:.1f} % of the series' non-zero voxels are negative (magnitude images "
            "are never negative: a sign or integer-overflow problem?)"
        )
    elif negative:
        warnings.append(
            f"{negative} voxels of the series are negative (magnitude images are not): their ADC is unreliable"
        )
    return AdcAssessment(
        n_tissue, zero_fraction, negative_fraction, median, tuple(degenerate), tuple(warnings)
    )


def adc_from_files(
    dwi: Path | str,
    bval: Path | str,
    out_adc: Path | str,
    out_b0: Path | str | None = None,
    *,
    subject: str | None = None,
    b_low_max: float = 50.0,
    b_high: float = 1000.0,
    b_tol: float = 150.0,
    adc_max: float = 4e-3,
    allow_degenerate: bool = False,
) -> dict:
    """Read a 4D DWI NIfTI and its FSL ``.bval``, write the ADC map (and the mean b0) on the DWI grid.

    Every problem with the inputs is an :class:`InputError` naming the subject and the file; nothing is written
    unless both maps could be computed. A degenerate series (:func:`assess_adc`) is an error too, unless
    ``allow_degenerate``; then, like milder problems, it is a logged warning. The other keywords are those of
    :func:`compute_adc`. Returns a provenance dict (with the problems found).
    """
    dwi, bval = Path(dwi), Path(bval)
    img = load_image(dwi, subject=subject, ndim=4)
    bvals = read_bvals(bval, subject=subject)
    data = np.asanyarray(img.dataobj)
    if data.shape[-1] != bvals.size:
        raise InputError(
            f"{bvals.size} b-values in {bval.name!r} but the DWI series has {data.shape[-1]} volumes",
            subject=subject,
            path=dwi,
        )
    try:
        adc, b0 = compute_adc(
            data, bvals, b_low_max=b_low_max, b_high=b_high, b_tol=b_tol, adc_max=adc_max
        )
    except InputError as exc:
        raise InputError(str(exc), subject=subject, path=bval) from exc
    low, high = select_shells(bvals, b_low_max=b_low_max, b_high=b_high, b_tol=b_tol)
    assessment = assess_adc(data, adc, b0)
    prefix = f"{subject}: " if subject else ""
    if assessment.degenerate and not allow_degenerate:
        raise InputError(
            f"{assessment.degenerate[0]}; to compute it anyway pass --allow-degenerate "
            "(workflow: preprocess.adc_allow_degenerate: true)",
            subject=subject,
            path=dwi,
        )
    for problem in (*assessment.degenerate, *assessment.warnings):
        log.warning("%s%s: %s", prefix, dwi.name, problem)
    save_image(adc, img.affine, out_adc)
    if out_b0 is not None:
        save_image(b0, img.affine, out_b0)
    provenance = {
        "dwi": str(dwi),
        "bval": str(bval),
        "n_b0": int(low.sum()),
        "n_b1000": int(high.sum()),
        "b1000_mean": float(bvals[high].mean()),
        **assessment.provenance(),
    }
    log.info(
        "%sADC from %d b0 and %d b≈1000 volumes (mean b %.1f), median %.2e mm²/s over %d tissue voxels "
        "(%.1f %% of them 0), written to %s",
        prefix,
        provenance["n_b0"],
        provenance["n_b1000"],
        provenance["b1000_mean"],
        assessment.median_adc,
        assessment.tissue_voxels,
        100 * assessment.zero_fraction,
        out_adc,
    )
    return provenance


def _format_bvals(bvals: np.ndarray) -> str:
    """Distinct b-values rounded to 10 s/mm², with counts, e.g. ``0 ×1, 500 ×30``."""
    values, counts = np.unique(
        np.round(np.asarray(bvals, dtype=np.float64) / 10.0) * 10.0, return_counts=True
    )
    return ", ".join(f"{v:g} ×{c}" for v, c in zip(values, counts, strict=True))
