"""Brain extraction in native space: backend choice and its messages, deepbet on a real raw head, HD-BET's call."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from virtual_contrast import cli
from virtual_contrast.io import InputError, save_image
from virtual_contrast.preprocess import skull_strip as ss
from virtual_contrast.preprocess.options import BackendUnavailableError, SkullStripOptions
from virtual_contrast.preprocess.quality import dice

TCGA = "tcga_fg_6692_raw"


def _options(backend: str = "auto", weights: Path | str = "") -> SkullStripOptions:
    return SkullStripOptions(backend=backend, hdbet_weights=str(weights))


def _sphere_head(shape=(24, 24, 24)) -> tuple[np.ndarray, np.ndarray]:
    grid = np.indices(shape) - (np.asarray(shape)[:, None, None, None] - 1) / 2
    r2 = (grid**2).sum(axis=0)
    brain = r2 <= 8.0**2
    t1 = np.where(brain, 1.0, np.where(r2 <= 11.0**2, 0.05, 0.0)).astype(np.float32)
    return t1, brain


# --- deepbet on a real raw head --------------------------------------------------------------------------------


@pytest.mark.shared_data
def test_deepbet_on_the_raw_tcga_t1_matches_its_shipped_mask(tcga_brain_mask, shared_data):
    """Raw clinical T1 with skull, 0.9 x 0.9 x 5.5 mm oblique slices (LAS): the mask lies on its own grid."""
    t1 = nib.load(shared_data / TCGA / "t1.nii.gz")
    mask_img = nib.load(tcga_brain_mask)
    assert mask_img.shape == t1.shape and np.allclose(mask_img.affine, t1.affine, atol=1e-4)
    assert mask_img.get_data_dtype() == np.uint8
    mask = np.asanyarray(mask_img.dataobj) > 0
    # The shipped mask (most likely HD-BET's) lies on the T1c grid, which is the T1's.
    shipped = np.asanyarray(nib.load(shared_data / TCGA / "t1c_brainmask.nii.gz").dataobj) > 0
    volume_l = mask.sum() * abs(np.linalg.det(t1.affine[:3, :3])) / 1e6
    assert dice(mask, shipped) >= 0.93  # measured 0.941
    assert 1.0 <= volume_l <= 1.8  # measured 1.59 L (shipped mask: 1.60 L)


def test_deepbet_library_path_runs_without_a_display():
    """deepbet declares a GUI dependency; the library call must not import it (compute nodes have no X)."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    code = (
        "import sys\n"
        "from virtual_contrast.preprocess import skull_strip as ss\n"
        "assert ss.deepbet_import_error() is None, ss.deepbet_import_error()\n"
        "ss._deepbet_extractor('cpu')\n"
        "print(sorted(m for m in sys.modules if 'tkinter' in m))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_a_blank_t1_is_refused_before_running_a_network(tmp_path):
    save_image(np.zeros((8, 8, 8)), np.eye(4), tmp_path / "t1.nii.gz")
    with pytest.raises(InputError, match=r"subject 's1'.*t1.nii.gz.*zero everywhere"):
        ss.skull_strip(tmp_path / "t1.nii.gz", tmp_path / "m.nii.gz", _options(), subject="s1")
    assert not (tmp_path / "m.nii.gz").exists()


def test_apply_mask_zeroes_outside_and_keeps_inside(tmp_path):
    t1, brain = _sphere_head()
    save_image(t1, np.eye(4), tmp_path / "t1.nii.gz")
    save_image(brain, np.eye(4), tmp_path / "mask.nii.gz", dtype=np.uint8)
    (out,) = ss.apply_mask(
        [tmp_path / "t1.nii.gz"], tmp_path / "mask.nii.gz", [tmp_path / "b.nii.gz"]
    )
    data = np.asanyarray(nib.load(out).dataobj)
    assert (data[~brain] == 0).all() and np.allclose(data[brain], t1[brain])
    save_image(brain[:-1], np.eye(4), tmp_path / "small.nii.gz", dtype=np.uint8)
    with pytest.raises(InputError, match="not on the brain mask's grid"):
        ss.apply_mask([tmp_path / "t1.nii.gz"], tmp_path / "small.nii.gz", [tmp_path / "c.nii.gz"])


