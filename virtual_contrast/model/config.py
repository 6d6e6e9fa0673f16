"""What defines a model and its training, without torch: the input channels, the network's shape
(:class:`UNetSpec`) and the training options (:class:`TrainConfig`).

Torch-free so that the workflow can build and check these at parse time, and the command line can parse its
options, without loading torch; :mod:`virtual_contrast.model.unet` builds the network from a :class:`UNetSpec`
and :mod:`virtual_contrast.model.train` trains with a :class:`TrainConfig`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from virtual_contrast.io import InputError
from virtual_contrast.sequences import ANCHOR, INPUT_CHANNELS, LOW_DOSE

#: Input channels of the paper, in the order used by default (ADC, T2-FLAIR, T1, low-dose T1c). Every
#: channel a model may take as input is in virtual_contrast.sequences (INPUT_CHANNELS, re-exported here).
DEFAULT_CHANNELS: tuple[str, ...] = ("ADC", "FLAIR", "T1w", "lowT1c")
#: How the network's head becomes the output (see virtual_contrast.model.unet): the paper's sigmoid, a
#: correction of the low-dose image's logit, or a gain of the low-dose enhancement plus an offset.
UNET_OUTPUTS = ("direct", "residual", "enhancement")
LR_SCHEDULES = ("constant", "poly")  # see virtual_contrast.model.schedule
NEGATIVE_SLOPE = 0.2  # of every LeakyReLU of the UNet
#: Keys of the workflow config's ``train`` section that are the job's cluster resources, not training options.
RESOURCE_KEYS = ("mem_mb", "runtime_min")


def check_channels(channels: Sequence[str]) -> tuple[str, ...]:
    """Validate a list of input channel names (known, unique, non-empty)."""
    channels = tuple(channels)
    unknown = [c for c in channels if c not in INPUT_CHANNELS]
    if not channels or unknown or len(set(channels)) != len(channels):
        raise InputError(
            f"invalid model channels {list(channels)}: give unique names among {list(INPUT_CHANNELS)}"
        )
    return channels


@dataclass(frozen=True)
class UNetSpec:
    """Everything needed to rebuild a :class:`~virtual_contrast.model.unet.UNet3D` (stored in every checkpoint)."""

    in_channels: int = 4
    width: int = 16
    depth: int = 5
    out_channels: int = 1
    negative_slope: float = NEGATIVE_SLOPE
    output: str = "direct"  # one of UNET_OUTPUTS; see virtual_contrast.model.unet
    residual_channel: int | None = (
        None  # index of the low-dose input channel, for output="residual" or "enhancement"
    )
    precontrast_channel: int | None = None  # index of the pre-contrast T1, for output="enhancement"

    def __post_init__(self) -> None:
        if self.output not in UNET_OUTPUTS:
            raise InputError(f"UNet output must be one of {UNET_OUTPUTS}, got {self.output!r}")
        if self.output == "enhancement" and not (
            self.precontrast_channel is not None
            and 0 <= self.precontrast_channel < self.in_channels
            and self.out_channels == 1
        ):
            raise InputError(
                "the enhancement UNet output needs the pre-contrast T1w among the input channels and one "
                f"output (precontrast_channel={self.precontrast_channel}, {self.in_channels} inputs)"
            )
        if self.output != "direct" and not (
            self.residual_channel is not None and 0 <= self.residual_channel < self.in_channels
        ):
            raise InputError(
                f"the {self.output} UNet output needs the low-dose T1c among the input channels "
                f"(residual_channel={self.residual_channel}, {self.in_channels} inputs)"
            )

    def to_dict(self) -> dict:
        return asdict(self)


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
    output: str = "direct"  # one of UNET_OUTPUTS; "direct" is the paper's (see model.unet)
    loss_region: str = "volume"  # "volume" | "brain"
    # Voxel weight of the L2 loss: 1 + enhancement_weight x max(target - pre-contrast T1, 0); 0 = the paper's
    # plain L2 (see model.train.loss_weights).
    enhancement_weight: float = 0.0
    # Weight of the enhancement ranking loss added to each training step; 0 = off (see model.ranking).
    rank_weight: float = 0.0
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
        # Both loss terms read the enhancement over the pre-contrast T1.
        for name, role in (("enhancement_weight", "weighs the loss by"), ("rank_weight", "ranks")):
            value = getattr(self, name)
            if not value >= 0:
                raise InputError(f"{name} must be >= 0 (0 = off), got {value}")
            if value > 0 and self.precontrast_channel is None:
                raise InputError(
                    f"{name} > 0 {role} the enhancement over the pre-contrast T1, "
                    f"which needs the T1w channel (channels: {list(self.channels)})"
                )
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

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> TrainConfig:
        """Build from the workflow config (validated, defaults filled in): every key of its ``model`` section
        and of its ``train`` section but the job's cluster resources (:data:`RESOURCE_KEYS`); ``overrides``
        (e.g. the job's ``threads``) win. An unknown key raises :class:`InputError`, as in :meth:`from_dict`."""
        train = {k: v for k, v in config["train"].items() if k not in RESOURCE_KEYS}
        return cls.from_dict({**config["model"], **train, **overrides})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @property
    def precontrast_channel(self) -> int | None:
        """Index of the pre-contrast T1 among the input channels (None without it)."""
        return self.channels.index(ANCHOR) if ANCHOR in self.channels else None

    @property
    def spec(self) -> UNetSpec:
        low = self.channels.index(LOW_DOSE) if LOW_DOSE in self.channels else None
        pre = self.precontrast_channel
        return UNetSpec(
            in_channels=len(self.channels),
            width=self.width,
            depth=self.depth,
            output=self.output,
            residual_channel=low if self.output != "direct" else None,
            precontrast_channel=pre if self.output == "enhancement" else None,
        )
