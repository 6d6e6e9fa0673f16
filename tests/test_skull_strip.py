"""Skull stripping: backend choice and its messages, the HD-BET call, the embedded atlas-prior method."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from virtual_contrast import cli
from virtual_contrast.io import InputError, save_image
from virtual_contrast.preprocess import skull_strip as ss

VOXEL = 2.0


def _ellipsoid(shape, centre_mm, radii_mm, voxel=VOXEL) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float32) * voxel
    r = sum(((g - c) / a) ** 2 for g, c, a in zip(grid, centre_mm, radii_mm, strict=True))
    return r <= 1.0


def synthetic_head(seed: int = 0):
    """(T1, true brain, prior) on a 2 mm grid: WM/GM/ventricle brain, CSF, dark skull, bright scalp.

    The prior is an atlas-like brain mask shifted by 6 mm and squashed by 8 % on one axis.
    """
    shape = (56, 64, 56)
    centre = np.array([55.0, 63.0, 55.0])
    radii = np.array([30.0, 38.0, 28.0])
    brain = _ellipsoid(shape, centre, radii)
    wm = _ellipsoid(shape, centre, radii - 6)
    ventricle = _ellipsoid(shape, centre, (6.0, 12.0, 5.0))
    outside = ndimage.distance_transform_edt(~brain, sampling=VOXEL)
    t1 = np.zeros(shape, dtype=np.float32)
    t1[brain] = 0.65  # GM
    t1[wm] = 1.0
    t1[ventricle] = 0.25
    t1[(outside > 0) & (outside <= 2)] = 0.25  # CSF
    t1[(outside > 2) & (outside <= 6)] = 0.05  # skull
    t1[(outside > 6) & (outside <= 12)] = 1.25  # scalp fat
    rng = np.random.default_rng(seed)
    t1 = np.abs(t1 + rng.normal(0, 0.03, shape)).astype(np.float32)
    prior = _ellipsoid(shape, centre + [6.0, -4.0, 0.0], radii * [1.0, 0.92, 1.0])
    scalp = (outside > 6) & (outside <= 12)
    return t1, brain, prior, scalp


def test_refine_improves_dice_over_the_prior_on_a_synthetic_head():
    t1, brain, prior, scalp = synthetic_head()
    mask, info = ss.refine_atlas_mask(t1, prior, VOXEL)
    before, after = ss.dice(prior, brain), ss.dice(mask, brain)
    assert before < 0.9  # the prior is really off
    assert after > 0.95 and after > before + 0.06
    assert (mask & scalp).sum() == 0  # no scalp
    # The dark ventricle and the WM/GM contrast did not punch holes into the mask.
    assert mask[brain].mean() > 0.95
    assert info["tissue_range"][0] < 0.65 < 1.0 < info["tissue_range"][1] < 1.25


def test_refine_with_the_real_atlas_masks(atlas_masks):
    """A head made from the official ICBM brain and head masks, moved off the atlas by 5 mm and scaled."""
    from virtual_contrast.atlas import build_atlas

    atlas, _ = build_atlas(VOXEL, **atlas_masks)
    bm, hm = atlas.brain_mask > 0.5, atlas.head_mask > 0.5
    centre = (np.array(bm.shape) - 1) / 2.0
    matrix = np.diag([1 / 1.06, 1 / 0.97, 1 / 1.04])
    offset = centre - matrix @ centre - np.array([5.0, -3.0, 4.0]) / VOXEL

    def move(a: np.ndarray) -> np.ndarray:
        return ndimage.affine_transform(a.astype(np.float32), matrix, offset=offset, order=1)

    brain, head = move(bm) > 0.5, move(hm) > 0.5
    outside = ndimage.distance_transform_edt(~brain, sampling=VOXEL)
    t1 = np.where(brain, move(atlas.t1), 0.0)
    t1[~brain & (outside <= 2)] = 0.2
    t1[~brain & (outside > 2) & (outside <= 7)] = 0.05
    t1[~brain & (outside > 7) & head] = 1.1
    t1 = np.abs(t1 + np.random.default_rng(1).normal(0, 0.02, t1.shape)).astype(np.float32)

    mask, _ = ss.refine_atlas_mask(t1, bm, VOXEL)
    before, after = ss.dice(bm, brain), ss.dice(mask, brain)
    assert after > 0.97 and after > before + 0.04, (before, after)
    assert not (mask & ~head).any()


def test_skull_strip_file_with_atlas_backend(tmp_path: Path):
    t1, brain, prior, _ = synthetic_head()
    affine = np.diag([VOXEL, VOXEL, VOXEL, 1.0])
    save_image(t1, affine, tmp_path / "t1.nii.gz")
    save_image(prior, affine, tmp_path / "prior.nii.gz", dtype=np.uint8)
    out = tmp_path / "mask.nii.gz"
    prov = ss.skull_strip(
        tmp_path / "t1.nii.gz", out, backend="atlas", atlas_brain_mask=tmp_path / "prior.nii.gz"
    )
    assert prov["backend"] == "atlas" and prov["reason"] == "requested"
    img = nib.load(str(out))
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.affine, affine)
    assert ss.dice(np.asarray(img.dataobj) > 0, brain) > 0.95
    assert prov["brain_volume_ml"] == pytest.approx(brain.sum() * VOXEL**3 / 1000, rel=0.1)

    # apply_mask zeroes everything outside the brain and keeps the inside.
    masked = tmp_path / "t1_brain.nii.gz"
    ss.apply_mask([tmp_path / "t1.nii.gz"], out, [masked])
    m = np.asarray(nib.load(str(masked)).dataobj)
    inside = np.asarray(img.dataobj) > 0
    assert (m[~inside] == 0).all()
    np.testing.assert_allclose(m[inside], t1[inside], rtol=1e-6)


def test_atlas_backend_needs_a_prior_on_the_same_grid(tmp_path: Path):
    t1, _, prior, _ = synthetic_head()
    save_image(t1, np.eye(4), tmp_path / "t1.nii.gz")
    save_image(prior[:-2], np.eye(4), tmp_path / "prior.nii.gz")
    with pytest.raises(InputError, match=r"subject 's3'.*t1.nii.gz.*not on the grid"):
        ss.skull_strip(
            tmp_path / "t1.nii.gz",
            tmp_path / "m.nii.gz",
            backend="atlas",
            atlas_brain_mask=tmp_path / "prior.nii.gz",
            subject="s3",
        )
    with pytest.raises(InputError, match="needs the atlas brain mask"):
        ss.skull_strip(tmp_path / "t1.nii.gz", tmp_path / "m.nii.gz", backend="atlas")
    assert not (tmp_path / "m.nii.gz").exists()


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


def test_auto_without_hdbet_uses_the_atlas_method_and_says_why(no_hdbet, tmp_path):
    backend, reason, weights = ss.choose_backend("auto", _weights(tmp_path / "w"))
    assert backend == "atlas" and weights is None
    assert "HD-BET not installed" in reason


def test_auto_with_hdbet_but_no_weights(fake_hdbet, tmp_path):
    backend, reason, _ = ss.choose_backend("auto", _weights(tmp_path / "w", complete=False))
    assert backend == "atlas"
    assert "fold_all/checkpoint_final.pth" in reason and str(tmp_path / "w") in reason


def test_auto_with_hdbet_and_weights(fake_hdbet, tmp_path):
    backend, reason, weights = ss.choose_backend("auto", _weights(tmp_path / "w"))
    assert backend == "hdbet" and weights == tmp_path / "w"


def test_auto_looks_in_hdbets_own_folder_when_none_configured(fake_hdbet, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert ss.choose_backend("auto")[0] == "atlas"
    _weights(tmp_path / "hd-bet_params" / "release_2.0.0")
    assert ss.choose_backend("auto")[0] == "hdbet"


def test_hdbet_requested_without_package_fails_with_install_hint(no_hdbet, tmp_path):
    with pytest.raises(ss.BackendUnavailableError, match=r"pip install .*hd-bet==2\.0\.1"):
        ss.choose_backend("hdbet", _weights(tmp_path / "w"))


def test_hdbet_requested_with_incomplete_weights_names_the_missing_files(fake_hdbet, tmp_path):
    with pytest.raises(ss.BackendUnavailableError) as err:
        ss.choose_backend("hdbet", _weights(tmp_path / "w", complete=False))
    msg = str(err.value)
    assert (
        "fold_all/checkpoint_final.pth" in msg and "dataset.json" not in msg.split("lacks")[1][:40]
    )
    assert str(tmp_path / "w") in msg and "Zenodo" in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ss.BackendUnavailableError, match="dataset.json, plans.json"):
        ss.choose_backend("hdbet", empty)


def test_unknown_backend():
    with pytest.raises(InputError, match="unknown skull-stripping backend 'bet'"):
        ss.choose_backend("bet")


def test_failed_hdbet_run_raises_and_does_not_fall_back(fake_hdbet, tmp_path, monkeypatch):
    t1, _, prior, _ = synthetic_head()
    save_image(t1, np.eye(4), tmp_path / "t1.nii.gz")
    save_image(prior, np.eye(4), tmp_path / "prior.nii.gz")

    def boom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(ss, "run_hdbet", boom)
    out = tmp_path / "mask.nii.gz"
    with pytest.raises(RuntimeError, match="HD-BET failed .*CUDA out of memory"):
        ss.skull_strip(
            tmp_path / "t1.nii.gz",
            out,
            backend="auto",
            atlas_brain_mask=tmp_path / "prior.nii.gz",
            hdbet_weights=_weights(tmp_path / "w"),
        )
    assert not out.exists()


def test_hdbet_run_result_is_written_with_provenance(fake_hdbet, tmp_path, monkeypatch):
    t1, brain, _, _ = synthetic_head()
    save_image(t1, np.eye(4), tmp_path / "t1.nii.gz")
    calls = {}

    def fake_run(t1_path, weights, *, device, use_tta):
        calls.update(t1=t1_path, weights=weights, device=device)
        return brain

    monkeypatch.setattr(ss, "run_hdbet", fake_run)
    out = tmp_path / "mask.nii.gz"
    prov = ss.skull_strip(
        tmp_path / "t1.nii.gz", out, backend="hdbet", hdbet_weights=_weights(tmp_path / "w")
    )
    assert prov["backend"] == "hdbet" and prov["weights"] == str(tmp_path / "w")
    assert prov["tta"] is False and calls["device"] == "cpu"
    np.testing.assert_array_equal(np.asarray(nib.load(str(out)).dataobj) > 0, brain)


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
def test_real_hdbet_inference(atlas_masks, tmp_path: Path):
    from virtual_contrast.atlas import build_atlas

    atlas, _ = build_atlas(2.0, **atlas_masks)
    save_image(atlas.t1 * 1000, atlas.affine, tmp_path / "t1.nii.gz")
    prov = ss.skull_strip(
        tmp_path / "t1.nii.gz",
        tmp_path / "mask.nii.gz",
        backend="hdbet",
        hdbet_weights=_hdbet_weights_here(),
    )
    mask = np.asarray(nib.load(str(tmp_path / "mask.nii.gz")).dataobj) > 0
    assert prov["backend"] == "hdbet"
    assert ss.dice(mask, atlas.brain_mask > 0.5) > 0.9


# --- CLI -----------------------------------------------------------------------------------------------------


def test_cli_skull_strip(tmp_path: Path, monkeypatch, capsys, no_hdbet):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("virtual_contrast.preprocess.commands",))
    t1, brain, prior, _ = synthetic_head()
    affine = np.diag([VOXEL, VOXEL, VOXEL, 1.0])
    save_image(t1, affine, tmp_path / "t1.nii.gz")
    save_image(prior, affine, tmp_path / "prior.nii.gz", dtype=np.uint8)
    out = tmp_path / "mask.nii.gz"
    rc = cli.main(
        [
            "skull-strip",
            "--t1",
            str(tmp_path / "t1.nii.gz"),
            "--out",
            str(out),
            "--atlas-brain-mask",
            str(tmp_path / "prior.nii.gz"),
            "--apply",
            str(tmp_path / "t1.nii.gz"),
            str(tmp_path / "t1_brain.nii.gz"),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "atlas: auto: HD-BET not installed" in printed and str(out) in printed
    assert (tmp_path / "t1_brain.nii.gz").exists()
    assert ss.dice(np.asarray(nib.load(str(out)).dataobj) > 0, brain) > 0.95
    # Asking for HD-BET where it is missing: a clean error, exit status 2, no output.
    rc = cli.main(
        [
            "skull-strip",
            "--t1",
            str(tmp_path / "t1.nii.gz"),
            "--out",
            str(tmp_path / "m2.nii.gz"),
            "--backend",
            "hdbet",
        ]
    )
    assert rc == 2 and "pip install" in capsys.readouterr().err
    assert not (tmp_path / "m2.nii.gz").exists()
