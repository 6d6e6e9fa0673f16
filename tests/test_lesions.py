"""The automated reader (``auto``): blobs and rings of 5-30 mm are kept with their centre and axes, tubes of any
orientation, sheets and vessel trees are rejected, on synthetic volumes at 1, 2 and 4 mm, and on a real case."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from virtual_contrast.cli import build_parser, main
from virtual_contrast.config import schema_defaults
from virtual_contrast.evaluate import lesions as L
from virtual_contrast.evaluate import shape
from virtual_contrast.evaluate.candidates import calibrated_enhancement, intensity_mapping
from virtual_contrast.io import InputError, save_image

SETTINGS = L.DetectorSettings.from_schema()
EXTENT_MM = 72.0


def grid(voxel: float, extent: float = EXTENT_MM) -> tuple[np.ndarray, np.ndarray]:
    """Affine and world coordinates (mm, centred on 0) of a cube of side ``extent`` mm."""
    n = int(round(extent / voxel))
    affine = np.diag([voxel, voxel, voxel, 1.0])
    affine[:3, 3] = -(n - 1) * voxel / 2
    ijk = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), axis=-1)
    return affine, ijk @ affine[:3, :3].T + affine[:3, 3]


def partial(distance_inside: np.ndarray, voxel: float) -> np.ndarray:
    """Fraction of a voxel inside a surface, from the signed distance (positive inside): a linear ramp over
    one voxel, as partial volume."""
    return np.clip(distance_inside / voxel + 0.5, 0, 1)


def brain(world: np.ndarray, voxel: float, *, seed: int = 0, noise: float = 0.02):
    """pre and post images of a brain ball of radius 34 mm (grey 0.4, post scaled and shifted like an
    independently normalised image) and its mask; the caller adds enhancement to post."""
    rng = np.random.default_rng(seed)
    mask = np.linalg.norm(world, axis=-1) < 34.0
    pre = np.where(mask, 0.4, 0.0) + noise * rng.standard_normal(mask.shape)
    post = np.where(mask, 0.4, 0.0) + noise * rng.standard_normal(mask.shape)
    return pre.astype(np.float32) * mask, post.astype(np.float32) * mask, mask


def ball(world, centre, diameter, voxel):
    return partial(diameter / 2 - np.linalg.norm(world - np.asarray(centre), axis=-1), voxel)


def ring(world, centre, diameter, voxel, wall=3.0):
    r = np.linalg.norm(world - np.asarray(centre), axis=-1)
    return partial(diameter / 2 - r, voxel) - partial(diameter / 2 - wall - r, voxel)


def tube(world, centre, direction, diameter, length, voxel):
    d = np.asarray(direction, float) / np.linalg.norm(direction)
    rel = world - np.asarray(centre)
    along = rel @ d
    across = np.linalg.norm(rel - along[..., None] * d, axis=-1)
    inside = np.minimum(diameter / 2 - across, length / 2 - np.abs(along))
    return partial(inside, voxel)


def read(post, pre, mask, affine, **changes) -> L.Candidates:
    return L.find_candidates(post, pre, mask, affine, SETTINGS.replace(**changes))


@pytest.mark.parametrize("voxel", [1.0, 2.0])
@pytest.mark.parametrize(
    ("kind", "diameter"),
    [
        ("nodule", 5.0),
        ("nodule", 10.0),
        ("nodule", 20.0),
        ("nodule", 30.0),
        ("ring", 12.0),
        ("ring", 30.0),
    ],
)
def test_blobs_and_rings_of_5_to_30_mm_are_kept_with_centre_and_axes(voxel, kind, diameter):
    affine, world = grid(voxel)
    pre, post, mask = brain(world, voxel)
    centre = (3.3, -2.1, 1.7)
    shape_ = ball if kind == "nodule" else ring
    post = post + 0.5 * shape_(world, centre, diameter, voxel).astype(np.float32) * mask
    det = L.detect_lesions(post, pre, mask, affine, SETTINGS)
    assert len(det) == 1, det
    row = det.iloc[0]
    assert np.linalg.norm(row[["x_mm", "y_mm", "z_mm"]].to_numpy(float) - centre) < max(voxel, 1.0)
    assert row["long_axis_mm"] == pytest.approx(diameter, abs=1.5 * voxel)
    assert row["short_axis_mm"] == pytest.approx(diameter, abs=1.5 * voxel)
    assert row["axis_ratio"] > 0.8 and row["tubularity"] < 0.3


@pytest.mark.parametrize("voxel", [1.0, 2.0])
@pytest.mark.parametrize(
    "direction", [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 2, 0.5), (-1, 1, 1)]
)
def test_a_tube_of_any_orientation_is_rejected(voxel, direction):
    """A vessel of 3 mm diameter and 30 mm length, as bright as a lesion: a candidate, never a lesion."""
    affine, world = grid(voxel)
    pre, post, mask = brain(world, voxel)
    vessel = tube(world, (2.0, -1.0, 0.5), direction, 3.0, 30.0, voxel)
    post = post + 0.6 * vessel.astype(np.float32) * mask
    found = read(post, pre, mask, affine)
    assert len(found.table) >= 1
    assert (found.table["status"] == "elongated").any()
    assert found.lesions(SETTINGS.threshold).empty


def test_a_vessel_tree_and_a_dural_sheet_are_rejected_a_lesion_beside_them_is_kept():
    affine, world = grid(1.0)
    pre, post, mask = brain(world, 1.0)
    # A branching vessel: a trunk and three branches in different directions, joined at one point.
    tree = np.maximum.reduce(
        [
            tube(world, (-10.0, 0.0, 0.0), (0, 1, 0), 2.5, 36.0, 1.0),
            tube(world, (-4.0, 8.0, 0.0), (1, 0.3, 0), 2.5, 14.0, 1.0),
            tube(world, (-4.0, -8.0, 3.0), (1, -0.2, 0.8), 2.5, 14.0, 1.0),
            tube(world, (-14.0, 5.0, -4.0), (-0.5, 0, 1), 2.5, 12.0, 1.0),
        ]
    )
    # A curved sheet 2 mm thick at 26-28 mm from the centre, over a cap (dura-like, inside the mask).
    r = np.linalg.norm(world, axis=-1)
    sheet = partial(np.minimum(r - 26.0, 28.0 - r), 1.0) * (world[..., 2] > 14.0)
    nodule = ball(world, (14.0, 0.0, -8.0), 10.0, 1.0)
    post = post + (0.6 * tree + 0.6 * sheet + 0.4 * nodule).astype(np.float32) * mask
    found = read(post, pre, mask, affine)
    lesions = found.lesions(SETTINGS.threshold)
    assert len(lesions) == 1
    assert lesions.loc[0, ["x_mm", "y_mm", "z_mm"]].to_numpy(float) == pytest.approx(
        [14.0, 0.0, -8.0], abs=1.0
    )
    rejected = set(found.table.loc[found.table["status"] != L.LESION, "status"])
    assert rejected and rejected <= {"elongated", "branching", "tubular", "surface"}


def test_on_a_4mm_grid_a_10mm_nodule_is_kept_and_a_vessel_rejected():
    affine, world = grid(4.0, extent=96.0)
    pre, post, mask = brain(world, 4.0)
    lesion = ball(world, (6.0, -6.0, 2.0), 12.0, 4.0)
    vessel = tube(world, (-10.0, 10.0, 0.0), (1, 1, 0.3), 3.0, 40.0, 4.0)
    post = post + (0.45 * lesion + 0.6 * vessel).astype(np.float32) * mask
    lesions = read(post, pre, mask, affine).lesions(SETTINGS.threshold)
    assert len(lesions) == 1
    assert lesions.loc[0, ["x_mm", "y_mm", "z_mm"]].to_numpy(float) == pytest.approx(
        [6.0, -6.0, 2.0], abs=4.0
    )


def test_a_nodule_touching_a_sinus_in_the_prior_stays_a_lesion_of_its_own():
    """A 20 mm nodule (enhancement 0.35) touching a brighter sinus (0.8) through a bright bridge: without the
    prior the two are one object, whose half-maximum core is the sinus alone, so the nodule has no candidate;
    with the sinus in the prior, objects do not cross the prior's edge and the nodule is found (on the cohort
    at 2.5 mm a 29 mm nodule was lost this way)."""
    affine, world = grid(2.0)
    pre, post, mask = brain(world, 2.0)
    sinus = tube(world, (-8.0, 0.0, 0.0), (0, 1, 0), 6.0, 50.0, 2.0)
    nodule = ball(world, (5.0, 0.0, 0.0), 20.0, 2.0)
    post = post + np.maximum(0.8 * sinus, 0.35 * nodule).astype(np.float32) * mask
    prior = tube(world, (-8.0, 0.0, 0.0), (0, 1, 0), 8.0, 54.0, 2.0) > 0.5

    def near_nodule(table: pd.DataFrame) -> pd.DataFrame:
        centre = table[["x_mm", "y_mm", "z_mm"]].to_numpy(float)
        return table[np.linalg.norm(centre - [5.0, 0.0, 0.0], axis=1) < 4.0]

    merged = read(post, pre, mask, affine).table
    assert near_nodule(merged).empty, merged
    found = L.find_candidates(post, pre, mask, affine, SETTINGS, prior=prior)
    lesions = near_nodule(found.lesions(SETTINGS.threshold))
    assert len(lesions) == 1, found.table
    assert lesions.iloc[0]["long_axis_mm"] == pytest.approx(20.0, abs=3.0)
    assert (found.table["status"] == "prior").any()


def test_noise_specks_the_surface_and_the_prior_give_no_lesion():
    affine, world = grid(1.0)
    pre, post, mask = brain(world, 1.0, noise=0.03)
    assert L.detect_lesions(post, pre, mask, affine, SETTINGS).empty
    speck = post.copy()
    speck[36, 36, 36:38] += 0.6  # 2 mm3: below the minimum volume
    assert L.detect_lesions(speck, pre, mask, affine, SETTINGS).empty
    # an enhancing cap at the mask's surface (a rim of dura) does not reach min_depth_mm into the brain
    r = np.linalg.norm(world, axis=-1)
    rim = post + 0.5 * ((r > 32.0) & (r < 34.0) & (world[..., 0] > 20)) * mask
    found = read(rim, pre, mask, affine)
    assert found.lesions(SETTINGS.threshold).empty and "surface" in set(found.table["status"])
    # a blob where physiological enhancement sits in most brains (the prior) is not a lesion
    blob = post + 0.5 * ball(world, (0.0, 8.0, 0.0), 10.0, 1.0).astype(np.float32) * mask
    prior = np.linalg.norm(world - [0.0, 8.0, 0.0], axis=-1) < 6.0
    assert len(L.detect_lesions(blob, pre, mask, affine, SETTINGS)) == 1
    assert L.detect_lesions(blob, pre, mask, affine, SETTINGS, prior=prior).empty


def test_the_decision_threshold_is_on_the_lesion_score():
    """score = peak x (1 - tubularity) x (1 - prior overlap): a ball's score is about 0.9 of its peak; half
    inside the prior, half of that."""
    affine, world = grid(1.0)
    pre, post, mask = brain(world, 1.0)
    post = post + 0.25 * ball(world, (0.0, 0.0, 0.0), 12.0, 1.0).astype(np.float32) * mask
    found = read(post, pre, mask, affine)
    row = found.table[found.table["status"] == L.LESION].iloc[0]
    assert 0.2 < row["max_enhancement"] < 0.3
    assert row["score"] == pytest.approx(row["max_enhancement"] * (1 - row["tubularity"]), rel=1e-6)
    score = float(row["score"])
    assert len(found.lesions(score - 0.01)) == 1 and found.lesions(score + 0.01).empty
    labels = found.lesion_labels(score - 0.01)
    assert set(np.unique(labels)) == {0, 1} and labels.dtype == np.int16
    prior = world[..., 0] < 0
    half = L.find_candidates(
        post, pre, mask, affine, SETTINGS.replace(max_prior_overlap=1.01), prior=prior
    )
    row = half.table.iloc[0]
    assert row["prior_overlap"] == pytest.approx(0.5, abs=0.1)
    assert row["score"] == pytest.approx(score * (1 - row["prior_overlap"]), rel=0.05)


def test_enhancement_maps_pre_onto_post_before_subtracting():
    """Independently normalised images: post = 0.6 pre - 0.1 on unenhanced tissue. The map must be ~0 there
    and show the lesion's enhancement on the post image's scale."""
    affine, world = grid(2.0)
    rng = np.random.default_rng(3)
    mask = np.linalg.norm(world, axis=-1) < 34.0
    pre = (0.5 + 0.3 * np.tanh(world[..., 0] / 10) + 0.01 * rng.standard_normal(mask.shape)) * mask
    post = (0.6 * pre - 0.1) * mask
    lesion = ball(world, (5.0, 5.0, 5.0), 12.0, 2.0) * mask
    post = (post + 0.3 * lesion).astype(np.float32)
    slope, intercept = intensity_mapping(pre, post, mask)
    assert slope == pytest.approx(0.6, abs=0.02) and intercept == pytest.approx(-0.1, abs=0.02)
    enh = calibrated_enhancement(post, pre, mask, affine, smoothing_mm=0.0)
    assert np.percentile(enh[mask & (lesion == 0)], 95) < 0.03
    assert enh[mask & (lesion == 1)].mean() == pytest.approx(0.3, abs=0.03)


def test_tubularity_agrees_with_scikit_image_frangi_on_an_isotropic_grid():
    from skimage.filters import frangi

    affine, world = grid(1.0, extent=48.0)
    image = (0.5 * tube(world, (0, 0, 0), (1, 2, 0.5), 3.0, 40.0, 1.0)).astype(np.float32)
    where = image > 0.25
    ours = shape.tubularity_map(image, affine, [1.0, 2.0], where)[where]
    # gamma -> 0 turns scikit-image's structureness factor into 1 where there is structure
    theirs = frangi(image, sigmas=[1.0, 2.0], black_ridges=False, gamma=1e-9)[where]
    assert np.median(ours) == pytest.approx(np.median(theirs), abs=0.05)
    assert np.median(ours) > 0.6


def test_scales_and_axes_are_in_mm_on_anisotropic_voxels():
    """The same tube on 1 mm and 1 x 1 x 2 mm voxels: the same tubularity; an ellipsoid's inertia axes."""
    iso, world = grid(1.0, extent=48.0)
    values = []
    for affine in (iso, np.diag([1.0, 1.0, 2.0, 1.0])):
        n = (48, 48, 48) if affine is iso else (48, 48, 24)
        aff = affine.copy()
        aff[:3, 3] = -(np.array(n) - 1) * np.diag(affine)[:3] / 2
        ijk = np.stack(np.meshgrid(*[np.arange(k) for k in n], indexing="ij"), axis=-1)
        w = ijk @ aff[:3, :3].T + aff[:3, 3]
        img = (0.5 * tube(w, (0, 0, 0), (1, 0, 1), 4.0, 40.0, 1.0)).astype(np.float32)
        centre = tuple(np.round(np.linalg.inv(aff) @ [0, 0, 0, 1])[:3].astype(int))
        values.append(shape.tubularity_at(img, aff, centre, 2.0 / np.sqrt(2)))
    assert values[0] > 0.6 and values[1] == pytest.approx(values[0], abs=0.1)
    inside = (world / np.array([15.0, 10.0, 5.0]) ** 1) ** 2
    voxels = np.argwhere(inside.sum(axis=-1) <= 1)
    assert shape.inertia_semi_axes(voxels, iso) == pytest.approx([15.0, 10.0, 5.0], abs=0.3)
    assert shape.inertia_semi_axes(np.array([[3, 3, 3]]), iso) == pytest.approx(
        [0.645] * 3, abs=0.01
    )


