"""Training of one fold (Ammari et al. 2021): L2 loss, Adam with default hyper-parameters, random flips.

One call of :func:`train_fold` trains on the training subjects of a fold and keeps the weights with the lowest
loss on the held-out (tuning) subjects. It writes, in ``out_dir``:

- ``model.pt``: the selected weights in a self-describing checkpoint (architecture, channels, grid, epoch,
  tuning loss, configuration, subject lists), read back by :func:`load_model`;
- ``train_log.tsv``: one row per epoch (epoch, train_loss, tune_loss, seconds, lr, best);
- ``loss_curve.png``: both losses against the epoch;
- ``last.pt`` (in ``checkpoint_dir``, default ``out_dir``): weights, optimiser, grad scaler, RNG states, epoch
  and history every ``checkpoint_every`` epochs. A rerun of a killed job continues from it and, on the CPU,
  ends with bitwise the same weights as an uninterrupted run. Do not declare it as a Snakemake output (Snakemake
  deletes outputs before rerunning a job).

The loss is the mean squared error over the whole cropped volume by default (``loss_region="volume"``): the
paper's L2 loss names no mask, and the background, zero after skull stripping, is cheap to learn.
``loss_region="brain"`` averages over brain-mask voxels only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from virtual_contrast.io import InputError, atomic_path, load_image, write_table
from virtual_contrast.layout import MODEL_FILES
from virtual_contrast.model import runtime
from virtual_contrast.model.data import (
    DEFAULT_CHANNELS,
    SubjectVolumes,
    VolumeStore,
    cache_subject,
    check_channels,
    epoch_plan,
)
from virtual_contrast.model.schedule import (
    LR_SCHEDULES,
    DivergenceGuard,
    learning_rate_at,
    saturated_fraction,
)
from virtual_contrast.model.unet import UNet3D, UNetSpec, check_grid, count_parameters

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "virtual-contrast/unet-v1"
LOG_COLUMNS = ["epoch", "train_loss", "tune_loss", "seconds", "lr", "best"]


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters and runtime choices of one training run.

    Defaults follow the paper where it is explicit (Adam defaults, lr 1e-3, 300 epochs, flips); the batch size
    is not given in the paper. ``device``, ``amp``, ``compile``, ``channels_last``, ``resident``,
    ``deterministic``, ``threads``, ``progress`` and ``checkpoint_every`` change speed, not the model, and may
    differ between a killed run and its resumption.
    """

    channels: tuple[str, ...] = DEFAULT_CHANNELS
    width: int = 16
    depth: int = 5
    epochs: int = 300
    batch_size: int = 2
    learning_rate: float = 1e-3
    lr_schedule: str = (
        "constant"  # "constant" (the paper's plain Adam) | "poly"; see model.schedule
    )
    grad_clip: float = 12.0  # max gradient norm (nnU-Net's 12); 0 = off (see train_step)
    divergence_guard: float = 3.0  # undo an epoch whose loss exceeds this x the best; 0 = off
    seed: int = 0
    output: str = "direct"  # "direct" (the paper) | "residual" (see virtual_contrast.model.unet)
    loss_region: str = "volume"  # "volume" | "brain"
    augment: bool = True
    tune_every: int = 1
    checkpoint_every: int = 5
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    amp: str = "auto"  # "auto" | "bf16" | "fp16" | "off"
    compile: bool = False
    channels_last: str | bool = "auto"
    resident: str | bool = "auto"
    deterministic: bool | None = None  # None: on for the CPU, off for CUDA
    threads: int | None = None
    progress: bool | None = None  # None: when stderr is a terminal

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", check_channels(self.channels))
        positive = ("width", "depth", "epochs", "batch_size", "tune_every", "checkpoint_every")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise InputError(f"training option {name} must be >= 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise InputError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise InputError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not self.grad_clip >= 0:
            raise InputError(f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        if not self.divergence_guard >= 0:
            raise InputError(
                f"divergence_guard must be >= 0 (0 = off), got {self.divergence_guard}"
            )
        if self.loss_region not in ("volume", "brain"):
            raise InputError(f"loss_region must be 'volume' or 'brain', got {self.loss_region!r}")
        self.spec  # noqa: B018 - validates output/channels

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """Build from a mapping (e.g. the workflow config), rejecting unknown keys."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
        values = dict(values)
        if "channels" in values:
            values["channels"] = tuple(values["channels"])
        return cls(**values)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @property
    def spec(self) -> UNetSpec:
        low = self.channels.index("lowT1c") if "lowT1c" in self.channels else None
        return UNetSpec(
            in_channels=len(self.channels),
            width=self.width,
            depth=self.depth,
            output=self.output,
            residual_channel=low if self.output == "residual" else None,
        )


# Options that define the result; a checkpoint written with other values is not resumed.
_RESULT_FIELDS = (
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
    "augment",
    "tune_every",
)


def loss_fn(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error in fp32, over all voxels or over ``mask`` voxels."""
    err = (pred.float() - target.float()) ** 2
    if mask is None:
        return err.mean()
    m = mask.float()
    return (err * m).sum() / m.sum().clamp_min(1.0)


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
) -> torch.Tensor:
    """One optimisation step; returns the (detached, on-device) batch loss without synchronising.

    ``grad_clip`` > 0 rescales the gradients so that their global norm is at most that value before the step
    (gradient-norm clipping, as nnU-Net does at 12): one outlier batch then cannot throw the weights far
    enough to saturate the output sigmoid, after which its gradient vanishes and training stalls.
    """
    x, y, m = split_batch(batch, n_inputs, channels_last)
    with runtime.autocast(batch.device, amp_dtype):
        pred = model(x)
    loss = loss_fn(pred, y, m if brain_loss else None)
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
) -> float:
    """Mean per-subject loss on a set, without augmentation."""
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=store.device)
    for batch in store.batches(batch_size):
        x, y, m = split_batch(batch, n_inputs, channels_last)
        with runtime.autocast(batch.device, amp_dtype):
            pred = model(x)
        for i in range(len(batch)):
            total += loss_fn(pred[i], y[i], m[i] if brain_loss else None).double()
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
) -> float:
    """:func:`~virtual_contrast.model.schedule.saturated_fraction` of the brain on the first training volume."""
    del brain_loss  # same keywords as evaluate_loss
    batch = next(iter(store.batches(1)))
    x, _, m = split_batch(batch, n_inputs, channels_last)
    with runtime.autocast(batch.device, amp_dtype):
        pred = model(x)
    return saturated_fraction(pred, m)


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Adam:
    """Adam with default hyper-parameters (betas 0.9/0.999, eps 1e-8); the fused kernel on CUDA."""
    return torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, fused=device.type == "cuda")


