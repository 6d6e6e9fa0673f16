"""HD-BET 2 (nnU-Net), with its weights in a local folder, for those who hold them.

``pip install 'virtual-contrast[hdbet2]'`` installs ``hd-bet==2.0.1``, which looks for its weights in
``~/hd-bet_params/release_2.0.0`` and downloads them from Zenodo on first use (a compute node often cannot).
Here the folder comes from the user's configuration (``preprocess.hdbet2_weights``) or command line
(``--hdbet2-weights``), never from a model file, and must hold :data:`HDBET2_WEIGHT_FILES`. nnU-Net's
predictor is built on that folder directly, as ``HD_BET.hd_bet_prediction.get_hdbet_predictor`` does but
without its hard-coded home-folder path. nnU-Net reads these files with ``torch.load(weights_only=False)``,
i.e. it runs what they contain: give it a folder you trust.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

#: Files that make a complete HD-BET 2 weights folder (relative to it).
HDBET2_WEIGHT_FILES = ("dataset.json", "plans.json", "fold_all/checkpoint_final.pth")
INSTALL_HINT = (
    "install it with `pip install -c constraints.txt 'virtual-contrast[hdbet2]'` (hd-bet==2.0.1; "
    "constrain torch to the installed version so pip does not pull a CUDA build, then `pip uninstall "
    "torchvision`)"
)
WEIGHTS_HINT = (
    "download release 2.0.0 of the HD-BET parameters (Zenodo record 14445620, release_v1.5.0.zip) and unpack "
    "it so that the folder holds " + ", ".join(HDBET2_WEIGHT_FILES)
)


def hdbet2_default_weights() -> Path:
    """The folder HD-BET 2 itself reads its parameters from (``HD_BET.paths``, computed from HOME)."""
    return Path(os.path.expanduser("~")) / "hd-bet_params" / "release_2.0.0"


def hdbet2_import_error() -> str | None:
    """``None`` when HD-BET 2 and nnU-Net import, else why not (one line)."""
    for module in ("HD_BET", "nnunetv2.inference.predict_from_raw_data"):
        try:
            importlib.import_module(module)
        except Exception as exc:  # a broken install raises anything from ImportError to OSError
            return f"cannot import {module} ({type(exc).__name__}: {exc})"
    return None


def missing_hdbet2_weights(folder: Path | str | None) -> list[str]:
    """The files of :data:`HDBET2_WEIGHT_FILES` that are absent or empty in ``folder`` (all when None)."""
    if folder is None:
        return list(HDBET2_WEIGHT_FILES)
    folder = Path(folder)
    missing = []
    for name in HDBET2_WEIGHT_FILES:
        path = folder / name
        if not path.is_file() or path.stat().st_size == 0:
            missing.append(name)
    return missing


def hdbet2_predictor_kwargs(device: str = "cpu", use_tta: bool | None = None) -> dict:
    """Keyword arguments of ``nnUNetPredictor(...)``, as HD-BET's ``get_hdbet_predictor`` sets them.

    ``use_tta`` (nnU-Net mirroring) defaults to on for a GPU and off on a CPU, HD-BET's own advice
    (``--disable_tta`` is "recommended for device cpu"). ``device`` stays a string here; :func:`run_hdbet2`
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


def hdbet2_model_args(weights: Path | str) -> dict:
    """Keyword arguments of ``nnUNetPredictor.initialize_from_trained_model_folder`` for HD-BET 2."""
    return {
        "model_training_output_dir": str(weights),
        "use_folds": ("all",),
        "checkpoint_name": "checkpoint_final.pth",
    }


def run_hdbet2(
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

    kwargs = hdbet2_predictor_kwargs(device, use_tta)
    kwargs["device"] = torch.device(kwargs["device"])
    predictor = nnUNetPredictor(**kwargs)
    predictor.initialize_from_trained_model_folder(**hdbet2_model_args(weights))
    reader_writer = predictor.plans_manager.image_reader_writer_class()
    images, properties = reader_writer.read_images([str(t1)])
    seg = predictor.predict_single_npy_array(images, properties, None, None, False)
    with tempfile.TemporaryDirectory(prefix="vc-hdbet2-") as tmp:
        seg_path = Path(tmp) / ("mask" + predictor.dataset_json.get("file_ending", ".nii.gz"))
        reader_writer.write_seg(np.asarray(seg), str(seg_path), properties)
        mask = np.asanyarray(nib.load(str(seg_path)).dataobj) > 0
    return mask