def test_axes_use_the_axial_plane_of_any_affine():
    """2 mm voxels with the voxel axes permuted (voxel axis 0 is superior): an ellipsoid elongated along
    world z must still be measured in the axial (x-y) plane."""
    affine = np.array(
        [[0.0, 2.0, 0.0, -48.0], [0.0, 0.0, 2.0, -40.0], [2.0, 0.0, 0.0, -48.0], [0, 0, 0, 1.0]]
    )
    assert shape.axial_axis(affine) == 0
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in (48, 48, 40)], indexing="ij"), axis=-1)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    inside = ((world[..., 0] / 10) ** 2 + (world[..., 1] / 5) ** 2 + (world[..., 2] / 15) ** 2) <= 1
    voxels = np.argwhere(inside)
    long_, short, _ = shape.measure_axes(voxels, affine)
    assert long_ == pytest.approx(20.0, abs=2.1) and short == pytest.approx(10.0, abs=2.1)


def test_settings_come_from_the_schema_and_the_cli_uses_them():
    defaults = schema_defaults("evaluate", "detector")
    assert L.DetectorSettings.from_schema() == L.DetectorSettings(**defaults)
    args = build_parser().parse_args(
        ["detect-lesions", "--post", "a", "--pre", "b", "--mask", "c", "--out", "d"]
    )
    assert {field: getattr(args, field) for field in defaults} == defaults
    with pytest.raises(InputError, match="threshold must be positive"):
        L.DetectorSettings.from_schema(threshold=0)
    with pytest.raises(InputError, match="edge_fraction"):
        L.DetectorSettings.from_schema(edge_fraction=1.0)


