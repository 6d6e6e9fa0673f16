"""Registration: transform convention, resampling, FLIRT plumbing, and recovery on the real atlas and a raw T1."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from virtual_contrast import cli
from virtual_contrast.io import InputError, load_image, save_image
from virtual_contrast.preprocess import quality
from virtual_contrast.preprocess import register as reg
from virtual_contrast.preprocess import transforms as tf
from virtual_contrast.preprocess.options import (
    BackendUnavailableError,
    GateOptions,
    default_options,
)
from virtual_contrast.preprocess.quality import RegistrationRejectedError, dice
from virtual_contrast.preprocess.registration import fsl, select_backend
from virtual_contrast.preprocess.registration.sitk_backend import SimpleITKBackend

TCGA = "tcga_fg_6692_raw"


# ----------------------------------------------------------------------------------------------- helpers
def affine_from(voxel, origin=(0.0, 0.0, 0.0), flip_x=False, rot_deg=(0.0, 0.0, 0.0)) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = Rotation.from_euler("xyz", rot_deg, degrees=True).as_matrix() @ np.diag(voxel)
    if flip_x:
        a[:3, 0] *= -1
    a[:3, 3] = origin
    return a


def centred(affine: np.ndarray, shape) -> np.ndarray:
    """``affine`` moved so that the grid's centre lies at the world origin."""
    out = np.array(affine, float)
    out[:3, 3] = -out[:3, :3] @ ((np.asarray(shape[:3]) - 1) / 2.0)
    return out


def blob_image(
    shape=(24, 26, 22), voxel=(2.0, 2.0, 2.0), *, flip_x=False, rot_deg=(0, 0, 0), seed=0
):
    """A smooth non-negative image (sum of Gaussian blobs in world space), centred on the world origin."""
    affine = centred(affine_from(voxel, flip_x=flip_x, rot_deg=rot_deg), shape)
    return nib.Nifti1Image(blob_values(shape, affine, seed), affine)


def blob_values(shape, affine, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-12, 12, (6, 3))
    ijk = np.indices(shape).reshape(3, -1)
    world = (affine @ np.r_[ijk, np.ones((1, ijk.shape[1]))])[:3]
    values = sum(
        np.exp(-((world - c[:, None]) ** 2).sum(0) / (2 * 6.0**2)) * (1 + i)
        for i, c in enumerate(centres)
    )
    return values.reshape(shape).astype(np.float32)


def random_affine(rng, *, max_deg=10.0, max_mm=15.0, scale=(0.9, 1.1), centre=None) -> np.ndarray:
    """A 12-DOF affine about ``centre``: rotations ≤ max_deg, translations ≤ max_mm, scales in ``scale``."""
    lin = Rotation.from_euler("xyz", rng.uniform(-max_deg, max_deg, 3), degrees=True).as_matrix()
    lin = lin @ np.diag(rng.uniform(*scale, 3))
    out = np.eye(4)
    centre = np.zeros(3) if centre is None else np.asarray(centre, float)
    centre = np.zeros(3) if centre is None else np.asarray(centre, float)
    out[:3, :3] = lin
    out[:3, 3] = centre - lin @ centre + rng.uniform(-max_mm, max_mm, 3)
    return out


def mean_displacement(a: np.ndarray, b: np.ndarray, mask: np.ndarray, affine: np.ndarray):
    ijk = np.argwhere(mask > 0.5)
    pts = affine @ np.c_[ijk, np.ones(len(ijk))].T
    d = np.linalg.norm(((a - b) @ pts)[:3], axis=0)
    return float(d.mean()), float(d.max())


# ----------------------------------------------------------------------------------------------- transforms
def test_transform_file_round_trip_states_convention(tmp_path):
    matrix = random_affine(np.random.default_rng(1))
    path = tf.save_transform(matrix, tmp_path / "x_xfm.txt", note="moving: a.nii.gz")
    text = path.read_text()
    assert "REFERENCE" in text and "MOVING" in text and text.startswith("#")
    np.testing.assert_allclose(tf.load_transform(path), matrix, atol=1e-9)


