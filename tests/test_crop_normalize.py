"""Crop/pad to the network shape on one shared grid, and percentile normalisation to [0, 1]."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from virtual_contrast import cli
from virtual_contrast.intensity import normalize, paper_scale
from virtual_contrast.io import InputError, save_image
from virtual_contrast.preprocess.crop import crop_images, crop_or_pad, crop_start_for_mask
from virtual_contrast.preprocess.normalize import normalize_image

AFFINE = np.array([[2.0, 0, 0, -40], [0, 2.0, 0, -50], [0, 0, 2.0, -30], [0, 0, 0, 1]])


def _ramp(shape=(20, 24, 18)) -> np.ndarray:
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape) + 1.0


def test_crop_and_pad_keep_world_positions():
    data = _ramp()
    # Crop on x, pad on y, both on z (box starts before and ends after the image).
    out, affine = crop_or_pad(data, AFFINE, (10, 30, 20), start=(5, -3, -1))
    assert out.shape == (10, 30, 20)
    for idx in [(0, 3, 1), (9, 26, 18), (4, 10, 7)]:
        src = np.array(idx) + [5, -3, -1]
        assert out[idx] == data[tuple(src)]
        np.testing.assert_allclose(affine @ [*idx, 1], AFFINE @ [*src, 1])
    assert (out[:, :3] == 0).all() and (out[:, 27:] == 0).all()  # padding
    assert (out[:, :, 0] == 0).all() and (out[:, :, 19] == 0).all()
    assert out.sum() == data[5:15, :, :].sum()


def test_default_box_is_centred_on_the_grid_and_channels_are_kept():
    data = np.stack([_ramp(), -_ramp()], axis=-1)
    out, affine = crop_or_pad(data, AFFINE, (10, 12, 8))
    np.testing.assert_array_equal(out, data[5:15, 6:18, 5:13])
    # Padding an odd margin: the image sits in the middle of the new grid.
    out, _ = crop_or_pad(np.ones((4, 4, 4)), np.eye(4), (8, 8, 8))
    assert out[2:6, 2:6, 2:6].all() and out.sum() == 64
    # A box that misses the image entirely is all padding (no crash).
    out, _ = crop_or_pad(np.ones((4, 4, 4)), np.eye(4), (2, 2, 2), start=(10, 0, 0))
    assert out.shape == (2, 2, 2) and not out.any()
    with pytest.raises(ValueError, match="either start or centre"):
        crop_or_pad(data, AFFINE, (4, 4, 4), centre=(1, 1, 1), start=(0, 0, 0))


def test_box_centred_on_the_mask_bounding_box():
    mask = np.zeros((30, 30, 30), dtype=bool)
    mask[4:12, 10:21, 15:29] = True  # centre (7.5, 15, 21.5)
    start = crop_start_for_mask(mask, (10, 13, 16))
    out, _ = crop_or_pad(mask, np.eye(4), (10, 13, 16), start=start)
    assert out.sum() == mask.sum()  # the whole mask fits
    idx = np.argwhere(out)
    lo, hi = idx.min(axis=0), (np.array(out.shape) - 1) - idx.max(axis=0)
    assert (np.abs(lo - hi) <= 1).all()  # equal margins on both sides (±1 voxel of rounding)
    with pytest.raises(InputError, match="empty"):
        crop_start_for_mask(np.zeros((3, 3, 3)), (2, 2, 2))


def test_paper_crop_keeps_the_whole_icbm_brain(atlas_masks):
    """160×192×160 at 1 mm around the official ICBM 2009a brain mask holds all of it."""
    img = nib.as_closest_canonical(nib.load(str(atlas_masks["brain_mask"])))
    mask = np.asarray(img.dataobj) > 0.5
    assert mask.shape == (197, 233, 189)
    start = crop_start_for_mask(mask, (160, 192, 160))
    out, affine = crop_or_pad(mask, img.affine, (160, 192, 160), start=start)
    assert out.sum() == mask.sum()
    # x and y are pure crops; the mask reaches the bottom slice of the template (brainstem), so the
    # 160-voxel box, 5 voxels taller than the brain, hangs 2 voxels below the field of view (zero padding).
    assert start == (19, 22, -2)
    np.testing.assert_allclose(affine[:3, 3], img.affine[:3, 3] + [19, 22, -2])


def test_crop_images_share_one_box_and_check_the_grid(tmp_path: Path):
    mask = np.zeros((20, 24, 18), dtype=np.uint8)
    mask[3:15, 5:20, 2:12] = 1
    save_image(mask, AFFINE, tmp_path / "atlas_mask.nii.gz", dtype=np.uint8)
    save_image(_ramp(), AFFINE, tmp_path / "t1.nii.gz")
    save_image(mask, AFFINE, tmp_path / "brain_mask.nii.gz", dtype=np.uint8)
    outs = {"t1": tmp_path / "c_t1.nii.gz", "brain_mask": tmp_path / "c_mask.nii.gz"}
    prov = crop_images(
        {"t1": tmp_path / "t1.nii.gz", "brain_mask": tmp_path / "brain_mask.nii.gz"},
        outs,
        (16, 16, 16),
        tmp_path / "atlas_mask.nii.gz",
        subject="s1",
    )
    start = crop_start_for_mask(mask, (16, 16, 16))
    assert prov["start"] == list(start) and prov["brain_fraction_kept"] == 1.0
    t1c, mc = nib.load(str(outs["t1"])), nib.load(str(outs["brain_mask"]))
    assert mc.get_data_dtype() == np.uint8 and t1c.get_data_dtype() == np.float32
    np.testing.assert_allclose(t1c.affine, mc.affine)
    expected, expected_affine = crop_or_pad(_ramp(), AFFINE, (16, 16, 16), start=start)
    np.testing.assert_array_equal(np.asarray(t1c.dataobj), expected)
    np.testing.assert_allclose(t1c.affine, expected_affine)

    save_image(_ramp((20, 24, 19)), AFFINE, tmp_path / "other.nii.gz")
    with pytest.raises(InputError, match=r"subject 's1'.*other.nii.gz.*not on the atlas grid"):
        crop_images(
            {"x": tmp_path / "other.nii.gz"},
            {"x": tmp_path / "c_x.nii.gz"},
            (16, 16, 16),
            tmp_path / "atlas_mask.nii.gz",
            subject="s1",
        )
    assert not (tmp_path / "c_x.nii.gz").exists()


def test_normalize_maps_brain_percentiles_to_unit_range():
    rng = np.random.default_rng(0)
    data = rng.normal(100.0, 20.0, (20, 20, 20)).astype(np.float32)
    mask = np.zeros(data.shape, dtype=bool)
    mask[4:16, 4:16, 4:16] = True
    data[~mask] = 5000.0  # bright background must not move the percentiles
    out = normalize(data, mask, 1.0, 99.0)
    lo, hi = np.percentile(data[mask], [1, 99])
    assert out.dtype == np.float32 and (out[~mask] == 0).all()
    np.testing.assert_allclose(out[mask], (data[mask] - lo) / (hi - lo), atol=1e-6)
    assert np.percentile(out[mask], [1, 99]) == pytest.approx([0.0, 1.0], abs=1e-6)
    # Nothing is clipped (issue 25): the top percent stays above 1, spread as in the image, no plateau.
    top = out[mask][out[mask] > 1.0]
    assert top.size == pytest.approx(0.01 * mask.sum(), abs=2) and np.unique(top).size == top.size
    assert out.max() == pytest.approx((data[mask].max() - lo) / (hi - lo), rel=1e-5)
    assert out[mask].min() < 0.0
    # the paper's normalisation is this one clipped to [0, 1]
    np.testing.assert_allclose(
        paper_scale(out)[mask], np.clip((data[mask] - lo) / (hi - lo), 0, 1), atol=1e-6
    )


def test_normalize_refuses_constant_and_empty():
    with pytest.raises(InputError, match="constant inside the brain mask"):
        normalize(np.full((5, 5, 5), 7.0), np.ones((5, 5, 5)))
    with pytest.raises(InputError, match="mask is empty"):
        normalize(np.ones((5, 5, 5)), np.zeros((5, 5, 5)))
    with pytest.raises(InputError, match=r"low percentile \(99\) must be below the high one \(1\)"):
        normalize(np.ones((5, 5, 5)), np.ones((5, 5, 5)), low=99, high=1)


def test_normalize_image_names_subject_and_file(tmp_path: Path):
    save_image(np.full((6, 6, 6), 3.0), np.eye(4), tmp_path / "flat.nii.gz")
    save_image(np.ones((6, 6, 6)), np.eye(4), tmp_path / "mask.nii.gz", dtype=np.uint8)
    with pytest.raises(InputError, match=r"subject 'p2'.*flat.nii.gz.*constant"):
        normalize_image(
            tmp_path / "flat.nii.gz", tmp_path / "mask.nii.gz", tmp_path / "o.nii.gz", subject="p2"
        )
    assert not (tmp_path / "o.nii.gz").exists()


def test_cli_crop_and_normalize(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("virtual_contrast.preprocess.commands",))
    mask = np.zeros((20, 24, 18), dtype=np.uint8)
    mask[3:15, 5:20, 2:12] = 1
    save_image(mask, AFFINE, tmp_path / "mask.nii.gz", dtype=np.uint8)
    save_image(_ramp(), AFFINE, tmp_path / "t1.nii.gz")

    rc = cli.main(
        [
            "crop",
            "--image",
            str(tmp_path / "t1.nii.gz"),
            "--out",
            str(tmp_path / "c.nii.gz"),
            "--shape",
            "16",
            "16",
            "16",
            "--reference-mask",
            str(tmp_path / "mask.nii.gz"),
        ]
    )
    assert rc == 0
    assert "cropped to (16, 16, 16)" in capsys.readouterr().out
    assert nib.load(str(tmp_path / "c.nii.gz")).shape == (16, 16, 16)

    rc = cli.main(
        [
            "normalize",
            "--image",
            str(tmp_path / "t1.nii.gz"),
            "--mask",
            str(tmp_path / "mask.nii.gz"),
            "--out",
            str(tmp_path / "n.nii.gz"),
            "--low",
            "2",
        ]
    )
    assert rc == 0
    assert "percentiles 2, 99" in capsys.readouterr().out
    n = np.asarray(nib.load(str(tmp_path / "n.nii.gz")).dataobj)
    assert (n[mask == 0] == 0).all()
    assert np.percentile(n[mask > 0], [2, 99]) == pytest.approx([0.0, 1.0], abs=1e-5)
    assert n.max() > 1.0 and n.min() < 0.0  # not clipped


def test_normalize_with_an_empty_mask_names_the_mask(tmp_path: Path, capsys):
    """It named the image: "file 'img.nii.gz': the brain mask is empty"."""
    image = save_image(
        np.random.default_rng(0).random((8, 8, 8)), np.eye(4), tmp_path / "img.nii.gz"
    )
    mask = save_image(np.zeros((8, 8, 8)), np.eye(4), tmp_path / "mask.nii.gz", dtype=np.uint8)
    out = tmp_path / "norm.nii.gz"
    argv = ["normalize", "--image", str(image), "--mask", str(mask), "--out", str(out)]
    assert cli.main([*argv, "--subject", "n01"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"virtual-contrast normalize: error: subject 'n01', file '{mask}': the brain mask is empty "
        "(no voxel above 0.5)"
    )
    assert not out.exists()