def test_bad_inputs_are_clear_errors(tmp_path):
    affine, world = grid(2.0)
    pre, post, mask = brain(world, 2.0)
    with pytest.raises(InputError, match="one shape"):
        L.detect_lesions(post[:-1], pre, mask, affine, SETTINGS)
    for name, data in (("pre", pre), ("post", post * 100), ("mask", mask)):
        save_image(data, affine, tmp_path / f"{name}.nii.gz")
    with pytest.raises(InputError, match="not normalised"):
        L.detect_lesions_from_files(
            post=tmp_path / "post.nii.gz",
            pre=tmp_path / "pre.nii.gz",
            mask=tmp_path / "mask.nii.gz",
        )


def test_subject_reads_give_a_table_and_a_label_volume_per_modality(tmp_path):
    affine, world = grid(2.0)
    pre, post, mask = brain(world, 2.0)
    lesion = ball(world, (0.0, 0.0, 0.0), 14.0, 2.0).astype(np.float32) * mask
    paths = {}
    for name, data in (("pre", pre), ("ref", post + 0.5 * lesion), ("low", post + 0.1 * lesion)):
        paths[name] = save_image(data, affine, tmp_path / f"{name}.nii.gz")
    save_image(mask, affine, tmp_path / "mask.nii.gz")
    table, labels, out_affine = L.detect_subject_reads(
        {"ref": paths["ref"], "low": paths["low"]},
        pre=paths["pre"],
        mask=tmp_path / "mask.nii.gz",
        settings=SETTINGS,
        subject="s1",
    )
    assert table["modality"].tolist() == ["ref"] and (table["subject"] == "s1").all()
    assert labels.shape == (*mask.shape, 3) and np.allclose(out_affine, affine)
    assert labels[..., 0].max() == 1 and labels[..., 1].max() == 0 and labels[..., 2].max() == 0


