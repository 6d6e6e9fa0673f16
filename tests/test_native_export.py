"""vir-T1c back on the native grid: the inverse of the registration, one interpolation, clipped, mapped to the
low-dose range, zero outside the native brain mask, one face-connected body."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from virtual_contrast.io import InputError, save_image
from virtual_contrast.preprocess.native import export_native, largest_component
from virtual_contrast.preprocess.transforms import carry_mask, resample, save_transform


def _rigid(deg, shift) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = Rotation.from_euler("xyz", deg, degrees=True).as_matrix()
    out[:3, 3] = shift
    return out


@pytest.fixture
def exam(tmp_path):
    """A native T1 with its brain mask, a low-dose T1c on another (thick-slice, rotated) grid, the atlas-space
    prediction (masked to the brain, as predict writes it) and the two transforms of the registration."""
    t1_affine = np.diag([1.5, 1.5, 1.5, 1.0])
    t1_affine[:3, 3] = [-45, -54, -42]
    ijk = np.indices((60, 72, 56)).astype(float)
    world = np.tensordot(t1_affine[:3, :3], ijk, axes=1) + t1_affine[:3, 3, None, None, None]
    brain = ((world / np.array([34.0, 42.0, 30.0])[:, None, None, None]) ** 2).sum(0) <= 1
    save_image(brain, t1_affine, tmp_path / "t1_mask.nii.gz", dtype=np.uint8)
    a_t1 = _rigid((4, -3, 6), (2.0, -3.0, 1.0)) @ np.diag([1.05, 0.95, 1.0, 1.0])  # atlas -> T1
    r_low = _rigid((3, 2, -4), (1.5, 2.0, -2.5))  # T1 world -> low-dose world
    save_transform(a_t1, tmp_path / "t1_xfm.txt")
    save_transform(r_low @ a_t1, tmp_path / "low_xfm.txt")
    low_affine = _rigid((0, 0, 10), (0, 0, 0)) @ np.diag([1.2, 1.2, 4.0, 1.0])
    low_affine[:3, 3] = [-48, -55, -40]
    rng = np.random.default_rng(0)
    save_image(rng.random((80, 92, 20)) * 500, low_affine, tmp_path / "low.nii.gz")
    atlas_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    atlas_affine[:3, 3] = [-50, -60, -46]
    shape = (50, 60, 46)
    mask_atlas = carry_mask(nib.load(tmp_path / "t1_mask.nii.gz"), shape, atlas_affine, a_t1)
    blob = ndimage.gaussian_filter(rng.random(shape), 2)
    vir = np.where(mask_atlas, 0.2 + 0.8 * (blob - blob.min()) / np.ptp(blob), 0.0)
    save_image(vir, atlas_affine, tmp_path / "vir.nii.gz")
    return tmp_path


def _export(exam, out="native.nii.gz", intensity_range=(100.0, 900.0)):
    return export_native(
        exam / "vir.nii.gz",
        exam / "low.nii.gz",
        exam / "low_xfm.txt",
        exam / out,
        t1_mask=exam / "t1_mask.nii.gz",
        t1_transform=exam / "t1_xfm.txt",
        intensity_range=intensity_range,
        subject="vc001",
    )


def test_native_vir_t1c_is_zero_outside_the_brain_and_in_range_inside(exam):
    low = nib.load(exam / "low.nii.gz")
    out = nib.load(_export(exam))
    assert out.shape == low.shape and np.allclose(out.affine, low.affine)
    data = np.asanyarray(out.dataobj)
    # The T1's brain mask on the low-dose grid: low world -> T1 world is A_t1 @ inv(R_low @ A_t1).
    a_t1 = np.loadtxt(exam / "t1_xfm.txt")
    a_low = np.loadtxt(exam / "low_xfm.txt")
    brain = carry_mask(
        nib.load(exam / "t1_mask.nii.gz"), low.shape, low.affine, a_t1 @ np.linalg.inv(a_low)
    )
    nonzero = data != 0
    assert (data[~brain] == 0).all()
    assert nonzero.sum() >= 0.99 * brain.sum()
    assert data[nonzero].min() >= 100.0 and data.max() <= 900.0
    labels, n = ndimage.label(nonzero)  # face connectivity
    assert n == 1


def test_the_spline_rings_in_the_background_so_the_mask_is_needed(exam):
    """The failure this guards against: the cubic spline leaves small values all around the brain, which a
    `data > 0` test kept (thousands of isolated voxels at the bottom of the intensity range)."""
    from virtual_contrast.preprocess.transforms import resample_to_native

    low = nib.load(exam / "low.nii.gz")
    spline = resample_to_native(
        nib.load(exam / "vir.nii.gz"), low, np.loadtxt(exam / "low_xfm.txt"), order=3
    )
    labels, n = ndimage.label(spline > 0)
    assert n > 1  # ringing: detached specks around the brain
    assert (np.asanyarray(nib.load(_export(exam)).dataobj) != 0).sum() < (spline > 0).sum()


def test_prediction_values_map_linearly_onto_the_low_dose_range(exam):
    a = np.asanyarray(nib.load(_export(exam, "a.nii.gz", (0.0, 1.0))).dataobj)
    b = np.asanyarray(nib.load(_export(exam, "b.nii.gz", (100.0, 900.0))).dataobj)
    inside = b != 0
    assert np.allclose(b[inside], 100.0 + 800.0 * a[inside], atol=1e-3)
    with pytest.raises(InputError, match="empty intensity range"):
        _export(exam, "c.nii.gz", (5.0, 5.0))


def test_a_brain_mask_outside_the_low_dose_field_of_view_is_named(exam):
    img = nib.load(exam / "low.nii.gz")
    moved = img.affine.copy()
    moved[:3, 3] += 500.0
    save_image(np.asanyarray(img.dataobj), moved, exam / "low.nii.gz")
    with pytest.raises(InputError, match=r"subject 'vc001'.*low.nii.gz.*field of view"):
        _export(exam)


def test_largest_component_uses_face_connectivity():
    mask = np.zeros((6, 6, 6), bool)
    mask[1:4, 1:4, 1:4] = True
    mask[4, 4, 4] = True  # touches the cube by a corner only
    kept = largest_component(mask)
    assert kept.sum() == 27 and not kept[4, 4, 4]


def test_resample_is_the_one_interpolation(exam):
    """An atlas image made from a native one comes back to where it came from (inside the brain)."""
    low = nib.load(exam / "low.nii.gz")
    a_low = np.loadtxt(exam / "low_xfm.txt")
    smooth = ndimage.gaussian_filter(np.random.default_rng(3).random(low.shape), 3)
    smooth = (smooth - smooth.min()) / np.ptp(smooth)
    atlas_affine = nib.load(exam / "vir.nii.gz").affine
    atlas = resample(nib.Nifti1Image(smooth, low.affine), (50, 60, 46), atlas_affine, a_low)
    save_image(atlas, atlas_affine, exam / "vir.nii.gz")
    back = np.asanyarray(nib.load(_export(exam, intensity_range=(0.0, 1.0))).dataobj)
    inner = ndimage.binary_erosion(back != 0, iterations=3)
    assert np.corrcoef(back[inner], smooth[inner])[0, 1] > 0.95


def test_enhancement_above_the_99th_percentile_is_mapped_back_without_flattening(exam):
    """A prediction brighter than 1 (the 99th brain percentile: full-dose enhancement, which the normalisation
    no longer clips) lands above the low dose's 99th percentile, in proportion; before issue 25 every such
    voxel was clipped to 1 and written at exactly the top of the low dose's range."""
    vir = nib.load(exam / "vir.nii.gz")
    data = np.asanyarray(vir.dataobj).copy()
    brain = data > 0
    lesion = np.zeros_like(data)
    centre = tuple(int(np.median(a)) for a in np.nonzero(brain))
    lesion[centre] = 1.0
    lesion = ndimage.gaussian_filter(lesion, 2.0)
    data = np.where(brain, data + 2.5 * lesion / lesion.max(), 0.0)  # a peak of about 3.5
    save_image(data, vir.affine, exam / "vir.nii.gz")
    out = np.asanyarray(nib.load(_export(exam, intensity_range=(100.0, 900.0))).dataobj)
    inside = out[out != 0]
    assert inside.max() > 900.0 + 0.5 * 2.5 * 800.0  # well above the low dose's 99th percentile
    assert np.mean(inside == inside.max()) < 5e-4  # no plateau at the maximum
    assert (inside > 900.0).sum() > 10  # a whole bright region, not one voxel
