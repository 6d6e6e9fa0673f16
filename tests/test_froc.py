"""Validation of the automated reader against known lesions, its FROC and the operating point chosen on
training subjects only."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from test_lesions import ball, brain, grid, tube

from virtual_contrast.evaluate import froc as F
from virtual_contrast.evaluate import lesions as L
from virtual_contrast.io import InputError

SETTINGS = L.DetectorSettings.from_schema()


def _lesion(subject, x, long_axis, **extra):
    return {
        "subject": subject,
        "x_mm": x,
        "y_mm": 0.0,
        "z_mm": 0.0,
        "long_axis_mm": long_axis,
        "short_axis_mm": long_axis,
        **extra,
    }


def test_validate_detector_counts_per_size_bin():
    """Truth: four lesions of two subjects; detections: three of them and a 7 mm false positive."""
    truth = pd.DataFrame(
        [
            _lesion("s1", 0, 3.0),
            _lesion("s1", 30, 6.0),
            _lesion("s1", 60, 16.0),
            _lesion("s2", 0, 8.0),
        ]
    )
    det = pd.DataFrame(
        [
            _lesion("s1", 0.5, 3.5),
            _lesion("s1", 60, 15.0),
            _lesion("s2", 0.5, 8.0),
            _lesion("s2", 40, 7.0),
        ]
    )
    table = F.validate_detector(det, truth, subjects=["s1", "s2", "s3"]).set_index("size_bin")
    assert list(table.index) == ["[0, 5)", "[5, 10)", "[10, inf)", "all"]
    assert table.loc["[0, 5)", "sensitivity"] == 1.0
    assert table.loc["[5, 10)", "n_true"] == 2 and table.loc["[5, 10)", "true_positives"] == 1
    assert table.loc["[5, 10)", "false_positives"] == 1 and table.loc["[5, 10)", "ppv"] == 0.5
    assert table.loc["all", "sensitivity"] == 0.75 and (table["n_subjects"] == 3).all()
    with pytest.raises(InputError, match="truth table lacks columns"):
        F.validate_detector(det, pd.DataFrame({"subject": ["a"]}))


def _candidates(rows):
    """Candidates as find_candidates tables: (subject, x, long axis, score, status)."""
    return pd.DataFrame(
        [
            _lesion(s, x, long_axis, score=peak, status=status)
            for s, x, long_axis, peak, status in rows
        ]
    )


def test_froc_sweeps_the_threshold_and_the_operating_point_is_the_lowest_within_target():
    truth = pd.DataFrame([_lesion("a", 0, 12.0), _lesion("a", 40, 6.0), _lesion("b", 0, 7.0)])
    cands = _candidates(
        [
            ("a", 0, 12.0, 0.50, "lesion"),
            ("a", 40, 6.0, 0.30, "lesion"),
            ("b", 0, 7.0, 0.35, "lesion"),
            ("a", 80, 8.0, 0.25, "lesion"),  # false positives of decreasing peak
            ("b", 80, 8.0, 0.28, "lesion"),
            ("b", 60, 9.0, 0.32, "lesion"),
            ("b", 20, 30.0, 0.90, "elongated"),  # a bright vessel: never a detection
        ]
    )
    froc = F.froc_table(cands, truth, subjects=["a", "b"], thresholds=[0.2, 0.3, 0.4])
    overall = froc[froc["size_bin"] == "all"].set_index("threshold")
    assert overall["fp_per_patient"].tolist() == [1.5, 0.5, 0.0]
    assert overall["sensitivity"].tolist() == [1.0, 1.0, pytest.approx(1 / 3)]
    point = F.choose_operating_point(froc, max_fp_per_patient=1.0)
    assert point["threshold"] == 0.3 and point["meets_target"]
    assert point["sensitivity"]["[5, 10)"] == 1.0 and point["fp_per_patient"] == 0.5
    strict = F.choose_operating_point(froc[froc["threshold"] < 0.35], max_fp_per_patient=0.1)
    assert strict["threshold"] == 0.3 and not strict["meets_target"]
    assert F.threshold_grid(0.1, 0.2, 0.05).tolist() == [0.1, 0.15, 0.2]


def test_truth_moves_to_atlas_space_with_the_inverse_registration():
    transform = np.eye(4)
    transform[:3, 3] = [10.0, -5.0, 2.0]  # atlas -> native: a translation
    truth = pd.DataFrame([_lesion("a", 15.0, 8.0), _lesion("other", 0.0, 8.0)])
    out = F.truth_in_atlas(truth, {"a": transform})
    assert len(out) == 1 and out.loc[0, ["x_mm", "y_mm", "z_mm"]].tolist() == [5.0, 5.0, -2.0]


def test_operating_point_file_errors_are_clear(tmp_path):
    path = tmp_path / "point.json"
    with pytest.raises(InputError, match="not found"):
        F.read_operating_point(path)
    path.write_text(json.dumps({"fp": 1}))
    with pytest.raises(InputError, match="not an operating point"):
        F.read_operating_point(path)
    path.write_text(json.dumps({"threshold": 0.25}))
    assert F.read_operating_point(path) == 0.25


def test_tuning_uses_the_training_subjects_with_a_leave_one_out_prior():
    """Three training subjects at 2 mm, each with a lesion of its own and the same bright 'choroid plexus'
    blob at one place: the blob enters each subject's prior from the two others, so it is no false positive;
    the lesions are found. The operating point depends on these subjects only (the function never sees
    another), and changes when one of their images changes."""
    affine, world = grid(2.0)
    images = {}
    for k, subject in enumerate(["t1", "t2", "t3"]):
        pre, post, mask = brain(world, 2.0, seed=k)
        lesion = ball(world, (-12.0 + 8 * k, 10.0, 0.0), 12.0, 2.0)
        plexus = ball(world, (10.0, -12.0, 4.0), 10.0, 2.0)
        vessel = tube(world, (0.0, -5.0, 10.0), (1, 0.2, 0.1), 3.0, 30.0, 2.0)
        post = post + (0.4 * lesion + 0.6 * plexus + 0.6 * vessel).astype(np.float32) * mask
        images[subject] = (post, pre, mask, affine)
    truth = pd.DataFrame(
        [_lesion(s, -12.0 + 8 * k, 12.0) | {"y_mm": 10.0} for k, s in enumerate(images)]
    )

    def tune(imgs):
        return F.tune_detector(
            imgs.__getitem__,
            list(imgs),
            truth,
            SETTINGS,
            prior_enhancement=0.2,
            prior_fraction=0.5,
            thresholds=F.threshold_grid(0.1, 0.6, 0.05),
            max_fp_per_patient=0.0,
        )

    froc, point, candidates = tune(images)
    assert point["subjects"] == ["t1", "t2", "t3"] and point["meets_target"]
    assert point["sensitivity"]["all"] == 1.0 and point["fp_per_patient"] == 0.0
    assert set(candidates["status"]) >= {"lesion", "prior"}
    # A new false positive (an enhancing blob that is no lesion) in one training subject moves the operating
    # point above its peak: the FROC is the training subjects' own.
    changed = dict(images)
    post, pre, mask, _ = images["t1"]
    blob = ball(world, (12.0, 14.0, -10.0), 10.0, 2.0).astype(np.float32) * mask
    changed["t1"] = (post + 0.3 * blob, pre, mask, affine)
    moved = tune(changed)[1]
    assert moved["threshold"] > point["threshold"] and moved["fp_per_patient"] == 0.0
    with pytest.raises(InputError, match="at least 2 training subjects"):
        F.tune_detector(
            images.__getitem__,
            ["t1"],
            truth,
            SETTINGS,
            prior_enhancement=0.2,
            prior_fraction=0.5,
            thresholds=[0.3],
            max_fp_per_patient=1.0,
        )


def test_cli_tunes_on_given_subjects_and_validates_detections(tmp_path, capsys):
    from virtual_contrast.cli import main
    from virtual_contrast.io import save_image

    affine, world = grid(2.0)
    args = {"--subjects": [], "--post": [], "--pre": [], "--mask": []}
    rows = []
    for k, subject in enumerate(["t1", "t2"]):
        pre, post, mask = brain(world, 2.0, seed=k)
        centre = (-10.0 + 12 * k, 8.0, 0.0)
        post = post + 0.45 * ball(world, centre, 12.0, 2.0).astype(np.float32) * mask
        for name, data in (("post", post), ("pre", pre), ("mask", mask)):
            args[f"--{name}"].append(
                str(save_image(data, affine, tmp_path / f"{subject}_{name}.nii.gz"))
            )
        args["--subjects"].append(subject)
        rows.append(_lesion(subject, centre[0], 12.0) | {"y_mm": centre[1]})
    pd.DataFrame(rows).to_csv(tmp_path / "truth.tsv", sep="\t", index=False)
    flat = [item for option, values in args.items() for item in (option, *values)]
    code = main(
        [
            "tune-detector",
            *flat,
            "--truth",
            str(tmp_path / "truth.tsv"),
            "--out-dir",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    point = json.loads((tmp_path / "out" / "detector_operating_point.json").read_text())
    assert point["subjects"] == ["t1", "t2"] and point["sensitivity"]["all"] == 1.0
    assert (tmp_path / "out" / "detector_froc.png").exists()
    capsys.readouterr()
    det = tmp_path / "det.tsv"
    code = main(
        [
            "detect-lesions",
            "--post",
            args["--post"][0],
            "--pre",
            args["--pre"][0],
            "--mask",
            args["--mask"][0],
            "--subject",
            "t1",
            "--out",
            str(det),
        ]
    )
    assert code == 0
    code = main(
        [
            "validate-detector",
            "--detections",
            str(det),
            "--truth",
            str(tmp_path / "truth.tsv"),
            "--out",
            str(tmp_path / "val.tsv"),
        ]
    )
    assert code == 0
    val = pd.read_csv(tmp_path / "val.tsv", sep="\t").set_index("size_bin")
    assert val.loc["[10, inf)", "true_positives"] == 1 and val.loc["all", "n_true"] == 2
    capsys.readouterr()
    code = main(
        [
            "tune-detector",
            *flat[:-1],
            "--truth",
            str(tmp_path / "truth.tsv"),
            "--out-dir",
            str(tmp_path),
        ]
    )
    assert code == 2 and "one --post, --pre and --mask per subject" in capsys.readouterr().err
