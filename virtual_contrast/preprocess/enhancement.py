"""The contrast agent's enhancement between a pre-contrast T1 and a post-contrast T1c on one grid, and what a
smaller dose would have made of it: the pure steps of :mod:`virtual_contrast.preprocess.low_dose`.

* :func:`match_intensities`: the line ``post ≈ a pre + b`` over the head, fitted robustly (Tukey's biweight),
  so that the few enhancing voxels (vessels, lesions, scalp) are outliers and do not bias it; the two are often
  different sequences (the paper's: TR 9 vs 6.1 ms);
* :func:`enhancement_probability`: how likely a voxel's smoothed enhancement is to be contrast rather than
  noise, from its size in units of the smoothed difference's own noise (a normal law: 0.5 at ``z`` noise
  levels);
* :func:`scale_enhancement`: the enhancement a dose fraction ``d`` makes: ``d`` times as much (``linear``), or
  through the spoiled-gradient-echo signal equation (``spgr``): the post/pre ratio is inverted for ΔR1 at the
  tissue's T1₀, ΔR1 scaled by ``d``, the signal computed again. With TR 6.1 ms, flip 12-20°, T1₀ 0.8-1.6 s
  and d = 0.25 the low/standard enhancement ratio is 0.26-0.29 for ΔR1 ≤ 1 s⁻¹ and 0.28-0.39 for
  ΔR1 = 2-4 s⁻¹: a linear scaling under-enhances strong lesions by up to 1.5 times.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage, special

from virtual_contrast.preprocess.noise import robust_std

#: Voxels drawn (evenly spaced) for the intensity fit: plenty for two parameters, cheap at 1 mm.
FIT_SAMPLES = 200_000
#: Tukey's biweight constant (95 % efficiency under Gaussian residuals), in robust standard deviations.
TUKEY_C = 4.685
#: Gaussian σ (voxels) of the enhancement map before its probability is judged (:func:`enhancement_evidence`).
ENHANCEMENT_SMOOTHING_VOX = 0.7
#: The smoothed enhancement, in units of its own noise, at which a voxel is as likely contrast as noise.
ENHANCEMENT_Z = 3.0
#: Side (voxels) of the cube over which :func:`local_wiener` takes its local mean and variance: the smallest
#: that has a centre; chosen on the demo's training patients (out-of-fold, ``benchmarks/dynamic_range.py
#: --out-of-fold``): 5 kept the same lesion peaks with more of the noise.
WIENER_WINDOW_VOX = 3
#: Largest R1 change (s⁻¹) the SPGR inversion returns: ratios beyond the equation's saturation are noise.
MAX_DELTA_R1 = 50.0


@dataclass(frozen=True)
class IntensityMatch:
    """``post ≈ scale × pre + offset`` on non-enhancing tissue, and the residuals' robust spread there."""

    scale: float
    offset: float
    residual_std: float
    voxels: int

    def apply(self, pre: np.ndarray) -> np.ndarray:
        return (self.scale * np.asarray(pre, np.float32) + self.offset).astype(np.float32)

    def summary(self) -> dict:
        return {
            "scale": round(self.scale, 6),
            "offset": round(self.offset, 4),
            "residual_std": round(self.residual_std, 4),
            "voxels": self.voxels,
        }