def test_detections_become_reader_auto_rows_and_the_truth_a_reference_reader():
    from virtual_contrast.reader.stats import reader_stats

    det = pd.DataFrame(
        [[1, 1.0, 2.0, 3.0, 8.0, 6.0]],
        columns=["lesion_id", "x_mm", "y_mm", "z_mm", "long_axis_mm", "short_axis_mm"],
    )
    rows = L.detections_to_reads(det, patient="P1", modality="vir")
    assert rows.columns.tolist()[:3] == ["patient", "reader", "modality"]
    assert rows.loc[0, "reader"] == "auto" and rows.loc[0, "long_axis_mm"] == 8.0
    truth = pd.DataFrame(
        {
            "subject": ["P1", "P1", "P3"],
            "x_mm": [1.0, 30.0, 0.0],
            "y_mm": [2.0, 0.0, 0.0],
            "z_mm": [3.0, 0.0, 0.0],
            "long_axis_mm": [9.0, 12.0, 5.0],
            "short_axis_mm": [7.0, 11.0, 4.0],
        }
    )
    t_lesions, t_reads = L.truth_reader_tables(truth, ["P1", "P2"])
    assert len(t_lesions) == 2 and set(t_lesions["reader"]) == {"truth"}
    assert t_reads["patient"].tolist() == [
        "P1",
        "P2",
    ]  # P2 has no lesion but is read; P3 is not a patient
    empty = det.iloc[0:0]
    a_lesions, a_reads = L.auto_reader_tables(
        {("P1", "low"): empty, ("P1", "vir"): det, ("P2", "low"): empty, ("P2", "vir"): empty}
    )
    tables = reader_stats(
        pd.concat([t_lesions, a_lesions]),
        pd.concat([t_reads, a_reads]),
        __import__("tempfile").mkdtemp(),
        reference_reader="truth",
        thresholds=[0, 10],
    )
    d = tables["detection"].set_index(["modality", "min_long_axis_mm"])
    assert d.loc[("vir", 0.0), "n_reference"] == 2 and d.loc[("vir", 0.0), "true_positives"] == 1
    assert d.loc[("low", 0.0), "true_positives"] == 0 and d.loc[("vir", 10.0), "n_reference"] == 1


