"""Automated lesion detection (reader ``auto``) on small synthetic volumes with known lesions, and its
validation per size bin."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from virtual_contrast.cli import main
from virtual_contrast.evaluate import lesions as L
from virtual_contrast.io import InputError, save_image

SHAPE = (48, 48, 40)


def _affine(voxel: float = 1.0) -> np.ndarray:
    aff = np.diag([voxel, voxel, voxel, 1.0])
    aff[:3, 3] = -np.array(SHAPE) * voxel / 2
    return aff


def _world(affine: np.ndarray) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), axis=-1)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def phantom(
    lesions: list[tuple[tuple[float, float, float], float, str]],
    *,
    affine: np.ndarray | None = None,
    noise: float = 0.02,
    enhancement: float = 0.5,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, pd.DataFrame]:
    """pre, post, brain mask, affine and the truth table of spherical nodules and rings (partial volume at
    the edge, Gaussian noise), in the cohort's lesions.tsv columns."""
    affine = _affine() if affine is None else affine
    world = _world(affine)
    rng = np.random.default_rng(seed)
    pre = np.full(SHAPE, 0.4, np.float32)
    r_brain = np.linalg.norm(world / np.array([22.0, 22.0, 18.0]), axis=-1)
    mask = r_brain < 1.0
    post = pre.copy()
    rows = []
    for k, (centre, diameter, kind) in enumerate(lesions, start=1):
        r = np.linalg.norm(world - np.array(centre), axis=-1)
        fill = np.clip(
            diameter / 2 + 0.5 - r, 0, 1
        )  # 1 inside, linear ramp over one voxel at the edge
        if kind == "ring":
            fill -= np.clip(diameter / 2 - 2.0 + 0.5 - r, 0, 1)  # 2 mm thick wall
        post += enhancement * fill
        rows.append(
            {
                "subject": "s1",
                "lesion_id": k,
                "x_mm": centre[0],
                "y_mm": centre[1],
                "z_mm": centre[2],
                "long_axis_mm": diameter,
                "short_axis_mm": diameter,
                "diameter_mm": diameter,
                "kind": kind,
            }
        )
    pre = pre + noise * rng.standard_normal(SHAPE).astype(np.float32)
    post = post + noise * rng.standard_normal(SHAPE).astype(np.float32)
    return pre * mask, post * mask, mask, affine, pd.DataFrame(rows)


LESIONS = [
    ((-10.0, -10.0, -6.0), 4.0, "nodule"),
    ((10.0, -10.0, 0.0), 6.0, "nodule"),
    ((-9.0, 9.0, 4.0), 10.0, "nodule"),
    ((8.0, 8.0, -3.0), 16.0, "ring"),
]


def test_detects_every_sphere_with_centre_and_axes() -> None:
    pre, post, mask, affine, truth = phantom(LESIONS)
    det = L.detect_lesions(post, pre, mask, affine)
    assert len(det) == len(LESIONS)
    for t in truth.itertuples():
        d = np.linalg.norm(
            det[["x_mm", "y_mm", "z_mm"]].to_numpy() - [t.x_mm, t.y_mm, t.z_mm], axis=1
        )
        best = det.iloc[int(np.argmin(d))]
        assert d.min() < 0.6, (t.kind, t.diameter_mm)
        assert best["long_axis_mm"] == pytest.approx(t.diameter_mm, abs=1.5)
        assert best["short_axis_mm"] <= best["long_axis_mm"]
        assert best["short_axis_mm"] == pytest.approx(t.diameter_mm, abs=1.5)
    assert det["lesion_id"].tolist() == list(range(1, 5))
    assert det["volume_mm3"].is_monotonic_decreasing


def test_ring_lesion_is_filled_and_measured_edge_to_edge() -> None:
    pre, post, mask, affine, _ = phantom([((0.0, 0.0, 0.0), 18.0, "ring")])
    det = L.detect_lesions(post, pre, mask, affine)
    assert len(det) == 1
    row = det.iloc[0]
    # a filled sphere of 18 mm holds about 3000 voxels; the wall alone about half of that
    assert row["volume_mm3"] > 0.8 * (4 / 3) * np.pi * 9**3
    assert row["long_axis_mm"] == pytest.approx(18.0, abs=1.5)
    assert np.hypot(row["x_mm"], row["y_mm"]) < 0.5