# --- backend choice ------------------------------------------------------------------------------------------


def _weights(folder: Path, complete: bool = True) -> Path:
    (folder / "fold_all").mkdir(parents=True)
    (folder / "dataset.json").write_text("{}")
    (folder / "plans.json").write_text("{}")
    if complete:
        (folder / "fold_all" / "checkpoint_final.pth").write_bytes(b"x")
    return folder


@pytest.fixture
def no_hdbet(monkeypatch):
    monkeypatch.setattr(
        ss, "hdbet_import_error", lambda: "cannot import HD_BET (ModuleNotFoundError)"
    )


@pytest.fixture
def fake_hdbet(monkeypatch):
    monkeypatch.setattr(ss, "hdbet_import_error", lambda: None)


def test_auto_without_configured_weights_is_deepbet_and_says_why(fake_hdbet, tmp_path, monkeypatch):
    # Even with HD-BET installed and weights in its own home folder: only configured weights select it.
    monkeypatch.setenv("HOME", str(tmp_path))
    _weights(tmp_path / "hd-bet_params" / "release_2.0.0")
    backend, reason, weights = ss.choose_backend("auto", None)
    assert (backend, weights) == ("deepbet", None)
    assert reason == "auto: no HD-BET weights configured"


def test_auto_with_configured_weights_is_hdbet(fake_hdbet, tmp_path):
    backend, reason, weights = ss.choose_backend("auto", _weights(tmp_path / "w"))
    assert backend == "hdbet" and weights == tmp_path / "w"
    assert "HD-BET weights configured" in reason


def test_configured_hdbet_that_cannot_run_is_an_error_not_a_fallback(no_hdbet, tmp_path):
    with pytest.raises(BackendUnavailableError, match=r"pip install .*hd-bet==2\.0\.1"):
        ss.choose_backend("auto", _weights(tmp_path / "w"))


def test_hdbet_requested_with_incomplete_weights_names_the_missing_files(fake_hdbet, tmp_path):
    with pytest.raises(BackendUnavailableError) as err:
        ss.choose_backend("hdbet", _weights(tmp_path / "w", complete=False))
    msg = str(err.value)
    assert "lacks fold_all/checkpoint_final.pth;" in msg
    assert str(tmp_path / "w") in msg and "Zenodo" in msg


def test_deepbet_missing_says_what_to_install(monkeypatch):
    monkeypatch.setattr(ss, "deepbet_import_error", lambda: "cannot import deepbet (ImportError)")
    with pytest.raises(BackendUnavailableError, match=r"deepbet==1\.0\.2"):
        ss.choose_backend("deepbet")


def test_unknown_backend():
    with pytest.raises(InputError, match="unknown skull-stripping backend 'atlas'"):
        ss.choose_backend("atlas")


def test_failed_hdbet_run_raises_and_does_not_fall_back(fake_hdbet, tmp_path, monkeypatch):
    t1, _ = _sphere_head()
    save_image(t1, np.eye(4), tmp_path / "t1.nii.gz")

    def boom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(ss, "run_hdbet", boom)
    out = tmp_path / "mask.nii.gz"
    with pytest.raises(RuntimeError, match="hdbet failed .*CUDA out of memory"):
        ss.skull_strip(tmp_path / "t1.nii.gz", out, _options("auto", _weights(tmp_path / "w")))
    assert not out.exists()


def test_hdbet_result_is_written_on_the_t1_grid_with_provenance(fake_hdbet, tmp_path, monkeypatch):
    t1, brain = _sphere_head()
    affine = np.diag([-1.0, 1.2, 3.0, 1.0])
    save_image(t1, affine, tmp_path / "t1.nii.gz")
    calls = {}

    def fake_run(t1_path, weights, *, device, use_tta):
        calls.update(t1=nib.load(t1_path), weights=weights, device=device)
        return brain

    monkeypatch.setattr(ss, "run_hdbet", fake_run)
    out = tmp_path / "mask.nii.gz"
    prov = ss.skull_strip(tmp_path / "t1.nii.gz", out, _options("hdbet", _weights(tmp_path / "w")))
    assert prov["backend"] == "hdbet" and prov["weights"] == str(tmp_path / "w")
    assert prov["tta"] is False and calls["device"] == "cpu"
    # HD-BET got the image as loaded (same grid), and the mask is written on that grid.
    assert np.allclose(calls["t1"].affine, affine) and calls["t1"].shape == t1.shape
    written = nib.load(out)
    assert np.allclose(written.affine, affine)
    np.testing.assert_array_equal(np.asarray(written.dataobj) > 0, brain)
    assert prov["brain_volume_ml"] == pytest.approx(brain.sum() * 3.6 / 1000, abs=0.1)