def match_intensities(
    pre: np.ndarray, post: np.ndarray, region: np.ndarray, *, iterations: int = 20
) -> IntensityMatch:
    """Fit ``post ≈ a pre + b`` over ``region`` by iteratively reweighted least squares (Tukey's biweight)."""
    idx = np.flatnonzero(np.asarray(region, bool).ravel())
    if idx.size < 10:
        raise ValueError("too few voxels to match the intensities of the two images")
    idx = idx[:: max(1, idx.size // FIT_SAMPLES)]
    x = np.asarray(pre, np.float64).ravel()[idx]
    y = np.asarray(post, np.float64).ravel()[idx]
    a = float(np.median(y) / max(np.median(x), 1e-12))
    b = 0.0
    design = np.stack([x, np.ones_like(x)], axis=1)
    scale = 0.0
    for _ in range(iterations):
        residual = y - (a * x + b)
        scale = 1.4826 * float(np.median(np.abs(residual - np.median(residual))))
        if scale <= 0:
            break
        u = residual / (TUKEY_C * scale)
        w = np.where(np.abs(u) < 1.0, (1.0 - u * u) ** 2, 0.0)
        wd = design * w[:, None]
        new_a, new_b = np.linalg.lstsq(wd.T @ design, wd.T @ y, rcond=None)[0]
        done = abs(new_a - a) <= 1e-6 * abs(a) and abs(new_b - b) <= 1e-3 * max(scale, 1e-12)
        a, b = float(new_a), float(new_b)
        if done:
            break
    return IntensityMatch(a, b, scale, int(idx.size))


def smooth_within(image: np.ndarray, mask: np.ndarray, sigma_vox) -> np.ndarray:
    """Gaussian smoothing of ``image`` over ``mask`` only (normalised convolution), 0 outside it."""
    mask = np.asarray(mask, np.float32)
    if np.all(np.asarray(sigma_vox) <= 0):
        return (np.asarray(image, np.float32) * mask).astype(np.float32)
    num = ndimage.gaussian_filter(np.asarray(image, np.float32) * mask, sigma_vox)
    den = ndimage.gaussian_filter(mask, sigma_vox)
    out = np.where(den > 1e-3, num / np.maximum(den, 1e-3), 0.0) * mask
    return out.astype(np.float32)


def local_wiener(
    image: np.ndarray, region: np.ndarray, size: int = WIENER_WINDOW_VOX
) -> tuple[np.ndarray, float]:
    """Adaptive Wiener (Lee) filter of ``image`` over ``region``: each voxel is pulled towards its local mean
    (a cube of ``size`` voxels, over ``region`` only) by the fraction of the local variance that the noise
    explains, ``mean + max(var − noise, 0) / max(var, noise) × (x − mean)``. Where the image is flat (the
    inside of a uniformly enhancing lesion) the output is the local mean and the noise falls by √(size³);
    where the signal varies more than the noise (a ring's thin wall, an edge) the voxel keeps its value. The
    noise variance is the robust variance of ``image − mean`` over ``region`` (mostly flat voxels), corrected
    for the voxel's own share of its mean. Returns the filtered image (0 outside ``region``) and the noise's
    standard deviation."""
    region = np.asarray(region, bool)
    weight = region.astype(np.float32)
    data = np.asarray(image, np.float32) * weight
    count = np.maximum(ndimage.uniform_filter(weight, size), 1e-3)
    mean = ndimage.uniform_filter(data, size) / count
    variance = np.maximum(ndimage.uniform_filter(data * data, size) / count - mean * mean, 0.0)
    n = size**3
    noise_variance = robust_std((data - mean)[region]) ** 2 * n / (n - 1)
    keep = np.maximum(variance - noise_variance, 0.0) / np.maximum(
        variance, max(noise_variance, 1e-12)
    )
    out = np.where(region, mean + keep * (data - mean), 0.0)
    return out.astype(np.float32), float(np.sqrt(noise_variance))


def contrast_field(
    difference: np.ndarray,
    quiet: np.ndarray,
    region: np.ndarray,
    sigma_vox,
    *,
    clip: float,
) -> np.ndarray:
    """The smooth part of ``difference`` (post − matched pre) over ``region``: its values in ``quiet`` (tissue
    that does not enhance), clipped at ± ``clip``, averaged by a Gaussian of ``sigma_vox`` (normalised
    convolution), 0 outside ``region``. What two sequences' different contrasts leave after the intensity
    match, at the scale of tissue regions."""
    weight = np.asarray(quiet, np.float32)
    values = np.clip(np.asarray(difference, np.float32), -clip, clip) * weight
    num = ndimage.gaussian_filter(values, sigma_vox)
    den = ndimage.gaussian_filter(weight, sigma_vox)
    field = np.where(den > 1e-3, num / np.maximum(den, 1e-3), 0.0)
    return (field * np.asarray(region, bool)).astype(np.float32)


def enhancement_probability(smoothed: np.ndarray, noise_std: float, z: float) -> np.ndarray:
    """Probability that a voxel truly enhances: Φ(Δ / σ − z) of its smoothed enhancement Δ (noise σ)."""
    if noise_std <= 0:
        return (np.asarray(smoothed) > 0).astype(np.float32)
    score = np.asarray(smoothed, np.float64) / noise_std - z
    return (0.5 * special.erfc(-score / np.sqrt(2.0))).astype(np.float32)


def enhancement_evidence(delta: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, float]:
    """How likely each voxel of ``delta`` (post − matched pre) is contrast rather than noise: ``delta``
    smoothed over ``region`` (:data:`ENHANCEMENT_SMOOTHING_VOX`) against that smoothing's own robust noise
    (:func:`enhancement_probability` at :data:`ENHANCEMENT_Z`), 0 outside ``region``. Returns the probability
    and the smoothed difference's noise."""
    region = np.asarray(region, bool)
    smoothed = smooth_within(delta, region, ENHANCEMENT_SMOOTHING_VOX)
    smoothed_std = robust_std(smoothed[region])
    probability = enhancement_probability(smoothed, smoothed_std, ENHANCEMENT_Z) * region
    return probability.astype(np.float32), smoothed_std


# ----------------------------------------------------------------------------------------------- dose
def spgr_relative(r1: np.ndarray, *, tr_s: float, flip_deg: float) -> np.ndarray:
    """Spoiled gradient echo signal per unit M0: sin α (1 − E) / (1 − cos α E), E = exp(−TR R1)."""
    alpha = np.deg2rad(flip_deg)
    e = np.exp(-tr_s * np.asarray(r1, np.float64))
    return np.sin(alpha) * (1.0 - e) / (1.0 - np.cos(alpha) * e)


def spgr_r1(signal: np.ndarray, *, tr_s: float, flip_deg: float) -> np.ndarray:
    """Inverse of :func:`spgr_relative`: R1 (s⁻¹) of a signal per unit M0 (below sin α)."""
    alpha = np.deg2rad(flip_deg)
    sin_a, cos_a = np.sin(alpha), np.cos(alpha)
    y = np.clip(np.asarray(signal, np.float64), 1e-12, sin_a * (1 - 1e-9))
    e = (sin_a - y) / (sin_a - y * cos_a)
    return -np.log(np.clip(e, 1e-300, 1.0)) / tr_s


def scale_enhancement(
    baseline: np.ndarray,
    enhancement: np.ndarray,
    dose_fraction: float,
    *,
    model: str = "linear",
    tr_ms: float | None = None,
    flip_deg: float | None = None,
    t10_s: float = 1.4,
    min_baseline: float = 0.0,
) -> np.ndarray:
    """The enhancement at ``dose_fraction`` of the dose that made ``enhancement`` over ``baseline``.

    ``linear``: ``d × enhancement``. ``spgr``: per voxel, the post/pre signal ratio gives ΔR1 at T1₀ =
    ``t10_s`` (the signal's M0 cancels), ``d ΔR1`` gives the low-dose signal; voxels whose baseline is at or
    below ``min_baseline`` (air, dark bone, where the ratio is noise) are scaled linearly.
    """
    enhancement = np.asarray(enhancement, np.float32)
    if model == "linear":
        return (dose_fraction * enhancement).astype(np.float32)
    if model != "spgr":
        raise ValueError(f"unknown dose model {model!r} (linear or spgr)")
    if tr_ms is None or flip_deg is None:
        raise ValueError("the spgr dose model needs the repetition time and the flip angle")
    tr_s = tr_ms / 1000.0
    baseline = np.asarray(baseline, np.float32)
    out = dose_fraction * enhancement
    valid = (baseline > max(min_baseline, 0.0)) & (enhancement > 0)
    if valid.any():
        r10 = 1.0 / t10_s
        s0 = float(spgr_relative(r10, tr_s=tr_s, flip_deg=flip_deg))
        ratio = 1.0 + enhancement[valid] / baseline[valid]
        delta_r1 = np.clip(
            spgr_r1(ratio * s0, tr_s=tr_s, flip_deg=flip_deg) - r10, 0.0, MAX_DELTA_R1
        )
        low = spgr_relative(r10 + dose_fraction * delta_r1, tr_s=tr_s, flip_deg=flip_deg)
        out[valid] = baseline[valid] * (low / s0 - 1.0)
    return out.astype(np.float32)
