"""Bad inputs to every preprocessing step: a clear InputError naming subject and file, and no output left.

Each step is run once on valid inputs (so a failure below is caused by the corruption alone), then with its
main input missing, truncated (a valid .nii.gz cut in half), holding NaN voxels, or of the wrong dimension; the
DWI also without a b≈1000 volume.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from virtual_contrast.io import InputError, save_image
from virtual_contrast.preprocess.adc import adc_from_files
from virtual_contrast.preprocess.crop import crop_images
from virtual_contrast.preprocess.normalize import normalize_image
from virtual_contrast.preprocess.options import default_options
from virtual_contrast.preprocess.skull_strip import apply_mask, skull_strip

SUBJECT = "sub-bad01"
SHAPE = (24, 24, 24)


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    """Valid inputs in tmp/in: a T1-like head, its brain mask, a 4D DWI and its b-values."""
    folder = tmp_path / "in"
    rng = np.random.default_rng(0)
    grid = np.indices(SHAPE) - 11.5
    brain = (grid**2).sum(axis=0) <= 8.0**2
    head = (grid**2).sum(axis=0) <= 11.0**2
    t1 = np.where(brain, 1.0, np.where(head, 0.05, 0.0)) + rng.uniform(0, 0.1, SHAPE)
    dwi = np.stack([1000 * head, 400 * head, 420 * head], axis=-1) + rng.uniform(
        1, 10, SHAPE + (3,)
    )
    paths = {
        "t1": save_image(t1, np.eye(4), folder / "t1.nii.gz"),
        "mask": save_image(brain, np.eye(4), folder / "mask.nii.gz", dtype=np.uint8),
        "dwi": save_image(dwi, np.eye(4), folder / "dwi.nii.gz"),
    }
    paths["bval"] = folder / "dwi.bval"
    paths["bval"].write_text("0 1000 1000\n")
    return paths


def _adc(inp, out):
    adc_from_files(inp["dwi"], inp["bval"], out / "adc.nii.gz", out / "b0.nii.gz", subject=SUBJECT)


def _skull_strip(inp, out):
    skull_strip(
        inp["t1"], out / "brain_mask.nii.gz", default_options().skull_strip, subject=SUBJECT
    )


def _apply_mask(inp, out):
    apply_mask([inp["t1"]], inp["mask"], [out / "t1_brain.nii.gz"], subject=SUBJECT)


def _crop(inp, out):
    crop_images(
        {"t1": inp["t1"]},
        {"t1": out / "t1_crop.nii.gz"},
        (16, 16, 16),
        inp["mask"],
        subject=SUBJECT,
    )


def _normalize(inp, out):
    normalize_image(inp["t1"], inp["mask"], out / "t1_norm.nii.gz", subject=SUBJECT)


#: step -> (function, the input key that gets corrupted)
STEPS: dict[str, tuple[Callable, str]] = {
    "adc": (_adc, "dwi"),
    "skull_strip": (_skull_strip, "t1"),
    "apply_mask": (_apply_mask, "t1"),
    "crop": (_crop, "t1"),
    "normalize": (_normalize, "t1"),
}


def _missing(path: Path) -> str:
    path.unlink()
    return "not found"


def _truncated(path: Path) -> str:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return "cannot be read"


def _nan(path: Path) -> str:
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32).copy()
    data[3, 4, 5] = np.nan
    save_image(data, img.affine, path)
    return "NaN"


def _wrong_ndim(path: Path) -> str:
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    # A 3D step gets a 4D series; the DWI step gets a single 3D volume.
    data = data[..., 0] if data.ndim == 4 else np.stack([data, data], axis=-1)
    save_image(data, img.affine, path)
    return "expected a"


CORRUPTIONS = {"missing": _missing, "truncated": _truncated, "nan": _nan, "wrong_ndim": _wrong_ndim}


def _assert_nothing_written(out: Path) -> None:
    leftovers = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert leftovers == [], f"partial outputs or temporary files left behind: {leftovers}"


# Brain extraction's valid run needs a real head (tests/test_skull_strip.py runs it on one); its bad inputs
# are refused before the network runs.
@pytest.mark.parametrize("step", [s for s in STEPS if s != "skull_strip"])
def test_valid_inputs_pass(step, inputs, tmp_path):
    func, _ = STEPS[step]
    func(inputs, tmp_path / "out")
    assert any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("corruption", CORRUPTIONS)
@pytest.mark.parametrize("step", STEPS)
def test_bad_input_is_named_and_leaves_nothing(step, corruption, inputs, tmp_path):
    func, key = STEPS[step]
    expected = CORRUPTIONS[corruption](inputs[key])
    out = tmp_path / "out"
    with pytest.raises(InputError) as err:
        func(inputs, out)
    message = str(err.value)
    assert f"subject {SUBJECT!r}" in message
    assert str(inputs[key]) in message
    assert expected in message
    assert err.value.path == inputs[key] and err.value.subject == SUBJECT
    _assert_nothing_written(out)


@pytest.mark.parametrize("bvals", ["0 500 500", "0 2000 3000", "10 20 30"])
def test_dwi_without_b1000_volume(bvals, inputs, tmp_path):
    inputs["bval"].write_text(bvals + "\n")
    out = tmp_path / "out"
    with pytest.raises(InputError) as err:
        _adc(inputs, out)
    message = str(err.value)
    assert f"subject {SUBJECT!r}" in message and "dwi.bval" in message
    assert "no b≈1000 volume" in message and "b-values found" in message
    _assert_nothing_written(out)


def test_dwi_without_b0_volume(inputs, tmp_path):
    inputs["bval"].write_text("1000 1000 1000\n")
    with pytest.raises(InputError, match=rf"subject '{SUBJECT}'.*no b≈0 volume"):
        _adc(inputs, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_missing_bval_file(inputs, tmp_path):
    inputs["bval"].unlink()
    with pytest.raises(InputError, match=rf"subject '{SUBJECT}'.*dwi.bval.*not found"):
        _adc(inputs, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_corrupt_mask_is_named(inputs, tmp_path):
    _truncated(inputs["mask"])
    with pytest.raises(InputError, match=rf"subject '{SUBJECT}'.*mask.nii.gz.*cannot be read"):
        _normalize(inputs, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def _rewrite_dwi(path: Path, change: Callable[[np.ndarray], np.ndarray]) -> None:
    import nibabel as nib

    img = nib.load(str(path))
    save_image(change(np.asarray(img.dataobj, dtype=np.float32)), img.affine, path)


def _overflowed(dwi: np.ndarray) -> np.ndarray:
    """int16 wrap-around: the brightest b0 voxels become large negative numbers."""
    out = dwi.copy()
    out[out > 900] -= 65536
    return out


#: Series whose ADC is mostly or wholly 0 although the computation "succeeds".
DEGENERATE_DWI = {
    "all zero": (lambda d: d * 0, "no positive signal"),
    "negated": (lambda d: -d, "no positive signal"),
    "b1000 brighter than b0": (
        lambda d: d[..., ::-1],
        "b≈1000 is at least as bright as b≈0 in 100 %",
    ),
    "int16 overflow": (_overflowed, "are negative"),
}


@pytest.mark.parametrize("case", DEGENERATE_DWI)
def test_a_degenerate_dwi_is_an_error_unless_allowed(case, inputs, tmp_path):
    change, expected = DEGENERATE_DWI[case]
    _rewrite_dwi(inputs["dwi"], change)
    out = tmp_path / "out"
    with pytest.raises(InputError) as err:
        _adc(inputs, out)
    message = str(err.value)
    assert f"subject {SUBJECT!r}" in message and str(inputs["dwi"]) in message
    assert expected in message and "--allow-degenerate" in message
    _assert_nothing_written(out)

    prov = adc_from_files(
        inputs["dwi"], inputs["bval"], out / "adc.nii.gz", subject=SUBJECT, allow_degenerate=True
    )
    assert (out / "adc.nii.gz").exists()
    assert any(expected in problem for problem in prov["problems"])


def test_a_healthy_dwi_has_no_problem_and_the_median_covers_zero_voxels(inputs, tmp_path):
    prov = adc_from_files(inputs["dwi"], inputs["bval"], tmp_path / "adc.nii.gz", subject=SUBJECT)
    assert prov["problems"] == [] and prov["adc_zero_fraction"] == 0.0
    expected = np.log(1000 / 410) / 1000  # b0 1000, mean b1000 410 (plus a little noise)
    assert prov["adc_median_mm2_s"] == pytest.approx(expected, rel=0.02)

    # A few voxels where b1000 is brighter, and one negative voxel: possible (noise, interpolation), warned.
    def spoil(d: np.ndarray) -> np.ndarray:
        d = d.copy()
        d[:, :, 8:12, 1:] = 2000.0
        d[0, 0, 0, 0] = -5.0
        return d

    _rewrite_dwi(inputs["dwi"], spoil)
    prov = adc_from_files(inputs["dwi"], inputs["bval"], tmp_path / "adc.nii.gz", subject=SUBJECT)
    assert 0.05 < prov["adc_zero_fraction"] < 0.5
    assert len(prov["problems"]) == 2
    assert "check the series" in prov["problems"][0] and "1 voxels" in prov["problems"][1]


def test_cli_adc_allow_degenerate(inputs, tmp_path, capsys):
    from virtual_contrast import cli

    _rewrite_dwi(inputs["dwi"], lambda d: d[..., ::-1])
    argv = ["adc", "--dwi", str(inputs["dwi"]), "--bval", str(inputs["bval"]), "--subject", "bad01"]
    out = tmp_path / "adc.nii.gz"
    assert cli.main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "at least as bright" in err and not out.exists()
    assert cli.main([*argv, "--out", str(out), "--allow-degenerate"]) == 0
    assert "warning: b≈1000 is at least as bright" in capsys.readouterr().out and out.exists()
