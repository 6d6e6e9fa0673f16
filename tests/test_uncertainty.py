"""The uncertainty map beside vir-T1c: the spread of the ensemble's passes, its calibration (fitted on
out-of-fold predictions), the files of the workflow and of `virtual-contrast predict`."""

from __future__ import annotations

import dataclasses
import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from toy_subjects import make_toy_subjects

from virtual_contrast import layout
from virtual_contrast.cli import main as cli_main
from virtual_contrast.io import InputError
from virtual_contrast.model.config import TrainConfig
from virtual_contrast.model.out_of_fold import (
    fit_from_files,
    predict_out_of_fold,
    uncertainty_from_files,
)
from virtual_contrast.model.predict import _dims, flip_configs, predict_subject, tta_ensemble
from virtual_contrast.model.train import train_fold
from virtual_contrast.model.uncertainty import (
    FEATURES,
    Calibration,
    _float32_below,
    _tree_sum,
    edge_distance,
    expected_error,
    fit_calibration,
    gaussian_smooth,
)
from virtual_contrast.model.unet import UNet3D, UNetSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _all_passes(models, x):
    """Every pass, un-mirrored, as (models, mirrors, ...): the reference of the running sums."""
    return torch.stack(
        [
            torch.stack([m(x.flip(_dims(c)) if c else x).flip(_dims(c)) for c in flip_configs()])
            for m in models
        ]
    )


