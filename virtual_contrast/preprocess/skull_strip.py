"""Brain extraction on the subject's native T1, before any registration: deepbet or HD-BET.

The brain mask is computed where the image was acquired (any orientation, with or without skull, thick slices
included) and written on the T1's own voxel grid; the registration then aligns brain with brain (the atlas
template is skull-stripped) and carries this mask to the atlas. Two backends, both deep-learning tools:

``deepbet``
    deepbet 1.0.2 (Fisch et al. 2024, MIT licence), a CNN whose weights ship inside its PyPI wheel, so it works
    offline with no download; the embedded default. On the CPU it took 8-19 s per 1 mm head on two busy cores;
    Dice 0.94 against the brain mask that ships with the raw TCGA-FG-6692 exam. The package declares a GUI
    dependency (customtkinter) that only its graphical front end imports: the library call used here runs
    without a display.
``hdbet``
    The paper's tool, HD-BET 2 (``pip install 'virtual-contrast[hdbet]'``, i.e. ``hd-bet==2.0.1``), with its
    weights in a local folder (``dataset.json``, ``plans.json``, ``fold_all/checkpoint_final.pth``; HD-BET itself
    looks in ``~/hd-bet_params/release_2.0.0`` and downloads them from Zenodo, which a compute node often cannot
    reach). We build nnU-Net's predictor on that folder directly, exactly as
    ``HD_BET.hd_bet_prediction.get_hdbet_predictor`` does but without its hard-coded home-folder path.

``auto`` takes ``hdbet`` when a weights folder is configured and ``deepbet`` otherwise, and the log, the
provenance, the QC figure and the report say which ran and why. A backend that was chosen and cannot run, or
fails, raises: there is no silent fallback from one tool to the other.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from virtual_contrast.io import InputError, load_image, save_image
from virtual_contrast.preprocess.options import BackendUnavailableError, SkullStripOptions

log = logging.getLogger(__name__)

BACKENDS = ("auto", "deepbet", "hdbet")
#: Files that make a complete HD-BET 2 weights folder (relative to it).
HDBET_WEIGHT_FILES = ("dataset.json", "plans.json", "fold_all/checkpoint_final.pth")
HDBET_INSTALL_HINT = (
    "install it with `pip install -c constraints.txt 'virtual-contrast[hdbet]'` (hd-bet==2.0.1; constrain "
    "torch to the installed version so pip does not pull a CUDA build, then `pip uninstall torchvision`)"
)
HDBET_WEIGHTS_HINT = (
    "download release 2.0.0 of the HD-BET parameters (Zenodo record 14445620, release_v1.5.0.zip) and unpack "
    "it so that the folder holds " + ", ".join(HDBET_WEIGHT_FILES)
)
DEEPBET_INSTALL_HINT = (
    "install it with `pip install -c constraints.txt deepbet==1.0.2` (constrain torch to the installed "
    "version so that pip does not replace it)"
)


def hdbet_default_weights() -> Path:
    """The folder HD-BET itself reads its parameters from (``HD_BET.paths``, computed from HOME)."""
    return Path(os.path.expanduser("~")) / "hd-bet_params" / "release_2.0.0"


def hdbet_import_error() -> str | None:
    """``None`` when HD-BET and nnU-Net import, else why not (one line)."""
    for module in ("HD_BET", "nnunetv2.inference.predict_from_raw_data"):
        try:
            importlib.import_module(module)
        except Exception as exc:  # a broken install raises anything from ImportError to OSError
            return f"cannot import {module} ({type(exc).__name__}: {exc})"
    return None


def missing_hdbet_weights(folder: Path | str | None) -> list[str]:
    """The files of :data:`HDBET_WEIGHT_FILES` that are absent or empty in ``folder`` (all when None)."""
    if folder is None:
        return list(HDBET_WEIGHT_FILES)
    folder = Path(folder)
    missing = []
    for name in HDBET_WEIGHT_FILES:
        path = folder / name
        if not path.is_file() or path.stat().st_size == 0:
            missing.append(name)
    return missing


def deepbet_import_error() -> str | None:
    """``None`` when deepbet's library part imports, else why not (one line)."""
    try:
        importlib.import_module("deepbet.bet")
    except Exception as exc:  # a broken install raises anything from ImportError to OSError
        return f"cannot import deepbet ({type(exc).__name__}: {exc})"
    return None


