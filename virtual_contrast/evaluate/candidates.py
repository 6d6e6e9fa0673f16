"""Candidate lesions of one post-contrast image and the features that tell lesions from vessels and dura.

1. **Enhancement.** The pre-contrast image is first mapped onto the post-contrast image's intensity scale:
   both are normalised separately (1st/99th brain percentiles), and in a post-contrast image the brightest
   voxels are vessels, so unenhanced tissue has different values in the two. Non-enhancing tissue is most of
   the brain and the two T1-weighted images share its contrast, so a straight line fitted to the brain's
   deciles (10th to 90th percentile of pre against post) maps pre onto post; the enhancement is post minus
   mapped pre, after a Gaussian smoothing of ``smoothing_mm`` (normalised by the smoothed brain mask so that
   the brain's edge is not darkened), clipped at 0, zero outside the brain. It is in the normalised units of
   the post-contrast image.
2. **Objects.** Voxels above ``candidate_floor`` are split at their saddles: a watershed from every local
   maximum, then neighbouring basins are merged, highest saddle first, unless the saddle lies below
   ``edge_fraction`` of the lower basin's peak (so a lesion touching a brighter vessel through a faint bridge
   stays a lesion of its own, and a vessel whose brightness dips along its course splits into segments), and
   never across the physiological-enhancement prior's edge: a basin whose peak lies in the prior (a sinus,
   the choroid plexus) is not merged with one whose peak lies outside it. Without that rule a nodule touching
   a sinus through a bright bridge became part of the sinus's object, whose half-maximum core (below) then
   left the nodule out: on the embedded cohort simulated at 2.5 mm, a 29 mm nodule had no candidate of its own.
   Each object is then its half-maximum core: the voxels above ``edge_fraction`` of its own peak that are
   connected to the peak, enclosed cavities filled (the necrotic core of a ring belongs to the lesion, as in
   RANO). The core puts the edge where a blurred step crosses its middle, i.e. at the true boundary, whatever
   the thresholds.
3. **Features** (one row per object, :data:`FEATURE_COLUMNS`): peak and mean enhancement, volume, RANO-like
   long and short axes (see :func:`virtual_contrast.evaluate.lesions.measure_axes`), the inertia ellipsoid's
   semi-axes and ``axis_ratio`` (shortest / longest: 1 for a ball, near 0 for a tube or a sheet), ``fill``
   (volume over the inertia ellipsoid's volume: about 1 for solid shapes, tubes and filled rings included,
   small for branching vessels and curved sheets such as the dura), ``depth_mm`` (the deepest voxel's
   distance to the brain mask's surface), ``prior_overlap`` (fraction in the physiological-enhancement
   prior), ``tubularity`` (Frangi vesselness at the object's centre and at its own scale, the shortest
   inertia semi-axis / sqrt(2), see :mod:`virtual_contrast.evaluate.shape`) and ``score``
   (:func:`lesion_score`, the decision variable).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage
from skimage.segmentation import watershed

from virtual_contrast.evaluate import shape

FEATURE_COLUMNS = (
    "x_mm",
    "y_mm",
    "z_mm",
    "long_axis_mm",
    "short_axis_mm",
    "volume_mm3",
    "n_voxels",
    "max_enhancement",
    "mean_enhancement",
    "axial_slice",
    "inertia_long_mm",
    "inertia_mid_mm",
    "inertia_short_mm",
    "axis_ratio",
    "fill",
    "depth_mm",
    "prior_overlap",
    "tubularity",
    "score",
)
#: Percentiles of the brain's intensities matched between pre- and post-contrast images.
CALIBRATION_PERCENTILES = tuple(range(10, 91, 10))
#: Objects are 26-connected (a vessel or a ring's wall that steps diagonally stays one piece), their
#: background 6-connected (the digital-topology pair for which filled cavities are well defined).
FULL = np.ones((3, 3, 3), bool)
FACE = ndimage.generate_binary_structure(3, 1)


def intensity_mapping(pre: np.ndarray, post: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Slope and intercept of the line that maps pre-contrast intensities onto the post-contrast image's,
    fitted (least squares) to the brain's :data:`CALIBRATION_PERCENTILES`."""
    inside = np.asarray(mask) > 0
    a = np.percentile(np.asarray(pre, np.float32)[inside], CALIBRATION_PERCENTILES)
    b = np.percentile(np.asarray(post, np.float32)[inside], CALIBRATION_PERCENTILES)
    if np.ptp(a) <= 0:
        return 1.0, float(np.median(b) - np.median(a))
    slope, intercept = np.polyfit(a, b, 1)
    return float(slope), float(intercept)


