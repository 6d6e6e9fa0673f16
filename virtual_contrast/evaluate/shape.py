"""Shape of enhancing structures: Hessian tubularity (a Frangi vesselness with scales in mm) and the inertia
ellipsoid of a connected component, so that the automated reader can tell lesions (blobs, rings) from vessels
(tubes) and dura (sheets).

Everything is in millimetres, whatever the voxel size or orientation of the grid:

- the Hessian at scale ``sigma_mm`` is computed with Gaussian derivatives of standard deviation ``sigma_mm /
  voxel size`` along each voxel axis and divided by the voxel sizes, so its eigenvalues are those of the
  Hessian in an orthonormal frame (any affine with orthogonal columns, anisotropic voxels included). A scale
  finer than :data:`MIN_SCALE_VOXELS` voxel is raised to it: a grid cannot represent a finer one (at 4 mm, a
  1 mm vein is a line one voxel wide, seen at 0.7 voxel = 2.8 mm).
- the tubularity of a bright structure is Frangi et al.'s vesselness (MICCAI 1998, eq. 13 with alpha = beta =
  0.5, as scikit-image's ``frangi``) without the "structureness" factor: that factor only separates structure
  from flat noise, and the detector evaluates tubularity only inside candidates that already enhance. It is
  therefore a pure shape measure in [0, 1]: about 0.86 on the axis of a tube, 0.1 at the centre of a ball, 0
  where the structure is dark or plate-like (a shell's wall, the dura).
- the inertia ellipsoid of a component is that of the solid with the same second moments: the covariance of
  its voxel centres (world mm), each voxel counted as a small cube (its own variance, size² / 12 per axis,
  added), weighted by enhancement. Its semi-axes are sqrt(5 · eigenvalue) (exact for a solid ellipsoid), so a
  single voxel is a ball and two voxels side by side are an ellipsoid with axis ratio 1/2.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull

#: Finest Hessian scale (voxels) a grid can represent; scales in mm below it are raised to it.
MIN_SCALE_VOXELS = 0.7
#: Frangi's sensitivity to the plate/line ratio R_A and to the blob ratio R_B (his and scikit-image's values).
FRANGI_ALPHA = 0.5
FRANGI_BETA = 0.5


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Length (mm) of each voxel axis."""
    return np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)


def effective_scales(scales_mm: Sequence[float], voxel_mm: np.ndarray) -> list[float]:
    """The scales (mm) used on a grid: each raised to :data:`MIN_SCALE_VOXELS` of the largest voxel axis,
    duplicates dropped, sorted."""
    floor = MIN_SCALE_VOXELS * float(np.max(voxel_mm))
    return sorted({round(max(float(s), floor), 6) for s in scales_mm})


def hessian_eigenvalues(
    image: np.ndarray, voxel_mm: np.ndarray, sigma_mm: float, where: np.ndarray
) -> np.ndarray:
    """Eigenvalues (n, 3) of the scale-normalised Hessian (sigma² · second derivatives per mm²) at the voxels
    ``where`` (boolean mask), sorted by increasing magnitude."""
    image = np.asarray(image, np.float32)
    sigma_vox = sigma_mm / np.asarray(voxel_mm, float)
    n = int(np.count_nonzero(where))
    h = np.empty((n, 3, 3), np.float32)
    for a in range(3):
        for b in range(a, 3):
            order = [0, 0, 0]
            order[a] += 1
            order[b] += 1
            d = ndimage.gaussian_filter(image, sigma_vox, order=order, mode="nearest")
            value = d[where] * (sigma_mm**2 / (voxel_mm[a] * voxel_mm[b]))
            h[:, a, b] = value
            h[:, b, a] = value
    eig = np.linalg.eigvalsh(h)
    return np.take_along_axis(eig, np.argsort(np.abs(eig), axis=1), axis=1)


