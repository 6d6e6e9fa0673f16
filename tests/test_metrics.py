"""Voxel metrics: equal to scikit-image / scikit-learn on the real BraTS volumes, Table 3 aggregation, the
standalone ``metrics`` command, and the evaluation figures."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage, stats
from skimage.filters import threshold_otsu
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from virtual_contrast.cli import main
from virtual_contrast.evaluate import figures
from virtual_contrast.evaluate import metrics as M
from virtual_contrast.io import InputError, save_image


def _skimage_ssim(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    _, full = structural_similarity(
        pred,
        ref,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1.0,
        full=True,
    )
    return float(full[mask].mean())


@pytest.fixture(scope="module")
def brats(shared_data) -> dict[str, np.ndarray]:
    """BraTS-MET-00110: t1n as pre, t1c as ref, a blurred and noisy t1c as pred; each normalised (1st and 99th
    brain percentiles at 0 and 1, not clipped; brain = t1n > 0)."""
    folder = shared_data / "brats_met_00110"
    pre = np.asarray(nib.load(folder / "BraTS-MET-00110-000-t1n.nii.gz").dataobj, np.float32)
    ref = np.asarray(nib.load(folder / "BraTS-MET-00110-000-t1c.nii.gz").dataobj, np.float32)
    mask = pre > 0
    rng = np.random.default_rng(0)
    pred = 0.85 * ndimage.gaussian_filter(ref, 1.2) + 0.15 * pre
    pred += rng.normal(0, 15, ref.shape).astype(np.float32)
    return {
        "pre": M.normalize_percentiles(pre, mask),
        "ref": M.normalize_percentiles(ref, mask),
        "pred": M.normalize_percentiles(pred, mask),
        "mask": mask,
    }


@pytest.mark.shared_data
def test_metrics_equal_skimage_and_sklearn_on_brats(brats) -> None:
    full = {k: brats[k] for k in ("pred", "ref", "pre")}
    mask = brats["mask"]
    assert max(float(full[k][mask].max()) for k in full) > 2.0  # the full dose above 1: not clipped
    ours = M.subject_voxel_metrics(full["pred"], full["ref"], full["pre"], mask)
    # The full-range rows score the images as they are, data range 1 (the 1st-99th percentile span) ...
    assert ours["ssim_full_range"] == pytest.approx(
        _skimage_ssim(full["pred"], full["ref"], mask), abs=1e-4
    )
    assert ours["psnr_full_range"] == pytest.approx(
        peak_signal_noise_ratio(full["ref"][mask], full["pred"][mask], data_range=1.0), abs=1e-4
    )
    # ... and the paper's rows score the paper's normalisation: the same images clipped to [0, 1].
    pred, ref, pre = (np.clip(full[k], 0, 1) for k in ("pred", "ref", "pre"))
    assert ours["ssim"] != pytest.approx(ours["ssim_full_range"], abs=1e-3)

    assert ours["ssim"] == pytest.approx(_skimage_ssim(pred, ref, mask), abs=1e-4)
    assert ours["psnr"] == pytest.approx(
        peak_signal_noise_ratio(ref[mask], pred[mask], data_range=1.0), abs=1e-4
    )
    ref_enh = np.clip(ref - pre, 0, None)[mask]
    score = np.clip(pred - pre, 0, None)[mask]
    labels = ref_enh > threshold_otsu(ref_enh)
    assert ours["auc"] == pytest.approx(roc_auc_score(labels, score), abs=1e-4)
    fpr, tpr, _ = sk_roc_curve(labels, score)
    best = int(np.argmax(tpr - fpr))
    assert ours["youden_sensitivity"] == pytest.approx(tpr[best], abs=1e-4)
    assert ours["youden_specificity"] == pytest.approx(1 - fpr[best], abs=1e-4)
    # the comparison is not vacuous: a real, imperfect prediction
    assert 0.5 < ours["ssim"] < 0.99 and 0.9 < ours["auc"] < 1.0
    assert ours["n_brain_voxels"] == int(mask.sum())


def test_ssim_matches_skimage_when_the_mask_touches_the_volume_border() -> None:
    rng = np.random.default_rng(1)
    ref = rng.random((30, 26, 22))
    ref = ndimage.gaussian_filter(ref, 1.0)
    pred = np.clip(ref + 0.05 * rng.standard_normal(ref.shape), 0, 1)
    for mask in (
        np.ones(ref.shape, bool),
        np.pad(np.ones((10, 8, 6), bool), ((0, 20), (9, 9), (16, 0))),
    ):
        assert M.ssim(pred, ref, mask) == pytest.approx(_skimage_ssim(pred, ref, mask), abs=1e-12)


def test_identical_images_score_perfectly_and_constant_reference_is_an_error() -> None:
    rng = np.random.default_rng(2)
    pre = rng.random((20, 20, 20)).astype(np.float32) * 0.5
    ref = pre.copy()
    ref[5:10, 5:10, 5:10] += 0.4
    mask = np.ones(ref.shape, bool)
    m = M.subject_voxel_metrics(ref, ref, pre, mask)
    assert m["ssim"] == pytest.approx(1.0) and m["psnr"] == float("inf") and m["auc"] == 1.0
    assert m["youden_sensitivity"] == 1.0 and m["youden_specificity"] == 1.0
    with pytest.raises(InputError, match="constant"):
        M.subject_voxel_metrics(pre, pre, pre, mask)
    with pytest.raises(InputError, match="same shape"):
        M.subject_voxel_metrics(ref[:-1], ref, pre, mask)


def test_roc_curve_equals_sklearn_with_ties() -> None:
    rng = np.random.default_rng(3)
    labels = rng.random(5000) < 0.2
    scores = np.round(rng.random(5000) + 0.5 * labels, 1)  # many ties
    curve = M.roc_curve(labels, scores)
    fpr, tpr, thr = sk_roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(curve.fpr, fpr)
    np.testing.assert_allclose(curve.tpr, tpr)
    np.testing.assert_allclose(curve.thresholds[1:], thr[1:])
    assert curve.auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    grid = curve.on_grid(np.array([0.0, 0.5, 1.0]))
    assert grid[-1] == 1.0 and 0 < grid[1] < 1


def test_table3_aggregate_is_a_paired_t_test() -> None:
    rng = np.random.default_rng(4)
    rows = []
    for i in range(8):
        for modality, shift in (("low", 0.0), ("vir", 0.06)):
            rows.append(
                {
                    "subject": f"s{i}",
                    "modality": modality,
                    "ssim": 0.80 + shift + 0.02 * rng.standard_normal(),
                    "psnr": 27 + 60 * shift + rng.standard_normal(),
                    "auc": 0.96 + shift / 3,
                    "youden_sensitivity": 0.9,
                    "youden_specificity": 0.9,
                }
            )
    df = pd.DataFrame(rows)
    table = M.aggregate_voxel_metrics(df).set_index("metric")
    wide = df.pivot(index="subject", columns="modality", values="ssim")
    expected = stats.ttest_rel(wide["vir"], wide["low"])
    assert table.loc["ssim", "p_value"] == pytest.approx(expected.pvalue)
    assert table.loc["ssim", "vir_mean"] == pytest.approx(wide["vir"].mean())
    assert table.loc["ssim", "low_sd"] == pytest.approx(wide["low"].std(ddof=1))
    assert np.isnan(table.loc["youden_sensitivity", "p_value"])  # no variation: no test
    md = M.table3_markdown(table.reset_index())
    assert f"| SSIM (%) | {100 * wide['low'].mean():.1f} (±{100 * wide['low'].std():.1f})" in md
    assert "paired t-tests" in md


def test_table3_prints_the_decimals_that_tell_close_means_apart():
    """Two AUCs of 99.953 and 99.963 % with spreads of 0.036 and 0.018 points print as 99.95 and 99.96, not as
    100.0 and 100.0; spreads of a few tenths keep the paper's one decimal."""
    rows = []
    for i, (low, vir) in enumerate([(0.99920, 0.99945), (0.99950, 0.99965), (0.99990, 0.99980)]):
        for modality, auc in (("low", low), ("vir", vir)):
            rows.append(
                {"subject": f"s{i}", "modality": modality, "auc": auc, "ssim": 0.99 - 0.002 * i}
            )
    for column in ("psnr", "youden_sensitivity", "youden_specificity"):
        for row in rows:
            row[column] = 0.5
    md = M.table3_markdown(M.aggregate_voxel_metrics(pd.DataFrame(rows)))
    assert "| AUC (%) | 99.95 (±0.04) | 99.96 (±0.02) |" in md
    assert md.startswith("| | low-T1c | vir-T1c |")
    # A study whose low dose is simulated says so in the table's header.
    simulated = M.table3_markdown(
        M.aggregate_voxel_metrics(pd.DataFrame(rows)), labels={"low": "simulated low-T1c"}
    )
    assert simulated.startswith("| | simulated low-T1c | vir-T1c |")
    assert "| SSIM (%) | 98.8 (±0.2) | 98.8 (±0.2) |" in md
    assert M.display_decimals([0.65, 1.1]) == 1
    assert M.display_decimals([0.036, 0.018]) == 2
    assert M.display_decimals([float("nan"), 0.0]) == 1
    assert M.display_decimals([1e-6]) == 3


