"""The paper's full-resolution 3D UNet (Ammari, Bône et al. 2021, Fig. 3; Bône et al. ISBI 2021).

Level ``l`` (0 = full resolution) has ``width * 2**l`` feature maps. The contracting path alternates
kernel-3 convolutions with kernel-2 stride-2 convolutions (the down-sampling is learnt, no pooling); the
expanding path alternates kernel-2 stride-2 transposed convolutions with kernel-3 convolutions. Each level has
a short additive (residual) skip around two kernel-3 convolutions, and every encoder level is concatenated onto
the decoder level of the same resolution (long skip). LeakyReLU(0.2) follows every convolution; a 1×1×1
convolution and a sigmoid give the output, scaled to [0, :data:`OUTPUT_CEILING`]: the normalised reference
T1c has its 1st and 99th brain percentiles at 0 and 1 and is not clipped above (issue 25; the paper clips it to
[0, 1] and its sigmoid stops at 1, so vir-T1c could never be brighter than the 99th percentile).

With 4 inputs, width 16 and depth 5 this network has 7.8 M parameters and costs 0.81 TFLOP per forward pass at
160×192×160 (counted by :func:`count_flops`). There is no normalisation layer: the paper names none, and the
inputs are already on a common scale (1st and 99th brain percentiles at 0 and 1).

``output="residual"`` (not in the paper; off by default) adds the logit of the low-dose input channel (as a
fraction of the ceiling) to the head's output before the sigmoid, so the network starts from the low-dose image and learns the correction. In
a study on the demo cohort (9 training and 3 test subjects, down-sampled to 40×48×40, width 8, depth 4, batch 1,
Adam lr 1e-3) the residual output reached the low-dose image's brain PSNR (29.7 dB against the reference)
within 80 steps and 30.2 dB at 320 steps, while the paper's direct output was at 17.0 dB after 320 steps (17.3
dB with lr 3e-3). Use it when the training budget is far below the paper's 300 epochs × 85 subjects.

``output="enhancement"`` (not in the paper) has a two-channel head, a gain ``g`` and an offset ``b``, and
outputs ``low + ENHANCEMENT_GAIN_SCALE · g · (low − pre) + b`` (``low`` the low-dose input, ``pre`` the
pre-contrast T1), not clamped: it is bounded by its inputs, and a clamp at 1 would flatten the lesions brighter
than the 99th percentile that the full dose shows (before issue 25 it was clamped to [0, 1]). Gadolinium's relaxation rate grows linearly with its
concentration (R1 = R1₀ + r1·C), so to first order a full dose enhances four times as much as a quarter dose:
with the scale 3 (= 4 − 1), ``g = 1`` is that first-order guess, and ``g`` learns what the signal's
non-linearity, the tissue and the delay between the two series change. The enhancement's edges then come from
the low-dose image itself instead of being redrawn by the decoder: the residual output blurred thin enhancing
structures (veins, rims) by about a voxel, so enhancement leaked onto the neighbouring voxels and the
enhancement ROC AUC fell further below the low-dose image's. Chosen on the demo's training patients only
(out-of-fold predictions of each fold's tuning patients, 12 patients, 3 folds, 250 epochs): against the
residual output SSIM 99.30 → 99.42 %, PSNR 33.4 → 34.1 dB, AUC 99.88 → 99.93 % (the low dose: 98.87 %,
29.3 dB, 99.96 %).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
from torch import nn

# The grid rule lives with the other checks so that the workflow can apply it at parse time without torch.
from virtual_contrast.checks import check_grid, max_depth_for_grid  # noqa: F401 (re-exported)
from virtual_contrast.model.config import UNetSpec

#: Initial output of the network everywhere, about the mean of a normalised, skull-stripped T1c volume.
INITIAL_OUTPUT = 0.1
#: Top of the sigmoid outputs (direct, residual), in normalised units (the 99th brain percentile is 1): far above
#: the brightest enhancement of a full dose (BraTS-MET-00110's T1c reaches 2.7 at its brain maximum).
OUTPUT_CEILING = 4.0
#: The low-dose input is clamped to [eps, 1 - eps] × OUTPUT_CEILING before its logit is taken (output="residual").
RESIDUAL_EPS = 1e-3
#: Full dose / quarter dose - 1: with output="enhancement", gain 1 scales the low-dose enhancement to full dose.
ENHANCEMENT_GAIN_SCALE = 3.0


def _conv3(cin: int, cout: int) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, kernel_size=3, padding=1)


class ResidualBlock(nn.Module):
    """``act(x + conv(act(conv(x))))``: the short additive skip inside a level."""

    def __init__(self, channels: int, negative_slope: float):
        super().__init__()
        self.conv1 = _conv3(channels, channels)
        self.conv2 = _conv3(channels, channels)
        self.act = nn.LeakyReLU(negative_slope, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv1(x))
        return self.act(x + self.conv2(h))


class EncoderLevel(nn.Module):
    """Entry (kernel-3 convolution at level 0, kernel-2 stride-2 convolution below) then a residual block."""

    def __init__(self, cin: int, cout: int, *, downsample: bool, negative_slope: float):
        super().__init__()
        if downsample:
            self.entry = nn.Conv3d(cin, cout, kernel_size=2, stride=2)
        else:
            self.entry = _conv3(cin, cout)
        self.act = nn.LeakyReLU(negative_slope, inplace=True)
        self.block = ResidualBlock(cout, negative_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.act(self.entry(x)))


class DecoderLevel(nn.Module):
    """Transposed convolution up, concatenation with the encoder's map, kernel-3 fusion, residual block."""

    def __init__(self, cin: int, cout: int, *, negative_slope: float):
        super().__init__()
        self.up = nn.ConvTranspose3d(cin, cout, kernel_size=2, stride=2)
        self.fuse = _conv3(2 * cout, cout)
        self.act = nn.LeakyReLU(negative_slope, inplace=True)
        self.block = ResidualBlock(cout, negative_slope)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.act(self.up(x))
        return self.block(self.act(self.fuse(torch.cat([up, skip], dim=1))))


