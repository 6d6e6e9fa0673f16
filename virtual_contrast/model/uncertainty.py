"""Where vir-T1c should not be trusted: a calibrated map of its expected error, from the ensemble and the images.

Every prediction runs K fold models × 8 mirror configurations (:func:`~virtual_contrast.model.predict.
tta_ensemble`); their spread is free. Alone it ranks the voxels' errors poorly (on the demo's training subjects,
out of fold, the mirror spread's Spearman correlation with |vir − ref| is about 0): most of the error is where
the image changes (enhancing vessels and lesions, tissue edges), which the passes agree on. So the map written
beside vir-T1c is an *expected |vir − ref|*, from a model of voxel features the predictor has anyway
(:data:`FEATURES`: the spread, the intensities of vir-T1c, the low dose and the pre-contrast T1, their
differences, edges, and the same smoothed over a voxel or two):

    log(|vir − ref| + eps) ≈ Σ_t tree_t(features),   uncertainty = exp(Σ_t tree_t) · smear

a sum of :data:`N_TREES` regression trees of depth :data:`MAX_DEPTH` (gradient boosting, fitted
with scikit-learn's HistGradientBoostingRegressor and stored as plain arrays), and ``smear`` the mean of
exp(residual) (Duan's smearing estimate, so that the map is on the scale of |error|, not of its geometric
mean). It is fitted ONLY on the training subjects' out-of-fold predictions (each fold model predicting its own
tuning subjects), never on test patients, and stored as JSON beside the models (:class:`Calibration`); the
map is evaluated from those arrays with torch, on the prediction's device.

The fold disagreement is written (:func:`spread_volumes`) but is no feature: an out-of-fold prediction is one
model's, which has no fold disagreement to learn from. The mirror spread enters as the root mean of each
model's variance over its mirrors, which is what one model gives out of fold.

Chosen on the training subjects only: leave-one-fold-out over the out-of-fold predictions of four demo runs
(each of 12 training subjects scored by a calibration fitted on the other folds' subjects; median Spearman
over subjects per run). An additive model of 16 quantile bins of the first 7 features (the calibration before
this one): 0.20, 0.24, 0.22, 0.24; the same with the 16 and FLAIR, ADC: 0.17-0.29; trees on the first 7:
0.23-0.32; 32 trees of depth 4 on all 16: 0.27, 0.36, 0.25, 0.31 (top-1 % AUC 0.95 in every case). The errors
depend on the features jointly (an edge matters where the network changed the low dose, not elsewhere), which
an additive model cannot say. Intensities of the other input channels (FLAIR, ADC) helped more (0.30-0.45) but
are not in every study's channels, so they are left out.
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
from scipy.ndimage import distance_transform_edt

from virtual_contrast.io import InputError, write_json

log = logging.getLogger(__name__)

#: The voxel features of the calibration, in order (normalised units; distances in voxels of the grid).
#: mirror_spread: the passes' spread within a model; correction: |vir − low| (how much the network changed the
#: low-dose image); gradient: Gaussian gradient magnitude of vir (sigma one voxel: edges); enhancement:
#: |vir − pre|; vir, low, pre: the intensities; *_smooth1/2: Gaussian smoothing with sigma 1 or 2 voxels (an
#: error spreads over a region); low_gradient: the low dose's edges; edge_distance: from the brain mask's edge;
#: detail: |vir − its smoothing| (fine structure); signed_correction: vir − low; low_enhancement: low − pre.
FEATURES = (
    "mirror_spread",
    "correction",
    "gradient",
    "enhancement",
    "vir",
    "low",
    "pre",
    "correction_smooth1",
    "correction_smooth2",
    "spread_smooth1",
    "gradient_smooth1",
    "low_gradient",
    "edge_distance",
    "detail",
    "signed_correction",
    "low_enhancement",
)
#: The deepest tree a calibration file may hold (the fit makes trees of MAX_DEPTH).
MAX_LOAD_DEPTH = 12
#: Boosting rounds, the depth of each tree (at most 16 leaves) and the learning rate. Nearly as good out of
#: fold as 200 trees of 31 leaves (leave-one-fold-out Spearman 0.25-0.36 against 0.23-0.39 over four demo
#: runs; 64 trees of depth 4: 0.25-0.37) at a fifteenth of the work to evaluate.
N_TREES = 32
MAX_DEPTH = 4
LEARNING_RATE = 0.3
#: The fit takes at most this many brain voxels, drawn evenly from the subjects with fixed seeds (the paper's
#: grid has about 1.5 million per subject; the demo's 4 mm grid 20,000-30,000).
MAX_FIT_VOXELS = 1_000_000
#: Added to |error| before the log (normalised units; the noise floor of |vir − ref| is about 0.01).
EPS = 1e-3
#: What a map written without a calibration holds (the workflow always has one; the CLI says when not).
UNCALIBRATED = "std_passes"
CALIBRATED = "expected_abs_error"
SPREAD_VOLUMES = ("std_passes", "std_folds", "std_mirrors")
#: The arrays of one tree: node i splits on feature[i] at threshold[i] (x <= threshold goes left) or is a leaf
#: (feature -1) of value[i].
TREE_FIELDS = ("feature", "threshold", "left", "right", "value")


@dataclass(frozen=True)
class Calibration:
    """The fitted model of :func:`expected_error` (see the module docstring).

    ``baseline``: the constant the trees start from (log scale); ``trees``: one mapping of
    :data:`TREE_FIELDS` to equal-length lists per tree, node 0 the root; ``smear``: Duan's factor;
    ``subjects``: the training subjects it was fitted on; ``n_voxels``: their brain voxels (``n_fit_voxels``
    of them drawn for the fit).
    """

    features: tuple[str, ...]
    baseline: float
    trees: tuple[dict, ...]
    smear: float
    eps: float
    subjects: tuple[str, ...]
    n_voxels: int
    n_fit_voxels: int

    def __post_init__(self) -> None:
        if tuple(self.features) != FEATURES:
            raise InputError(f"calibration features {list(self.features)} are not {list(FEATURES)}")
        if not self.trees:
            raise InputError("calibration has no trees")
        for k, tree in enumerate(self.trees):
            _check_tree(tree, k, len(self.features))
        if not np.isfinite(self.baseline):
            raise InputError(f"calibration baseline {self.baseline} is not finite")
        if not (np.isfinite(self.smear) and self.smear > 0):
            raise InputError(f"calibration smear factor {self.smear} must be positive")

    def save(self, path: Path | str) -> Path:
        return write_json(asdict(self), path)

    @classmethod
    def load(cls, path: Path | str) -> Calibration:
        try:
            raw = json.loads(Path(path).read_text())
            if "trees" not in raw and "edges" in raw:
                raise InputError(
                    "an uncertainty calibration of an earlier version (binned features): run "
                    "calibrate_uncertainty again (delete this file)"
                )
            return cls(
                features=tuple(raw["features"]),
                baseline=float(raw["baseline"]),
                trees=tuple({f: list(tree[f]) for f in TREE_FIELDS} for tree in raw["trees"]),
                smear=float(raw["smear"]),
                eps=float(raw["eps"]),
                subjects=tuple(str(s) for s in raw["subjects"]),
                n_voxels=int(raw["n_voxels"]),
                n_fit_voxels=int(raw["n_fit_voxels"]),
            )
        except FileNotFoundError:
            raise InputError("uncertainty calibration not found", path=path) from None
        except InputError as exc:  # before ValueError: an InputError is one
            raise InputError(exc.reason, path=path) from None
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"not an uncertainty calibration: {exc}", path=path) from None


def _check_tree(tree: dict, k: int, n_features: int) -> None:
    try:
        sizes = {len(tree[f]) for f in TREE_FIELDS}
    except (KeyError, TypeError):
        raise InputError(f"calibration tree {k} needs the lists {list(TREE_FIELDS)}") from None
    if len(sizes) != 1 or 0 in sizes:
        raise InputError(f"calibration tree {k}: its lists {list(TREE_FIELDS)} differ in length")
    n = sizes.pop()
    feature, left, right = (np.asarray(tree[f]) for f in ("feature", "left", "right"))
    split = feature >= 0
    if (feature >= n_features).any() or (feature < -1).any():
        raise InputError(f"calibration tree {k}: a feature index outside 0..{n_features - 1}")
    children = np.r_[left[split], right[split]]
    # Children come after their parent, so every path ends at a leaf (no cycle).
    parents = np.r_[np.flatnonzero(split), np.flatnonzero(split)]
    if (children >= n).any() or (children <= parents).any():
        raise InputError(f"calibration tree {k}: a child index out of order")
    if not np.isfinite(np.asarray(tree["value"], float)).all():
        raise InputError(f"calibration tree {k}: a value that is not finite")
    if not np.isfinite(np.asarray(tree["threshold"], float)[split]).all():
        raise InputError(f"calibration tree {k}: a threshold that is not finite")
    if _tree_depth(tree) > MAX_LOAD_DEPTH:
        # evaluated as a complete tree: 2**depth nodes each
        raise InputError(f"calibration tree {k} is deeper than {MAX_LOAD_DEPTH} levels")


def _gaussian_kernels(
    sigma: float = 1.0, truncate: float = 4.0
) -> tuple[torch.Tensor, torch.Tensor]:
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = g / g.sum()
    return g, -t / sigma**2 * g  # the Gaussian and its derivative (correlation kernels)


def _separable(volume: torch.Tensor, kernels: Sequence[torch.Tensor]) -> torch.Tensor:
    """``volume`` (1, 1, X, Y, Z) convolved with one 1D kernel per axis, edges replicated."""
    out = volume
    for axis, kernel in enumerate(kernels):
        radius = (len(kernel) - 1) // 2
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = len(kernel)
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        # conv3d correlates: flip to convolve
        out = F.conv3d(F.pad(out, pad, mode="replicate"), kernel.flip(0).reshape(shape))
    return out


def gradient_magnitude(image: torch.Tensor) -> torch.Tensor:
    """Gaussian gradient magnitude (sigma one voxel, edges replicated) of a 3D tensor, on its device: the
    same operation where the calibration is fitted and where it is applied, on a GPU in milliseconds."""
    g, dg = (k.to(image.device) for k in _gaussian_kernels())
    volume = image.float()[None, None]
    squares = torch.zeros_like(volume)
    for axis in range(3):
        squares += _separable(volume, [dg if a == axis else g for a in range(3)]).square()
    return squares.sqrt()[0, 0]


def gaussian_smooth(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing (sigma in voxels, edges replicated) of a 3D tensor, on its device."""
    g = _gaussian_kernels(sigma)[0].to(image.device)
    return _separable(image.float()[None, None], [g, g, g])[0, 0]