def frangi_tubularity(eigenvalues: np.ndarray) -> np.ndarray:
    """Frangi's vesselness of bright tubes from eigenvalues sorted by magnitude (|l1| <= |l2| <= |l3|), without
    the structureness factor: 0 unless l2 and l3 are negative."""
    l1, l2, l3 = (eigenvalues[:, i].astype(np.float64) for i in range(3))
    bright = (l2 < 0) & (l3 < 0)
    a2, a3 = np.maximum(-l2, 1e-12), np.maximum(-l3, 1e-12)
    r_a = a2 / a3
    r_b = np.abs(l1) / np.sqrt(a2 * a3)
    v = (1 - np.exp(-(r_a**2) / (2 * FRANGI_ALPHA**2))) * np.exp(-(r_b**2) / (2 * FRANGI_BETA**2))
    return np.where(bright, v, 0.0)


def tubularity_map(
    image: np.ndarray, affine: np.ndarray, scales_mm: Sequence[float], where: np.ndarray
) -> np.ndarray:
    """Multi-scale tubularity (maximum over the scales) at the voxels ``where``; 0 elsewhere (float32)."""
    where = np.asarray(where, bool)
    out = np.zeros(np.shape(image), np.float32)
    if not where.any():
        return out
    voxel = voxel_sizes(affine)
    # Only the bounding box of the voxels asked for (plus the filters' reach) is filtered.
    scales = effective_scales(scales_mm, voxel)
    reach = np.ceil(4 * max(scales) / voxel).astype(int) + 1
    idx = np.argwhere(where)
    lo = np.maximum(idx.min(axis=0) - reach, 0)
    hi = np.minimum(idx.max(axis=0) + reach + 1, np.shape(image))
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    local_where = where[box]
    best = np.zeros(int(local_where.sum()), np.float64)
    for sigma in scales:
        eig = hessian_eigenvalues(np.asarray(image)[box], voxel, sigma, local_where)
        best = np.maximum(best, frangi_tubularity(eig))
    out[box][local_where] = best
    return out


