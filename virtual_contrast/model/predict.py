"""Prediction with test-time augmentation: every fold model × every mirror configuration, plain mean.

The paper averages 40 predictions per exam (5 fold models × the 8 subsets of the 3 axes to mirror). Here the
8 mirrored copies of the input are stacked in the batch dimension and each model runs once on that batch (or on
chunks of it, to bound memory), in bf16 on GPUs; the outputs are mirrored back and summed in fp32. The result
equals the one-at-a-time fp32 loop up to the precision of the arithmetic
(:func:`tta_predict_naive`, kept as the reference for tests and benchmarks).

:func:`tta_ensemble` runs the same passes and also keeps their spread (over all passes, over the fold models'
means, over each model's mirrors: :class:`Ensemble`), at the cost of one sum of squares per pass; from it and
the images :func:`predict_subject` writes vir-T1c's uncertainty map (:mod:`virtual_contrast.model.uncertainty`).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from virtual_contrast.io import InputError, load_image, save_image
from virtual_contrast.model import runtime
from virtual_contrast.model.checkpoint import load_model
from virtual_contrast.model.data import SubjectVolumes, load_subject_arrays
from virtual_contrast.model.uncertainty import (
    SPREAD_VOLUMES,
    Calibration,
    spread_volumes,
    uncertainty_map,
)
from virtual_contrast.model.unet import check_grid
from virtual_contrast.sequences import ANCHOR, LOW_DOSE

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


@dataclass(frozen=True)
class Ensemble:
    """The passes of a test-time-augmented ensemble summarised voxel by voxel, in fp32.

    ``mean``: the prediction (mean over every model × mirror configuration). ``std_passes``: standard deviation
    over all passes. ``std_folds``: standard deviation of the models' own means (their disagreement; 0 with
    one model). ``std_mirrors``: the root mean of each model's variance over its mirror configurations (the
    disagreement of a model with itself). ``std_passes² = std_folds² + std_mirrors²`` (population variances,
    the law of total variance), so the three cost one extra sum of squares per pass.
    """

    mean: torch.Tensor
    std_passes: torch.Tensor
    std_folds: torch.Tensor
    std_mirrors: torch.Tensor
    n_models: int
    n_mirrors: int


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
    return _run_passes(models, x, flips, amp, batch, channels_last, spread=False).mean


@torch.inference_mode()
def tta_ensemble(
    models: Sequence[nn.Module],
    x: torch.Tensor,
    flips: FlipSpec = "all8",
    amp: bool | str = True,
    batch: int | None = None,
    channels_last: bool | str = "auto",
) -> Ensemble:
    """:func:`tta_predict` that also keeps the spread of the passes (:class:`Ensemble`): the same forward
    passes, plus a running sum of squares per model."""
    return _run_passes(models, x, flips, amp, batch, channels_last, spread=True)


def _run_passes(
    models: Sequence[nn.Module],
    x: torch.Tensor,
    flips: FlipSpec,
    amp: bool | str,
    batch: int | None,
    channels_last: bool | str,
    *,
    spread: bool,
) -> Ensemble:
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
    # One sum per model (its mean: the fold disagreement), and with `spread` one sum of squares per model of
    # the passes' deviation from the model's first pass (a shift that keeps the fp32 variance exact when the
    # spread is small against the intensities).
    sums: list[torch.Tensor | None] = [None] * len(models)
    squares: list[torch.Tensor | None] = [None] * len(models)
    shifts: list[torch.Tensor | None] = [None] * len(models)
    for start in range(0, len(configs), batch):
        chunk = configs[start : start + batch]
        xb = torch.cat([x.flip(_dims(c)) if c else x for c in chunk])
        if cl:
            xb = xb.contiguous(memory_format=torch.channels_last_3d)
        for m, model in enumerate(models):
            with runtime.autocast(device, amp_dtype):
                yb = model(xb)
            for j, c in enumerate(chunk):
                y = yb[j : j + 1].float()
                y = y.flip(_dims(c)) if c else y
                sums[m] = y.clone() if sums[m] is None else sums[m].add_(y)
                if spread:
                    if shifts[m] is None:
                        shifts[m] = y.clone()
                        squares[m] = torch.zeros_like(y)
                    else:
                        squares[m].add_((y - shifts[m]).square_())
    n_mirrors = len(configs)
    total = torch.stack(sums).sum(0)
    mean = total / (len(models) * n_mirrors)
    if spread:
        model_means = torch.stack(sums) / n_mirrors
        # Var over a model's mirrors = E[(y - s)^2] - (E[y] - s)^2 with s its first pass.
        within = torch.stack(squares) / n_mirrors - (model_means - torch.stack(shifts)).square()
        std_mirrors = within.clamp_min(0).mean(0).sqrt()
        std_folds = (model_means - mean).square().mean(0).sqrt()
        std_passes = (std_folds.square() + std_mirrors.square()).sqrt()
    else:
        std_passes = std_folds = std_mirrors = torch.zeros(0)
    if squeeze:
        mean = mean[0]
        if spread:
            std_passes, std_folds, std_mirrors = std_passes[0], std_folds[0], std_mirrors[0]
    return Ensemble(mean, std_passes, std_folds, std_mirrors, len(models), n_mirrors)


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
    uncertainty_path: Path | str | None = None,
    spread_path: Path | str | None = None,
    calibration: Calibration | None = None,
    pre_path: Path | str | None = None,
) -> Path:
    """Predict vir-T1c for one subject on its normalised atlas-space grid and write it with the input affine.

    ``channel_paths`` maps channel names to normalised NIfTIs (extra channels are ignored; the models'
    channels are required). With ``mask_path`` the prediction is set to 0 outside the brain mask.
    Runs on the GPU when there is one (``device="auto"``), otherwise on the CPU, much more slowly.

    With ``uncertainty_path`` the same passes also give the uncertainty map
    (:func:`virtual_contrast.model.uncertainty.uncertainty_map`: the ``calibration``'s expected |vir − ref|,
    which needs the low-dose T1c among ``channel_paths`` and the pre-contrast T1 (``pre_path``, or ``T1w``
    among ``channel_paths``); without a calibration the standard deviation over all passes, said in the log),
    masked like vir-T1c; with ``spread_path`` the raw spreads as a 4D image
    (:data:`~virtual_contrast.model.uncertainty.SPREAD_VOLUMES`).
    """
    t0 = time.perf_counter()
    want_spread = uncertainty_path is not None or spread_path is not None
    feature_paths: dict[str, Path] = {}
    if uncertainty_path is not None and calibration is not None:
        pre_path = pre_path or channel_paths.get(ANCHOR)
        if LOW_DOSE not in channel_paths or pre_path is None:
            raise InputError(
                f"the calibrated uncertainty map needs the normalised {LOW_DOSE} and {ANCHOR}",
                subject=subject,
            )
        feature_paths = {"low": Path(channel_paths[LOW_DOSE]), "pre": Path(pre_path)}
    dev = runtime.resolve_device(device)
    models, channels, ckpts = load_models(model_paths, dev)
    sv = SubjectVolumes(
        subject=subject or "?",
        channels={k: Path(v) for k, v in channel_paths.items()},
        mask=Path(mask_path) if mask_path is not None else None,
    )
    inputs, _, mask, affine = load_subject_arrays(sv, channels, with_target=False)
    features = {}
    for name, path in feature_paths.items():
        data = np.asanyarray(load_image(path, subject=subject).dataobj, dtype=np.float32)
        if data.shape != inputs.shape[1:]:
            raise InputError(
                f"grid {data.shape} differs from the channels' {inputs.shape[1:]}",
                subject=subject,
                path=path,
            )
        features[name] = data
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
    ensemble = None
    if want_spread:
        ensemble = tta_ensemble(models, x, flips=flips, amp=amp, batch=batch)
        y = ensemble.mean
    else:
        y = tta_predict(models, x, flips=flips, amp=amp, batch=batch)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t2 = time.perf_counter()
    vir = y[0].cpu().numpy().astype(np.float32)
    out = vir
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
    if ensemble is not None:
        t3 = time.perf_counter()
        if spread_path is not None:
            spreads = [getattr(ensemble, k)[0].cpu().numpy() for k in SPREAD_VOLUMES]
            save_image(spread_volumes(*spreads, mask), affine, spread_path)
        if uncertainty_path is not None:
            # On the prediction's device: the features of the calibration are a few convolutions.
            unc, kind = uncertainty_map(
                calibration,
                vir=torch.from_numpy(out).to(dev),
                low=features.get("low"),
                pre=features.get("pre"),
                std_passes=ensemble.std_passes[0],
                std_mirrors=ensemble.std_mirrors[0],
                mask=mask,
            )
            save_image(unc, affine, uncertainty_path)
            log.info(
                "sub-%s: uncertainty map (%s%s) in %.2f s → %s",
                subject,
                kind,
                ""
                if calibration
                else ": no calibration given, the standard deviation over all passes",
                time.perf_counter() - t3,
                uncertainty_path,
            )
    return Path(out_path)