def test_cli_detects_with_the_schema_defaults_and_draws_the_overlay(tmp_path, capsys):
    affine, world = grid(2.0)
    pre, post, mask = brain(world, 2.0)
    post = post + 0.5 * ball(world, (4.0, 4.0, 0.0), 14.0, 2.0).astype(np.float32) * mask
    for name, data in (("pre", pre), ("post", post), ("mask", mask)):
        save_image(data, affine, tmp_path / f"{name}.nii.gz")
    common = ["--pre", str(tmp_path / "pre.nii.gz"), "--mask", str(tmp_path / "mask.nii.gz")]
    code = main(
        [
            "detect-lesions",
            "--post",
            str(tmp_path / "post.nii.gz"),
            *common,
            "--subject",
            "s1",
            "--out",
            str(tmp_path / "det.tsv"),
            "--overlay",
            str(tmp_path / "overlay.png"),
            "--labels",
            str(tmp_path / "labels.nii.gz"),
        ]
    )
    assert code == 0
    det = pd.read_csv(tmp_path / "det.tsv", sep="\t")
    assert len(det) == 1 and (det["subject"] == "s1").all()
    assert (tmp_path / "overlay.png").stat().st_size > 5000 and (
        tmp_path / "labels.nii.gz"
    ).exists()
    capsys.readouterr()
    code = main(
        ["detect-lesions", "--post", str(tmp_path / "missing.nii.gz"), *common, "--out", "x.tsv"]
    )
    assert code == 2 and "file not found" in capsys.readouterr().err