def _gaussian_derivatives(sigma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Offsets and the sampled Gaussian (normalised to sum 1) with its first and second derivatives, as
    :func:`scipy.ndimage.gaussian_filter` builds them (radius 4 sigma)."""
    radius = int(4.0 * sigma + 0.5)
    d = np.arange(-radius, radius + 1, dtype=float)
    g0 = np.exp(-0.5 * d**2 / sigma**2)
    g0 /= g0.sum()
    return d, g0, -d / sigma**2 * g0, (d**2 / sigma**4 - 1 / sigma**2) * g0


def hessian_at(
    image: np.ndarray, affine: np.ndarray, ijk: Sequence[int], sigma_mm: float
) -> np.ndarray:
    """The scale-normalised Hessian (3x3, per mm²) of ``image`` smoothed at ``sigma_mm``, at one voxel.

    The same numbers as :func:`hessian_eigenvalues`' Gaussian filtering, evaluated at one point only (a dot
    product of the voxel's neighbourhood with the derivative kernels); the image's edge is extended.
    """
    voxel = voxel_sizes(affine)
    kernels, index = [], []
    for axis in range(3):
        d, *k = _gaussian_derivatives(sigma_mm / voxel[axis])
        kernels.append(k)
        index.append(np.clip(int(ijk[axis]) + d.astype(int), 0, np.shape(image)[axis] - 1))
    box = np.asarray(image)[np.ix_(*index)].astype(np.float64)
    h = np.empty((3, 3))
    for a in range(3):
        for b in range(a, 3):
            order = [0, 0, 0]
            order[a] += 1
            order[b] += 1
            # Kernels of odd order are antisymmetric; in a second derivative their signs cancel.
            value = np.einsum("ijk,i,j,k->", box, *(kernels[n][order[n]] for n in range(3)))
            h[a, b] = h[b, a] = value * sigma_mm**2 / (voxel[a] * voxel[b])
    return h


def tubularity_at(
    image: np.ndarray, affine: np.ndarray, ijk: Sequence[int], sigma_mm: float
) -> float:
    """Tubularity (:func:`frangi_tubularity`) at one voxel and one scale (raised to the grid's finest)."""
    sigma = effective_scales([sigma_mm], voxel_sizes(affine))[0]
    eig = np.linalg.eigvalsh(hessian_at(image, affine, ijk, sigma))
    return float(frangi_tubularity(eig[np.argsort(np.abs(eig))][None, :])[0])


def inertia_semi_axes(
    voxels: np.ndarray, affine: np.ndarray, weights: np.ndarray | None = None
) -> np.ndarray:
    """Semi-axes (mm, decreasing) of the solid ellipsoid with the second moments of a set of voxels.

    ``voxels`` (n, 3) are voxel indices; ``weights`` (n,) non-negative (default: equal). Each voxel is a small
    parallelepiped: its own covariance ``M diag(1/12) M^T`` (M the affine's 3x3 part) is added.
    """
    m = np.asarray(affine, float)[:3, :3]
    points = np.asarray(voxels, float) @ m.T
    w = np.ones(len(points)) if weights is None else np.asarray(weights, float)
    if len(points) == 0 or w.sum() <= 0:
        raise ValueError("a component needs at least one voxel of positive weight")
    w = w / w.sum()
    centred = points - w @ points
    cov = (centred * w[:, None]).T @ centred + m @ m.T / 12.0
    eig = np.clip(np.linalg.eigvalsh(cov)[::-1], 0, None)
    return np.sqrt(5.0 * eig)


def axial_axis(affine: np.ndarray) -> int:
    """Voxel axis whose world direction is closest to superior-inferior (RAS z)."""
    cols = np.asarray(affine, float)[:3, :3]
    cos = np.abs(cols[2, :]) / np.linalg.norm(cols, axis=0)
    return int(np.argmax(cos))


def _farthest_pair(points: np.ndarray, plane_basis: np.ndarray) -> tuple[int, int, float]:
    """Indices and distance of the two farthest points (all in one plane)."""
    candidates = np.arange(len(points))
    if len(points) > 64:
        # The farthest pair lies on the convex hull; compute it in the plane's own 2D coordinates.
        try:
            candidates = ConvexHull(points @ plane_basis.T).vertices
        except Exception:  # noqa: BLE001 - degenerate (collinear) sets: fall back to all points
            candidates = np.arange(len(points))
    p = points[candidates]
    d = np.linalg.norm(p[:, None, :] - p[None, :, :], axis=2)
    i, j = np.unravel_index(int(np.argmax(d)), d.shape)
    return int(candidates[i]), int(candidates[j]), float(d[i, j])


def measure_axes(voxels: np.ndarray, affine: np.ndarray) -> tuple[float, float, int]:
    """RANO-like long and perpendicular short axis (mm) of one component, and the slice they were measured in.

    ``voxels`` is an (n, 3) array of voxel indices. Each axial slice of the component is measured; the slice
    with the longest long axis wins (ties: the one with more voxels).
    """
    affine = np.asarray(affine, float)
    s = axial_axis(affine)
    inplane = [a for a in range(3) if a != s]
    a_p, a_q = affine[:3, inplane[0]], affine[:3, inplane[1]]
    normal = np.cross(a_p, a_q)
    normal /= np.linalg.norm(normal)
    e1 = a_p / np.linalg.norm(a_p)
    basis = np.stack([e1, np.cross(normal, e1)])

    inplane_matrix = np.stack(
        [basis @ a_p, basis @ a_q], axis=1
    )  # voxel steps in 2D plane coordinates
    inverse = np.linalg.inv(inplane_matrix)

    def width(u: np.ndarray) -> float:
        # Voxel size along the in-plane unit direction u: the length of u measured in voxel steps, inverted
        # (the voxel size for isotropic voxels in every direction). Voxel centres of a disc of diameter D
        # span about D minus one voxel along any direction, so adding this restores D.
        return float(1.0 / np.linalg.norm(inverse @ (basis @ u)))

    best = (-1.0, 0.0, -1, -1)  # long, short, n_voxels, slice
    for k in np.unique(voxels[:, s]):
        idx = voxels[voxels[:, s] == k]
        world = idx @ affine[:3, :3].T + affine[:3, 3]
        if len(world) == 1:
            u = e1
            long_ = width(u)
        else:
            i, j, d = _farthest_pair(world, basis)
            u = (world[j] - world[i]) / d
            long_ = d + width(u)
        w = np.cross(normal, u)
        proj = world @ w
        short = float(np.ptp(proj)) + width(w)
        if (long_, len(idx)) > (best[0], best[2]):
            best = (long_, min(short, long_), len(idx), int(k))
    return best[0], best[1], best[3]