class UNet3D(nn.Module):
    """Residual 3D UNet mapping ``(N, in_channels, X, Y, Z)`` to ``(N, out_channels, X, Y, Z)``.

    Every spatial size must be a multiple of ``2 ** (depth - 1)`` (see :func:`check_grid`).
    """

    def __init__(self, spec: UNetSpec | None = None, **kwargs):
        super().__init__()
        spec = spec if spec is not None else UNetSpec(**kwargs)
        if spec.depth < 1 or spec.width < 1 or spec.in_channels < 1 or spec.out_channels < 1:
            raise ValueError(f"invalid UNet specification: {spec}")
        self.spec = spec
        widths = [spec.width * 2**level for level in range(spec.depth)]
        slope = spec.negative_slope
        self.encoders = nn.ModuleList(
            EncoderLevel(
                spec.in_channels if level == 0 else widths[level - 1],
                widths[level],
                downsample=level > 0,
                negative_slope=slope,
            )
            for level in range(spec.depth)
        )
        self.decoders = nn.ModuleList(
            DecoderLevel(widths[level + 1], widths[level], negative_slope=slope)
            for level in range(spec.depth - 1)
        )
        # output="enhancement": the head gives a gain and an offset (both 0 at start: output = low-dose input).
        head_channels = 2 if spec.output == "enhancement" else spec.out_channels
        self.head = nn.Conv3d(widths[0], head_channels, kernel_size=1)
        # The head starts at zero weights and a constant output of INITIAL_OUTPUT. With PyTorch's default
        # initialisation the first Adam steps drive the many zero background voxels, through the unbounded
        # LeakyReLU features of an un-normalised network, to logits of -1e3 and beyond: the sigmoid saturates,
        # every gradient becomes exactly zero and the network outputs 0 for ever (seen with lr 1e-3 and 1e-4
        # on toy data). Starting from a constant output keeps the features small until the head has learnt
        # which of them matter.
        # With the residual and enhancement outputs, zero head means "output = low-dose input".
        nn.init.zeros_(self.head.weight)
        start = INITIAL_OUTPUT / OUTPUT_CEILING
        bias = 0.0 if spec.output != "direct" else math.log(start / (1 - start))
        nn.init.constant_(self.head.bias, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.spec.in_channels:
            raise ValueError(
                f"UNet3D expects (N, {self.spec.in_channels}, X, Y, Z), got {tuple(x.shape)}"
            )
        check_grid(tuple(x.shape[2:]), self.spec.depth)
        inputs = x
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
        x = skips.pop()
        for level in reversed(range(self.spec.depth - 1)):
            x = self.decoders[level](x, skips.pop())
        # The 1×1 head and the sigmoid run in fp32 under autocast: bf16 keeps 8 bits of mantissa, which would
        # quantise the output in steps of up to 0.004 (and flatten the small corrections of a young network).
        kind = x.device.type
        fp32 = (
            torch.autocast(device_type=kind, enabled=False)
            if kind in ("cpu", "cuda")  # not "meta" (count_flops)
            else contextlib.nullcontext()
        )
        with fp32:
            logits = self.head(x.float())
        if self.spec.output == "enhancement":
            c, p = self.spec.residual_channel, self.spec.precontrast_channel
            low, pre = inputs[:, c : c + 1].float(), inputs[:, p : p + 1].float()
            gain, offset = logits[:, 0:1], logits[:, 1:2]
            # No clamp, in training or after: see the module docstring.
            return low + ENHANCEMENT_GAIN_SCALE * gain * (low - pre) + offset
        if self.spec.output == "residual":
            c = self.spec.residual_channel
            low = inputs[:, c : c + 1].float() / OUTPUT_CEILING
            low = low.clamp(RESIDUAL_EPS, 1 - RESIDUAL_EPS)
            logits = logits + torch.log(low / (1 - low))
        return OUTPUT_CEILING * torch.sigmoid(logits)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_flops(
    spec: UNetSpec, shape: Sequence[int], batch: int = 1, backward: bool = False
) -> int:
    """FLOPs (2 per multiply-add, torch's FLOP counter) of one pass at ``shape``, on the meta device.

    Counted without allocating memory, so the full 160×192×160 grid is cheap to count anywhere. With
    ``backward`` the count covers forward plus backward (about 3× forward), the cost of one training step.
    """
    from torch.utils.flop_counter import FlopCounterMode

    check_grid(shape, spec.depth)
    with torch.device("meta"):
        model = UNet3D(spec)
        x = torch.zeros(batch, spec.in_channels, *shape)
    counter = FlopCounterMode(display=False)
    with counter:
        y = model(x)
        if backward:
            y.sum().backward()
    return int(counter.get_total_flops())