def calibrated_enhancement(
    post: np.ndarray,
    pre: np.ndarray,
    mask: np.ndarray,
    affine: np.ndarray,
    *,
    smoothing_mm: float,
) -> np.ndarray:
    """Post minus the pre-contrast image mapped onto the post's scale (:func:`intensity_mapping`), smoothed,
    clipped at 0, zero outside the brain (float32)."""
    inside = np.asarray(mask) > 0
    slope, intercept = intensity_mapping(pre, post, inside)
    diff = np.asarray(post, np.float32) - (slope * np.asarray(pre, np.float32) + intercept)
    diff[~inside] = 0
    if smoothing_mm > 0:
        sigma = smoothing_mm / shape.voxel_sizes(affine)
        weight = ndimage.gaussian_filter(inside.astype(np.float32), sigma)
        diff = ndimage.gaussian_filter(diff, sigma) / np.maximum(weight, 1e-6)
    enh = np.clip(diff, 0, None).astype(np.float32)
    enh[~inside] = 0
    return enh


#: Half of the 26 neighbour offsets: each pair of touching voxels is seen once.
_OFFSETS = [o for o in np.ndindex(3, 3, 3) if o > (1, 1, 1)]


def _shifted(array: np.ndarray, offset: tuple[int, ...], first: bool) -> np.ndarray:
    """The part of ``array`` that has a neighbour at ``offset`` (first) or that neighbour (not first)."""
    index = []
    for d in offset:
        d -= 1
        if d == 0:
            index.append(slice(None))
        elif first:
            index.append(slice(None, -d) if d > 0 else slice(-d, None))
        else:
            index.append(slice(d, None) if d > 0 else slice(None, d))
    return array[tuple(index)]


def _saddle_edges(basins: np.ndarray, enh: np.ndarray) -> pd.DataFrame:
    """Highest saddle (the larger of the two voxels' minimum across the boundary, over 26-neighbours)
    between touching basins."""
    parts = []
    for offset in _OFFSETS:
        a, b = _shifted(basins, offset, True), _shifted(basins, offset, False)
        touching = (a > 0) & (b > 0) & (a != b)
        if not touching.any():
            continue
        la, lb = a[touching], b[touching]
        saddle = np.minimum(
            _shifted(enh, offset, True)[touching], _shifted(enh, offset, False)[touching]
        )
        parts.append(
            pd.DataFrame({"a": np.minimum(la, lb), "b": np.maximum(la, lb), "saddle": saddle})
        )
    if not parts:
        return pd.DataFrame({"a": [], "b": [], "saddle": []})
    return pd.concat(parts).groupby(["a", "b"], as_index=False)["saddle"].max()


def _peak_in_prior(basins: np.ndarray, enh: np.ndarray, prior: np.ndarray, n: int) -> np.ndarray:
    """For each basin label 0..n: whether its brightest voxel lies in ``prior``."""
    inside = np.flatnonzero(basins.ravel() > 0)
    labels, values = basins.ravel()[inside], enh.ravel()[inside]
    order = np.lexsort((values, labels))
    last = np.r_[labels[order][1:] != labels[order][:-1], True]
    in_prior = np.zeros(n + 1, bool)
    in_prior[labels[order][last]] = np.asarray(prior).ravel()[inside[order][last]] > 0
    return in_prior


def split_objects(
    enh: np.ndarray, *, floor: float, split_fraction: float, prior: np.ndarray | None = None
) -> np.ndarray:
    """Label image of the objects above ``floor``, split where the saddle between two maxima lies below
    ``split_fraction`` of the lower one (before the half-maximum trimming of :func:`object_cores`), and
    between maxima on either side of ``prior``'s edge (a physiological-enhancement mask, or None)."""
    above = enh > floor
    if not above.any():
        return np.zeros(enh.shape, np.int32)
    maxima = (enh == ndimage.maximum_filter(enh, size=3)) & above
    markers, n = ndimage.label(maxima, structure=FULL)
    basins = watershed(-enh, markers, mask=above, connectivity=3).astype(np.int32)
    peaks = np.zeros(n + 1)
    np.maximum.at(peaks, basins[above], enh[above])
    # A merged object keeps the brighter root's peak, so its side of the prior's edge is its root's.
    in_prior = _peak_in_prior(basins, enh, prior, n) if prior is not None else np.zeros(n + 1, bool)
    parent = np.arange(n + 1)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    edges = _saddle_edges(basins, enh).sort_values("saddle", ascending=False, kind="stable")
    for a, b, saddle in edges.itertuples(index=False, name=None):
        ra, rb = root(int(a)), root(int(b))
        if ra == rb or saddle < split_fraction * min(peaks[ra], peaks[rb]):
            continue
        if in_prior[ra] != in_prior[rb]:
            continue
        keep, drop = (ra, rb) if peaks[ra] >= peaks[rb] else (rb, ra)
        parent[drop] = keep
    roots = np.array([root(i) for i in range(n + 1)])
    _, relabel = np.unique(roots, return_inverse=True)
    return relabel.astype(np.int32)[basins]