def _fingerprint(cfg: TrainConfig, train_keys: list[str], tune_keys: list[str]) -> str:
    payload = {
        "cfg": {k: cfg.to_dict()[k] for k in _RESULT_FIELDS},
        "train": train_keys,
        "tune": tune_keys,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _state_dict_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _save(obj: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _model_checkpoint(
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
    """Read a ``model.pt`` written by :func:`train_fold`, checking its format."""
    path = Path(path)
    if not path.exists():
        raise InputError("model checkpoint not found", path=path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise InputError(f"cannot be read as a model checkpoint: {exc}", path=path) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"not a {CHECKPOINT_FORMAT} checkpoint", path=path)
    return ckpt


def load_model(path: Path | str, device: torch.device | str = "cpu") -> tuple[UNet3D, dict]:
    """Rebuild the UNet of a ``model.pt`` in eval mode on ``device``; returns ``(model, checkpoint)``."""
    ckpt = load_checkpoint(path)
    model = UNet3D(UNetSpec(**ckpt["spec"]))
    model.load_state_dict(ckpt.pop("state_dict"))
    return model.to(device).eval(), ckpt


def write_loss_curve(history: list[dict], path: Path | str, title: str = "") -> Path:
    """Plot train and tuning loss per epoch (log scale), marking the selected epoch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if history:
        df = pd.DataFrame(history)
        ax.plot(df["epoch"], df["train_loss"], label="train")
        tune = df.dropna(subset=["tune_loss"])
        if len(tune):
            ax.plot(tune["epoch"], tune["tune_loss"], label="tuning")
            best = df[df["best"]]
            if len(best):
                last = best.iloc[-1]
                ax.axvline(
                    last["epoch"],
                    color="grey",
                    ls=":",
                    label=f"selected (epoch {int(last['epoch'])})",
                )
        positive = df[["train_loss", "tune_loss"]].to_numpy(dtype=float)
        if np.nanmin(positive) > 0:
            ax.set_yscale("log")
        ax.legend()
    ax.set_xlabel("epoch")
    ax.set_ylabel("L2 loss (mean squared error)")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def _write_log(history: list[dict], path: Path) -> None:
    df = pd.DataFrame(history, columns=LOG_COLUMNS)
    write_table(df, path)


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
    fingerprint = _fingerprint(cfg, [p.name for p in train_cache], [p.name for p in tune_cache])

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
            resumed = _try_resume(last_path, fingerprint, model, optimizer, scaler)
            if resumed is not None:
                state = resumed
                guard.load_state_dict(state.get("guard"))
        state["guard"] = guard.state_dict()
        if state["best"] is not None:
            # Snakemake deletes a job's outputs before rerunning it: restore the selected weights so far.
            _save(state["best"], model_path)
        elif model_path.exists():
            model_path.unlink()  # from an earlier, different run: must not survive as this run's result
        if state["epoch"] >= cfg.epochs and model_path.exists():
            log.info("training already complete (%d epochs); nothing to do", state["epoch"])
            _write_outputs(state["history"], out_dir, title=out_dir.name)
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
        )
        train_kw = dict(step_kw, grad_clip=cfg.grad_clip)
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
                    state["best"] = _model_checkpoint(
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
                    _save(state["best"], model_path)
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
                _write_log(state["history"], out_dir / MODEL_FILES["log"])
                if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == stop_at:
                    _save_last(last_path, model, optimizer, scaler, state, fingerprint, cfg)
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
                state["best"] = _model_checkpoint(
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
                _save_last(last_path, model, optimizer, scaler, state, fingerprint, cfg)
            _save(state["best"], model_path)
            log.info(
                "selected epoch %d (tuning loss %.5g) → %s",
                state["best_epoch"],
                state["best_loss"],
                model_path,
            )
        _write_outputs(state["history"], out_dir, title=out_dir.name)
    return model_path


def _write_outputs(history: list[dict], out_dir: Path, title: str) -> None:
    _write_log(history, out_dir / MODEL_FILES["log"])
    write_loss_curve(history, out_dir / MODEL_FILES["curve"], title=title)


def _save_last(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    state: dict,
    fingerprint: str,
    cfg: TrainConfig,
) -> None:
    _save(
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


def _try_resume(
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
