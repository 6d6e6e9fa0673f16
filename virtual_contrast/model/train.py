"""Training of one fold (Ammari et al. 2021): L2 loss, Adam with default hyper-parameters, random flips.

One call of :func:`train_fold` trains on the training subjects of a fold and keeps the weights with the lowest
loss on the held-out (tuning) subjects. It writes, in ``out_dir``:

- ``model.pt``: the selected weights in a self-describing checkpoint (architecture, channels, grid, epoch,
  tuning loss, configuration, subject lists), read back by
  :func:`~virtual_contrast.model.checkpoint.load_model`;
- ``train_log.tsv``: one row per epoch (epoch, train_loss, tune_loss, seconds, lr, best);
- ``loss_curve.png``: both losses against the epoch;
- ``last.pt`` (in ``checkpoint_dir``, default ``out_dir``): weights, optimiser, grad scaler, RNG states, epoch
  and history every ``checkpoint_every`` epochs. A rerun of a killed job continues from it and, on the CPU,
  ends with bitwise the same weights as an uninterrupted run. Do not declare it as a Snakemake output (Snakemake
  deletes outputs before rerunning a job).

The loss is the mean squared error over the whole cropped volume by default (``loss_region="volume"``): the
paper's L2 loss names no mask, and the background, zero after skull stripping, is cheap to learn.
``loss_region="brain"`` averages over brain-mask voxels only. With ``enhancement_weight`` > 0 (not in the paper)
each voxel's squared error weighs ``1 + enhancement_weight * max(target - pre-contrast T1, 0)`` and the loss is the
weighted mean (:func:`loss_weights`): enhancing lesions and vessels are a few voxels of the brain, and with the
plain L2 a small network trained on a few patients drew them too faint. Weighting the errors where the tumour
enhances is the remedy of Chen et al. 2021 (arXiv:2104.01592, a "local loss" for the tumour's imbalance
with normal tissue); here the weight comes from the target's own enhancement, so it needs no segmentation.
With ``rank_weight`` > 0 (not in the paper) each training step adds that many times the ranking loss of the
enhancement map (:func:`~virtual_contrast.model.ranking.enhancement_rank_loss`: the voxels that enhance on the
full dose above those that do not, the ranking the paper's ROC AUC scores). The tuning loss that selects the
epoch stays the image's (weighted) L2.

The options are a :class:`~virtual_contrast.model.config.TrainConfig`; the checkpoints are written and read by
:mod:`virtual_contrast.model.checkpoint`, the log and the loss curve by :mod:`virtual_contrast.model.train_log`.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from virtual_contrast.io import InputError, load_image
from virtual_contrast.layout import MODEL_FILES
from virtual_contrast.model import runtime
from virtual_contrast.model.checkpoint import (
    model_checkpoint,
    run_fingerprint,
    save_checkpoint,
    save_last,
    try_resume,
)
from virtual_contrast.model.config import TrainConfig
from virtual_contrast.model.data import SubjectVolumes, VolumeStore, cache_subject, epoch_plan
from virtual_contrast.model.ranking import enhancement_rank_loss
from virtual_contrast.model.schedule import DivergenceGuard, learning_rate_at, saturated_fraction
from virtual_contrast.model.train_log import write_log, write_loss_curve, write_outputs
from virtual_contrast.model.unet import OUTPUT_CEILING, UNet3D, check_grid, count_parameters

log = logging.getLogger(__name__)


def loss_fn(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error in fp32, over all voxels or over ``mask`` voxels, weighted by ``weight`` if given
    (a weighted mean: the weights are normalised by their sum)."""
    err = (pred.float() - target.float()) ** 2
    if mask is None and weight is None:
        return err.mean()
    w = torch.ones_like(err) if weight is None else weight.float().expand_as(err)
    if mask is not None:
        w = w * mask.float()
    return (err * w).sum() / w.sum().clamp_min(1.0)


def loss_weights(
    x: torch.Tensor, target: torch.Tensor, pre_channel: int | None, enhancement_weight: float
) -> torch.Tensor | None:
    """``1 + enhancement_weight * max(target - x[:, pre_channel], 0)``, the voxel weights of the loss (None
    when the weight is 0: the plain L2)."""
    if not enhancement_weight:
        return None
    if pre_channel is None:
        raise ValueError("enhancement_weight > 0 needs the pre-contrast T1's channel (pre_channel)")
    pre = x[:, pre_channel : pre_channel + 1].float()
    return 1.0 + enhancement_weight * (target.float() - pre).clamp_min(0.0)