def choose_backend(
    backend: str = "auto", hdbet_weights: Path | str | None = None
) -> tuple[str, str, Path | None]:
    """Resolve ``backend`` to ``('deepbet' | 'hdbet', reason, HD-BET weights folder or None)``.

    ``auto`` is ``hdbet`` when ``hdbet_weights`` is configured (and then HD-BET must be usable: a configured
    tool that cannot run is an error, not a reason to run another one), ``deepbet`` otherwise. ``hdbet``
    without a configured folder uses HD-BET's own (:func:`hdbet_default_weights`). An unusable backend raises
    :class:`BackendUnavailableError` at once, saying what to install or where to put the weights.
    """
    if backend not in BACKENDS:
        raise InputError(
            f"unknown skull-stripping backend {backend!r}; choose one of {', '.join(BACKENDS)}"
        )
    if backend == "hdbet" or (backend == "auto" and hdbet_weights):
        weights = Path(hdbet_weights) if hdbet_weights else hdbet_default_weights()
        where = "configured" if hdbet_weights else "HD-BET's default"
        import_error = hdbet_import_error()
        if import_error:
            raise BackendUnavailableError(
                f"skull-stripping backend 'hdbet' ({'requested' if backend == 'hdbet' else 'auto: HD-BET weights configured'}) "
                f"but HD-BET is not usable: {import_error}; " + HDBET_INSTALL_HINT
            )
        missing = missing_hdbet_weights(weights)
        if missing:
            raise BackendUnavailableError(
                f"skull-stripping backend 'hdbet' but its weights folder ({where}) lacks "
                f"{', '.join(missing)}; {HDBET_WEIGHTS_HINT} and pass that folder as hdbet_weights",
                path=weights,
            )
        reason = (
            "requested" if backend == "hdbet" else f"auto: HD-BET weights configured in {weights}"
        )
        return "hdbet", reason, weights
    import_error = deepbet_import_error()
    if import_error:
        raise BackendUnavailableError(
            f"skull-stripping backend 'deepbet' is not usable: {import_error}; "
            + DEEPBET_INSTALL_HINT
        )
    reason = "requested" if backend == "deepbet" else "auto: no HD-BET weights configured"
    return "deepbet", reason, None


# --- deepbet ---------------------------------------------------------------------------------------------


@functools.cache
def _deepbet_extractor(device: str):
    from deepbet.bet import BrainExtraction

    return BrainExtraction(no_gpu=not str(device).startswith("cuda"))


def run_deepbet(
    image: nib.Nifti1Image, *, device: str = "cpu", threshold: float = 0.5
) -> np.ndarray:
    """Run deepbet on a 3D image in memory; returns the brain mask (bool) on the image's voxel grid.

    deepbet reorients the volume to the closest canonical (RAS) axes, predicts, keeps the largest connected
    component, fills its holes and orients the mask back. The network (two small TorchScript models) is loaded
    once per process and device.
    """
    extractor = _deepbet_extractor(device)
    try:
        _, mask_img, _ = extractor.run(image, threshold=threshold)
    except (AssertionError, ValueError) as exc:
        # deepbet asserts on an empty bounding box and fails in its connected-component step when it finds
        # no brain at all.
        raise InputError(f"deepbet found no brain in this image ({exc})") from exc
    mask = np.asanyarray(mask_img.dataobj) > 0
    if mask.shape != image.shape[:3]:
        raise RuntimeError(f"deepbet returned shape {mask.shape} for a {image.shape} image")
    return mask


# --- HD-BET ------------------------------------------------------------------------------------------------


def hdbet_predictor_kwargs(device: str = "cpu", use_tta: bool | None = None) -> dict:
    """Keyword arguments of ``nnUNetPredictor(...)``, as HD-BET's ``get_hdbet_predictor`` sets them.

    ``use_tta`` (nnU-Net mirroring) defaults to on for a GPU and off on a CPU, HD-BET's own advice
    (``--disable_tta`` is "recommended for device cpu"). ``device`` stays a string here; :func:`run_hdbet`
    turns it into a ``torch.device``.
    """
    on_gpu = str(device).startswith("cuda")
    return {
        "tile_step_size": 0.5,
        "use_gaussian": True,
        "use_mirroring": on_gpu if use_tta is None else bool(use_tta),
        "perform_everything_on_device": on_gpu,
        "device": str(device),
        "verbose": False,
        "verbose_preprocessing": False,
        "allow_tqdm": False,
    }


def hdbet_model_args(weights: Path | str) -> dict:
    """Keyword arguments of ``nnUNetPredictor.initialize_from_trained_model_folder`` for HD-BET 2."""
    return {
        "model_training_output_dir": str(weights),
        "use_folds": ("all",),
        "checkpoint_name": "checkpoint_final.pth",
    }


