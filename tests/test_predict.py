"""Prediction: mirror TTA (batched = naive loop, exact for flip-equivariant maps), per-subject NIfTI, CLI."""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn
from toy_subjects import make_toy_subjects

from virtual_contrast.cli import main as cli_main
from virtual_contrast.io import InputError
from virtual_contrast.model.config import TrainConfig
from virtual_contrast.model.predict import (
    flip_configs,
    load_models,
    predict_subject,
    tta_predict,
    tta_predict_naive,
)
from virtual_contrast.model.train import train_fold
from virtual_contrast.model.unet import UNet3D, UNetSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two tiny 'fold' models trained for 2 epochs on toy subjects, and the toy subjects."""
    root = tmp_path_factory.mktemp("trained")
    subjects = make_toy_subjects(root / "data", 5, (16, 16, 8), seed=2)
    cfg = TrainConfig(width=4, depth=2, epochs=2, threads=1, progress=False)
    models = []
    for fold in range(2):
        tune = [subjects[fold]]
        train = [s for s in subjects[:4] if s not in tune]
        models.append(
            train_fold(train, tune, root / f"fold-{fold}", dataclasses.replace(cfg, seed=fold),
                       cache_dir=root / "cache")
        )  # fmt: skip
    return models, subjects


def test_flip_configs():
    configs = flip_configs("all8")
    assert len(configs) == len(set(configs)) == 8
    assert () in configs and (0, 1, 2) in configs
    assert flip_configs("none") == [()]
    assert flip_configs([(0,), (1, 2)]) == [(0,), (1, 2)]
    with pytest.raises(InputError):
        flip_configs([(3,)])
    with pytest.raises(InputError):
        flip_configs("all4")


class Voxelwise(nn.Module):
    """A flip-equivariant map: the same function at every voxel."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 1, kernel_size=1)

    def forward(self, x):
        return torch.sigmoid(self.conv(x) + x[:, :1] ** 2)


class ShiftX(nn.Module):
    """Not flip-equivariant: shifts the first channel along X."""

    def forward(self, x):
        return torch.roll(x[:, :1], shifts=2, dims=2)


def test_tta_of_a_flip_equivariant_function_is_the_function():
    torch.manual_seed(0)
    models = [Voxelwise(), Voxelwise()]
    x = torch.rand(3, 6, 5, 4)
    expected = (models[0](x[None]) + models[1](x[None]))[0] / 2
    for batch in (1, 3, 8):
        out = tta_predict(models, x, batch=batch, amp=False)  # exact algebra: fp32
        assert out.shape == (1, 6, 5, 4)
        torch.testing.assert_close(out, expected)


def test_tta_of_a_non_equivariant_function_averages_the_unflipped_passes():
    x = torch.rand(1, 1, 6, 5, 4)
    out = tta_predict([ShiftX()], x)
    # Mirroring X turns a shift by +2 into a shift by -2; the other axes commute with the shift.
    expected = (torch.roll(x, 2, dims=2) + torch.roll(x, -2, dims=2)) / 2
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, ShiftX()(x))


def test_batched_tta_equals_the_naive_loop_for_a_unet():
    torch.manual_seed(0)
    models = []
    for _ in range(2):
        m = UNet3D(UNetSpec(in_channels=2, width=4, depth=3)).eval()
        nn.init.normal_(m.head.weight, std=5.0)
        models.append(m)
    x = torch.rand(1, 2, 8, 12, 8)
    naive = tta_predict_naive(models, x)
    assert float(naive.std()) > 1e-3
    for batch in (1, 8):
        torch.testing.assert_close(
            tta_predict(models, x, batch=batch, amp=False), naive, atol=1e-6, rtol=1e-5
        )
    # Without TTA it is the plain mean of the models.
    torch.testing.assert_close(
        tta_predict(models, x, flips="none", amp=False), (models[0](x) + models[1](x)) / 2
    )
    # bf16 autocast (chosen automatically on GPUs and on CPUs with native bf16) stays close to fp32.
    torch.testing.assert_close(tta_predict(models, x, amp="bf16"), naive, atol=2e-2, rtol=0)


def test_predict_subject_writes_vir_t1c_on_the_input_grid(trained, tmp_path):
    models, subjects = trained
    sv = subjects[4]
    out = predict_subject(
        models, sv.channels, tmp_path / "vir.nii.gz", device="cpu", subject=sv.subject, amp=False
    )
    img = nib.load(out)
    ref = nib.load(sv.channels["T1w"])
    assert img.shape == ref.shape == (16, 16, 8)
    np.testing.assert_allclose(img.affine, ref.affine)
    data = img.get_fdata()
    assert np.isfinite(data).all() and data.std() > 0
    # The file is the TTA mean of both models.
    loaded, channels, _ = load_models(models)
    x = torch.from_numpy(
        np.stack([nib.load(sv.channels[c]).get_fdata(dtype=np.float32) for c in channels])
    )
    np.testing.assert_allclose(data, tta_predict_naive(loaded, x)[0].numpy(), atol=1e-5)
    masked = predict_subject(
        models, sv.channels, tmp_path / "masked.nii.gz", device="cpu", mask_path=sv.mask
    )
    mask = nib.load(sv.mask).get_fdata() > 0.5
    mdata = nib.load(masked).get_fdata()
    assert (mdata[~mask] == 0).all()
    np.testing.assert_allclose(mdata[mask], data[mask], atol=1e-6)


