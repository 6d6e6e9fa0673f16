"""FSL FLIRT backend (nipype) and the conversion between FLIRT matrices and our world transforms.

FLIRT matrices do not live in world coordinates. They map the *input* (moving) image's "scaled voxel"
coordinates to the *reference* image's: voxel indices times voxel sizes, and, when the image's voxel-to-world
matrix has a positive determinant (a neurological, RAS-like storage), the x axis is first flipped
(``x_fsl = (nx - 1 - i) * dx``). Our convention is the reverse direction in world RAS mm (reference world →
moving world), so

    A = M_mov · S_mov⁻¹ · F⁻¹ · S_ref · M_ref⁻¹

with ``M`` the voxel-to-world affines and ``S`` the voxel → FSL scaled-voxel matrices.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from virtual_contrast.io import InputError, load_image, save_image
from virtual_contrast.preprocess.registration.base import Registration
from virtual_contrast.preprocess.transforms import voxel_sizes

log = logging.getLogger(__name__)

_INTERP = {0: "nearestneighbour", 1: "trilinear", 3: "spline"}


def find_flirt() -> tuple[str | None, str]:
    """(path of the ``flirt`` executable or None, a sentence saying where it was looked for)."""
    exe = shutil.which("flirt")
    if exe:
        return exe, f"flirt found at {exe}{_fsl_version_note()}"
    fsldir = os.environ.get("FSLDIR")
    if fsldir:
        candidate = Path(fsldir) / "bin" / "flirt"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate), f"flirt found in FSLDIR={fsldir}{_fsl_version_note()}"
        return (
            None,
            f"FSLDIR={fsldir} is set but {candidate} is not an executable, and flirt is not on PATH",
        )
    return None, "no flirt on PATH and FSLDIR is not set"


def _fsl_version_note() -> str:
    fsldir = os.environ.get("FSLDIR")
    if fsldir and (Path(fsldir) / "etc" / "fslversion").is_file():
        version = (Path(fsldir) / "etc" / "fslversion").read_text().strip().split(":")[0]
        return f", FSL {version}"
    return ""


# ----------------------------------------------------------------------------------------------- matrices
def fsl_scaled_voxel_matrix(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """4×4 map from voxel indices to FSL scaled-voxel mm (with FSL's x flip for a positive determinant)."""
    zooms = voxel_sizes(affine)
    scale = np.diag([*zooms, 1.0])
    if np.linalg.det(np.asarray(affine)[:3, :3]) > 0:
        flip = np.eye(4)
        flip[0, 0] = -1.0
        flip[0, 3] = (shape[0] - 1) * zooms[0]
        return flip @ scale
    return scale


def flirt_matrix_to_world(
    mat: np.ndarray, moving_img: nib.Nifti1Image, ref_img: nib.Nifti1Image
) -> np.ndarray:
    """FLIRT ``-omat`` matrix (moving FSL coords → reference FSL coords) → our reference→moving world matrix."""
    s_mov = fsl_scaled_voxel_matrix(moving_img.shape, moving_img.affine)
    s_ref = fsl_scaled_voxel_matrix(ref_img.shape, ref_img.affine)
    return (
        moving_img.affine
        @ np.linalg.inv(s_mov)
        @ np.linalg.inv(np.asarray(mat, float))
        @ s_ref
        @ np.linalg.inv(ref_img.affine)
    )


def world_to_flirt_matrix(
    transform: np.ndarray, moving_img: nib.Nifti1Image, ref_img: nib.Nifti1Image
) -> np.ndarray:
    """Inverse of :func:`flirt_matrix_to_world`: a FLIRT matrix for ``-init``/``-applyxfm``."""
    s_mov = fsl_scaled_voxel_matrix(moving_img.shape, moving_img.affine)
    s_ref = fsl_scaled_voxel_matrix(ref_img.shape, ref_img.affine)
    return (
        s_ref
        @ np.linalg.inv(ref_img.affine)
        @ np.linalg.inv(np.asarray(transform, float))
        @ moving_img.affine
        @ np.linalg.inv(s_mov)
    )


# ----------------------------------------------------------------------------------------------- interfaces
def _flirt_class():
    from nipype.interfaces import fsl

    class _FLIRT(fsl.FLIRT):
        # Fixing the output type on the class keeps nipype from warning that FSLOUTPUTTYPE is unset.
        _output_type = "NIFTI_GZ"

    return _FLIRT


def flirt_estimate(
    in_file: Path,
    reference: Path,
    out_matrix_file: Path,
    out_file: Path,
    *,
    dof: int = 12,
    cost: str = "corratio",
    ref_weight: Path | None = None,
    in_matrix_file: Path | None = None,
    command: str | None = None,
):
    """nipype FLIRT interface that estimates a ``dof`` transform of ``in_file`` onto ``reference``.

    With ``in_matrix_file`` the search starts from it and FLIRT's coarse angular search is skipped
    (``-nosearch``): the start is already close (the brain-outline stage).
    """
    inputs = dict(
        in_file=str(in_file),
        reference=str(reference),
        out_file=str(out_file),
        out_matrix_file=str(out_matrix_file),
        dof=dof,
        cost=cost,
        interp="trilinear",
    )
    if ref_weight is not None:
        inputs["ref_weight"] = str(ref_weight)
    if in_matrix_file is not None:
        inputs["in_matrix_file"] = str(in_matrix_file)
        inputs["no_search"] = True
    if command:
        inputs["command"] = command
    return _flirt_class()(**inputs)


def flirt_apply(
    in_file: Path,
    reference: Path,
    in_matrix_file: Path,
    out_file: Path,
    *,
    order: int = 3,
    command: str | None = None,
):
    """nipype FLIRT interface (``-applyxfm``) that resamples ``in_file`` on ``reference``'s grid."""
    if order not in _INTERP:
        raise InputError(f"interpolation order must be one of {sorted(_INTERP)}, got {order}")
    inputs = dict(
        in_file=str(in_file),
        reference=str(reference),
        in_matrix_file=str(in_matrix_file),
        apply_xfm=True,
        interp=_INTERP[order],
        out_file=str(out_file),
        # Without it nipype invents a matrix name in the current folder.
        out_matrix_file=str(Path(out_file).with_name("applied.mat")),
    )
    if command:
        inputs["command"] = command
    return _flirt_class()(**inputs)


class FSLBackend:
    """FLIRT estimates (dof 12 or 6) and FLIRT ``-applyxfm -interp spline`` resamples (the paper's tools).

    Brain to brain, as the embedded backend: with the two brain masks, a first FLIRT run (7 DOF, least
    squares) matches the reference brain mask to the subject's (the subject is FLIRT's reference, so that a
    slab that cuts the brain is not pulled towards the whole brain); the second run registers the
    brain-extracted image from there (``-init``, ``-nosearch``) with the grown reference brain mask as
    ``-refweight``.
    """

    name = "fsl"

    def __init__(self, flirt: str = "flirt", *, cost: str = "corratio"):
        self.flirt = flirt
        self.cost = cost

    def _run(self, interface) -> None:
        log.info("running: %s", interface.cmdline)
        try:
            interface.run()
        except Exception as exc:  # nipype wraps tool failures in several exception types
            raise RuntimeError(f"FLIRT failed: {interface.cmdline}\n{exc}") from exc

    @staticmethod
    def _tmpdir():
        return tempfile.TemporaryDirectory(prefix="vc_flirt_")

    def register(
        self,
        moving: nib.Nifti1Image,
        reference: nib.Nifti1Image,
        *,
        dof: int = 12,
        reference_mask: np.ndarray | None = None,
        moving_outline: np.ndarray | None = None,
        reference_outline: np.ndarray | None = None,
        initial: np.ndarray | None = None,
    ) -> Registration:
        if dof not in (6, 12):
            raise InputError(f"dof must be 6 (rigid) or 12 (affine), got {dof}")
        t0 = time.perf_counter()
        stages: list[dict] = []
        with self._tmpdir() as tmp:
            tmp = Path(tmp)
            mov_path = save_image(
                np.asanyarray(moving.dataobj), moving.affine, tmp / "moving.nii.gz"
            )
            ref_path = save_image(
                np.asanyarray(reference.dataobj), reference.affine, tmp / "ref.nii.gz"
            )
            weight = None
            if reference_mask is not None:
                weight = save_image(reference_mask, reference.affine, tmp / "refweight.nii.gz")
            if initial is None and moving_outline is not None and reference_outline is not None:
                s0 = time.perf_counter()
                subject_brain = save_image(
                    np.asarray(moving_outline, np.float32),
                    moving.affine,
                    tmp / "subject_brain.nii.gz",
                )
                atlas_brain = save_image(
                    np.asarray(reference_outline, np.float32),
                    reference.affine,
                    tmp / "ref_brain.nii.gz",
                )
                iface = flirt_estimate(
                    atlas_brain,
                    subject_brain,
                    tmp / "outline.mat",
                    tmp / "outline_out.nii.gz",
                    dof=7,
                    cost="leastsq",
                    command=self.flirt,
                )
                self._run(iface)
                # FLIRT mapped reference-brain coords onto subject-brain coords; in our world convention that
                # run's "reference" is the subject, so the world matrix is subject -> atlas; invert it.
                subj_to_atlas = flirt_matrix_to_world(
                    np.loadtxt(tmp / "outline.mat"),
                    nib.Nifti1Image(np.zeros(reference.shape, np.float32), reference.affine),
                    nib.Nifti1Image(np.zeros(moving.shape, np.float32), moving.affine),
                )
                initial = np.linalg.inv(subj_to_atlas)
                stages.append(
                    {
                        "name": "brain outline (FLIRT dof 7, leastsq)",
                        "metric": None,
                        "cmdline": iface.cmdline,
                        "seconds": round(time.perf_counter() - s0, 3),
                    }
                )
            init_path = None
            if initial is not None:
                init_path = tmp / "init.mat"
                np.savetxt(
                    init_path, world_to_flirt_matrix(initial, moving, reference), fmt="%.10f"
                )
            s0 = time.perf_counter()
            iface = flirt_estimate(
                mov_path,
                ref_path,
                tmp / "out.mat",
                tmp / "out.nii.gz",
                dof=dof,
                cost=self.cost,
                ref_weight=weight,
                in_matrix_file=init_path,
                command=self.flirt,
            )
            self._run(iface)
            mat = np.loadtxt(tmp / "out.mat")
            stages.append(
                {
                    "name": f"FLIRT dof {dof} ({self.cost})",
                    "metric": None,
                    "cmdline": iface.cmdline,
                    "flirt_matrix": mat.tolist(),
                    "seconds": round(time.perf_counter() - s0, 3),
                }
            )
        transform = flirt_matrix_to_world(mat, moving, reference)
        return Registration(
            transform=transform,
            backend=self.name,
            dof=dof,
            stages=stages,
            seconds=time.perf_counter() - t0,
        )

    def resample(self, moving, ref_shape, ref_affine, transform, order=3) -> np.ndarray:
        ref_img = nib.Nifti1Image(np.zeros(tuple(ref_shape[:3]), np.float32), ref_affine)
        with self._tmpdir() as tmp:
            tmp = Path(tmp)
            mov_path = save_image(
                np.asanyarray(moving.dataobj), moving.affine, tmp / "moving.nii.gz"
            )
            ref_path = save_image(
                ref_img.get_fdata(dtype=np.float32), ref_affine, tmp / "ref.nii.gz"
            )
            mat_path = tmp / "apply.mat"
            np.savetxt(mat_path, world_to_flirt_matrix(transform, moving, ref_img), fmt="%.10f")
            iface = flirt_apply(
                mov_path,
                ref_path,
                mat_path,
                tmp / "resampled.nii.gz",
                order=order,
                command=self.flirt,
            )
            self._run(iface)
            out = load_image(tmp / "resampled.nii.gz")
        if out.shape[:3] != tuple(ref_shape[:3]) or not np.allclose(
            out.affine, ref_affine, atol=1e-3
        ):
            raise RuntimeError("FLIRT -applyxfm output is not on the reference grid")
        return np.asanyarray(out.dataobj, dtype=np.float32)
