"""ADC map: the formula on exact synthetic signals, the real dipy DWI crop, validation, and the CLI."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from virtual_contrast import cli
from virtual_contrast.io import InputError, save_image
from virtual_contrast.preprocess.adc import adc_from_files, compute_adc, read_bvals

DIPY = "dwi_dipy_small64d"


def _synthetic(adc_true: np.ndarray, bvals: np.ndarray, s0: float = 1000.0) -> np.ndarray:
    """S(b) = S0 exp(-b ADC), one volume per b-value."""
    return (s0 * np.exp(-adc_true[..., None] * bvals)).astype(np.float32)


def test_recovers_known_adc_using_actual_b_values():
    rng = np.random.default_rng(0)
    adc_true = rng.uniform(0.3e-3, 3.0e-3, size=(6, 5, 4))
    # Two b0 and three b≈1000 volumes at slightly different b, as scanners write them.
    bvals = np.array([0.0, 5.0, 995.0, 1000.0, 1005.0])
    s0 = 1000.0
    dwi = np.empty(adc_true.shape + (5,), dtype=np.float64)
    dwi[..., :2] = s0
    # Each b≈1000 volume decays with the mean b, so the mean signal decays exactly by exp(-b_mean ADC).
    dwi[..., 2:] = s0 * np.exp(-adc_true[..., None] * 1000.0)
    adc, b0 = compute_adc(dwi, bvals)
    np.testing.assert_allclose(adc, adc_true, rtol=1e-5)
    np.testing.assert_allclose(b0, s0)
    # Dividing by the nominal 1000 rather than the mean b is what we do NOT do: check the mean is used.
    adc2, _ = compute_adc(dwi, np.array([0.0, 5.0, 895.0, 900.0, 905.0]), b_high=900)
    np.testing.assert_allclose(adc2, adc_true * 1000.0 / 900.0, rtol=1e-5)


def test_no_signal_is_zero_full_decay_is_max_and_clipping():
    bvals = np.array([0.0, 1000.0])
    dwi = np.zeros((4, 1, 1, 2), dtype=np.float32)
    dwi[0] = [1000.0, 400.0]  # tissue: ln(2.5)/1000
    dwi[1] = [0.0, 0.0]  # background
    dwi[2] = [1000.0, 0.0]  # completely decayed
    dwi[3] = [1000.0, 1200.0]  # noise above S0: negative ADC, clipped to 0
    adc, _ = compute_adc(dwi, bvals, adc_max=4e-3)
    assert adc[0, 0, 0] == pytest.approx(np.log(2.5) / 1000.0, rel=1e-5)
    assert adc[1, 0, 0] == 0.0
    assert adc[2, 0, 0] == pytest.approx(4e-3)
    assert adc[3, 0, 0] == 0.0
    assert np.isfinite(adc).all()


def test_noise_floor_zeroes_dim_background():
    bvals = np.array([0.0, 1000.0])
    dwi = np.zeros((3, 1, 1, 2), dtype=np.float32)
    dwi[0] = [1000.0, 400.0]
    dwi[1] = [1000.0, 500.0]
    dwi[2] = [5.0, 2.0]  # 0.5 % of the brightest voxel: air
    adc, _ = compute_adc(dwi, bvals, noise_fraction=0.02)
    assert adc[2, 0, 0] == 0.0 and adc[0, 0, 0] > 0


def test_geometric_average_gives_mean_of_directional_adcs():
    # Three orthogonal directions with different ADCs (anisotropic tissue).
    d = np.array([1.7e-3, 0.3e-3, 0.3e-3])
    bvals = np.array([0.0, 1000.0, 1000.0, 1000.0])
    dwi = np.concatenate([[1000.0], 1000.0 * np.exp(-1000.0 * d)]).reshape(1, 1, 1, 4)
    geo, _ = compute_adc(dwi, bvals, high_average="geometric")
    ari, _ = compute_adc(dwi, bvals)
    assert geo[0, 0, 0] == pytest.approx(d.mean(), rel=1e-5)
    assert ari[0, 0, 0] < geo[0, 0, 0]  # the arithmetic mean of signals underestimates the trace


def test_missing_shells_named_with_found_b_values():
    dwi = np.ones((2, 2, 2, 3), dtype=np.float32)
    with pytest.raises(InputError, match=r"no b≈1000 volume .*b-values found: 0 ×1, 500 ×2"):
        compute_adc(dwi, np.array([0.0, 500.0, 500.0]))
    with pytest.raises(InputError, match=r"no b≈0 volume"):
        compute_adc(dwi, np.array([1000.0, 1000.0, 500.0]))
    with pytest.raises(InputError, match=r"3 volumes but there are 2 b-values"):
        compute_adc(dwi, np.array([0.0, 1000.0]))


def test_read_bvals_fsl_row_and_column(tmp_path: Path):
    row = tmp_path / "row.bval"
    row.write_text("0 1000 1000\n")
    col = tmp_path / "col.bval"
    col.write_text("0\n1000\n1000\n")
    np.testing.assert_array_equal(read_bvals(row), [0, 1000, 1000])
    np.testing.assert_array_equal(read_bvals(col), [0, 1000, 1000])
    bad = tmp_path / "bad.bval"
    bad.write_text("0 1000 abc\n")
    with pytest.raises(InputError, match="subject 's1'.*bad.bval.*cannot be read"):
        read_bvals(bad, subject="s1")
    neg = tmp_path / "neg.bval"
    neg.write_text("0 -1000\n")
    with pytest.raises(InputError, match="non-negative"):
        read_bvals(neg)


def test_bval_count_must_match_volumes(tmp_path: Path):
    dwi = tmp_path / "dwi.nii.gz"
    save_image(np.ones((4, 4, 4, 3)), np.eye(4), dwi)
    bval = tmp_path / "dwi.bval"
    bval.write_text("0 1000\n")
    with pytest.raises(InputError, match=r"subject 'p7'.*2 b-values .* 3 volumes"):
        adc_from_files(dwi, bval, tmp_path / "adc.nii.gz", subject="p7")
    assert not (tmp_path / "adc.nii.gz").exists()


def test_real_dipy_dwi(shared_data: Path, tmp_path: Path):
    folder = shared_data / DIPY
    dwi_path, bval_path = folder / "small_64D.nii", folder / "small_64D.bval"
    out, out_b0 = tmp_path / "adc.nii.gz", tmp_path / "b0.nii.gz"
    prov = adc_from_files(dwi_path, bval_path, out, out_b0, subject="dipy")
    assert prov["n_b0"] == 1 and prov["n_b1000"] == 64
    assert (
        prov["problems"] == [] and prov["adc_zero_fraction"] == 0.0
    )  # real tissue: nothing degenerate
    assert 985.0 < prov["b1000_mean"] < 1005.0

    img = nib.load(str(dwi_path))
    data = np.asarray(img.dataobj, dtype=np.float64)
    bvals = np.loadtxt(bval_path)
    s0 = data[..., bvals <= 50].mean(axis=-1)
    high = np.abs(bvals - 1000) <= 150
    expected = np.clip(np.log(s0 / data[..., high].mean(axis=-1)) / bvals[high].mean(), 0, 4e-3)

    adc_img = nib.load(str(out))
    adc = np.asarray(adc_img.dataobj)
    np.testing.assert_allclose(adc, expected, rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(adc_img.affine, img.affine, atol=1e-4)
    np.testing.assert_allclose(np.asarray(nib.load(str(out_b0)).dataobj), s0, rtol=1e-5)
    # Brain tissue: median ADC of grey/white matter is 0.7-0.9e-3 mm²/s; nothing above free water.
    assert 0.5e-3 < float(np.median(adc)) < 1.2e-3
    assert float(np.percentile(adc, 99)) <= 4e-3
    assert (adc > 0).mean() > 0.95  # a tissue-only crop: almost every voxel has signal


def test_cli_adc(shared_data: Path, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("virtual_contrast.preprocess.commands",))
    folder = shared_data / DIPY
    out, b0 = tmp_path / "adc.nii.gz", tmp_path / "b0.nii.gz"
    argv = ["adc", "--dwi", str(folder / "small_64D.nii"), "--bval", str(folder / "small_64D.bval")]
    assert cli.main([*argv, "--out", str(out), "--b0-out", str(b0)]) == 0
    assert out.exists() and b0.exists()
    printed = capsys.readouterr().out
    assert "64 b≈1000 volumes" in printed and str(out) in printed
    # A clean error (exit 2) for a bad b-value file.
    bad = tmp_path / "bad.bval"
    bad.write_text("0 500\n")
    assert (
        cli.main(
            [
                "adc",
                "--dwi",
                str(folder / "small_64D.nii"),
                "--bval",
                str(bad),
                "--out",
                str(tmp_path / "x.nii.gz"),
            ]
        )
        == 2
    )
    assert "2 b-values" in capsys.readouterr().err