def test_evaluate_subject_writes_metrics_and_roc(tmp_path) -> None:
    rng = np.random.default_rng(5)
    shape = (24, 24, 20)
    affine = np.eye(4)
    pre = (0.3 + 0.05 * rng.random(shape)).astype(np.float32)
    ref = pre.copy()
    ref[8:14, 8:14, 8:12] += 0.5
    low = pre + 0.25 * (ref - pre)
    vir = pre + 0.9 * (ref - pre)
    mask = np.zeros(shape, np.float32)
    mask[2:22, 2:22, 2:18] = 1
    paths = {}
    for name, data in (("pre", pre), ("ref", ref), ("low", low), ("vir", vir), ("mask", mask)):
        paths[name] = save_image(data, affine, tmp_path / f"{name}.nii.gz")
    table = M.evaluate_subject(
        "s1",
        candidates={"low": paths["low"], "vir": paths["vir"]},
        ref=paths["ref"],
        pre=paths["pre"],
        mask=paths["mask"],
        out_metrics=tmp_path / "m.tsv",
        out_roc=tmp_path / "roc.tsv",
    )
    assert list(table["modality"]) == ["low", "vir"]
    assert (
        table.set_index("modality").loc["vir", "ssim"]
        > table.set_index("modality").loc["low", "ssim"]
    )
    written = pd.read_csv(tmp_path / "m.tsv", sep="\t")
    assert tuple(written.columns) == M.METRIC_COLUMNS
    roc = pd.read_csv(tmp_path / "roc.tsv", sep="\t")
    assert len(roc) == 2 * len(M.ROC_FPR_GRID)

    # Figure 5 from two subjects' curves; Figure 4 montage
    roc2 = roc.assign(subject="s2", tpr=np.clip(roc["tpr"] * 0.98, 0, 1))
    curves = pd.concat([roc, roc2])
    mean = figures.mean_roc(curves)
    band = mean[mean["modality"] == "vir"]
    assert (band["low"] <= band["tpr"] + 1e-12).all() and (
        band["tpr"] <= band["high"] + 1e-12
    ).all()
    assert (band["n"] == 2).all() and (band["high"] > band["low"]).any()
    png = figures.plot_mean_roc(curves, tmp_path / "fig" / "roc.png", metrics=written)
    assert png.read_bytes()[:4] == b"\x89PNG"
    montage = figures.plot_montage(
        {"t1": pre, "flair": pre, "adc": pre * 3e-3, "low": low, "vir": vir, "ref": ref},
        tmp_path / "fig" / "montage.png",
        title="s1",
    )
    assert montage.read_bytes()[:4] == b"\x89PNG"
    assert figures.select_axial_slice(ref, pre, mask) in range(8, 12)
    assert not list((tmp_path / "fig").glob(".*"))  # no temporary file left behind


