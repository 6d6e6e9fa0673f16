"""`virtual-contrast predict` on a raw exam: every input checked before any work, nothing partial left behind,
and the registration quality gate applies to a new exam as to the workflow's subjects."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from virtual_contrast.cli import main as cli_main
from virtual_contrast.io import save_image

pytestmark = pytest.mark.slow


@pytest.fixture
def raw_exam(tiny_run, tmp_path) -> dict[str, Path]:
    """A copy of one test subject's raw files (the tests change them) and the models of the tiny run."""
    import shutil

    from workflow_helpers import REPO

    from virtual_contrast.config import load_config
    from virtual_contrast.workflow import plan_study

    config = load_config(REPO / "tests/tiny.yaml")
    study = plan_study(config)
    subject = study.test_subjects[0]
    files = {}
    for key, path in study.raw_inputs(subject).items():
        if key in ("t1", "flair", "dwi", "bval", "low"):
            files[key] = Path(shutil.copy(tiny_run / path, tmp_path / Path(path).name))
    files["models"] = tiny_run / "results" / "models"
    return files


def _predict(files, out, *extra) -> int:
    args = ["predict", "--models", str(files["models"]), "--device", "cpu", "--out", str(out)]
    for key in ("t1", "flair", "dwi", "bval", "low"):
        args += [f"--{key}", str(files[key])]
    return cli_main([*args, *extra])


def test_an_all_zero_low_dose_t1c_is_one_line_before_any_work(raw_exam, tmp_path, capsys):
    img = nib.load(raw_exam["low"])
    save_image(np.zeros(img.shape), img.affine, raw_exam["low"])
    assert _predict(raw_exam, tmp_path / "out", "--subject", "p01") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert "subject 'p01'" in err and raw_exam["low"].name in err and "has no signal" in err
    assert not (tmp_path / "out").exists()


def test_a_flair_that_does_not_overlap_the_t1_is_named(raw_exam, tmp_path, capsys):
    img = nib.load(raw_exam["flair"])
    moved = img.affine.copy()
    moved[:3, 3] += [0.0, 400.0, 0.0]
    save_image(np.asanyarray(img.dataobj), moved, raw_exam["flair"])
    assert _predict(raw_exam, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert raw_exam["flair"].name in err and "does not overlap the T1 in world space" in err
    assert not (tmp_path / "out").exists()


def test_a_rejected_registration_leaves_its_figure_and_no_work_folder(raw_exam, tmp_path, capsys):
    """Models whose stored gate no head can pass: the exam fails after brain extraction and ADC were
    written (into the staging folder), which disappears; the figure the message names stays."""
    models = tmp_path / "models"
    for path in sorted(raw_exam["models"].rglob("model.pt")):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        ckpt["preprocess"]["register"]["gate"]["scale_range"] = [1.6, 2.0]
        (models / path.parent.name).mkdir(parents=True)
        torch.save(ckpt, models / path.parent.name / "model.pt")
    raw_exam["models"] = models
    out = tmp_path / "out"
    assert _predict(raw_exam, out, "--subject", "p02") == 2
    err = capsys.readouterr().err
    figure = out / "sub-p02_desc-rejected_registration.png"
    assert "subject 'p02'" in err and "rejected by the quality gate" in err and str(figure) in err
    assert sorted(p.name for p in out.iterdir()) == [
        "sub-p02_desc-rejected_registration.json",
        "sub-p02_desc-rejected_registration.png",
    ]


def _models_with_gate(raw_exam, folder: Path, **gate) -> Path:
    """Copies of the tiny run's models with other stored gate limits."""
    for path in sorted(raw_exam["models"].rglob("model.pt")):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        ckpt["preprocess"]["register"]["gate"].update(gate)
        (folder / path.parent.name).mkdir(parents=True)
        torch.save(ckpt, folder / path.parent.name / "model.pt")
    return folder


def test_a_slab_that_misses_most_of_the_brain_is_rejected_by_the_coverage_gate(
    raw_exam, tmp_path, capsys
):
    """A low-dose T1c covering a third of the head: the gate the models store (min_brain_coverage 0.9)
    rejects the exam, naming the sequence and its coverage."""
    img = nib.load(raw_exam["low"])
    n = img.shape[2]
    slab = img.slicer[:, :, n // 3 : n // 3 + max(2, n // 3)]
    save_image(np.asanyarray(slab.dataobj), slab.affine, raw_exam["low"])
    out = tmp_path / "out"
    assert _predict(raw_exam, out, "--subject", "p03") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "subject 'p03'" in err, err
    assert "the lowT1c's field of view holds" in err and "below 90 % (min_brain_coverage)" in err
    assert sorted(p.name for p in out.iterdir()) == [
        "sub-p03_desc-rejected_registration.json",
        "sub-p03_desc-rejected_registration.png",
    ]


def test_override_gate_predicts_a_rejected_exam_and_says_so(raw_exam, tmp_path, capsys):
    import json

    raw_exam["models"] = _models_with_gate(raw_exam, tmp_path / "models", scale_range=[1.6, 2.0])
    out = tmp_path / "out"
    assert _predict(raw_exam, out, "--subject", "p04", "--override-gate") == 0
    printed = capsys.readouterr().out
    figure = out / "sub-p04_desc-rejected_registration.png"
    assert "REJECTED" in printed and "--override-gate" in printed and str(figure) in printed
    assert figure.exists() and (out / "sub-p04_space-ICBM09a_desc-virtual_T1c.nii.gz").exists()
    work = out / "sub-p04_work"
    gate = json.loads((work / "sub-p04_provenance.json").read_text())["register"]["gate"]
    assert gate["overridden"] and not gate["passed"] and "outside [1.6, 2]" in gate["failures"][0]
