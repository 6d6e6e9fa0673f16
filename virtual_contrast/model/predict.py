"""Prediction with test-time augmentation: every fold model × every mirror configuration, plain mean.

The paper averages 40 predictions per exam (5 fold models × the 8 subsets of the 3 axes to mirror). Here the
8 mirrored copies of the input are stacked in the batch dimension and each model runs once on that batch (or on
chunks of it, to bound memory), in bf16 on GPUs; the outputs are mirrored back and summed in fp32. The result
equals the one-at-a-time fp32 loop up to the precision of the arithmetic
(:func:`tta_predict_naive`, kept as the reference for tests and benchmarks).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from virtual_contrast.io import InputError, save_image
from virtual_contrast.model import runtime
from virtual_contrast.model.checkpoint import load_model
from virtual_contrast.model.data import SubjectVolumes, load_subject_arrays
from virtual_contrast.model.unet import check_grid

log = logging.getLogger(__name__)

FlipSpec = str | Sequence[Sequence[int]]


def flip_configs(flips: FlipSpec = "all8") -> list[tuple[int, ...]]:
    """Spatial axes (0, 1, 2) to mirror for each TTA pass: ``"all8"`` (every subset), ``"none"`` or a list."""
    if flips == "all8":
        return [c for r in range(4) for c in itertools.combinations(range(3), r)]
    if flips == "none":
        return [()]
    if isinstance(flips, str):
        raise InputError(f"unknown flips {flips!r}: use 'all8', 'none' or a list of axis tuples")
    configs = [tuple(int(a) for a in c) for c in flips]
    if not configs or any(a not in (0, 1, 2) for c in configs for a in c):
        raise InputError(f"invalid flip configurations {flips!r}: axes must be 0, 1 or 2")
    return configs


def _dims(config: tuple[int, ...]) -> list[int]:
    """Tensor dims of spatial axes in a (N, C, X, Y, Z) batch."""
    return [2 + a for a in config]


@torch.inference_mode()
def tta_predict(
    models: Sequence[nn.Module],
    x: torch.Tensor,
    flips: FlipSpec = "all8",
    amp: bool | str = True,
    batch: int | None = None,
    channels_last: bool | str = "auto",
) -> torch.Tensor:
    """Mean over ``models`` × mirror configurations of the un-mirrored predictions, in fp32.

    ``x`` is ``(C, X, Y, Z)`` or ``(1, C, X, Y, Z)`` on the models' device; the result has the same number of
    dimensions with ``out_channels`` channels. ``batch`` mirrored copies are stacked per forward pass (default:
    :func:`auto_batch`, all 8 when memory allows; batching pays on the CPU too, 7× at 32×48×32).
    ``amp`` follows :func:`~virtual_contrast.model.runtime.resolve_amp` (bf16 on a GPU and on CPUs with native
    bf16, else fp32).
    """
    if not models:
        raise ValueError("tta_predict needs at least one model")
    squeeze = x.ndim == 4
    if squeeze:
        x = x[None]
    if x.ndim != 5 or x.shape[0] != 1:
        raise ValueError(f"expected (C, X, Y, Z) or (1, C, X, Y, Z), got {tuple(x.shape)}")
    device = x.device
    amp_dtype = runtime.resolve_amp(amp, device)
    cl = runtime.use_channels_last(channels_last, device)
    configs = flip_configs(flips)
    batch = batch or auto_batch(models, x, amp_dtype, len(configs))
    acc: torch.Tensor | None = None
    for start in range(0, len(configs), batch):
        chunk = configs[start : start + batch]
        xb = torch.cat([x.flip(_dims(c)) if c else x for c in chunk])
        if cl:
            xb = xb.contiguous(memory_format=torch.channels_last_3d)
        for model in models:
            with runtime.autocast(device, amp_dtype):
                yb = model(xb)
            for j, c in enumerate(chunk):
                y = yb[j : j + 1].float()
                y = y.flip(_dims(c)) if c else y
                acc = y.clone() if acc is None else acc.add_(y)
    out = acc / (len(models) * len(configs))
    return out[0] if squeeze else out


def auto_batch(
    models: Sequence[nn.Module], x: torch.Tensor, amp_dtype: torch.dtype | None, n_configs: int = 8
) -> int:
    """Mirrored copies per forward pass that fit a memory budget: half the free GPU memory, or on the CPU a
    quarter of the available RAM and at most 4 GB.

    Inference keeps about 8 full-resolution feature maps of ``width`` channels alive per sample (the
    long skips of every level plus the working maps); that bound is used per sample.
    """
    width = max(getattr(getattr(m, "spec", None), "width", 32) for m in models)
    itemsize = 2 if amp_dtype is not None else 4
    per_sample = 8 * width * itemsize * x[0, 0].numel()
    budget = runtime.available_bytes(x.device) * 0.5
    if x.device.type != "cuda":
        budget = min(budget * 0.5, 4e9)
    return int(max(1, min(n_configs, budget // per_sample)))


@torch.inference_mode()
def tta_predict_naive(
    models: Sequence[nn.Module], x: torch.Tensor, flips: FlipSpec = "all8"
) -> torch.Tensor:
    """Reference implementation: fp32, one model and one mirror configuration at a time."""
    squeeze = x.ndim == 4
    if squeeze:
        x = x[None]
    configs = flip_configs(flips)
    outs = []
    for model in models:
        for c in configs:
            y = model(x.flip(_dims(c)) if c else x).float()
            outs.append(y.flip(_dims(c)) if c else y)
    out = torch.stack(outs).mean(0)
    return out[0] if squeeze else out


def load_models(
    model_paths: Sequence[Path | str], device: torch.device | str = "cpu"
) -> tuple[list[nn.Module], list[str], list[dict]]:
    """Load fold models; they must take the same input channels. Returns (models, channels, checkpoints)."""
    if not model_paths:
        raise InputError("no model checkpoint given")
    models, ckpts = [], []
    device = torch.device(device)
    for p in model_paths:
        model, ckpt = load_model(p, device)
        if runtime.use_channels_last("auto", device):
            model = model.to(memory_format=torch.channels_last_3d)
        models.append(model)
        ckpts.append(ckpt)
    channels = ckpts[0]["channels"]
    for p, ck in zip(model_paths, ckpts, strict=True):
        if ck["channels"] != channels:
            raise InputError(
                f"model takes channels {ck['channels']}, but {model_paths[0]} takes {channels}",
                path=p,
            )
    return models, list(channels), ckpts


def predict_subject(
    model_paths: Sequence[Path | str],
    channel_paths: dict[str, Path | str],
    out_path: Path | str,
    *,
    device: str | torch.device = "auto",
    amp: bool | str = True,
    flips: FlipSpec = "all8",
    mask_path: Path | str | None = None,
    subject: str | None = None,
    batch: int | None = None,
) -> Path:
    """Predict vir-T1c for one subject on its normalised atlas-space grid and write it with the input affine.

    ``channel_paths`` maps channel names to normalised NIfTIs (extra channels are ignored; the models'
    channels are required). With ``mask_path`` the prediction is set to 0 outside the brain mask.
    Runs on the GPU when there is one (``device="auto"``), otherwise on the CPU, much more slowly.
    """
    t0 = time.perf_counter()
    dev = runtime.resolve_device(device)
    models, channels, ckpts = load_models(model_paths, dev)
    sv = SubjectVolumes(
        subject=subject or "?",
        channels={k: Path(v) for k, v in channel_paths.items()},
        mask=Path(mask_path) if mask_path is not None else None,
    )
    inputs, _, mask, affine = load_subject_arrays(sv, channels, with_target=False)
    grid = inputs.shape[1:]
    for p, ck in zip(model_paths, ckpts, strict=True):
        try:
            check_grid(grid, ck["spec"]["depth"])
        except InputError as exc:
            raise InputError(str(exc), subject=subject, path=p) from None
        if list(grid) != list(ck["grid"]):
            log.warning(
                "sub-%s: grid %s differs from the training grid %s of %s",
                subject,
                grid,
                tuple(ck["grid"]),
                p,
            )
    x = torch.from_numpy(inputs).to(dev)
    t1 = time.perf_counter()
    y = tta_predict(models, x, flips=flips, amp=amp, batch=batch)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t2 = time.perf_counter()
    out = y[0].cpu().numpy().astype(np.float32)
    if mask is not None:
        out = np.where(mask > 0.5, out, 0.0).astype(np.float32)
    save_image(out, affine, out_path)
    log.info(
        "sub-%s: %d models × %d mirror configurations on %s in %.2f s (total %.2f s) → %s",
        subject,
        len(models),
        len(flip_configs(flips)),
        dev,
        t2 - t1,
        time.perf_counter() - t0,
        out_path,
    )
    return Path(out_path)