def test_the_montage_slice_avoids_the_skull_base_however_bright():
    """A real head's most enhancing slices are at the skull base (sinuses, with little brain): the montage
    shows the lesion in the brain's body instead."""
    shape = (24, 24, 20)
    pre = np.full(shape, 0.3, np.float32)
    mask = np.zeros(shape, bool)
    mask[4:20, 4:20, 6:18] = True  # the brain's body
    mask[10:14, 10:14, 1:6] = True  # the skull base: a small cross-section
    ref = pre.copy()
    ref[10:14, 10:14, 2] = 1.0  # a venous sinus: the most enhancement of any slice
    ref[8:11, 8:11, 11:13] = 0.8  # a lesion
    assert (ref - pre)[:, :, 2].sum() > (ref - pre)[:, :, 11].sum()
    assert figures.select_axial_slice(ref, pre, mask) in (11, 12)
    # Nothing enhancing in the brain's body: its largest slice, not the sinus.
    ref[8:11, 8:11, 11:13] = 0.3
    assert figures.select_axial_slice(ref, pre, mask) in range(6, 18)


def _write_case(tmp_path, *, scale: float = 1.0):
    rng = np.random.default_rng(6)
    shape = (20, 20, 16)
    pre = (0.3 + 0.1 * rng.random(shape)).astype(np.float32)
    ref = pre.copy()
    ref[6:12, 6:12, 6:10] += 0.5
    pred = np.clip(ref + 0.03 * rng.standard_normal(shape), 0, 1).astype(np.float32)
    mask = np.ones(shape, np.float32)
    paths = []
    for name, data in (
        ("pred", pred * scale),
        ("ref", ref * scale),
        ("pre", pre * scale),
        ("mask", mask),
    ):
        paths += [f"--{name}", str(save_image(data, np.eye(4), tmp_path / f"{name}.nii.gz"))]
    return paths


def test_cli_metrics_prints_json(tmp_path, capsys) -> None:
    args = _write_case(tmp_path)
    assert main(["metrics", *args]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("ssim", "psnr", "auc", "youden_sensitivity", "youden_specificity"):
        assert isinstance(out[key], float)
    assert 0.5 < out["ssim"] < 1 and out["auc"] > 0.9


def test_cli_metrics_refuses_unnormalised_images_unless_asked(tmp_path, capsys) -> None:
    args = _write_case(tmp_path, scale=900.0)
    assert main(["metrics", *args]) == 2
    assert "pred is not normalised: brain values span" in capsys.readouterr().err
    assert main(["metrics", *args, "--normalize"]) == 0
    assert json.loads(capsys.readouterr().out)["auc"] > 0.9


def test_cli_metrics_refuses_different_grids(tmp_path, capsys) -> None:
    args = _write_case(tmp_path)
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    save_image(np.ones((20, 20, 16)), shifted, tmp_path / "mask.nii.gz")
    assert main(["metrics", *args]) == 2
    assert "different affines" in capsys.readouterr().err