def object_cores(enh: np.ndarray, objects: np.ndarray, *, edge_fraction: float) -> np.ndarray:
    """Each object trimmed to its half-maximum core, relabelled 1..n by decreasing volume.

    The core is the object's voxels above ``edge_fraction`` of its peak that are connected to the peak, plus
    the cavities the object encloses (the necrotic centre of a ring, even where the wall's half-maximum
    shell is open on a coarse grid), cavities of the result filled too.
    """
    cores = np.zeros(enh.shape, np.int32)
    for i, box in enumerate(ndimage.find_objects(objects), start=1):
        if box is None:
            continue
        region = objects[box] == i
        values = np.where(region, enh[box], 0.0)
        peak = np.unravel_index(int(np.argmax(values)), values.shape)
        pieces, _ = ndimage.label(values >= edge_fraction * values[peak], structure=FULL)
        cavity = ndimage.binary_fill_holes(region, structure=FACE) & ~region
        core = ndimage.binary_fill_holes((pieces == pieces[peak]) | cavity, structure=FACE)
        pieces, _ = ndimage.label(core, structure=FULL)
        core = pieces == pieces[peak]
        free = cores[box]
        free[core & (free == 0)] = i
    labels, counts = np.unique(cores[cores > 0], return_counts=True)
    order = labels[np.argsort(-counts, kind="stable")]
    lut = np.zeros(int(cores.max()) + 1, np.int32)
    lut[order] = np.arange(1, len(order) + 1)
    return lut[cores]


def lesion_score(peak: float, tubularity: float, prior_overlap: float) -> float:
    """The decision variable: peak enhancement discounted by how much the object looks like a vessel at its
    own scale and by how much of it lies where physiological enhancement sits,
    ``peak * (1 - tubularity) * (1 - prior_overlap)``, in normalised units of enhancement."""
    return float(peak * (1.0 - tubularity) * (1.0 - prior_overlap))


def object_features(
    enh: np.ndarray,
    cores: np.ndarray,
    mask: np.ndarray,
    affine: np.ndarray,
    *,
    prior: np.ndarray | None = None,
) -> pd.DataFrame:
    """One row of :data:`FEATURE_COLUMNS` (and ``candidate_id``, the label in ``cores``) per object.

    ``tubularity`` is measured at the object's voxel nearest its enhancement-weighted centroid, at the
    object's own scale (shortest inertia semi-axis / sqrt(2)): at a ball's centre the Hessian is isotropic
    (about 0.1), on a vessel's axis it is a tube's (about 0.9). Not over all voxels: near the surface of any
    bright ball the Hessian has one small and two large eigenvalues, like a tube's.
    """
    affine = np.asarray(affine, float)
    voxel = shape.voxel_sizes(affine)
    voxel_volume = float(abs(np.linalg.det(affine[:3, :3])))
    depth = ndimage.distance_transform_edt(np.asarray(mask) > 0, sampling=voxel)
    rows = []
    for i, box in enumerate(ndimage.find_objects(cores), start=1):
        if box is None:
            continue
        local = cores[box] == i
        voxels = np.argwhere(local) + np.array([s.start for s in box])
        values = enh[box][local]
        weights = np.maximum(values, 1e-6)
        semi = shape.inertia_semi_axes(voxels, affine, weights)
        volume = len(voxels) * voxel_volume
        long_, short, k = shape.measure_axes(voxels, affine)
        centre = voxels.mean(axis=0) @ affine[:3, :3].T + affine[:3, 3]
        weighted = weights @ voxels / weights.sum()
        nearest = voxels[int(np.argmin(((voxels - weighted) ** 2).sum(axis=1)))]
        rows.append(
            {
                "candidate_id": i,
                "x_mm": centre[0],
                "y_mm": centre[1],
                "z_mm": centre[2],
                "long_axis_mm": long_,
                "short_axis_mm": short,
                "volume_mm3": volume,
                "n_voxels": len(voxels),
                "max_enhancement": float(values.max()),
                "mean_enhancement": float(values.mean()),
                "axial_slice": k,
                "inertia_long_mm": float(semi[0]),
                "inertia_mid_mm": float(semi[1]),
                "inertia_short_mm": float(semi[2]),
                "axis_ratio": float(semi[2] / semi[0]),
                "fill": float(volume / (4 / 3 * np.pi * np.prod(semi))),
                "depth_mm": float(depth[box][local].max()),
                "prior_overlap": float((prior[box][local] > 0).mean())
                if prior is not None
                else 0.0,
                "tubularity": shape.tubularity_at(
                    enh, affine, nearest, float(semi[2]) / np.sqrt(2)
                ),
            }
        )
        row = rows[-1]
        row["score"] = lesion_score(row["max_enhancement"], row["tubularity"], row["prior_overlap"])
    return pd.DataFrame(rows, columns=["candidate_id", *FEATURE_COLUMNS])
