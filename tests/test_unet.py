"""The 3D UNet: shapes, grid checks, size and arithmetic of the paper's configuration."""

from __future__ import annotations

import pytest
import torch

from virtual_contrast.io import InputError
from virtual_contrast.model.unet import (
    OUTPUT_CEILING,
    UNet3D,
    UNetSpec,
    check_grid,
    count_flops,
    count_parameters,
    max_depth_for_grid,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(
    ("shape", "depth"), [((16, 24, 16), 3), ((8, 8, 16), 4), ((12, 20, 4), 3), ((5, 7, 9), 1)]
)
def test_unet_keeps_the_grid(shape, depth):
    torch.manual_seed(0)
    model = UNet3D(UNetSpec(in_channels=4, width=4, depth=depth))
    for p in model.head.parameters():  # leave the constant initial output
        torch.nn.init.normal_(p, std=0.5)
    with torch.no_grad():
        y = model(torch.rand(2, 4, *shape))
    assert y.shape == (2, 1, *shape)
    assert float(y.min()) > 0 and float(y.max()) < OUTPUT_CEILING  # sigmoid output
    assert float(y.std()) > 0  # depends on the input


def test_initial_output_is_constant_and_not_saturated():
    model = UNet3D(UNetSpec(in_channels=2, width=4, depth=2))
    y = model(torch.rand(1, 2, 8, 8, 8))
    assert torch.allclose(y, torch.full_like(y, 0.1), atol=1e-6)


def test_residual_output_starts_from_the_low_dose_input():
    spec = UNetSpec(in_channels=3, width=4, depth=2, output="residual", residual_channel=2)
    model = UNet3D(spec)
    x = torch.rand(2, 3, 8, 8, 8)
    x[0, 2, 0, 0, 0], x[0, 2, 0, 0, 1] = 0.0, 1.0
    with torch.no_grad():
        y = model(x)
    torch.testing.assert_close(y, x[:, 2:3].clamp(min=1e-3 * OUTPUT_CEILING))
    # a low-dose input above 1 (enhancement above the 99th percentile, not clipped) comes through
    bright = x.clone()
    bright[:, 2] = 2.5
    with torch.no_grad():
        torch.testing.assert_close(model(bright), bright[:, 2:3])
    with pytest.raises(InputError, match="needs the low-dose T1c"):
        UNetSpec(in_channels=3, output="residual")
    with pytest.raises(InputError, match="UNet output must be one of"):
        UNetSpec(output="skip")


def test_enhancement_output_scales_the_low_dose_enhancement():
    spec = UNetSpec(
        in_channels=3,
        width=4,
        depth=2,
        output="enhancement",
        residual_channel=2,
        precontrast_channel=0,
    )
    model = UNet3D(spec).eval()
    x = torch.rand(2, 3, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), x[:, 2:3])  # zero head: the low-dose input
        # gain 1, offset 0: low + 3 (low - pre), the full dose if enhancement is linear in the dose
        model.head.bias.copy_(torch.tensor([1.0, 0.0]))
        low, pre = x[:, 2:3], x[:, 0:1]
        torch.testing.assert_close(model(x), low + 3 * (low - pre))
        # not clamped (issue 25): brighter than 1 where the full dose would be, no plateau at either end
        out = model(x)
        assert float(out.max()) > 1.5 and float(out.min()) < 0
        assert int((out == out.max()).sum()) == 1
        torch.testing.assert_close(model.train()(x), out)
    with pytest.raises(InputError, match="needs the pre-contrast T1w"):
        UNetSpec(in_channels=3, output="enhancement", residual_channel=2)
    with pytest.raises(InputError, match="needs the low-dose T1c"):
        UNetSpec(in_channels=3, output="enhancement", precontrast_channel=0)


def test_input_channels_follow_the_spec():
    model = UNet3D(UNetSpec(in_channels=3, width=4, depth=2))
    assert model(torch.rand(1, 3, 8, 8, 8)).shape == (1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match=r"expects \(N, 3, X, Y, Z\)"):
        model(torch.rand(1, 4, 8, 8, 8))


def test_grid_the_unet_cannot_handle_fails_clearly():
    model = UNet3D(UNetSpec(in_channels=1, width=2, depth=4))
    with pytest.raises(InputError) as err:
        model(torch.rand(1, 1, 20, 24, 20))
    msg = str(err.value)
    assert "depth-4 UNet cannot process a 20×24×20 grid" in msg
    assert "multiple of 2**(depth-1) = 8" in msg
    assert "(20 is not)" in msg
    assert "depth <= 3" in msg


def test_check_grid_rules():
    check_grid((160, 192, 160), 5)
    check_grid((80, 96, 80), 5)
    check_grid((40, 48, 40), 4)
    with pytest.raises(InputError, match="40 is not"):
        check_grid((40, 48, 40), 5)
    with pytest.raises(InputError, match="8 is not"):
        check_grid((8, 16, 16), 5)  # smaller than one bottom voxel
    with pytest.raises(InputError, match="3D grid"):
        check_grid((16, 16), 2)
    assert max_depth_for_grid((160, 192, 160)) == 6
    assert max_depth_for_grid((40, 48, 40)) == 4
    assert max_depth_for_grid((5, 8, 8)) == 1


def test_default_network_matches_the_stated_size_and_cost():
    spec = UNetSpec()  # 4 inputs, width 16, depth 5
    params = count_parameters(UNet3D(spec))
    assert 7.7e6 < params < 7.85e6  # the size stated in the module docstring: 7.8 M
    flops = count_flops(spec, (160, 192, 160))
    assert 0.80e12 < flops < 0.82e12  # and its cost: 0.81 TFLOP per forward pass
    # Convolution cost is proportional to the number of voxels and grows as width².
    assert count_flops(spec, (80, 96, 80)) == pytest.approx(flops / 8, rel=1e-6)
    assert count_flops(UNetSpec(width=32), (160, 192, 160)) == pytest.approx(3.2e12, rel=0.01)
    step = count_flops(spec, (160, 192, 160), backward=True)
    assert 2.8 < step / flops < 3.1  # training step ≈ forward + 2× backward