def edge_distance(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance (voxels) of each voxel from outside the mask; the grid's border counts as outside."""
    padded = np.pad(np.asarray(mask) > 0.5, 1)
    return distance_transform_edt(padded)[1:-1, 1:-1, 1:-1].astype(np.float32)


def feature_volumes(vir, low, pre, std_mirrors, mask=None) -> torch.Tensor:
    """``(len(FEATURES), X, Y, Z)`` float32 tensor of the voxel features (normalised units), on the device of
    ``vir`` (arrays or tensors of one shape). The spread is set to 0 outside ``mask`` (the brain; the whole
    grid when None) before it is smoothed, as in the spread file of an out-of-fold prediction."""
    vir = torch.as_tensor(vir).float()
    low, pre, spread = (torch.as_tensor(a).float().to(vir.device) for a in (low, pre, std_mirrors))
    shapes = {tuple(a.shape) for a in (vir, low, pre, spread)}
    if len(shapes) != 1 or vir.ndim != 3:
        raise InputError(f"vir, low, pre and spread must be 3D on one grid, got {sorted(shapes)}")
    inside = np.ones(tuple(vir.shape), bool) if mask is None else np.asarray(mask) > 0.5
    if inside.shape != tuple(vir.shape):
        raise InputError(f"mask {inside.shape} is not on the grid {tuple(vir.shape)}")
    spread = spread * torch.as_tensor(inside, device=vir.device)
    correction = (vir - low).abs()
    gradient = gradient_magnitude(vir)
    columns = {
        "mirror_spread": spread,
        "correction": correction,
        "gradient": gradient,
        "enhancement": (vir - pre).abs(),
        "vir": vir,
        "low": low,
        "pre": pre,
        "correction_smooth1": gaussian_smooth(correction, 1.0),
        "correction_smooth2": gaussian_smooth(correction, 2.0),
        "spread_smooth1": gaussian_smooth(spread, 1.0),
        "gradient_smooth1": gaussian_smooth(gradient, 1.0),
        "low_gradient": gradient_magnitude(low),
        "edge_distance": torch.as_tensor(edge_distance(inside), device=vir.device),
        "detail": (vir - gaussian_smooth(vir, 1.0)).abs(),
        "signed_correction": vir - low,
        "low_enhancement": low - pre,
    }
    return torch.stack([columns[f] for f in FEATURES])


def voxel_features(vir, low, pre, std_mirrors, mask) -> np.ndarray:
    """``(n_brain_voxels, len(FEATURES))`` float32 array, the brain voxels in C order."""
    volumes = feature_volumes(vir, low, pre, std_mirrors, mask)  # checks the mask's grid
    inside = torch.as_tensor(np.asarray(mask) > 0.5, device=volumes.device)
    return volumes[:, inside].T.cpu().numpy()


def _export_trees(model) -> tuple[float, tuple[dict, ...]]:
    """The baseline and the trees of a fitted HistGradientBoostingRegressor as plain lists. Reads its
    ``_predictors`` (node arrays: feature_idx, num_threshold, left, right, value, is_leaf; stable since
    scikit-learn 1.0): :func:`fit_calibration` checks the export against ``model.predict``."""
    trees = []
    for (predictor,) in model._predictors:
        nodes = predictor.nodes
        leaf = nodes["is_leaf"].astype(bool)
        trees.append(
            {
                "feature": np.where(leaf, -1, nodes["feature_idx"]).astype(int).tolist(),
                "threshold": np.where(leaf, 0.0, nodes["num_threshold"]).astype(float).tolist(),
                "left": np.where(leaf, 0, nodes["left"]).astype(int).tolist(),
                "right": np.where(leaf, 0, nodes["right"]).astype(int).tolist(),
                "value": np.where(leaf, nodes["value"], 0.0).astype(float).tolist(),
            }
        )
    return float(np.ravel(model._baseline_prediction)[0]), tuple(trees)


#: Voxels evaluated at once by :func:`_tree_sum` (its index arrays are trees × this many int64s).
TREE_CHUNK = 65_536


def _tree_depth(tree: dict) -> int:
    """Levels of splits on the longest path from the root (0 for a lone leaf)."""
    depth = {0: 0}
    for i, f in enumerate(tree["feature"]):  # children come after their parents (checked on load)
        if f >= 0:
            depth[tree["left"][i]] = depth[tree["right"][i]] = depth[i] + 1
    return max(depth.values())


def _complete(trees: Sequence[dict], device) -> tuple[int, dict[str, torch.Tensor]]:
    """The trees as complete binary trees of one depth D: node k's children are 2k+1 and 2k+2, the 2**D
    leaves follow the 2**D − 1 splits; a leaf above depth D becomes a subtree whose leaves all hold its value
    (its splits send everything left). Tensors (n_trees, 2**D − 1) feature and threshold, (n_trees, 2**D)
    value: a voxel then descends D steps with index arithmetic, no child lists. The thresholds are float32,
    rounded down (:func:`_float32_below`), to be compared with the float32 features."""
    depth = max(_tree_depth(t) for t in trees)
    n_split, n_leaf = 2**depth - 1, 2**depth
    feature = np.zeros((len(trees), n_split), np.int64)
    threshold = np.full((len(trees), n_split), np.inf)
    value = np.zeros((len(trees), n_leaf))
    for k, tree in enumerate(trees):
        stack = [(0, 0, 0)]  # (node in the tree, slot in the complete tree, level)
        while stack:
            node, slot, level = stack.pop()
            if tree["feature"][node] < 0:
                first = slot
                for _ in range(depth - level):
                    first = 2 * first + 1
                span = 2 ** (depth - level)
                value[k, first - n_split : first - n_split + span] = tree["value"][node]
                continue
            feature[k, slot], threshold[k, slot] = tree["feature"][node], tree["threshold"][node]
            stack += [(tree["left"][node], 2 * slot + 1, level + 1),
                      (tree["right"][node], 2 * slot + 2, level + 1)]  # fmt: skip
    as_tensor = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
    return depth, {"feature": as_tensor(feature), "threshold": as_tensor(_float32_below(threshold)),
                   "value": as_tensor(value)}  # fmt: skip


def _float32_below(threshold: np.ndarray) -> np.ndarray:
    """The largest float32 at or below each float64 threshold: for a float32 ``x``, ``x > t`` then holds
    exactly when it holds in float64 (scikit-learn's comparison), at half the memory traffic."""
    below = threshold.astype(np.float32)
    above = below.astype(np.float64) > threshold
    below[above] = np.nextafter(below[above], np.float32(-np.inf))
    return below


def _tree_sum(baseline: float, trees: Sequence[dict], x: torch.Tensor) -> torch.Tensor:
    """Σ_t tree_t(x) + baseline for ``x`` (len(FEATURES), n) float32 on its device, summed in float64. All
    trees descend together, one level per step."""
    depth, packed = _complete(trees, x.device)
    x = x.float()
    total = torch.empty(x.shape[1], dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[1], TREE_CHUNK):
        chunk = x[:, start : start + TREE_CHUNK]
        node = torch.zeros(len(trees), chunk.shape[1], dtype=torch.long, device=x.device)
        for _ in range(depth):
            goes_right = chunk.gather(0, packed["feature"].gather(1, node)) > packed[
                "threshold"
            ].gather(1, node)
            node.mul_(2).add_(1).add_(goes_right)  # in place: the children of k are 2k+1 and 2k+2
        leaf = node.sub_(2**depth - 1)
        total[start : start + TREE_CHUNK] = packed["value"].gather(1, leaf).sum(0)
    return total + baseline


def voxel_quota(n_subjects: int, max_voxels: int = MAX_FIT_VOXELS) -> int:
    """Voxels of each subject the fit takes at most: ``max_voxels`` shared evenly."""
    return max(1, max_voxels // max(1, n_subjects))


def draw_voxels(
    features: np.ndarray, error: np.ndarray, quota: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """At most ``quota`` of one subject's voxels (rows), drawn without replacement with ``seed``, in their
    order; all of them when there are no more."""
    if len(error) <= quota:
        return features, error
    keep = np.sort(np.random.default_rng(seed).choice(len(error), quota, replace=False))
    return features[keep], error[keep]


def fit_calibration(
    samples: Sequence[tuple[np.ndarray, np.ndarray]],
    subjects: Sequence[str],
    *,
    eps: float = EPS,
    max_voxels: int = MAX_FIT_VOXELS,
    threads: int | None = None,
    n_voxels: int | None = None,
) -> Calibration:
    """Fit :class:`Calibration` on ``(voxel_features, |vir − ref|)`` pairs of training subjects' out-of-fold
    predictions (one pair per subject, brain voxels), on at most ``threads`` threads (None: all). Subject i
    gives at most :func:`voxel_quota` voxels, drawn by :func:`draw_voxels` with seed i (a caller may draw
    them first, as it reads, to bound its memory, and give the subjects' brain voxels in ``n_voxels``)."""
    from sklearn.ensemble import HistGradientBoostingRegressor
    from threadpoolctl import threadpool_limits

    if not samples:
        raise InputError("no out-of-fold prediction to fit the uncertainty calibration on")
    if any(
        np.ndim(f) != 2 or np.shape(f)[1] != len(FEATURES) or len(f) != len(e) for f, e in samples
    ):
        raise InputError(f"expected {len(FEATURES)} features per voxel and one error per voxel")
    total = sum(len(e) for _, e in samples) if n_voxels is None else n_voxels
    quota = voxel_quota(len(samples), max_voxels)
    drawn = [
        draw_voxels(np.asarray(f), np.asarray(e), quota, i) for i, (f, e) in enumerate(samples)
    ]
    # float32 as the features are where the map is made (the trees compare float32 values exactly)
    x = np.concatenate([f for f, _ in drawn]).astype(np.float32).astype(np.float64)
    y = np.concatenate([np.asarray(e, np.float64) for _, e in drawn])
    target = np.log(y + eps)
    model = HistGradientBoostingRegressor(
        max_iter=N_TREES,
        learning_rate=LEARNING_RATE,
        max_depth=MAX_DEPTH,
        max_leaf_nodes=None,
        early_stopping=False,
        random_state=0,
    )
    with threadpool_limits(limits=threads):
        model.fit(x, target)
        fitted = model.predict(x)
    baseline, trees = _export_trees(model)
    exported = _tree_sum(baseline, trees, torch.from_numpy(x.T.copy())).numpy()
    if not np.allclose(exported, fitted, rtol=0, atol=1e-6):
        raise RuntimeError(
            "the exported trees do not reproduce scikit-learn's prediction (its tree format changed?): "
            f"largest difference {np.abs(exported - fitted).max():.3g}"
        )
    smear = float(np.mean(np.exp(target - fitted)))
    cal = Calibration(FEATURES, baseline, trees, smear, eps, tuple(subjects), total, len(y))
    log.info(
        "uncertainty calibration fitted on %d training subjects' out-of-fold predictions (%d voxels, %d "
        "drawn), %d trees, smear %.3f",
        len(subjects),
        total,
        len(y),
        len(trees),
        smear,
    )
    return cal


def expected_error(cal: Calibration, features) -> np.ndarray | torch.Tensor:
    """The calibrated expected |vir − ref| of each voxel (normalised units): ``features`` is
    ``(n, len(FEATURES))`` (an array: an array back) or ``(len(FEATURES), X, Y, Z)`` (a tensor, on its
    device: a tensor back)."""
    as_array = not isinstance(features, torch.Tensor)
    x = torch.as_tensor(np.asarray(features, np.float32)).T if as_array else features
    shape = x.shape[1:]
    log_error = _tree_sum(cal.baseline, cal.trees, x.reshape(x.shape[0], -1)).reshape(shape)
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
    volumes = feature_volumes(vir, low, pre, std_mirrors, inside)
    brain = torch.as_tensor(inside, device=volumes.device)
    out = np.zeros(shape, np.float32)
    out[inside] = expected_error(calibration, volumes[:, brain]).cpu().numpy()  # C order both
    return out, CALIBRATED


def spread_volumes(std_passes, std_folds, std_mirrors, mask: np.ndarray | None) -> np.ndarray:
    """The raw spreads as one 4D array (volumes in :data:`SPREAD_VOLUMES` order), 0 outside the mask."""
    stack = np.stack([np.asarray(a, np.float32) for a in (std_passes, std_folds, std_mirrors)], -1)
    if mask is not None:
        stack[~(np.asarray(mask) > 0.5)] = 0
    return stack