# --- the HD-BET call -----------------------------------------------------------------------------------------


def test_hdbet_predictor_arguments():
    cpu = ss.hdbet_predictor_kwargs("cpu")
    assert cpu["use_mirroring"] is False and cpu["perform_everything_on_device"] is False
    gpu = ss.hdbet_predictor_kwargs("cuda")
    assert gpu["use_mirroring"] is True and gpu["perform_everything_on_device"] is True
    assert ss.hdbet_predictor_kwargs("cpu", use_tta=True)["use_mirroring"] is True
    assert gpu["tile_step_size"] == 0.5 and gpu["use_gaussian"] is True  # as get_hdbet_predictor
    model = ss.hdbet_model_args(Path("/w"))
    assert model == {
        "model_training_output_dir": "/w",
        "use_folds": ("all",),
        "checkpoint_name": "checkpoint_final.pth",
    }


def test_hdbet_arguments_match_nnunet_signatures():
    nnunet = pytest.importorskip(
        "nnunetv2.inference.predict_from_raw_data",
        reason="nnU-Net (pulled by hd-bet) not installed",
    )
    predictor = nnunet.nnUNetPredictor
    assert set(ss.hdbet_predictor_kwargs()) <= set(inspect.signature(predictor.__init__).parameters)
    init = inspect.signature(predictor.initialize_from_trained_model_folder).parameters
    assert set(ss.hdbet_model_args("/w")) <= set(init)


def _hdbet_weights_here() -> Path | None:
    folder = Path(os.environ.get("VC_HDBET_WEIGHTS", ss.hdbet_default_weights()))
    return None if ss.missing_hdbet_weights(folder) else folder


def _hdbet_skip_reason() -> str:
    error = ss.hdbet_import_error()
    if error:
        return f"hd-bet (optional extra 'hdbet') is not installed: {error}"
    if _hdbet_weights_here() is None:
        return "no HD-BET weights (set VC_HDBET_WEIGHTS or fill ~/hd-bet_params/release_2.0.0)"
    return ""


@pytest.mark.skipif(bool(_hdbet_skip_reason()), reason=_hdbet_skip_reason() or "runs")
@pytest.mark.shared_data
def test_real_hdbet_on_the_raw_tcga_t1(shared_data, tmp_path: Path):
    prov = ss.skull_strip(
        shared_data / TCGA / "t1.nii.gz",
        tmp_path / "mask.nii.gz",
        _options("hdbet", _hdbet_weights_here()),
    )
    mask = np.asarray(nib.load(str(tmp_path / "mask.nii.gz")).dataobj) > 0
    shipped = np.asanyarray(nib.load(shared_data / TCGA / "t1c_brainmask.nii.gz").dataobj) > 0
    assert prov["backend"] == "hdbet"
    assert dice(mask, shipped) > 0.9


# --- CLI -----------------------------------------------------------------------------------------------------


def test_cli_hdbet_where_it_is_missing_fails_cleanly(tmp_path, monkeypatch, capsys, no_hdbet):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("virtual_contrast.preprocess.commands",))
    t1, _ = _sphere_head()
    save_image(t1, np.eye(4), tmp_path / "t1.nii.gz")
    rc = cli.main(
        ["skull-strip", "--t1", str(tmp_path / "t1.nii.gz"), "--out", str(tmp_path / "m.nii.gz"),
         "--backend", "hdbet"]
    )  # fmt: skip
    assert rc == 2 and "pip install" in capsys.readouterr().err
    assert not (tmp_path / "m.nii.gz").exists()
