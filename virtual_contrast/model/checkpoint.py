"""Checkpoints of a training run: ``model.pt`` (the selected weights, self-describing) and ``last.pt`` (everything
a killed run needs to continue bitwise the same on the CPU), written atomically and read back with checks.

``model.pt`` holds the architecture (:class:`~virtual_contrast.model.config.UNetSpec`), channels, grid and its
affine, epoch, losses, configuration, subject lists and, when given, the pre-processing options; it is read by
:func:`load_checkpoint` and :func:`load_model` (prediction needs nothing of the training loop).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from virtual_contrast.io import InputError, atomic_path
from virtual_contrast.model import runtime
from virtual_contrast.model.config import TrainConfig, UNetSpec
from virtual_contrast.model.unet import UNet3D

log = logging.getLogger(__name__)

#: v2: trained on intensities normalised without the top clip, sigmoid outputs up to OUTPUT_CEILING (issue 25).
CHECKPOINT_FORMAT = "virtual-contrast/unet-v2"
#: Earlier formats, and why a model of theirs cannot be used.
RETIRED_FORMATS = {
    "virtual-contrast/unet-v1": "it was trained on intensities clipped at the 99th brain percentile (before "
    "the full-range normalisation), so its vir-T1c flattens the brightest enhancement: train it again",
}
# Options that define the result; a checkpoint written with other values is not resumed.
RESULT_FIELDS = (
    "channels",
    "width",
    "depth",
    "output",
    "batch_size",
    "learning_rate",
    "lr_schedule",
    "grad_clip",
    "divergence_guard",
    "seed",
    "loss_region",
    "enhancement_weight",
    "rank_weight",
    "augment",
    "tune_every",
)


def run_fingerprint(cfg: TrainConfig, train_keys: list[str], tune_keys: list[str]) -> str:
    """Identity of a run: its result-defining options and subjects; ``last.pt`` resumes only the same."""
    payload = {
        "format": CHECKPOINT_FORMAT,  # a run of another format (another intensity scale) is not resumed
        "cfg": {k: cfg.to_dict()[k] for k in RESULT_FIELDS},
        "train": train_keys,
        "tune": tune_keys,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _state_dict_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def save_checkpoint(obj: dict, path: Path) -> None:
    """``torch.save`` to ``path`` atomically: a killed job leaves the previous file, never half of one."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def model_checkpoint(
    model: nn.Module,
    cfg: TrainConfig,
    grid: Sequence[int],
    *,
    affine: np.ndarray,
    epoch: int,
    train_loss: float,
    tune_loss: float,
    train_ids: list[str],
    tune_ids: list[str],
    preprocess: dict | None = None,
) -> dict:
    """What ``model.pt`` holds: the weights on the CPU and all that rebuilds and feeds the model."""
    extra = {} if preprocess is None else {"preprocess": preprocess}
    return {
        "format": CHECKPOINT_FORMAT,
        "spec": cfg.spec.to_dict(),
        "channels": list(cfg.channels),
        "grid": [int(s) for s in grid],
        # The voxel-to-world matrix of the training grid: a raw exam is pre-processed onto the same grid.
        "affine": np.asarray(affine, dtype=float).tolist(),
        "state_dict": _state_dict_cpu(model),
        "epoch": int(epoch),
        "train_loss": float(train_loss),
        "tune_loss": float(tune_loss),
        "loss_region": cfg.loss_region,
        "config": cfg.to_dict(),
        "train_subjects": list(train_ids),
        "tune_subjects": list(tune_ids),
        "torch_version": str(torch.__version__),
        # How the volumes were pre-processed (PreprocessOptions.to_dict()): predict feeds a raw exam the same.
        **extra,
    }


def load_checkpoint(path: Path | str) -> dict:
    """Read a ``model.pt`` written by :func:`~virtual_contrast.model.train.train_fold`, checking its format."""
    path = Path(path)
    if not path.exists():
        raise InputError("model checkpoint not found", path=path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise InputError(f"cannot be read as a model checkpoint: {exc}", path=path) from exc
    found = ckpt.get("format") if isinstance(ckpt, dict) else None
    if found in RETIRED_FORMATS:
        raise InputError(f"a {found} checkpoint: {RETIRED_FORMATS[found]}", path=path)
    if found != CHECKPOINT_FORMAT:
        raise InputError(f"not a {CHECKPOINT_FORMAT} checkpoint", path=path)
    return ckpt


def load_model(path: Path | str, device: torch.device | str = "cpu") -> tuple[UNet3D, dict]:
    """Rebuild the UNet of a ``model.pt`` in eval mode on ``device``; returns ``(model, checkpoint)``."""
    ckpt = load_checkpoint(path)
    model = UNet3D(UNetSpec(**ckpt["spec"]))
    model.load_state_dict(ckpt.pop("state_dict"))
    return model.to(device).eval(), ckpt


def save_last(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    state: dict,
    fingerprint: str,
    cfg: TrainConfig,
) -> None:
    """Write ``last.pt``: all that :func:`try_resume` needs to continue the run bitwise the same on the CPU."""
    save_checkpoint(
        {
            "format": CHECKPOINT_FORMAT + "/resume",
            "fingerprint": fingerprint,
            "config": cfg.to_dict(),
            "state_dict": _state_dict_cpu(model),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": runtime.rng_states(),
            "epoch": state["epoch"],
            "best_loss": state["best_loss"],
            "best_epoch": state["best_epoch"],
            "history": state["history"],
            "best": state["best"],
            "guard": state.get("guard"),
        },
        path,
    )


def try_resume(
    path: Path,
    fingerprint: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
) -> dict | None:
    """Load ``last.pt`` into model and optimiser when it belongs to this run; ``None`` otherwise."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a truncated checkpoint means starting afresh
        log.warning("cannot read %s (%s); starting from scratch", path, exc)
        return None
    if ckpt.get("fingerprint") != fingerprint:
        log.warning("%s was written with other options or subjects; starting from scratch", path)
        return None
    model.load_state_dict(ckpt["state_dict"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    runtime.set_rng_states(ckpt["rng"])
    log.info("resuming from %s after epoch %d", path, ckpt["epoch"])
    return {
        "epoch": int(ckpt["epoch"]),
        "best_loss": float(ckpt["best_loss"]),
        "best_epoch": int(ckpt["best_epoch"]),
        "history": list(ckpt["history"]),
        "best": ckpt.get("best"),
        "guard": ckpt.get("guard"),
    }