def test_predict_subject_errors(trained, tmp_path):
    models, subjects = trained
    channels = dict(subjects[4].channels)
    del channels["FLAIR"]
    with pytest.raises(InputError, match=r"missing input channel\(s\) \['FLAIR'\]"):
        predict_subject(models, channels, tmp_path / "x.nii.gz", device="cpu")
    junk = tmp_path / "junk.pt"
    torch.save({"hello": 1}, junk)
    with pytest.raises(InputError, match="not a virtual-contrast/unet-v2 checkpoint"):
        predict_subject([junk], subjects[4].channels, tmp_path / "x.nii.gz", device="cpu")
    # a model of the clipped normalisation (issue 25) is refused, saying why
    torch.save({"format": "virtual-contrast/unet-v1"}, junk)
    with pytest.raises(InputError, match="clipped at the 99th brain percentile.*train it again"):
        predict_subject([junk], subjects[4].channels, tmp_path / "x.nii.gz", device="cpu")
    with pytest.raises(InputError, match="model checkpoint not found"):
        predict_subject([tmp_path / "none.pt"], subjects[4].channels, tmp_path / "x.nii.gz")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            predict_subject(models, subjects[4].channels, tmp_path / "x.nii.gz", device="cuda")


def test_predict_command_with_normalised_channels(trained, tmp_path):
    models, subjects = trained
    sv = subjects[4]
    models_dir = models[0].parent.parent  # folder holding fold-0/ and fold-1/
    data = sv.target.parent
    rc = cli_main(["predict", "--models", str(models_dir), "--channels-dir", str(data),
                   "--subject", sv.subject, "--out", str(tmp_path / "a"), "--device", "cpu"])  # fmt: skip
    assert rc == 0
    a = nib.load(tmp_path / "a" / f"sub-{sv.subject}_space-ICBM09a_desc-virtual_T1c.nii.gz")
    a = a.get_fdata()
    rc = cli_main(["predict", "--models", *map(str, models), "--adc", str(sv.channels["ADC"]),
                   "--flair", str(sv.channels["FLAIR"]), "--t1", str(sv.channels["T1w"]),
                   "--low", str(sv.channels["lowT1c"]), "--out", str(tmp_path / "b")])  # fmt: skip
    assert rc == 0
    b = nib.load(tmp_path / "b" / "sub-exam_space-ICBM09a_desc-virtual_T1c.nii.gz").get_fdata()
    mask = nib.load(sv.mask).get_fdata() > 0.5  # --channels-dir picks up the brain mask
    np.testing.assert_allclose(a[mask], b[mask], atol=1e-6)
    assert (a[~mask] == 0).all()


def test_predict_command_errors(trained, tmp_path, capsys):
    models, subjects = trained
    sv = subjects[4]
    rc = cli_main(["predict", "--models", str(models[0]), "--t1", str(sv.channels["T1w"]),
                   "--out", str(tmp_path / "o")])  # fmt: skip
    assert rc == 2
    assert "a raw exam needs --dwi and --bval" in capsys.readouterr().err
    rc = cli_main(["predict", "--models", str(models[0]), "--adc", str(sv.channels["ADC"]),
                   "--out", str(tmp_path / "o")])  # fmt: skip
    assert rc == 2
    assert "pass --flair --t1 --low" in capsys.readouterr().err
    # Raw files where normalised ones are expected: an error, not a warning with an output.
    raw = tmp_path / "raw_t1.nii.gz"
    nib.save(nib.Nifti1Image(nib.load(sv.channels["T1w"]).get_fdata() * 800, np.eye(4)), raw)
    rc = cli_main(["predict", "--models", str(models[0]), "--adc", str(sv.channels["ADC"]),
                   "--flair", str(sv.channels["FLAIR"]), "--t1", str(raw), "--low",
                   str(sv.channels["lowT1c"]), "--out", str(tmp_path / "o")])  # fmt: skip
    assert rc == 2
    assert "raw_t1.nii.gz" in capsys.readouterr().err and not (tmp_path / "o").exists()
    # A model trained outside the workflow does not know how to pre-process a raw exam.
    rc = cli_main(["predict", "--models", str(models[0]), "--t1", str(raw), "--flair", str(raw),
                   "--low", str(raw), "--dwi", str(raw), "--bval", str(raw), "--out",
                   str(tmp_path / "o")])  # fmt: skip
    assert rc == 2
    assert "does not record the pre-processing options" in capsys.readouterr().err
    # Subject ids are checked as in the workflow: nothing can be written outside --out.
    rc = cli_main(["predict", "--models", str(models[0]), "--channels-dir", str(sv.target.parent),
                   "--subject", "x/../../../escape", "--out", str(tmp_path / "o")])  # fmt: skip
    assert rc == 2
    assert "invalid subject id" in capsys.readouterr().err and not (tmp_path / "o").exists()
    # Raw-exam mode: needs every raw file, then the preprocessing hook.
    rc = cli_main(["predict", "--models", str(models[0]), "--dwi", str(sv.channels["ADC"]),
                   "--out", str(tmp_path)])  # fmt: skip
    assert rc == 2
    assert "a raw exam needs --t1 --flair --bval --low" in capsys.readouterr().err
    rc = cli_main(["predict", "--models", str(tmp_path / "nothing"), "--channels-dir", str(tmp_path),
                   "--out", str(tmp_path)])  # fmt: skip
    assert rc == 2
    assert "model not found" in capsys.readouterr().err


def test_override_gate_is_for_a_raw_exam_only(trained, tmp_path, capsys):
    models, subjects = trained
    rc = cli_main(["predict", "--models", str(models[0]), "--channels-dir",
                   str(subjects[4].target.parent), "--override-gate", "--out", str(tmp_path / "o")])  # fmt: skip
    assert rc == 2 and "--override-gate applies to a raw exam" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