def split_batch(
    batch: torch.Tensor, n_inputs: int, channels_last: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B, C + 2, ...)`` float16 → fp32 inputs (NDHWC when asked), target, mask."""
    x = batch[:, :n_inputs].float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return x, batch[:, n_inputs : n_inputs + 1], batch[:, n_inputs + 1 : n_inputs + 2]


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    batch: torch.Tensor,
    *,
    n_inputs: int,
    amp_dtype: torch.dtype | None,
    brain_loss: bool,
    channels_last: bool,
    grad_clip: float = 0.0,
    pre_channel: int | None = None,
    enhancement_weight: float = 0.0,
    rank_weight: float = 0.0,
) -> torch.Tensor:
    """One optimisation step; returns the (detached, on-device) batch loss without synchronising.

    The loss is the (weighted) L2 plus ``rank_weight`` times the enhancement ranking loss, which needs
    ``pre_channel``.

    ``grad_clip`` > 0 rescales the gradients so that their global norm is at most that value before the step
    (gradient-norm clipping, as nnU-Net does at 12): one outlier batch then cannot throw the weights far
    enough to saturate the output sigmoid, after which its gradient vanishes and training stalls.
    """
    x, y, m = split_batch(batch, n_inputs, channels_last)
    with runtime.autocast(batch.device, amp_dtype):
        pred = model(x)
    weight = loss_weights(x, y, pre_channel, enhancement_weight)
    loss = loss_fn(pred, y, m if brain_loss else None, weight)
    if rank_weight:
        if pre_channel is None:
            raise ValueError("rank_weight > 0 needs the pre-contrast T1's channel (pre_channel)")
        pre = x[:, pre_channel : pre_channel + 1]
        loss = loss + rank_weight * enhancement_rank_loss(pred, y, pre, m)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
    return loss.detach()


@torch.inference_mode()
def evaluate_loss(
    model: nn.Module,
    store: VolumeStore,
    *,
    batch_size: int,
    n_inputs: int,
    amp_dtype: torch.dtype | None,
    brain_loss: bool,
    channels_last: bool,
    pre_channel: int | None = None,
    enhancement_weight: float = 0.0,
) -> float:
    """Mean per-subject loss on a set, without augmentation."""
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=store.device)
    for batch in store.batches(batch_size):
        x, y, m = split_batch(batch, n_inputs, channels_last)
        with runtime.autocast(batch.device, amp_dtype):
            pred = model(x)
        weight = loss_weights(x, y, pre_channel, enhancement_weight)
        for i in range(len(batch)):
            w = None if weight is None else weight[i]
            total += loss_fn(pred[i], y[i], m[i] if brain_loss else None, w).double()
    return float(total) / len(store)


@torch.inference_mode()
def output_saturation(
    model: nn.Module,
    store: VolumeStore,
    *,
    n_inputs: int,
    amp_dtype: torch.dtype | None,
    brain_loss: bool,
    channels_last: bool,
    pre_channel: int | None = None,
    enhancement_weight: float = 0.0,
) -> float:
    """:func:`~virtual_contrast.model.schedule.saturated_fraction` of the brain on the first training volume."""
    del brain_loss, pre_channel, enhancement_weight  # same keywords as evaluate_loss
    batch = next(iter(store.batches(1)))
    x, _, m = split_batch(batch, n_inputs, channels_last)
    with runtime.autocast(batch.device, amp_dtype):
        pred = model(x)
    return saturated_fraction(pred, m, OUTPUT_CEILING)


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Adam:
    """Adam with default hyper-parameters (betas 0.9/0.999, eps 1e-8); the fused kernel on CUDA."""
    return torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, fused=device.type == "cuda")


def train_fold(
    train_subjects: Sequence[SubjectVolumes],
    tune_subjects: Sequence[SubjectVolumes],
    out_dir: Path | str,
    cfg: TrainConfig,
    *,
    cache_dir: Path | str | None = None,
    checkpoint_dir: Path | str | None = None,
    max_epochs_this_run: int | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    preprocess: dict | None = None,
) -> Path:
    """Train one fold; returns the path of ``model.pt`` (see the module docstring for every output).

    ``cache_dir`` (default ``out_dir/cache``) receives the float16 arrays of the subjects; share it between
    folds so each subject is converted once. A ``last.pt`` in ``checkpoint_dir`` written with the same
    result-defining options and subjects is resumed; any other is ignored (with a warning) and overwritten.
    ``max_epochs_this_run`` stops after that many epochs (with a checkpoint), and ``on_epoch_end(epoch, row)``
    is called after each epoch; both exist to test and benchmark interruption. ``preprocess`` (the
    pre-processing options as a plain dict) is stored in ``model.pt`` for ``predict``.
    """
    out_dir = Path(out_dir)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else out_dir
    cache_dir = Path(cache_dir) if cache_dir is not None else out_dir / "cache"
    train_ids = [s.subject for s in train_subjects]
    tune_ids = [s.subject for s in tune_subjects]
    if not train_ids:
        raise InputError("no training subjects")
    for ids, what in ((train_ids, "training"), (tune_ids, "tuning")):
        dup = sorted({s for s in ids if ids.count(s) > 1})
        if dup:
            raise InputError(f"subject(s) {dup} listed twice among the {what} subjects")
    leak = sorted(set(train_ids) & set(tune_ids))
    if leak:
        raise InputError(f"subject(s) {leak} are both training and tuning subjects")

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = runtime.resolve_device(cfg.device)
    amp_dtype = runtime.resolve_amp(cfg.amp, device)
    channels_last = runtime.use_channels_last(cfg.channels_last, device)
    deterministic = cfg.deterministic if cfg.deterministic is not None else device.type == "cpu"
    n_in = len(cfg.channels)

    train_cache = [cache_subject(s, cache_dir, cfg.channels) for s in train_subjects]
    tune_cache = [cache_subject(s, cache_dir, cfg.channels) for s in tune_subjects]
    train_store = VolumeStore(train_cache, device, cfg.resident)
    tune_store = VolumeStore(tune_cache, device, cfg.resident) if tune_cache else None
    grid = train_store.sample_shape[1:]
    if tune_store is not None and tune_store.sample_shape != train_store.sample_shape:
        raise InputError(
            f"tuning subjects have grid {tune_store.sample_shape[1:]}, training subjects {grid}"
        )
    check_grid(grid, cfg.depth)
    grid_affine = load_image(train_subjects[0].channels[cfg.channels[0]]).affine
    fingerprint = run_fingerprint(cfg, [p.name for p in train_cache], [p.name for p in tune_cache])

    with runtime.deterministic_algorithms(deterministic, device):
        runtime.seed_everything(cfg.seed)
        model = UNet3D(cfg.spec).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last_3d)
        optimizer = make_optimizer(model, cfg, device)
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        log.info(
            "UNet width %d depth %d, %.2f M parameters, grid %s, %d train / %d tune subjects, "
            "precision %s%s",
            cfg.width,
            cfg.depth,
            count_parameters(model) / 1e6,
            "×".join(map(str, grid)),
            len(train_ids),
            len(tune_ids),
            "fp32" if amp_dtype is None else str(amp_dtype).removeprefix("torch."),
            ", channels-last" if channels_last else "",
        )

        state = {"epoch": 0, "best_loss": math.inf, "best_epoch": 0, "history": [], "best": None}
        guard = DivergenceGuard(cfg.divergence_guard)
        last_path = ckpt_dir / "last.pt"
        model_path = out_dir / MODEL_FILES["model"]
        if last_path.exists():
            resumed = try_resume(last_path, fingerprint, model, optimizer, scaler)
            if resumed is not None:
                state = resumed
                guard.load_state_dict(state.get("guard"))
        state["guard"] = guard.state_dict()
        if state["best"] is not None:
            # Snakemake deletes a job's outputs before rerunning it: restore the selected weights so far.
            save_checkpoint(state["best"], model_path)
        elif model_path.exists():
            model_path.unlink()  # from an earlier, different run: must not survive as this run's result
        if state["epoch"] >= cfg.epochs and model_path.exists():
            log.info("training already complete (%d epochs); nothing to do", state["epoch"])
            write_outputs(state["history"], out_dir, title=out_dir.name)
            return model_path

        step_model = torch.compile(model) if cfg.compile else model
        show = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
        from tqdm.auto import tqdm

        bar = tqdm(
            total=cfg.epochs,
            initial=state["epoch"],
            disable=not show,
            desc=out_dir.name,
            unit="epoch",
        )
        stop_at = cfg.epochs
        if max_epochs_this_run is not None:
            stop_at = min(cfg.epochs, state["epoch"] + max_epochs_this_run)
        step_kw = dict(
            n_inputs=n_in,
            amp_dtype=amp_dtype,
            brain_loss=cfg.loss_region == "brain",
            channels_last=channels_last,
            pre_channel=cfg.precontrast_channel,
            enhancement_weight=cfg.enhancement_weight,
        )
        train_kw = dict(step_kw, grad_clip=cfg.grad_clip, rank_weight=cfg.rank_weight)
        try:
            while state["epoch"] < stop_at:
                epoch = state["epoch"]
                t0 = time.perf_counter()
                order, flips = epoch_plan(len(train_store), cfg.seed, epoch, cfg.augment)
                lr = learning_rate_at(cfg.learning_rate, cfg.lr_schedule, epoch, cfg.epochs)
                for group in optimizer.param_groups:
                    group["lr"] = lr * guard.lr_factor
                if not guard.remembers:  # the untrained network: where a first epoch returns
                    guard.remember(model, optimizer)
                step_model.train()
                total = torch.zeros((), dtype=torch.float64, device=device)
                for batch in train_store.batches(cfg.batch_size, order, flips):
                    loss = train_step(step_model, optimizer, scaler, batch, **train_kw)
                    total += loss.double() * len(batch)
                train_loss = float(total) / len(train_store)
                best_train = min((r["train_loss"] for r in state["history"]), default=math.inf)
                saturated = (
                    output_saturation(step_model, train_store, **step_kw) if guard.factor else 0.0
                )
                if guard.diverged(train_loss, best_train, saturated):
                    guard.roll_back(model, optimizer, epoch=epoch + 1, train_loss=train_loss)
                    state["guard"] = guard.state_dict()
                    continue
                if train_loss < best_train:
                    guard.remember(model, optimizer)
                    state["guard"] = guard.state_dict()
                tune_loss = math.nan
                is_tune_epoch = (epoch + 1) % cfg.tune_every == 0 or epoch + 1 == cfg.epochs
                if tune_store is not None and is_tune_epoch:
                    tune_loss = evaluate_loss(
                        step_model, tune_store, batch_size=cfg.batch_size, **step_kw
                    )
                best = tune_store is not None and tune_loss < state["best_loss"]
                if best:
                    state["best_loss"], state["best_epoch"] = tune_loss, epoch + 1
                    state["best"] = model_checkpoint(
                        model,
                        cfg,
                        grid,
                        affine=grid_affine,
                        epoch=epoch + 1,
                        train_loss=train_loss,
                        tune_loss=tune_loss,
                        train_ids=train_ids,
                        tune_ids=tune_ids,
                        preprocess=preprocess,
                    )
                    save_checkpoint(state["best"], model_path)
                if not math.isfinite(train_loss):
                    raise FloatingPointError(f"training loss is {train_loss} at epoch {epoch + 1}")
                row = {
                    "epoch": epoch + 1,
                    "train_loss": train_loss,
                    "tune_loss": tune_loss,
                    "seconds": round(time.perf_counter() - t0, 3),
                    "lr": optimizer.param_groups[0]["lr"],
                    "best": bool(best),
                }
                state["history"].append(row)
                state["epoch"] = epoch + 1
                bar.update(1)
                bar.set_postfix(train=f"{train_loss:.3g}", tune=f"{tune_loss:.3g}")
                log.info(
                    "epoch %d/%d train %.5g tune %.5g (%.1f s)%s",
                    epoch + 1,
                    cfg.epochs,
                    train_loss,
                    tune_loss,
                    row["seconds"],
                    " *" if best else "",
                )
                write_log(state["history"], out_dir / MODEL_FILES["log"])
                if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == stop_at:
                    save_last(last_path, model, optimizer, scaler, state, fingerprint, cfg)
                    write_loss_curve(
                        state["history"], out_dir / MODEL_FILES["curve"], title=out_dir.name
                    )
                if on_epoch_end is not None:
                    on_epoch_end(epoch + 1, row)
        finally:
            bar.close()

        if state["epoch"] >= cfg.epochs:
            if state["best"] is None:
                # No tuning set (or no finite tuning loss): keep the last weights.
                log.warning("no tuning loss to select weights with; model.pt holds the last epoch")
                state["best"] = model_checkpoint(
                    model,
                    cfg,
                    grid,
                    affine=grid_affine,
                    epoch=state["epoch"],
                    train_loss=state["history"][-1]["train_loss"],
                    tune_loss=math.nan,
                    train_ids=train_ids,
                    tune_ids=tune_ids,
                    preprocess=preprocess,
                )
                save_last(last_path, model, optimizer, scaler, state, fingerprint, cfg)
            save_checkpoint(state["best"], model_path)
            log.info(
                "selected epoch %d (tuning loss %.5g) → %s",
                state["best_epoch"],
                state["best_loss"],
                model_path,
            )
        write_outputs(state["history"], out_dir, title=out_dir.name)
    return model_path
