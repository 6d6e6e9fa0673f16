"""vir-T1c back on the native grid: the inverse of the registration, one interpolation, intensity mapping."""

from __future__ import annotations

import nibabel as nib
import numpy as np
from scipy import ndimage

from virtual_contrast.model.export import export_native
from virtual_contrast.preprocess.transforms import resample, save_transform


def _rotation(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    m = np.eye(4)
    m[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    return m


def test_atlas_image_goes_back_to_where_it_came_from_on_the_native_grid(tmp_path):
    rng = np.random.default_rng(0)
    native_aff = np.diag([2.0, 2.0, 3.0, 1.0])
    native_aff[:3, 3] = [-30, -34, -24]
    blob = ndimage.gaussian_filter(rng.random((32, 36, 18)), 3)
    blob = (blob - blob.min()) / (blob.max() - blob.min())
    native = nib.Nifti1Image(blob.astype(np.float32), native_aff)
    # atlas world -> native world: a rotation and a shift (the direction the register step saves).
    transform = _rotation(12.0)
    transform[:3, 3] = [6.0, -4.0, 3.0]
    atlas_aff = np.diag([2.0, 2.0, 2.0, 1.0])
    atlas_aff[:3, 3] = [-40, -40, -40]
    atlas_data = resample(native, (40, 40, 40), atlas_aff, transform, order=3)
    nib.save(nib.Nifti1Image(atlas_data, atlas_aff), tmp_path / "vir.nii.gz")
    nib.save(native, tmp_path / "low.nii.gz")
    save_transform(transform, tmp_path / "xfm.txt")

    export_native(
        tmp_path / "vir.nii.gz",
        tmp_path / "low.nii.gz",
        tmp_path / "xfm.txt",
        tmp_path / "native.nii.gz",
        intensity_range=(0.0, 1.0),
    )
    back = nib.load(tmp_path / "native.nii.gz")
    assert back.shape == native.shape and np.allclose(back.affine, native_aff)
    got = np.asanyarray(back.dataobj)
    inner = (slice(6, -6), slice(6, -6), slice(4, -4))
    assert np.corrcoef(got[inner].ravel(), blob[inner].ravel())[0, 1] > 0.95

    export_native(
        tmp_path / "vir.nii.gz",
        tmp_path / "low.nii.gz",
        tmp_path / "xfm.txt",
        tmp_path / "scaled.nii.gz",
        intensity_range=(100.0, 900.0),
    )
    scaled = np.asanyarray(nib.load(tmp_path / "scaled.nii.gz").dataobj)
    inside = got > 0
    assert np.allclose(scaled[inside], 100.0 + 800.0 * np.clip(got[inside], 0, 1), atol=1e-3)
    assert np.all(scaled[~inside] == 0)