def test_axes_use_the_axial_plane_of_any_affine() -> None:
    """2 mm voxels with the voxel axes permuted (voxel axis 0 is superior): an ellipsoid elongated along
    world z must still be measured in the axial (x-y) plane."""
    affine = np.array(
        [[0.0, 2.0, 0.0, -48.0], [0.0, 0.0, 2.0, -40.0], [2.0, 0.0, 0.0, -48.0], [0, 0, 0, 1.0]]
    )
    assert L.axial_axis(affine) == 0
    world = _world(affine)
    # ellipsoid: 20 mm along x, 10 mm along y, 30 mm along z (z must not enter the axial axes)
    inside = ((world[..., 0] / 10) ** 2 + (world[..., 1] / 5) ** 2 + (world[..., 2] / 15) ** 2) <= 1
    pre = np.zeros(SHAPE, np.float32)
    post = 0.5 * inside.astype(np.float32)
    mask = np.ones(SHAPE, bool)
    det = L.detect_lesions(post, pre, mask, affine, smoothing_mm=0, edge_margin_mm=0)
    assert len(det) == 1
    assert det.loc[0, "long_axis_mm"] == pytest.approx(20.0, abs=2.1)
    assert det.loc[0, "short_axis_mm"] == pytest.approx(10.0, abs=2.1)


def test_noise_and_tiny_blobs_and_excluded_voxels_give_no_lesion() -> None:
    pre, post, mask, affine, _ = phantom([], noise=0.03)
    assert L.detect_lesions(post, pre, mask, affine).empty
    # a 2-voxel speck is below the minimum volume
    post2 = post.copy()
    post2[24, 24, 20:22] += 0.6
    assert L.detect_lesions(post2, pre, mask, affine, smoothing_mm=0, min_volume_mm3=10).empty
    # a lesion inside an exclusion mask (physiological enhancement) is ignored
    pre3, post3, mask3, _, _ = phantom([((0.0, 0.0, 0.0), 8.0, "nodule")])
    exclude = np.zeros(SHAPE, bool)
    exclude[18:30, 18:30, 14:26] = True
    assert len(L.detect_lesions(post3, pre3, mask3, affine)) == 1
    assert L.detect_lesions(post3, pre3, mask3, affine, exclude=exclude).empty


def test_rim_at_the_brain_surface_is_dropped_by_the_edge_margin() -> None:
    pre, post, mask, affine, _ = phantom([])
    world = _world(affine)
    r = np.linalg.norm(world / np.array([22.0, 22.0, 18.0]), axis=-1)
    rim = mask & (r > 0.93) & (world[..., 0] > 10)  # dura-like enhancing rim at the mask's edge
    post = post + 0.5 * rim
    assert L.detect_lesions(post, pre, mask, affine, edge_margin_mm=3.0).empty
    assert len(L.detect_lesions(post, pre, mask, affine, edge_margin_mm=0.0)) >= 1


def test_normal_enhancement_mask_keeps_what_most_subjects_share() -> None:
    a = np.zeros((4, 4, 4))
    a[0, 0, 0] = a[1, 1, 1] = 1.0
    b = np.zeros((4, 4, 4))
    b[0, 0, 0] = 1.0
    c = np.zeros((4, 4, 4))
    c[0, 0, 0] = c[2, 2, 2] = 1.0
    m = L.normal_enhancement_mask([a, b, c], threshold=0.5)
    assert m[0, 0, 0] and m.sum() == 1


def test_bad_inputs_are_clear_errors() -> None:
    pre, post, mask, affine, _ = phantom([])
    with pytest.raises(InputError, match="one shape"):
        L.detect_lesions(post[:-1], pre, mask, affine)
    with pytest.raises(InputError, match="threshold must be positive"):
        L.detect_lesions(post, pre, mask, affine, threshold=0)


def test_validate_detector_counts_per_size_bin() -> None:
    """Truth: the four lesions plus a faint 3 mm one the detector misses; detections: the four plus a false
    positive (an enhancing blob that is no lesion)."""
    lesions = [*LESIONS, ((12.0, -12.0, 10.0), 3.0, "nodule")]
    pre, post, mask, affine, truth = phantom(lesions)
    # make the last lesion faint (below threshold) and add a 7 mm blob that is not in the truth
    world = _world(affine)
    faint = np.linalg.norm(world - np.array([12.0, -12.0, 10.0]), axis=-1) < 2.5
    post = np.where(faint, pre + 0.05, post)
    blob = np.linalg.norm(world - np.array([-12.0, 12.0, -10.0]), axis=-1) < 3.5
    post = post + 0.5 * blob
    det = L.detect_lesions(post, pre, mask, affine)
    det.insert(0, "subject", "s1")
    table = L.validate_detector(det, truth, subjects=["s1", "s2"]).set_index("size_bin")
    assert table.loc["[0, 5)", "n_true"] == 2 and table.loc["[0, 5)", "true_positives"] == 1
    assert (
        table.loc["[5, 10)", "true_positives"] == 1 and table.loc["[5, 10)", "false_positives"] == 1
    )
    assert table.loc["[5, 10)", "ppv"] == pytest.approx(0.5)
    assert table.loc["[10, 20)", "sensitivity"] == 1.0 and table.loc["[10, 20)", "ppv"] == 1.0
    assert table.loc["all", "sensitivity"] == pytest.approx(4 / 5)
    assert table.loc["all", "ppv"] == pytest.approx(4 / 5)
    assert (table["n_subjects"] == 2).all()