@pytest.mark.shared_data
def test_real_metastasis_is_found_without_vessels(shared_data, tmp_path):
    """BraTS-MET-00110 (1 mm, skull-stripped): the CLI with its defaults finds the cystic metastasis of the
    left parieto-occipital lobe (its enhancing posterior wall and nodule) and nothing else: the sinuses,
    cortical veins and choroid plexus that the previous detector reported are rejected."""
    import nibabel as nib

    folder = shared_data / "brats_met_00110"
    t1n = nib.load(folder / "BraTS-MET-00110-000-t1n.nii.gz")
    mask = (np.asarray(t1n.dataobj) > 0).astype(np.uint8)
    nib.save(nib.Nifti1Image(mask, t1n.affine), tmp_path / "mask.nii.gz")
    code = main(
        [
            "detect-lesions",
            "--post",
            str(folder / "BraTS-MET-00110-000-t1c.nii.gz"),
            "--pre",
            str(folder / "BraTS-MET-00110-000-t1n.nii.gz"),
            "--mask",
            str(tmp_path / "mask.nii.gz"),
            "--normalize",
            "--out",
            str(tmp_path / "det.tsv"),
            "--candidates",
            str(tmp_path / "candidates.tsv"),
        ]
    )
    assert code == 0
    det = pd.read_csv(tmp_path / "det.tsv", sep="\t")
    ijk = (np.linalg.inv(t1n.affine) @ np.c_[det[["x_mm", "y_mm", "z_mm"]], np.ones(len(det))].T).T
    # The largest detection is the metastasis: the enhancing wall of the cyst lies around voxel (92, 48, 75),
    # the cyst spans about 40 mm. At most two more, small (below 10 mm) and not elongated.
    assert 1 <= len(det) <= 3, det
    assert np.linalg.norm(ijk[0, :3] - [92, 48, 75]) < 10
    assert 15 < det.loc[0, "long_axis_mm"] < 45
    assert (det["long_axis_mm"].iloc[1:] < 10).all() and (det["axis_ratio"] >= 0.4).all()
    candidates = pd.read_csv(tmp_path / "candidates.tsv", sep="\t")
    bright = candidates[candidates["max_enhancement"] >= 0.3]
    assert (
        bright["status"] != L.LESION
    ).sum() >= 10  # vessels and sinuses were candidates, rejected