def test_the_ensembles_spreads_are_those_of_its_passes():
    torch.manual_seed(0)
    models = []
    for _ in range(3):
        m = UNet3D(UNetSpec(in_channels=2, width=4, depth=3)).eval()
        nn.init.normal_(m.head.weight, std=5.0)
        models.append(m)
    x = torch.rand(1, 2, 8, 12, 8) + 3.0  # an offset: the fp32 variance must not cancel
    with torch.inference_mode():
        passes = _all_passes(models, x)
    ens = tta_ensemble(models, x, amp=False, batch=3)
    flat = passes.reshape(-1, *passes.shape[2:])
    torch.testing.assert_close(ens.mean, flat.mean(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ens.std_passes, flat.std(0, correction=0), atol=2e-5, rtol=1e-3)
    torch.testing.assert_close(
        ens.std_folds, passes.mean(1).std(0, correction=0), atol=2e-5, rtol=1e-3
    )
    within = passes.var(1, correction=0).mean(0).sqrt()
    torch.testing.assert_close(ens.std_mirrors, within, atol=2e-5, rtol=1e-3)
    assert float(ens.std_folds.mean()) > 1e-3 and float(ens.std_mirrors.mean()) > 1e-3
    # One model: no fold disagreement, all of the spread is the mirrors'.
    one = tta_ensemble(models[:1], x, amp=False)
    assert float(one.std_folds.abs().max()) == 0.0
    torch.testing.assert_close(one.std_passes, one.std_mirrors)


def _synthetic_samples(rng, n_subjects=3, n=4000):
    """Voxel features with an error that grows with the 'enhancement' feature (and noise)."""
    samples = []
    for _ in range(n_subjects):
        features = rng.random((n, len(FEATURES))).astype(np.float32)
        scale = 0.01 + 0.2 * features[:, FEATURES.index("enhancement")] ** 2
        samples.append((features, np.abs(rng.normal(0, scale))))
    return samples


def test_the_calibration_learns_which_voxels_err_and_on_which_scale(tmp_path):
    rng = np.random.default_rng(0)
    cal = fit_calibration(_synthetic_samples(rng), ["a", "b", "c"])
    features, error = _synthetic_samples(rng, 1)[0]
    predicted = expected_error(cal, features)
    from scipy.stats import spearmanr

    assert spearmanr(predicted, error)[0] > 0.5
    # On the scale of |error| (Duan's smearing), not of its geometric mean.
    assert 0.8 < predicted.mean() / error.mean() < 1.25
    assert (cal.n_voxels, cal.n_fit_voxels) == (12000, 12000)
    # Each subject gives at most its share of max_voxels (the paper's grid has 1.5 million per subject).
    few = fit_calibration(
        _synthetic_samples(np.random.default_rng(0)), ["a", "b", "c"], max_voxels=3000
    )
    assert (few.n_voxels, few.n_fit_voxels) == (12000, 3000)
    # Stored as JSON and read back to the same map.
    path = cal.save(tmp_path / "cal.json")
    np.testing.assert_allclose(expected_error(Calibration.load(path), features), predicted)
    raw = json.loads(path.read_text())
    raw["trees"][0]["value"] = raw["trees"][0]["value"][:-1]
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(InputError, match="bad.json.*differ in length"):
        Calibration.load(tmp_path / "bad.json")
    raw = json.loads(path.read_text())
    raw["trees"][1]["left"][0] = 0  # a cycle: the root its own child
    (tmp_path / "cycle.json").write_text(json.dumps(raw))
    with pytest.raises(InputError, match="child index out of order"):
        Calibration.load(tmp_path / "cycle.json")
    raw = json.loads(path.read_text())
    chain = 14  # a tree 14 levels deep: 2**14 nodes per voxel as a complete tree
    raw["trees"][0] = {"feature": [0] * chain + [-1] * (chain + 1),
                       "threshold": [0.5] * chain + [0.0] * (chain + 1),
                       "left": [chain + i for i in range(chain)] + [0] * (chain + 1),
                       "right": [i + 1 for i in range(chain - 1)] + [2 * chain] + [0] * (chain + 1),
                       "value": [0.0] * (2 * chain + 1)}  # fmt: skip
    (tmp_path / "deep.json").write_text(json.dumps(raw))
    with pytest.raises(InputError, match="deeper than 12 levels"):
        Calibration.load(tmp_path / "deep.json")
    # A calibration of the earlier, binned kind is named as such.
    (tmp_path / "old.json").write_text(json.dumps({"features": [], "edges": [], "values": []}))
    with pytest.raises(InputError, match="old.json.*earlier version"):
        Calibration.load(tmp_path / "old.json")


def test_the_trees_learn_errors_that_depend_on_two_features_jointly():
    """Large errors only where the network changed the low dose AND at an edge. A sum of one-feature
    functions of log |error| (the calibration before the trees) cannot give 'one of the two' the value of
    'neither' and 'both' twenty times more; the trees do."""
    rng = np.random.default_rng(2)

    def samples(n):
        features = rng.random((n, len(FEATURES))).astype(np.float32)
        changed = features[:, FEATURES.index("correction")] > 0.5
        edge = features[:, FEATURES.index("gradient")] > 0.5
        error = np.abs(rng.normal(0, np.where(changed & edge, 0.2, 0.01)))
        return features, error, changed.astype(int) + edge

    cal = fit_calibration([samples(20000)[:2] for _ in range(2)], ["a", "b"])
    features, _, group = samples(6000)
    predicted = expected_error(cal, features)
    neither, one, both = (np.median(predicted[group == k]) for k in range(3))
    assert 0.67 < one / neither < 1.5
    assert both / neither > 8


def _walk(tree: dict, x: np.ndarray) -> float:
    node = 0
    while tree["feature"][node] >= 0:
        go_left = x[tree["feature"][node]] <= tree["threshold"][node]
        node = tree["left"][node] if go_left else tree["right"][node]
    return tree["value"][node]


def test_the_trees_are_evaluated_as_a_node_by_node_walk_would():
    """Trees of uneven depth (a leaf at the root's side, a split three levels down), padded to complete
    trees for the tensor walk: the same sums as following each voxel's path node by node."""
    lopsided = {"feature": [2, -1, 0, 1, -1, -1, -1], "threshold": [0.5, 0, 0.3, 0.7, 0, 0, 0],
                "left": [1, 0, 3, 5, 0, 0, 0], "right": [2, 0, 4, 6, 0, 0, 0],
                "value": [0, -1.0, 0, 0, 2.0, 3.0, 4.0]}  # fmt: skip
    stump = {"feature": [-1], "threshold": [0.0], "left": [0], "right": [0], "value": [0.25]}
    x = np.random.default_rng(3).random((500, len(FEATURES))).astype(np.float32)  # as the features
    x[:5, 2] = 0.5  # on a threshold: left, as in scikit-learn
    got = _tree_sum(0.5, [lopsided, stump], torch.from_numpy(x.T.copy())).numpy()
    want = [0.5 + _walk(lopsided, v) + _walk(stump, v) for v in x]
    np.testing.assert_allclose(got, want)
    assert set(np.round(got, 6)) == {-0.25, 2.75, 3.75, 4.75}


def test_float32_thresholds_decide_as_float64_ones_do():
    rng = np.random.default_rng(5)
    threshold = rng.random(2000)  # float64, as scikit-learn's
    below = _float32_below(threshold)
    assert below.dtype == np.float32
    # float32 values at, just below and just above each threshold's float32 neighbours
    near = threshold.astype(np.float32)
    for x in (near, np.nextafter(near, np.float32(0)), np.nextafter(near, np.float32(2))):
        np.testing.assert_array_equal(x > below, x.astype(np.float64) > threshold)


def test_a_wrong_export_of_the_trees_stops_the_fit(monkeypatch):
    import virtual_contrast.model.uncertainty as uncertainty

    real = uncertainty._export_trees

    def shifted(model):
        baseline, trees = real(model)
        return baseline + 0.1, trees

    monkeypatch.setattr(uncertainty, "_export_trees", shifted)
    with pytest.raises(RuntimeError, match="do not reproduce scikit-learn"):
        fit_calibration(_synthetic_samples(np.random.default_rng(0), 1, 2000), ["a"])


def test_the_smoothed_features_are_scipys_filters():
    from scipy.ndimage import distance_transform_edt, gaussian_filter

    volume = np.random.default_rng(4).random((12, 14, 10)).astype(np.float32)
    np.testing.assert_allclose(
        gaussian_smooth(torch.from_numpy(volume), 2.0).numpy(),
        gaussian_filter(volume, 2.0, mode="nearest", truncate=4.0),
        atol=1e-5,
    )
    mask = np.zeros((12, 14, 10), bool)
    mask[2:10, 3:13, 1:10] = (
        True  # touches the grid's border at z = 9: the border counts as outside
    )
    distance = edge_distance(mask)
    assert distance[5, 7, 9] == 1 and distance[5, 7, 1] == 1 and distance[0, 0, 0] == 0
    np.testing.assert_array_equal(
        distance[:, :, :9], distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1, 1:-1][:, :, :9]
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two tiny fold models (1 epoch) of toy subjects 0-3 (fold f tuned on subject f), subject 4 held out."""
    root = tmp_path_factory.mktemp("unc")
    subjects = make_toy_subjects(root / "data", 5, (16, 16, 8), seed=3)
    cfg = TrainConfig(width=4, depth=2, epochs=1, threads=1, progress=False)
    models = {}
    for fold in range(2):
        tune = [subjects[fold], subjects[fold + 2]]
        train = [s for s in subjects[:4] if s not in tune]
        models[fold] = train_fold(
            train, tune, root / "models" / f"fold-{fold}", dataclasses.replace(cfg, seed=fold)
        )
    folds = root / "folds.tsv"
    folds.write_text("subject\tfold\n" + "".join(f"toy{i:02d}\t{i % 2}\n" for i in range(4)))
    return root, models, subjects, folds


def test_out_of_fold_calibration_and_the_maps_of_predict(trained, tmp_path):
    root, models, subjects, folds = trained
    items = []
    for sv in subjects[:4]:
        vir, spread = (
            tmp_path / f"{sv.subject}_vir.nii.gz",
            tmp_path / f"{sv.subject}_spread.nii.gz",
        )
        fold = predict_out_of_fold(
            models, folds, sv.subject, sv.channels, vir, spread, mask_path=sv.mask, device="cpu"
        )
        assert fold == int(sv.subject[-2:]) % 2
        # One model: its own passes only, so no fold disagreement in the spread file.
        spreads = nib.load(spread).get_fdata()
        assert spreads.shape[-1] == 3 and np.abs(spreads[..., 1]).max() == 0
        items.append(
            dict(subject=sv.subject, vir=vir, spread=spread, low=sv.channels["lowT1c"],
                 pre=sv.channels["T1w"], ref=sv.target, mask=sv.mask)
        )  # fmt: skip
    cal_path = tmp_path / "uncertainty_calibration.json"
    cal = fit_from_files(items, cal_path)
    assert cal.subjects == ("toy00", "toy01", "toy02", "toy03")
    unc = uncertainty_from_files(cal_path, **{k: items[0][k] for k in ("vir", "spread", "low", "pre", "mask")},
                                 out=tmp_path / "oof_unc.nii.gz", subject="toy00")  # fmt: skip
    assert nib.load(unc).get_fdata().max() > 0
    with pytest.raises(InputError, match="not a training subject"):
        predict_out_of_fold(models, folds, "toy04", subjects[4].channels, tmp_path / "x.nii.gz",
                            tmp_path / "y.nii.gz", device="cpu")  # fmt: skip

    # The held-out subject: the map beside vir-T1c, calibrated, zero outside the brain like vir-T1c.
    sv = subjects[4]
    out = predict_subject(
        list(models.values()), sv.channels, tmp_path / "vir.nii.gz", device="cpu",
        mask_path=sv.mask, uncertainty_path=tmp_path / "unc.nii.gz",
        spread_path=tmp_path / "spread.nii.gz", calibration=cal,
    )  # fmt: skip
    brain = nib.load(sv.mask).get_fdata() > 0.5
    vir = nib.load(out).get_fdata()
    calibrated = nib.load(tmp_path / "unc.nii.gz").get_fdata()
    spreads = nib.load(tmp_path / "spread.nii.gz").get_fdata()
    assert calibrated.shape == vir.shape and (calibrated[~brain] == 0).all()
    assert (calibrated[brain] > 0).all() and (spreads[~brain] == 0).all()
    assert spreads[..., 1][brain].max() > 0  # two models disagree somewhere
    # Without a calibration: the standard deviation over all passes, said so.
    predict_subject(
        list(models.values()), sv.channels, tmp_path / "vir2.nii.gz", device="cpu",
        mask_path=sv.mask, uncertainty_path=tmp_path / "unc2.nii.gz",
    )  # fmt: skip
    np.testing.assert_allclose(
        nib.load(tmp_path / "unc2.nii.gz").get_fdata(), spreads[..., 0], atol=1e-6
    )
    np.testing.assert_allclose(nib.load(tmp_path / "vir2.nii.gz").get_fdata(), vir, atol=1e-6)


def test_the_cli_writes_the_map_with_the_calibration_beside_the_folds(trained, tmp_path, capsys):
    root, models, subjects, folds = trained
    sv = subjects[4]
    args = ["predict", "--models", str(root / "models"), "--channels-dir", str(sv.target.parent),
            "--subject", sv.subject, "--device", "cpu"]  # fmt: skip
    assert cli_main([*args, "--out", str(tmp_path / "a")]) == 0
    said = capsys.readouterr().out
    assert "UNCALIBRATED" in said
    unc = tmp_path / "a" / layout.uncertainty_name(sv.subject)
    assert unc.exists() and (tmp_path / "a" / layout.spread_name(sv.subject)).exists()
    # The workflow's calibration file beside the fold folders is found and applied.
    cal = fit_calibration(_synthetic_samples(np.random.default_rng(1)), ["x"])
    cal.save(root / "models" / layout.UNCERTAINTY_CALIBRATION_NAME)
    try:
        assert cli_main([*args, "--out", str(tmp_path / "b")]) == 0
    finally:
        (root / "models" / layout.UNCERTAINTY_CALIBRATION_NAME).unlink()
    said = capsys.readouterr().out
    assert "expected |vir - ref|" in said and layout.UNCERTAINTY_CALIBRATION_NAME in said
    calibrated = nib.load(tmp_path / "b" / layout.uncertainty_name(sv.subject)).get_fdata()
    assert not np.allclose(calibrated, nib.load(unc).get_fdata())


# --- evaluation: calibration scores, reliability, per lesion ------------------------------------------


def test_calibration_scores_rank_the_largest_errors():
    from virtual_contrast.evaluate.uncertainty import calibration_scores, reliability_table

    rng = np.random.default_rng(0)
    scale = rng.random(20000) * 0.1
    error = np.abs(rng.normal(0, scale))
    good = calibration_scores(scale, error)
    assert good["spearman"] > 0.4 and good["auc_top1"] > 0.85
    blind = calibration_scores(rng.random(20000), error)
    assert abs(blind["spearman"]) < 0.05 and 0.4 < blind["auc_top1"] < 0.6
    assert np.isnan(calibration_scores(np.ones(100), rng.random(100))["spearman"])
    # E|N(0, s)| = s * sqrt(2 / pi): a map of that is calibrated, bin by bin.
    table = reliability_table(scale * np.sqrt(2 / np.pi), error, n_bins=5)
    assert len(table) == 5 and table["n_voxels"].sum() == 20000
    np.testing.assert_allclose(table["observed"], table["predicted"], rtol=0.1)


def test_false_positives_and_misses_are_told_from_true_positives_with_their_uncertainty():
    from virtual_contrast.evaluate.uncertainty import (
        lesion_uncertainty,
        outcome_summary,
        uncertainty_by_outcome,
    )

    labels = np.zeros((10, 10, 10), int)
    labels[1:3, 1:3, 1:3] = 1
    labels[6:8, 6:8, 6:8] = 2
    unc = np.full(labels.shape, 0.01)
    unc[6:8, 6:8, 6:8] = 0.2
    unc[4, 8, 2] = 0.5  # where a true lesion lies that no detection found
    np.testing.assert_allclose(lesion_uncertainty(labels, unc, [2, 1]), [0.2, 0.01])
    affine = np.eye(4)  # 1 mm voxels, world = voxel indices
    lesion = dict(long_axis_mm=2.0, short_axis_mm=2.0)
    detections = pd.DataFrame(
        [dict(x_mm=1.5, y_mm=1.5, z_mm=1.5, mean_uncertainty=0.01, **lesion),
         dict(x_mm=6.5, y_mm=6.5, z_mm=6.5, mean_uncertainty=0.2, **lesion)]
    )  # fmt: skip
    truth = pd.DataFrame(
        [dict(x_mm=1.5, y_mm=1.5, z_mm=1.5, **lesion), dict(x_mm=4, y_mm=8, z_mm=2, **lesion)]
    )
    table = uncertainty_by_outcome("s1", detections, truth, unc, affine)
    assert list(table["outcome"]) == ["true_positive", "false_positive", "missed"]
    np.testing.assert_allclose(table["mean_uncertainty"][:2], [0.01, 0.2])
    assert table["mean_uncertainty"][2] > 0.05  # the ball around the missed lesion holds the 0.5
    summary = outcome_summary(table.assign(group="test")).set_index("outcome")
    assert summary.loc["false_positive", "p_higher_than_tp"] == 1.0
    assert summary.loc["missed", "p_higher_than_tp"] == 1.0
    assert summary.loc["true_positive", "n"] == 1


def test_the_montage_and_the_overlay_show_the_map(tmp_path, monkeypatch):
    from virtual_contrast.evaluate import overlays
    from virtual_contrast.evaluate.figures import plot_montage
    from virtual_contrast.evaluate.overlays import plot_detection_overlay

    rng = np.random.default_rng(0)
    shape = (12, 14, 10)
    images = {k: rng.random(shape).astype(np.float32) for k in ("t1", "low", "vir", "ref")}
    mask = np.ones(shape, bool)
    unc = rng.random(shape).astype(np.float32) * 0.1
    plain = plot_montage(images, tmp_path / "plain.png", mask=mask)
    with_map = plot_montage(images, tmp_path / "map.png", mask=mask, uncertainty=unc)
    from matplotlib.image import imread

    assert imread(with_map).shape[0] > 1.5 * imread(plain).shape[0]  # a second row
    labels = {m: np.zeros(shape, np.int16) for m in ("ref", "vir")}
    table = pd.DataFrame(columns=["lesion_id", "x_mm", "y_mm", "z_mm", "long_axis_mm",
                                  "short_axis_mm", "volume_mm3"])  # fmt: skip
    args = ({m: images[m] for m in ("ref", "vir")}, labels, {"ref": table, "vir": table}, np.eye(4))
    two = plot_detection_overlay(*args, tmp_path / "two.png")
    figures = []
    monkeypatch.setattr(overlays.plt, "close", figures.append)
    three = plot_detection_overlay(
        *args, tmp_path / "three.png", uncertainty=unc, title="sub-p01: automated reader"
    )
    assert imread(three).shape[1] > 1.3 * imread(two).shape[1]  # a column more
    # The figure keeps its own title; the map's column has its own (a loop variable once took the former).
    (fig,) = figures
    assert fig._suptitle.get_text().startswith("sub-p01: automated reader")
    assert [ax.get_title() for ax in fig.axes][:3] == [
        "ref-T1c",
        "vir-T1c",
        "vir-T1c uncertainty (0-0.1)",
    ]
    with pytest.raises(InputError, match="grid"):
        plot_detection_overlay(*args, tmp_path / "x.png", uncertainty=unc[:-1])