@pytest.mark.parametrize(
    "content, message",
    [("1 0 0\n0 1 0\n0 0 1\n", "4x4"), ("1 0 0 0\n0 1 0 0\n0 0 1 0\n1 0 0 1\n", "last row")],
)
def test_load_transform_rejects_bad_matrices(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(InputError, match=message) as err:
        tf.load_transform(path, subject="007")
    assert "007" in str(err.value) and "bad.txt" in str(err.value)


def test_transform_path_beside_output():
    assert reg.transform_path_for(Path("o/sub-1_T1w.nii.gz")) == Path("o/sub-1_T1w_xfm.txt")
    assert reg.transform_path_for(Path("x.nii")) == Path("x_xfm.txt")


# ----------------------------------------------------------------------------------------------- resampling
@pytest.mark.parametrize("order", [0, 1, 3])
def test_resample_identity_returns_the_image(order):
    img = blob_image(flip_x=True, rot_deg=(5, -3, 8))
    out = tf.resample(img, img.shape, img.affine, np.eye(4), order=order)
    np.testing.assert_allclose(out, img.get_fdata(), atol=1e-4)


def test_resample_pulls_from_transformed_points():
    """Pull convention: output(x) = moving(A @ x). A translation by +2 voxels along i reads 2 voxels further."""
    img = blob_image(voxel=(2, 2, 2))
    shift = np.eye(4)
    shift[:3, 3] = img.affine[:3, :3] @ [2, 0, 0]
    out = tf.resample(img, img.shape, img.affine, shift, order=1)
    data = img.get_fdata()
    np.testing.assert_allclose(out[:-2], data[2:], atol=1e-5)
    assert np.all(out[-2:] == 0)  # beyond the field of view: zero


def test_resample_matches_analytic_image_under_affine():
    """A smooth analytic image resampled through a random affine equals the analytic image at A @ x."""
    rng = np.random.default_rng(3)
    moving = blob_image(shape=(40, 44, 38), voxel=(1.5, 1.5, 1.5), rot_deg=(4, 0, -6))
    ref_affine = affine_from((2.0, 2.0, 2.0), (-20, -22, -18), flip_x=False)
    ref_shape = (20, 22, 18)
    a = random_affine(rng, max_deg=6, max_mm=3, scale=(0.95, 1.05))
    out = tf.resample(moving, ref_shape, ref_affine, a, order=3, antialias=False)
    expected = blob_values(ref_shape, a @ ref_affine)
    inside = out > 0
    assert inside.mean() > 0.5
    np.testing.assert_allclose(out[inside], expected[inside], atol=0.02 * expected.max())


def test_composition_rigid_then_affine_equals_one_pass():
    """FLAIR → T1 (rigid R) → atlas (affine A) in two interpolations ≈ one interpolation with R @ A."""
    rng = np.random.default_rng(4)
    flair = blob_image(shape=(44, 44, 40), voxel=(1.2, 1.2, 1.2), rot_deg=(0, 10, 0), seed=2)
    t1_shape = (36, 36, 32)
    t1_affine = centred(affine_from((1.4, 1.4, 1.4), flip_x=True), t1_shape)
    atlas_shape, atlas_affine = (18, 18, 16), affine_from((2.0, 2.0, 2.0), (-17, -17, -15))
    r = random_affine(rng, max_deg=12, max_mm=4, scale=(1, 1))
    a = random_affine(rng, max_deg=12, max_mm=4, scale=(0.95, 1.05))
    on_t1 = nib.Nifti1Image(tf.resample(flair, t1_shape, t1_affine, r, order=3), t1_affine)
    two_pass = tf.resample(on_t1, atlas_shape, atlas_affine, a, order=3)
    one_pass = tf.resample(flair, atlas_shape, atlas_affine, r @ a, order=3)
    core = (slice(4, -4),) * 3
    np.testing.assert_allclose(two_pass[core], one_pass[core], atol=0.02 * one_pass.max())
    # The other order of composition is a different transform: the test can tell them apart.
    wrong = tf.resample(flair, atlas_shape, atlas_affine, a @ r, order=3)
    assert np.abs(wrong[core] - one_pass[core]).max() > 0.05 * one_pass.max()


def test_resample_to_native_inverts_the_atlas_transform():
    rng = np.random.default_rng(5)
    native = blob_image(shape=(30, 30, 30), voxel=(1.5, 1.5, 1.5))
    atlas_shape, atlas_affine = (30, 30, 30), affine_from((1.5, 1.5, 1.5), (-22, -22, -22))
    a = random_affine(rng, max_deg=5, max_mm=2, scale=(0.97, 1.03))
    on_atlas = nib.Nifti1Image(tf.resample(native, atlas_shape, atlas_affine, a), atlas_affine)
    back = tf.resample_to_native(on_atlas, native, a)
    core = (slice(6, -6),) * 3
    np.testing.assert_allclose(back[core], native.get_fdata()[core], atol=0.03 * back.max())


def test_resample_masks_stay_binary_and_spline_does_not_overshoot():
    mask = np.zeros((20, 20, 20), np.float32)
    mask[5:15, 5:15, 5:15] = 1
    img = nib.Nifti1Image(mask, np.diag([2.0, 2.0, 2.0, 1.0]))
    a = random_affine(np.random.default_rng(6), max_deg=8, max_mm=3, centre=np.full(3, 19.0))
    nearest = tf.resample(img, (25, 25, 25), np.diag([1.6, 1.6, 1.6, 1.0]), a, order=0)
    assert set(np.unique(nearest)) <= {0.0, 1.0}
    cubic = tf.resample(img, (25, 25, 25), np.diag([1.6, 1.6, 1.6, 1.0]), a, order=3)
    assert cubic.min() >= 0.0 and cubic.max() <= 1.0


# ----------------------------------------------------------------------------------------------- FSL
def test_flirt_command_lines_without_fsl(tmp_path):
    for name in ("t1.nii.gz", "atlas.nii.gz", "brain.nii.gz", "init.mat"):
        (tmp_path / name).touch()  # nipype checks that inputs exist
    est = fsl.flirt_estimate(
        tmp_path / "t1.nii.gz",
        tmp_path / "atlas.nii.gz",
        tmp_path / "t1.mat",
        tmp_path / "t1_flirt.nii.gz",
        dof=12,
        ref_weight=tmp_path / "brain.nii.gz",
    )
    cmd = est.cmdline
    assert cmd.split()[0].endswith("flirt")
    assert f"-ref {tmp_path / 'atlas.nii.gz'}" in cmd and f"-in {tmp_path / 't1.nii.gz'}" in cmd
    assert "-dof 12" in cmd and f"-omat {tmp_path / 't1.mat'}" in cmd
    assert f"-refweight {tmp_path / 'brain.nii.gz'}" in cmd and "-nosearch" not in cmd
    rigid = fsl.flirt_estimate(
        tmp_path / "t1.nii.gz",
        tmp_path / "atlas.nii.gz",
        tmp_path / "m.mat",
        tmp_path / "o.nii.gz",
        dof=6,
        in_matrix_file=tmp_path / "init.mat",
    )
    assert "-dof 6" in rigid.cmdline and "-init" in rigid.cmdline and "-nosearch" in rigid.cmdline
    t1, atlas, init = tmp_path / "t1.nii.gz", tmp_path / "atlas.nii.gz", tmp_path / "init.mat"
    apply = fsl.flirt_apply(t1, atlas, init, tmp_path / "o.nii.gz", order=3)
    assert "-applyxfm" in apply.cmdline and f"-init {init}" in apply.cmdline
    assert "-interp spline" in apply.cmdline and f"-ref {atlas}" in apply.cmdline
    assert "-interp nearestneighbour" in fsl.flirt_apply(t1, atlas, init, "o", order=0).cmdline


def test_flirt_identity_between_two_grids_gives_the_hand_computed_matrix():
    """Reference LAS 1 mm (det < 0: no flip), moving RAS 2 mm with 10 columns (det > 0: x flipped).

    World x = -i + 5 (reference), 2 i (moving). FSL coordinates: x_ref = i_ref = 5 - x,
    x_mov = (10 - 1 - i_mov) * 2 = 18 - x. The identity in world is thus x_ref = x_mov - 13.
    """
    ref = nib.Nifti1Image(
        np.zeros((8, 8, 8), np.float32), affine_from((1, 1, 1), (5, 0, 0), flip_x=True)
    )
    mov = nib.Nifti1Image(np.zeros((10, 6, 6), np.float32), np.diag([2.0, 2, 2, 1]))
    expected = np.eye(4)
    expected[0, 3] = -13.0
    expected[1, 1] = expected[2, 2] = 1.0
    np.testing.assert_allclose(fsl.world_to_flirt_matrix(np.eye(4), mov, ref), expected, atol=1e-9)
    np.testing.assert_allclose(fsl.flirt_matrix_to_world(expected, mov, ref), np.eye(4), atol=1e-9)


def test_flirt_matrix_round_trip_on_oblique_grids():
    rng = np.random.default_rng(7)
    mov = nib.Nifti1Image(
        np.zeros((30, 28, 12), np.float32),
        affine_from((0.9, 0.9, 5.5), (90, -70, -40), True, (3, -2, 5)),
    )
    ref = nib.Nifti1Image(
        np.zeros((50, 59, 48), np.float32), affine_from((4, 4, 4), (-98, -134, -72))
    )
    world = random_affine(rng)
    mat = fsl.world_to_flirt_matrix(world, mov, ref)
    np.testing.assert_allclose(fsl.flirt_matrix_to_world(mat, mov, ref), world, atol=1e-9)
    # A FLIRT matrix is not a world matrix: a grid with the x flip changes it.
    assert not np.allclose(mat, np.linalg.inv(world), atol=1e-3)


FAKE_FLIRT = textwrap.dedent(
    """\
    #!{python}
    # Stands in for FSL's flirt: records its arguments, writes -omat (FAKE_FLIRT_MAT or identity) and a copy
    # of -ref as -out, so that the backend's file plumbing and matrix conversion can be tested without FSL.
    import os, sys, shutil
    import numpy as np
    args = sys.argv[1:]
    with open(os.environ["FAKE_FLIRT_LOG"], "a") as log:
        log.write(" ".join(args) + "\\n")
    opt = {{args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("-")}}
    # Keep the input images of each call (the backend's temporary folder is gone afterwards).
    keep = os.path.join(os.path.dirname(os.environ["FAKE_FLIRT_LOG"]), "flirt_inputs")
    os.makedirs(keep, exist_ok=True)
    n = len(os.listdir(keep)) // 2
    shutil.copy(opt["-in"], os.path.join(keep, f"{{n}}_in.nii.gz"))
    shutil.copy(opt["-ref"], os.path.join(keep, f"{{n}}_ref.nii.gz"))
    if "-applyxfm" in args:
        shutil.copy(opt["-init"], opt["-omat"])
    else:
        np.savetxt(opt["-omat"], np.loadtxt(os.environ["FAKE_FLIRT_MAT"]) if "FAKE_FLIRT_MAT" in os.environ
                   else np.eye(4))
    shutil.copy(opt["-ref"], opt["-out"])
    """
)


@pytest.fixture
def fake_fsl(tmp_path, monkeypatch):
    bin_dir = tmp_path / "fslbin"
    bin_dir.mkdir()
    flirt = bin_dir / "flirt"
    flirt.write_text(FAKE_FLIRT.format(python=sys.executable))
    flirt.chmod(flirt.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_FLIRT_LOG", str(tmp_path / "flirt.log"))
    return tmp_path


def test_fsl_backend_registers_brain_to_brain_with_a_stand_in_flirt(fake_fsl, monkeypatch, caplog):
    """The FLIRT path gets the same inputs as the embedded one: the two brain masks for the outline stage,
    then the brain-extracted T1 against the template, weighted by the grown atlas brain mask."""
    from virtual_contrast.atlas import build_atlas

    mat = random_affine(np.random.default_rng(8))
    np.savetxt(fake_fsl / "known.mat", mat)
    monkeypatch.setenv("FAKE_FLIRT_MAT", str(fake_fsl / "known.mat"))
    with caplog.at_level(logging.INFO, logger="virtual_contrast.preprocess.registration"):
        backend = select_backend("auto")
    assert backend.name == "fsl" and "registration backend: fsl" in caplog.text
    atlas, _ = build_atlas(8.0)
    head = blob_image(shape=(20, 22, 10), voxel=(6.0, 6.0, 12.0), flip_x=True)
    brain = head.get_fdata() > 0.3 * head.get_fdata().max()
    result = reg.register_brain_to_atlas(head, brain, atlas, backend)
    reference = atlas.image("t1")
    np.testing.assert_allclose(result.transform, fsl.flirt_matrix_to_world(mat, head, reference))
    out = backend.resample(head, reference.shape, reference.affine, result.transform, order=3)
    assert out.shape == reference.shape
    outline, affine, apply = (fake_fsl / "flirt.log").read_text().splitlines()
    # 1: the atlas brain mask onto the subject's brain mask (the subject is FLIRT's reference).
    assert "-dof 7" in outline and "-cost leastsq" in outline
    assert "subject_brain" in outline.split("-ref ")[1] and "ref_brain" in outline.split("-in ")[1]
    kept = fake_fsl / "flirt_inputs"
    np.testing.assert_array_equal(nib.load(kept / "0_ref.nii.gz").get_fdata() > 0.5, brain)
    # 2: 12 DOF from there, the brain-extracted T1 against the template, weighted by the grown brain mask.
    assert "-dof 12" in affine and "-refweight" in affine and "-init" in affine
    assert "-nosearch" in affine
    moving = nib.load(kept / "1_in.nii.gz").get_fdata()
    assert (moving[~brain] == 0).all() and np.allclose(moving[brain], head.get_fdata()[brain])
    # 3: one spline resampling.
    assert "-applyxfm" in apply and "-interp spline" in apply


# ----------------------------------------------------------------------------------------------- backends
@pytest.fixture
def no_fsl(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("FSLDIR", raising=False)


def test_fsl_without_fsl_fails_at_once_saying_what_to_install(no_fsl):
    with pytest.raises(BackendUnavailableError) as err:
        select_backend("fsl")
    text = str(err.value)
    assert "FSL >= 6" in text and "FSLDIR" in text and "flirt" in text and "PATH" in text


def test_fsl_with_a_broken_fsldir_names_it(no_fsl, monkeypatch, tmp_path):
    monkeypatch.setenv("FSLDIR", str(tmp_path / "fsl"))
    with pytest.raises(BackendUnavailableError, match="FSLDIR=.*fsl is set"):
        select_backend("fsl")


def test_auto_without_fsl_chooses_simpleitk_and_says_why(no_fsl, caplog):
    with caplog.at_level(logging.INFO, logger="virtual_contrast.preprocess.registration"):
        backend = select_backend("auto")
    assert backend.name == "simpleitk"
    assert "registration backend: simpleitk" in caplog.text and "FSL not found" in caplog.text


def test_unknown_backend_is_an_input_error():
    with pytest.raises(InputError, match="ants"):
        select_backend("ants")


def test_rigid_recovery_is_rigid_and_reproducible():
    """dof=6 on a smooth synthetic head: a known rigid motion comes back, twice identically (1 thread)."""
    fixed = blob_image(shape=(32, 32, 32), voxel=(2.0, 2.0, 2.0), seed=11)
    truth = random_affine(np.random.default_rng(12), max_deg=8, max_mm=5, scale=(1, 1))
    moving_affine = centred(affine_from((2.5, 2.5, 2.5), flip_x=True), (28, 28, 28))
    moving = nib.Nifti1Image(
        tf.resample(fixed, (28, 28, 28), moving_affine, np.linalg.inv(truth)), moving_affine
    )
    backend = SimpleITKBackend(threads=1)
    first = backend.register(moving, fixed, dof=6, initial=np.eye(4))
    second = backend.register(moving, fixed, dof=6, initial=np.eye(4))
    np.testing.assert_allclose(first.transform, second.transform, rtol=0, atol=1e-9)
    assert np.allclose(first.transform[:3, :3] @ first.transform[:3, :3].T, np.eye(3), atol=1e-6)
    centre = fixed.get_fdata() > 0.2 * fixed.get_fdata().max()
    mean, _ = mean_displacement(first.transform, truth, centre, fixed.affine)
    assert mean < 0.5


# ----------------------------------------------------------------------------------------------- real atlas
@pytest.fixture(scope="module")
def atlas3():
    """The atlas on a 3 mm grid, with no official mask: the template inside nilearn's package only."""
    from virtual_contrast.atlas import build_atlas

    atlas, _ = build_atlas(3.0)
    return atlas


@pytest.mark.parametrize("seed", [0, 1])
def test_known_affine_is_recovered_on_the_atlas(atlas3, seed):
    """A seeded random 12-DOF affine (≤ 10°, ≤ 15 mm, scales 0.9-1.1) comes back within 1 mm on brain voxels."""
    rng = np.random.default_rng(seed)
    brain_centre = (atlas3.affine @ np.r_[np.argwhere(atlas3.brain_mask > 0.5).mean(0), 1])[:3]
    truth = random_affine(rng, centre=brain_centre)
    # The moving image lies on another grid (LAS, 3.6 mm, larger field of view), as a scanner's would.
    shape = tuple(int(s * 1.05) for s in atlas3.shape)
    moving_affine = centred(affine_from((3.6, 3.6, 3.6), flip_x=True), shape)
    moving_affine[:3, 3] += brain_centre
    moving = nib.Nifti1Image(
        tf.resample(atlas3.image("t1"), shape, moving_affine, np.linalg.inv(truth)), moving_affine
    )
    before, _ = mean_displacement(np.eye(4), truth, atlas3.brain_mask, atlas3.affine)
    result = reg.register_images(
        moving,
        atlas3.image("t1"),
        backend=SimpleITKBackend(),
        reference_mask=atlas3.brain_mask,
    )
    mean, worst = mean_displacement(result.transform, truth, atlas3.brain_mask, atlas3.affine)
    assert before > 5.0  # the test starts far from the answer
    assert mean <= 1.0, f"mean displacement {mean:.2f} mm (max {worst:.2f})"
    assert result.stages[-1]["levels"][-1]["metric"] < -1.0  # Mattes MI of a monomodal match


@pytest.fixture(scope="module")
def atlas1_masks(shared_data):
    """The atlas brain mask on the 1 mm grid (as the workflow builds it) and the official one (truth only)."""
    from virtual_contrast.atlas import build_atlas

    atlas, _ = build_atlas(1.0)
    official = load_image(
        shared_data
        / "mni_icbm152_09a_sym_masks_niak"
        / "mni_icbm152_t1_tal_nlin_sym_09a_mask.mnc.gz"
    )  # MINC, other axis order: resampled through world coordinates
    return atlas, tf.resample(official, atlas.shape, atlas.affine, np.eye(4), order=0) > 0.5


def _dice_at_1mm(native_mask: Path, transform: np.ndarray, atlas1_masks) -> tuple[float, float]:
    atlas, official = atlas1_masks
    carried = tf.carry_mask(load_image(native_mask), atlas.shape, atlas.affine, transform)
    return dice(carried, atlas.brain_mask), dice(carried, official)


def _gate(**limits) -> GateOptions:
    limits = {
        "scale_range": (0.67, 1.5),
        "min_correlation": 0.2,
        "min_brain_dice": 0.8,
        "min_brain_coverage": 0.9,
        **limits,
    }
    return GateOptions(**limits)


@pytest.mark.shared_data
def test_raw_tcga_head_with_skull_registers_brain_to_brain(
    atlas3, atlas1_masks, tcga_brain_mask, shared_data, tmp_path
):
    """Raw clinical T1 (skull, 5.5 mm oblique slices, head pitched ~25°) + its T1c, default options, no
    official mask: registered on the 3 mm atlas, its brain mask lands on the atlas brain at 1 mm."""
    folder = shared_data / TCGA
    out_images = {"T1": tmp_path / "t1.nii.gz", "T1c": tmp_path / "t1c.nii.gz"}
    out_xfm = {"T1": tmp_path / "t1_xfm.txt", "T1c": tmp_path / "t1c_xfm.txt"}
    provenance = reg.register_subject(
        folder / "t1.nii.gz",
        tcga_brain_mask,
        {"T1c": (folder / "t1c.nii.gz", folder / "t1c.nii.gz")},
        atlas3,
        out_images,
        out_xfm,
        tmp_path / "mask.nii.gz",
        default_options().register.backend,
        subject="TCGAFG6692",
    )
    a_t1 = tf.load_transform(out_xfm["T1"])
    workflow_mask, official = _dice_at_1mm(tcga_brain_mask, a_t1, atlas1_masks)
    assert workflow_mask >= 0.90 and official >= 0.90, (
        workflow_mask,
        official,
    )  # measured 0.954, 0.953
    # The carried mask written on the atlas grid agrees with the atlas brain mask there too.
    assert provenance["quality"]["brain_dice"] >= 0.9
    assert quality.gate_verdict(provenance["quality"], default_options().register.gate)["passed"]
    assert 0.3 < provenance["quality"]["correlation"] < 1  # measured 0.61 at 3 mm
    # Each sequence's share of the atlas brain in its field of view (the T1c: same slab as the T1).
    coverage = provenance["quality"]["brain_coverage"]
    assert set(coverage) == {"T1", "T1c"} and min(coverage.values()) > 0.9, coverage
    # Outputs on the atlas grid, the composed transform is rigid(T1c) @ affine(T1).
    t1c = load_image(out_images["T1c"])
    assert t1c.shape == atlas3.shape and np.allclose(t1c.affine, atlas3.affine)
    rigid = np.asarray(provenance["channels"]["T1c"]["registration"]["transform"])
    np.testing.assert_allclose(tf.load_transform(out_xfm["T1c"]), rigid @ a_t1, atol=1e-6)
    stages = provenance["channels"]["T1"]["registration"]["stages"]
    assert [s["name"].split(" (")[0] for s in stages] == ["brain outline", "mutual information"]


@pytest.mark.shared_data
def test_register_command_on_a_skull_stripped_brats_t1_with_no_other_flag(
    atlas3, atlas1_masks, shared_data, tmp_path, no_fsl, capsys
):
    """`virtual-contrast register --moving T1 --reference ATLAS --out O`: the brain is extracted (deepbet),
    registered brain to brain, checked by the gate; the mask lands on the atlas brain at 1 mm."""
    reference = save_image(atlas3.t1, atlas3.affine, tmp_path / "atlas_T1w.nii.gz")
    out = tmp_path / "t1_atlas.nii.gz"
    t1 = shared_data / "brats_met_00110" / "BraTS-MET-00110-000-t1n.nii.gz"
    rc = cli.main(
        ["register", "--moving", str(t1), "--reference", str(reference), "--out", str(out)]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "deepbet" in printed and "quality gate passed" in printed
    for suffix in ("_xfm.txt", "_desc-brain_mask.nii.gz", "_register.json", "_qc.png"):
        assert reg.transform_path_for(out, suffix).exists(), suffix
    native_mask = reg.transform_path_for(out, "_space-moving_desc-brain_mask.nii.gz")
    a_t1 = tf.load_transform(reg.transform_path_for(out))
    workflow_mask, official = _dice_at_1mm(native_mask, a_t1, atlas1_masks)
    assert workflow_mask >= 0.90 and official >= 0.90, (
        workflow_mask,
        official,
    )  # measured 0.959, 0.959
    assert load_image(out).shape == atlas3.shape


@pytest.mark.parametrize("starts", ["all", "unrotated only"])
def test_outline_match_escapes_the_local_minimum_of_a_turned_head(
    atlas4, tmp_path, monkeypatch, starts
):
    """Embedded-cohort patient vc011 (seed 2021) acquired at 2.5 mm, its brain extracted by deepbet, its header
    turned 70 degrees about the vertical axis (as a wrong orientation in a converted file would): from the
    unrotated start alone the brain-outline match stops in a local minimum (measured: mask mismatch 0.039,
    brain Dice 0.888); the starts rotated by 20 degrees find the pose (0.0008, Dice 0.975). Unturned, this head
    needed them while the match compared every voxel (from the unrotated start it ended 36 degrees off); with
    the sampled match no head of the cohort does."""
    from virtual_contrast.atlas import build_atlas
    from virtual_contrast.cohort.exam import make_exam
    from virtual_contrast.preprocess import skull_strip
    from virtual_contrast.preprocess.registration import sitk_backend

    if starts != "all":
        monkeypatch.setattr(sitk_backend, "OUTLINE_START_ROTATIONS_DEG", ((0.0, 0.0, 0.0),))
    t1_path = tmp_path / "t1.nii.gz"
    make_exam(
        {"t1": t1_path}, tmp_path / "lesions.tsv", subject="vc011", session="01", seed=2021,
        atlas=build_atlas(2.5)[0], native_voxel_mm=2.5,
    )  # fmt: skip
    acquired = load_image(t1_path)
    mask = skull_strip.run_deepbet(acquired)
    angle = np.deg2rad(70.0)
    turn = np.eye(4)
    turn[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    t1 = nib.Nifti1Image(np.asanyarray(acquired.dataobj), turn @ acquired.affine)
    reference = nib.Nifti1Image(atlas4.t1, atlas4.affine)
    found = reg.register_images(
        t1,
        reference,
        backend=SimpleITKBackend(),
        reference_mask=atlas4.brain_mask,
        moving_mask=mask,
    )
    carried = tf.carry_mask(
        nib.Nifti1Image(mask.astype(np.float32), t1.affine), atlas4.shape, atlas4.affine,
        found.transform,
    )  # fmt: skip
    brain_dice = dice(carried, atlas4.brain_mask > 0.5)
    outline = found.stages[0]
    if starts == "all":
        assert outline["metric"] < 0.002 and brain_dice > 0.95, (outline, brain_dice)
        assert outline["start_rotation_deg"] != [0.0, 0.0, 0.0]
    else:  # the failure the extra starts are for (if this passes, the test above proves nothing)
        assert outline["metric"] > 0.01 and brain_dice < 0.93, (outline, brain_dice)


def test_the_gate_applies_apart_from_the_registration_and_its_rejection_names_the_subject(
    atlas4, tmp_path
):
    """register_subject writes the registration and its figures whatever the limits; gate_subject rejects
    it with an error naming the subject, the figure to look at and the failing figure, drawing the
    registration with its figures beside it; within the limits the stale figure goes away."""
    t1, mask = _synthetic_subject(atlas4, tmp_path)
    out = tmp_path / "out"
    outs = {"T1": out / "t1.nii.gz"}, {"T1": out / "t1_xfm.txt"}
    provenance = reg.register_subject(
        t1, mask, {}, atlas4, *outs, out / "mask.nii.gz", "simpleitk", subject="vc042"
    )
    assert "gate" not in provenance and provenance["quality"]["brain_dice"] > 0.9
    assert provenance["quality"]["brain_coverage"]["T1"] > 0.99
    assert sorted(p.name for p in out.iterdir()) == ["mask.nii.gz", "t1.nii.gz", "t1_xfm.txt"]
    rejected = out / "rejected.png"
    images = {
        "t1_atlas": out / "t1.nii.gz",
        "mask_atlas": out / "mask.nii.gz",
        "atlas_brain_mask": save_image(atlas4.brain_mask, atlas4.affine, tmp_path / "a.nii.gz"),
    }
    with pytest.raises(RegistrationRejectedError) as err:
        quality.gate_subject(
            provenance["quality"], _gate(scale_range=(1.3, 1.5)), subject="vc042",
            rejected_figure=rejected, path=t1, **images,
        )  # fmt: skip
    message = str(err.value)
    assert message.startswith("subject 'vc042'") and "rejected by the quality gate" in message
    assert "outside [1.3, 1.5]" in message and f"look at {rejected}" in message
    assert rejected.exists() and rejected.with_suffix(".json").exists()
    verdict = quality.gate_subject(
        provenance["quality"], _gate(), subject="vc042", rejected_figure=rejected, **images
    )
    assert (
        verdict["passed"] and not rejected.exists() and not rejected.with_suffix(".json").exists()
    )


@pytest.fixture(scope="module")
def atlas4():
    from virtual_contrast.atlas import build_atlas

    atlas, _ = build_atlas(4.0)
    return atlas


def _synthetic_subject(atlas, tmp_path) -> tuple[Path, Path]:
    """The atlas brain on a rotated 3 mm scanner grid, scaled by 1.05, as a skull-stripped exam with its mask."""
    truth = random_affine(np.random.default_rng(4), max_deg=10, max_mm=6, scale=(1.05, 1.05))
    shape = (60, 70, 56)
    affine = centred(affine_from((3.0, 3.0, 3.0), flip_x=True, rot_deg=(8, 0, -5)), shape)
    affine[:3, 3] += (atlas.affine @ np.r_[np.argwhere(atlas.brain_mask > 0.5).mean(0), 1])[:3]
    inverse = np.linalg.inv(truth)
    t1 = tf.resample(atlas.image("t1"), shape, affine, inverse) * 1000
    mask = tf.carry_mask(atlas.image("brain_mask"), shape, affine, inverse)
    return (
        save_image(t1 * mask, affine, tmp_path / "t1.nii.gz"),
        save_image(mask, affine, tmp_path / "t1_mask.nii.gz", dtype=np.uint8),
    )


# ----------------------------------------------------------------------------------------------- CLI
def test_register_command_rigid_within_the_reference_brain(tmp_path, no_fsl, capsys):
    fixed = blob_image(shape=(24, 24, 24), voxel=(2.0, 2.0, 2.0), seed=3)
    truth = random_affine(np.random.default_rng(9), max_deg=6, max_mm=4, scale=(1, 1))
    moving = tf.resample(fixed, fixed.shape, fixed.affine, np.linalg.inv(truth))
    save_image(fixed.get_fdata(), fixed.affine, tmp_path / "ref.nii.gz")
    save_image(moving, fixed.affine, tmp_path / "mov.nii.gz")
    centre = fixed.get_fdata() > 0.2 * fixed.get_fdata().max()
    save_image(centre, fixed.affine, tmp_path / "ref_mask.nii.gz", dtype=np.uint8)
    rc = cli.main(
        ["register", "--moving", str(tmp_path / "mov.nii.gz"), "--reference", str(tmp_path / "ref.nii.gz"),
         "--reference-mask", str(tmp_path / "ref_mask.nii.gz"), "--out", str(tmp_path / "out.nii.gz"),
         "--backend", "auto", "--dof", "6", "--threads", "1"]
    )  # fmt: skip
    assert rc == 0
    assert "backend: simpleitk" in capsys.readouterr().out
    out = load_image(tmp_path / "out.nii.gz")
    xfm = tf.load_transform(tmp_path / "out_xfm.txt")
    assert out.shape == fixed.shape
    assert mean_displacement(xfm, truth, centre, fixed.affine)[0] < 0.5


def test_register_command_applies_the_gate_as_the_workflow_does(atlas4, tmp_path, no_fsl, capsys):
    """The single-step command and the workflow's register step share the gate (register.gate_registration):
    outside the limits, one line naming the subject and the figure; only the figure and its JSON are written;
    within them, every output and the figure of the passed registration."""
    import json

    t1, mask = _synthetic_subject(atlas4, tmp_path)
    reference = save_image(atlas4.t1, atlas4.affine, tmp_path / "atlas_T1w.nii.gz")
    out = tmp_path / "out" / "t1_atlas.nii.gz"
    out.parent.mkdir()
    command = ["register", "--moving", str(t1), "--moving-mask", str(mask), "--reference",
               str(reference), "--out", str(out), "--backend", "simpleitk", "--subject", "vc042"]  # fmt: skip
    assert cli.main([*command, "--gate-scale-range", "1.3", "1.5"]) == 2
    err = capsys.readouterr().err.strip()
    figure = reg.transform_path_for(out, "_qc.png")
    assert err.count("\n") == 0 and "error: subject 'vc042'" in err
    assert "rejected by the quality gate" in err and f"look at {figure}" in err
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "t1_atlas_qc.png", "t1_atlas_register.json"
    ]  # fmt: skip
    record = json.loads(reg.transform_path_for(out, "_register.json").read_text())
    assert set(record) == {"registration", "moving", "reference", "quality", "gate"}
    assert not record["gate"]["passed"]
    assert cli.main(command) == 0
    assert "quality gate passed" in capsys.readouterr().out
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "t1_atlas.nii.gz", "t1_atlas_desc-brain_mask.nii.gz", "t1_atlas_qc.png",
        "t1_atlas_register.json", "t1_atlas_xfm.txt",
    ]  # fmt: skip


def test_register_command_missing_input_is_one_line(tmp_path, no_fsl, capsys):
    rc = cli.main(
        ["register", "--moving", str(tmp_path / "nope.nii.gz"), "--reference", str(tmp_path / "r.nii.gz"),
         "--out", str(tmp_path / "o.nii.gz"), "--backend", "simpleitk"]
    )  # fmt: skip
    assert rc == 2
    assert "nope.nii.gz" in capsys.readouterr().err and not (tmp_path / "o.nii.gz").exists()


def _rigid_error(transform: np.ndarray, points: np.ndarray) -> float:
    """Largest displacement (mm) of ``points`` (world, n x 3) under ``transform`` (identity: 0)."""
    moved = points @ transform[:3, :3].T + transform[:3, 3]
    return float(np.linalg.norm(moved - points, axis=1).max())


def test_t2_aligns_on_edges_where_intensities_mislead(tiny_run: Path):
    """The cohort's T2 is acquired in the T1's pose (the truth is the identity). Mutual information of the
    intensities within the T1's brain moves it by centimetres; on gradient magnitudes it stays within a
    voxel or two, and the workflow registers the T2 that way (the sequence table's ``align_feature``)."""
    from virtual_contrast import layout
    from virtual_contrast.sequences import BY_CHANNEL

    subject = "vc001"
    anat = tiny_run / layout.COHORT_DIR / f"sub-{subject}" / "ses-01" / "anat"
    t1 = load_image(anat / f"sub-{subject}_ses-01_T1w.nii.gz")
    t2 = load_image(anat / f"sub-{subject}_ses-01_T2w.nii.gz")
    mask = load_image(tiny_run / layout.skull_strip_files(subject)["mask"])
    brain = np.argwhere(np.asanyarray(mask.dataobj) > 0.5)
    points = nib.affines.apply_affine(mask.affine, brain)
    engine = select_backend("simpleitk", threads=1)
    voxel = float(reg.voxel_sizes(t1.affine).max())

    on_edges = reg.register_rigid(t2, t1, mask, engine, feature="gradient")
    on_intensity = reg.register_rigid(t2, t1, mask, engine, feature="intensity")
    assert _rigid_error(on_edges.transform, points) < 2 * voxel
    assert _rigid_error(on_intensity.transform, points) > 4 * voxel  # why the T2 row asks for edges
    assert BY_CHANNEL["T2w"].align_feature == "gradient"
    assert {BY_CHANNEL[c].align_feature for c in ("FLAIR", "lowT1c", "refT1c")} == {"intensity"}
    with pytest.raises(ValueError, match="feature"):
        reg.register_rigid(t2, t1, mask, engine, feature="edges")


def test_a_registration_is_the_same_to_the_bit_in_a_fresh_process(tiny_run: Path, tmp_path: Path):
    """`virtual-contrast register` twice on one cohort head, each in its own process, as two workflow runs (or
    a local and a SLURM run) would: the same transform to the last digit. With ITK on all cores the two
    differed by up to 2e-5 mm (the metric's sums followed the threads' schedule)."""
    from virtual_contrast import layout

    subject = "vc001"
    anat = tiny_run / "results" / "cohort" / f"sub-{subject}" / "ses-01" / "anat"
    command = [
        sys.executable, "-c", "import sys; from virtual_contrast.cli import main; sys.exit(main())",
        "register", "--moving", str(anat / f"sub-{subject}_ses-01_T1w.nii.gz"),
        "--moving-mask", str(tiny_run / layout.skull_strip_files(subject)["mask"]),
        "--reference", str(tiny_run / "results" / "atlas" / "res-4.0mm" / "atlas_T1w.nii.gz"),
        "--backend", "simpleitk", "--subject", subject,
    ]  # fmt: skip
    transforms = []
    for run in ("first", "second"):
        out = tmp_path / run / "t1_atlas.nii.gz"
        out.parent.mkdir()
        proc = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        transforms.append(reg.transform_path_for(out).read_text())
    assert transforms[0] == transforms[1]