def run_hdbet(
    t1: Path | str, weights: Path | str, *, device: str = "cpu", use_tta: bool | None = None
) -> np.ndarray:
    """Run HD-BET 2 on the T1 file; returns the brain mask (bool) on the T1's voxel grid.

    nnU-Net reads and writes the image with the reader/writer named in HD-BET's ``plans.json`` (so axis order
    and spacing are as in training), and its segmentation is read back with nibabel, which puts it on the same
    voxel grid as ``load_image(t1)``.
    """
    import torch

    # HD-BET disables torch.compile for inference; compiling would cost minutes per job.
    os.environ["nnUNet_compile"] = "F"
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    kwargs = hdbet_predictor_kwargs(device, use_tta)
    kwargs["device"] = torch.device(kwargs["device"])
    predictor = nnUNetPredictor(**kwargs)
    predictor.initialize_from_trained_model_folder(**hdbet_model_args(weights))
    reader_writer = predictor.plans_manager.image_reader_writer_class()
    images, properties = reader_writer.read_images([str(t1)])
    seg = predictor.predict_single_npy_array(images, properties, None, None, False)
    with tempfile.TemporaryDirectory(prefix="vc-hdbet-") as tmp:
        seg_path = Path(tmp) / ("mask" + predictor.dataset_json.get("file_ending", ".nii.gz"))
        reader_writer.write_seg(np.asarray(seg), str(seg_path), properties)
        mask = np.asanyarray(nib.load(str(seg_path)).dataobj) > 0
    return mask


# --- files ---------------------------------------------------------------------------------------------------


def skull_strip(
    t1: Path | str,
    out_mask: Path | str,
    options: SkullStripOptions,
    *,
    device: str = "cpu",
    threads: int | None = None,
    use_tta: bool | None = None,
    subject: str | None = None,
) -> dict:
    """Write the brain mask (uint8, on the T1's own grid) of a native T1; returns the provenance.

    ``options`` chooses the backend (see the module docstring); ``device`` and ``threads`` say where it runs
    (``threads`` sets torch's CPU threads, for a workflow job that was given that many cores). The provenance
    names the backend, why it was chosen, the run time and the brain volume.
    """
    t1, out_mask = Path(t1), Path(out_mask)
    chosen, reason, weights = choose_backend(options.backend, options.hdbet_weights or None)
    prefix = f"{subject}: " if subject else ""
    log.info("%sskull stripping %s with %s (%s)", prefix, t1.name, chosen, reason)
    img = load_image(t1, subject=subject)
    if not np.any(np.asanyarray(img.dataobj)):
        raise InputError("the T1 is zero everywhere: no brain to extract", subject=subject, path=t1)
    provenance: dict = {"backend": chosen, "reason": reason, "t1": str(t1), "device": device}
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    start = time.perf_counter()
    try:
        if chosen == "hdbet":
            with tempfile.TemporaryDirectory(prefix="vc-hdbet-in-") as tmp:
                # nnU-Net reads files itself: hand it the image as loaded (checked, singleton axes dropped).
                staged = save_image(np.asanyarray(img.dataobj), img.affine, Path(tmp) / "t1.nii.gz")
                mask = run_hdbet(staged, weights, device=device, use_tta=use_tta)
            provenance.update(
                weights=str(weights), tta=hdbet_predictor_kwargs(device, use_tta)["use_mirroring"]
            )
        else:
            mask = run_deepbet(img, device=device)
            provenance["version"] = importlib.metadata.version("deepbet")
    except InputError as exc:
        raise InputError(exc.args[0], subject=subject, path=t1) from exc
    except Exception as exc:
        raise RuntimeError(f"{prefix}{chosen} failed on {t1}: {exc}") from exc
    if mask.shape != img.shape[:3]:
        raise RuntimeError(f"{prefix}{chosen} returned shape {mask.shape} for a {img.shape} T1")
    if not mask.any():
        raise InputError(f"{chosen} found no brain (empty mask)", subject=subject, path=t1)
    voxel_ml = float(abs(np.linalg.det(img.affine[:3, :3]))) / 1000.0
    provenance["seconds"] = round(time.perf_counter() - start, 2)
    provenance["brain_volume_ml"] = round(float(mask.sum()) * voxel_ml, 1)
    save_image(mask, img.affine, out_mask, dtype=np.uint8)
    log.info(
        "%sbrain mask of %.0f mL written to %s (%s, %.1f s)",
        prefix,
        provenance["brain_volume_ml"],
        out_mask,
        chosen,
        provenance["seconds"],
    )
    return provenance


def apply_mask(
    images: Sequence[Path | str],
    mask: Path | str,
    outs: Sequence[Path | str],
    *,
    subject: str | None = None,
) -> list[Path]:
    """Zero every image outside the brain mask; ``images[i]`` is written to ``outs[i]`` (float32)."""
    if len(images) != len(outs):
        raise ValueError(f"{len(images)} images but {len(outs)} outputs")
    mask_img = load_image(mask, subject=subject)
    brain = np.asanyarray(mask_img.dataobj) > 0.5
    loaded = [load_image(path, subject=subject) for path in images]
    for path, img in zip(images, loaded, strict=True):
        if img.shape != brain.shape or not np.allclose(img.affine, mask_img.affine, atol=1e-3):
            raise InputError(
                f"not on the brain mask's grid (shape {img.shape} vs {brain.shape})",
                subject=subject,
                path=path,
            )
    written = []
    for img, out in zip(loaded, outs, strict=True):
        written.append(save_image(np.asanyarray(img.dataobj) * brain, img.affine, out))
    return written