def test_the_prior_keeps_what_several_subjects_share():
    a, b, c = (np.zeros((4, 4, 4)) for _ in range(3))
    a[0, 0, 0] = b[0, 0, 0] = c[0, 0, 0] = 1.0  # choroid plexus: in every subject
    a[1, 1, 1] = b[1, 1, 1] = 1.0  # in two of three
    c[2, 2, 2] = 1.0  # one subject's own lesion: never physiological, even when 0.3 x 3 < 1
    m = L.normal_enhancement_mask([a, b, c], threshold=0.5, fraction=0.3)
    assert m[0, 0, 0] and m[1, 1, 1] and not m[2, 2, 2] and m.sum() == 2
    assert L.normal_enhancement_mask([a, b, c], threshold=0.5, fraction=0.9).sum() == 1


def test_the_hessian_at_one_voxel_equals_gaussian_filtering():
    rng = np.random.default_rng(0)
    image = rng.standard_normal((30, 28, 26)).astype(np.float32)
    affine = np.diag([1.0, 1.5, 3.0, 1.0])
    for ijk in ((15, 14, 13), (1, 2, 25)):  # inside, and at the edge (the image is extended)
        where = np.zeros(image.shape, bool)
        where[ijk] = True
        filtered = shape.hessian_eigenvalues(image, shape.voxel_sizes(affine), 2.0, where)[0]
        eig = np.linalg.eigvalsh(shape.hessian_at(image, affine, ijk, 2.0))
        assert eig[np.argsort(np.abs(eig))] == pytest.approx(filtered, abs=1e-5)


def test_detections_export_to_slicer_markups_and_back(tmp_path):
    """The Slicer export of the automated reader's reads: detections -> lesions table -> line markups."""
    from virtual_contrast.reader import slicer

    affine, world = grid(2.0)
    pre, post, mask = brain(world, 2.0)
    post = post + 0.5 * ball(world, (6.0, -4.0, 2.0), 14.0, 2.0).astype(np.float32) * mask
    det = L.detect_lesions(post, pre, mask, affine, SETTINGS)
    lesions, _ = L.auto_reader_tables({("P1", "ref"): det})
    written = slicer.lesions_to_markups(lesions, tmp_path)
    assert len(written) == 2
    back = slicer.markups_to_lesions(
        tmp_path / "auto" / "P1" / "ref", patient="P1", reader="auto", modality="ref"
    )
    assert back.loc[0, ["x_mm", "y_mm", "z_mm"]].to_numpy(float) == pytest.approx(
        det.loc[0, ["x_mm", "y_mm", "z_mm"]].to_numpy(float), abs=1e-3
    )
    assert back.loc[0, "long_axis_mm"] == pytest.approx(det.loc[0, "long_axis_mm"], abs=1e-3)


def test_the_overlay_title_stays_clear_of_the_column_titles(tmp_path, monkeypatch):
    """A tall overlay (many detection rows, three narrow columns): the figure's title drew over the column
    titles of the first row, because tight_layout leaves it no room."""
    from virtual_contrast.evaluate import overlays

    figures = []
    monkeypatch.setattr(overlays.plt, "close", figures.append)
    shape = (40, 40, 40)
    image = np.zeros(shape, np.float32)
    label = np.zeros(shape, np.int32)
    rows = []
    for k in range(12):  # small detections far apart, one per row of the figure (the most it draws)
        at = 3 + 3 * k
        label[at : at + 2, at : at + 2, at] = k + 1
        rows.append(
            {"lesion_id": k + 1, "x_mm": at + 0.5, "y_mm": at + 0.5, "z_mm": float(at),
             "long_axis_mm": 3.0, "short_axis_mm": 2.0, "volume_mm3": 4.0 + k}
        )  # fmt: skip
    table = pd.DataFrame(rows)
    names = ("ref", "low", "vir")
    overlays.plot_detection_overlay(
        dict.fromkeys(names, image), dict.fromkeys(names, label), dict.fromkeys(names, table),
        np.eye(4), tmp_path / "overlay.png",
        title="sub-BraTSMET00110: lesions found by the automated reader, with a long title",
    )  # fmt: skip
    (fig,) = figures
    renderer = fig.canvas.get_renderer()
    heading = fig._suptitle.get_window_extent(renderer)
    column_titles = [ax.title.get_window_extent(renderer) for ax in fig.axes[:3]]
    # A visible gap (0.05 inch): with the title at its default height the two touched (1.6 px) on this
    # figure and overlapped on a real exam's four-column one.
    assert all(heading.y0 - box.y1 >= 0.05 * fig.dpi for box in column_titles)
