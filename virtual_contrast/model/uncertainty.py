"""Where vir-T1c should not be trusted: a calibrated map of its expected error, from the ensemble and the images.

Every prediction runs K fold models × 8 mirror configurations (:func:`~virtual_contrast.model.predict.
tta_ensemble`); their spread is free. Alone it ranks the voxels' errors poorly (on the demo's training subjects,
out of fold, the mirror spread's Spearman correlation with |vir − ref| is about 0): most of the error is where
the image changes (enhancing vessels and lesions, tissue edges), which the passes agree on. So the map written
beside vir-T1c is an *expected |vir − ref|*, from a small additive model of voxel features the predictor has
anyway (:data:`FEATURES`):

    log(|vir − ref| + eps) ≈ Σ_f g_f(feature_f),   uncertainty = exp(Σ_f g_f) · smear

each ``g_f`` a step function on :data:`N_BINS` quantile bins of its feature, fitted by least squares, and
``smear`` the mean of exp(residual) (Duan's smearing estimate, so that the map is on the scale of |error|,
not of its geometric mean). It is fitted ONLY on the training subjects' out-of-fold predictions (each fold
model predicting its own tuning subjects), never on test patients, and stored as JSON beside the models
(:class:`Calibration`).

The fold disagreement is written (:func:`spread_volumes`) but is no feature: an out-of-fold prediction is one
model's, which has no fold disagreement to learn from. The mirror spread enters as the root mean of each
model's variance over its mirrors, which is what one model gives out of fold.

Chosen on the training subjects only (leave-one-fold-out over the out-of-fold predictions of a demo run): 16
bins (Spearman 0.32, top-1 % AUC 0.90, median over subjects; 8 bins 0.30 / 0.89, 4 bins 0.27 / 0.85); these
7 features (4 more features of smoothed and distance-to-edge kinds: 0.34 / 0.89).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from virtual_contrast.io import InputError, write_json

log = logging.getLogger(__name__)

#: The voxel features of the calibration, in order. mirror_spread: the passes' spread within a model;
#: correction: |vir − low| (how much the network changed the low-dose image); gradient: Gaussian gradient
#: magnitude of vir (sigma one voxel: edges); enhancement: |vir − pre|; vir, low, pre: the intensities.
FEATURES = ("mirror_spread", "correction", "gradient", "enhancement", "vir", "low", "pre")
N_BINS = 16
#: Added to |error| before the log (normalised units; the noise floor of |vir − ref| is about 0.01).
EPS = 1e-3
#: What a map written without a calibration holds (the workflow always has one; the CLI says when not).
UNCALIBRATED = "std_passes"
CALIBRATED = "expected_abs_error"
SPREAD_VOLUMES = ("std_passes", "std_folds", "std_mirrors")


@dataclass(frozen=True)
class Calibration:
    """The fitted model of :func:`expected_error` (see the module docstring).

    ``edges[f]``: the inner bin edges of feature ``f`` (ascending; ``len(values[f]) == len(edges[f]) + 1``);
    ``values[f]``: its step function, on the log scale; ``smear``: Duan's factor; ``subjects``: the training
    subjects it was fitted on; ``n_voxels``: their brain voxels.
    """

    features: tuple[str, ...]
    edges: tuple[tuple[float, ...], ...]
    values: tuple[tuple[float, ...], ...]
    smear: float
    eps: float
    subjects: tuple[str, ...]
    n_voxels: int

    def __post_init__(self) -> None:
        if tuple(self.features) != FEATURES:
            raise InputError(f"calibration features {list(self.features)} are not {list(FEATURES)}")
        if len(self.edges) != len(self.features) or len(self.values) != len(self.features):
            raise InputError("calibration needs one edge list and one value list per feature")
        for f, e, v in zip(self.features, self.edges, self.values, strict=True):
            if len(v) != len(e) + 1 or any(b <= a for a, b in zip(e, e[1:], strict=False)):
                raise InputError(
                    f"calibration of {f}: {len(e)} ascending edges need {len(e) + 1} values"
                )
        if not (np.isfinite(self.smear) and self.smear > 0):
            raise InputError(f"calibration smear factor {self.smear} must be positive")

    def save(self, path: Path | str) -> Path:
        return write_json(asdict(self), path)

    @classmethod
    def load(cls, path: Path | str) -> Calibration:
        try:
            raw = json.loads(Path(path).read_text())
            return cls(
                features=tuple(raw["features"]),
                edges=tuple(tuple(float(x) for x in e) for e in raw["edges"]),
                values=tuple(tuple(float(x) for x in v) for v in raw["values"]),
                smear=float(raw["smear"]),
                eps=float(raw["eps"]),
                subjects=tuple(str(s) for s in raw["subjects"]),
                n_voxels=int(raw["n_voxels"]),
            )
        except FileNotFoundError:
            raise InputError("uncertainty calibration not found", path=path) from None
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"not an uncertainty calibration: {exc}", path=path) from None
        except InputError as exc:
            raise InputError(exc.reason, path=path) from None


def _gaussian_kernels(
    sigma: float = 1.0, truncate: float = 4.0
) -> tuple[torch.Tensor, torch.Tensor]:
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = g / g.sum()
    return g, -t / sigma**2 * g  # the Gaussian and its derivative (correlation kernels)


def gradient_magnitude(image: torch.Tensor) -> torch.Tensor:
    """Gaussian gradient magnitude (sigma one voxel, edges replicated) of a 3D tensor, on its device: the
    same operation where the calibration is fitted and where it is applied, on a GPU in milliseconds."""
    g, dg = (k.to(image.device) for k in _gaussian_kernels())
    radius = (len(g) - 1) // 2
    volume = image.float()[None, None]
    squares = torch.zeros_like(volume)
    for axis in range(3):
        out = volume
        for conv_axis in range(3):
            kernel = (dg if conv_axis == axis else g).flip(0)  # conv3d correlates: flip to convolve
            shape = [1, 1, 1, 1, 1]
            shape[2 + conv_axis] = len(kernel)
            pad = [0, 0, 0, 0, 0, 0]
            pad[2 * (2 - conv_axis)] = pad[2 * (2 - conv_axis) + 1] = radius
            out = F.conv3d(F.pad(out, pad, mode="replicate"), kernel.reshape(shape))
        squares += out.square()
    return squares.sqrt()[0, 0]


def feature_volumes(vir, low, pre, std_mirrors) -> torch.Tensor:
    """``(len(FEATURES), X, Y, Z)`` float32 tensor of the voxel features (normalised units), on the device of
    ``vir`` (arrays or tensors of one shape)."""
    vir = torch.as_tensor(vir).float()
    low, pre, spread = (torch.as_tensor(a).float().to(vir.device) for a in (low, pre, std_mirrors))
    shapes = {tuple(a.shape) for a in (vir, low, pre, spread)}
    if len(shapes) != 1 or vir.ndim != 3:
        raise InputError(f"vir, low, pre and spread must be 3D on one grid, got {sorted(shapes)}")
    columns = {
        "mirror_spread": spread,
        "correction": (vir - low).abs(),
        "gradient": gradient_magnitude(vir),
        "enhancement": (vir - pre).abs(),
        "vir": vir,
        "low": low,
        "pre": pre,
    }
    return torch.stack([columns[f] for f in FEATURES])


def voxel_features(vir, low, pre, std_mirrors, mask) -> np.ndarray:
    """``(n_brain_voxels, len(FEATURES))`` float32 array, the brain voxels in C order."""
    volumes = feature_volumes(vir, low, pre, std_mirrors)
    inside = torch.as_tensor(np.asarray(mask) > 0.5, device=volumes.device)
    if tuple(inside.shape) != tuple(volumes.shape[1:]):
        raise InputError(
            f"mask {tuple(inside.shape)} is not on the grid {tuple(volumes.shape[1:])}"
        )
    return volumes[:, inside].T.cpu().numpy()


def _bin_design(features: np.ndarray, edges: Sequence[Sequence[float]]) -> np.ndarray:
    """One-hot bins of every feature (the first feature's first bin is the intercept's: its column is kept,
    the other features' first columns are dropped so that the design has full rank)."""
    blocks = []
    for j, e in enumerate(edges):
        index = np.searchsorted(np.asarray(e), features[:, j], side="right")
        onehot = np.zeros((len(features), len(e) + 1), np.float32)
        onehot[np.arange(len(features)), index] = 1
        blocks.append(onehot if j == 0 else onehot[:, 1:])
    return np.hstack(blocks)


def fit_calibration(
    samples: Sequence[tuple[np.ndarray, np.ndarray]],
    subjects: Sequence[str],
    *,
    n_bins: int = N_BINS,
    eps: float = EPS,
) -> Calibration:
    """Fit :class:`Calibration` on ``(voxel_features, |vir − ref|)`` pairs of training subjects' out-of-fold
    predictions (one pair per subject, brain voxels)."""
    if not samples:
        raise InputError("no out-of-fold prediction to fit the uncertainty calibration on")
    x = np.concatenate([f for f, _ in samples]).astype(np.float64)
    y = np.concatenate([np.asarray(e, np.float64) for _, e in samples])
    if x.shape[1] != len(FEATURES) or len(x) != len(y):
        raise InputError(f"expected {len(FEATURES)} features per voxel and one error per voxel")
    quantiles = np.linspace(0, 1, n_bins + 1)[1:-1]
    edges = [tuple(np.unique(np.quantile(x[:, j], quantiles)).tolist()) for j in range(x.shape[1])]
    design = _bin_design(x, edges)
    target = np.log(y + eps)
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    smear = float(np.mean(np.exp(target - design @ coef)))
    values, start = [], 0
    for j, e in enumerate(edges):
        width = len(e) + 1 if j == 0 else len(e)
        step = coef[start : start + width]
        values.append(tuple(float(v) for v in (step if j == 0 else np.r_[0.0, step])))
        start += width
    cal = Calibration(FEATURES, tuple(edges), tuple(values), smear, eps, tuple(subjects), len(y))
    log.info(
        "uncertainty calibration fitted on %d training subjects' out-of-fold predictions (%d voxels), "
        "smear %.3f",
        len(subjects),
        len(y),
        smear,
    )
    return cal


def expected_error(cal: Calibration, features) -> np.ndarray | torch.Tensor:
    """The calibrated expected |vir − ref| of each voxel (normalised units): ``features`` is
    ``(n, len(FEATURES))`` (an array: an array back) or ``(len(FEATURES), X, Y, Z)`` (a tensor, on its
    device: a tensor back)."""
    as_array = not isinstance(features, torch.Tensor)
    x = torch.as_tensor(np.asarray(features, np.float32)).T if as_array else features
    log_error = torch.zeros(x.shape[1:], dtype=torch.float64, device=x.device)
    for j, (e, v) in enumerate(zip(cal.edges, cal.values, strict=True)):
        edges = torch.tensor(e, dtype=torch.float32, device=x.device)
        values = torch.tensor(v, dtype=torch.float64, device=x.device)
        log_error += values[torch.bucketize(x[j].contiguous(), edges, right=True)]
    out = (torch.exp(log_error) * cal.smear - cal.eps).clamp_min(0).float()
    return out.cpu().numpy() if as_array else out


def uncertainty_map(
    calibration: Calibration | None,
    *,
    vir,
    low,
    pre,
    std_passes,
    std_mirrors,
    mask: np.ndarray | None,
) -> tuple[np.ndarray, str]:
    """The map written beside vir-T1c (float32 array) and what it holds (:data:`CALIBRATED` or
    :data:`UNCALIBRATED`): the calibrated expected |error|, or without a calibration the standard deviation
    over all passes; 0 outside the brain mask (when given). Arrays or tensors (computed on their device)."""
    shape = tuple(np.shape(vir))
    inside = np.ones(shape, bool) if mask is None else np.asarray(mask) > 0.5
    if calibration is None:
        spread = torch.as_tensor(std_passes).float().cpu().numpy()
        return np.where(inside, spread, 0.0).astype(np.float32), UNCALIBRATED
    if low is None or pre is None:
        raise InputError(
            "a calibrated uncertainty map needs the low-dose T1c and the pre-contrast T1"
        )
    expected = expected_error(calibration, feature_volumes(vir, low, pre, std_mirrors))
    return np.where(inside, expected.cpu().numpy(), 0.0).astype(np.float32), CALIBRATED


def spread_volumes(std_passes, std_folds, std_mirrors, mask: np.ndarray | None) -> np.ndarray:
    """The raw spreads as one 4D array (volumes in :data:`SPREAD_VOLUMES` order), 0 outside the mask."""
    stack = np.stack([np.asarray(a, np.float32) for a in (std_passes, std_folds, std_mirrors)], -1)
    if mask is not None:
        stack[~(np.asarray(mask) > 0.5)] = 0
    return stack