def test_validate_detector_needs_the_columns() -> None:
    with pytest.raises(InputError, match="truth table lacks columns"):
        L.validate_detector(
            pd.DataFrame(columns=list(L.TRUTH_COLUMNS)), pd.DataFrame({"subject": ["a"]})
        )


def test_detections_become_reader_auto_rows() -> None:
    det = pd.DataFrame(
        [[1, 1.0, 2.0, 3.0, 8.0, 6.0]],
        columns=["lesion_id", "x_mm", "y_mm", "z_mm", "long_axis_mm", "short_axis_mm"],
    )
    rows = L.detections_to_reads(det, patient="P1", modality="vir")
    assert rows.columns.tolist()[:3] == ["patient", "reader", "modality"]
    assert rows.loc[0, "reader"] == "auto" and rows.loc[0, "long_axis_mm"] == 8.0


def test_auto_reader_runs_the_reader_statistics(tmp_path) -> None:
    """The detector as reader ``auto``: ref and vir detections of two patients (one without lesions) give a
    reader study whose vir sensitivity is 1 and whose FDR counts the lesion-free patient."""
    from virtual_contrast.reader.stats import reader_stats

    pre, post, mask, affine, _ = phantom(LESIONS)
    pre0, post0, mask0, _, _ = phantom([], seed=1)
    detections = {}
    for patient, (a, b, m) in {"P1": (pre, post, mask), "P2": (pre0, post0, mask0)}.items():
        found = L.detect_lesions(b, a, m, affine)
        detections[(patient, "ref")] = found
        detections[(patient, "vir")] = found
    lesions, reads = L.auto_reader_tables(detections)
    assert len(reads) == 4 and set(lesions["reader"]) == {"auto"}
    tables = reader_stats(lesions, reads, tmp_path, reference_reader="auto", thresholds=[0, 12])
    det = tables["detection"].set_index("min_long_axis_mm")
    assert det.loc[0.0, "sensitivity"] == 1.0 and det.loc[0.0, "n_reference"] == 4
    assert det.loc[0.0, "n_patients"] == 2 and det.loc[0.0, "fdr"] == 0.0
    assert det.loc[12.0, "n_reference"] == 1  # only the 16 mm ring is >= 12 mm


def test_cli_detect_and_validate(tmp_path, capsys) -> None:
    pre, post, mask, affine, truth = phantom(LESIONS)
    for name, data in (("pre", pre), ("post", post), ("mask", mask)):
        save_image(data, affine, tmp_path / f"{name}.nii.gz")
    truth.to_csv(tmp_path / "truth.tsv", sep="\t", index=False)
    code = main(
        [
            "detect-lesions",
            "--post",
            str(tmp_path / "post.nii.gz"),
            "--pre",
            str(tmp_path / "pre.nii.gz"),
            "--mask",
            str(tmp_path / "mask.nii.gz"),
            "--subject",
            "s1",
            "--out",
            str(tmp_path / "det.tsv"),
        ]
    )
    assert code == 0
    det = pd.read_csv(tmp_path / "det.tsv", sep="\t")
    assert len(det) == 4 and (det["subject"] == "s1").all()
    code = main(
        [
            "validate-detector",
            "--detections",
            str(tmp_path / "det.tsv"),
            "--truth",
            str(tmp_path / "truth.tsv"),
            "--out",
            str(tmp_path / "val.tsv"),
        ]
    )
    assert code == 0
    val = pd.read_csv(tmp_path / "val.tsv", sep="\t").set_index("size_bin")
    assert val.loc["all", "sensitivity"] == 1.0 and val.loc["all", "ppv"] == 1.0
    capsys.readouterr()
    code = main(
        [
            "detect-lesions",
            "--post",
            str(tmp_path / "missing.nii.gz"),
            "--pre",
            str(tmp_path / "pre.nii.gz"),
            "--mask",
            str(tmp_path / "mask.nii.gz"),
            "--out",
            str(tmp_path / "x.tsv"),
        ]
    )
    assert code == 2 and "file not found" in capsys.readouterr().err
