"""The workflow's DAG, config validation and lint, checked with real Snakemake dry runs (no job runs)."""

from __future__ import annotations

import os
import re

import pandas as pd
import pytest
import yaml
from workflow_helpers import REPO, job_counts, snakemake

from virtual_contrast.config import load_config

PER_SUBJECT = ["adc", "register", "skull_strip", "crop", "normalize", "qc"]


def test_default_config_has_one_job_per_subject_for_each_per_subject_rule(tmp_path):
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    proc = snakemake(tmp_path, "-n", overlays=())
    counts = job_counts(proc.stdout)
    cohort = config["cohort"]
    n_included = cohort["n_subjects"]
    for rule in PER_SUBJECT:
        assert counts.get(rule) == n_included, (rule, counts)
    assert counts["cohort"] == n_included  # only the complete, first exams are generated
    # One atlas for the working grid, one for the cohort's simulation grid when they differ.
    assert counts["atlas"] == len({config["grid"]["voxel_mm"], cohort["native_voxel_mm"]})
    assert counts["exclusions"] == 1


@pytest.mark.parametrize(
    ("overlay", "key"),
    [
        ({"grid": {"voxel_mm": -1}}, "voxel_mm"),
        ({"preprocess": {"register_backend": "ants"}}, "register_backend"),
        ({"grid": {"crop_shape": [40, 48]}}, "crop_shape"),
        ({"trian": {"epochs": 3}}, "trian"),
    ],
)
def test_invalid_config_stops_before_any_job_and_names_the_key(tmp_path, overlay, key):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(overlay))
    proc = snakemake(tmp_path, "-n", overlays=("tests/tiny.yaml", bad), check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert key in out
    assert "Job stats" not in out
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    ("overlay", "expected"),
    [
        (
            {"preprocess": {"normalize_percentiles": [99, 1]}},
            "config preprocess.normalize_percentiles = [99, 1]: the low percentile (99) must be below",
        ),
        ({"model": {"depth": 5}}, "config grid.crop_shape = [40, 48, 40] with model.depth = 5"),
        (
            {"split": {"folds": 5}},
            "config split.folds = 5 but there are only 3 training subject(s)",
        ),
    ],
)
def test_what_the_schema_cannot_see_stops_the_dry_run_with_one_line(tmp_path, overlay, expected):
    """Valid for the schema, wrong in meaning: each used to pass the dry run and fail later in a job (every
    normalize job, train after all pre-processing, split)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(overlay))
    proc = snakemake(tmp_path, "-n", overlays=("tests/tiny.yaml", bad), check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("virtual-contrast workflow: error: config ")
    assert expected in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr and "Job stats" not in proc.stdout
    assert not (tmp_path / "results").exists()


def test_subject_id_with_path_separator_stops_the_run_naming_it(tmp_path):
    table = tmp_path / "subjects.tsv"
    row = {
        "subject": "a/../b",
        "t1": "t1.nii.gz",
        "flair": "f.nii.gz",
        "dwi": "d.nii.gz",
        "bval": "d.bval",
        "low": "l.nii.gz",
        "ref": "r.nii.gz",
    }
    pd.DataFrame([row]).to_csv(table, sep="\t", index=False)
    overlay = tmp_path / "data.yaml"
    overlay.write_text(yaml.safe_dump({"subjects": str(table)}))
    proc = snakemake(tmp_path, "-n", overlays=("tests/tiny.yaml", overlay), check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("virtual-contrast workflow: error: subject 'a/../b', file ")
    assert "line 2: invalid subject id" in proc.stderr and "Traceback" not in proc.stderr


def test_lint_reports_nothing_serious(tmp_path):
    proc = snakemake(tmp_path, "--lint", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Lints for rule" not in out, out


def _job_blocks(output: str) -> list[tuple[str, str]]:
    """(rule, text of the job block) for each job listed by a dry run."""
    parts = re.split(r"\n(?:local)?rule (\w+):\n", output)
    return list(zip(parts[1::2], parts[2::2], strict=True))


def test_test_subjects_never_enter_a_training_job(tmp_path):
    proc = snakemake(tmp_path, "-n")
    study = _tiny_study()
    assert study.test_subjects and study.train_subjects
    trains = [block for rule, block in _job_blocks(proc.stdout) if rule == "train"]
    assert len(trains) == 2  # tests/tiny.yaml: 2 folds
    for block in trains:
        inputs = block.split("input:", 1)[1].split("\n", 1)[0]
        for subject in study.test_subjects:
            assert f"sub-{subject}" not in inputs
        for subject in study.train_subjects:
            assert f"sub-{subject}_desc-norm_refT1c" in inputs
    predicts = [block for rule, block in _job_blocks(proc.stdout) if rule == "predict"]
    assert sorted(re.search(r"subject=(\w+)", b).group(1) for b in predicts) == sorted(
        study.test_subjects
    )


def _tiny_study():
    from virtual_contrast.workflow import plan_study

    return plan_study(load_config(REPO / "tests/tiny.yaml"))


def test_paper_overlay_lists_every_job(tmp_path):
    """config.paper.yaml (1 mm, 160x192x160, 5 folds, 300 epochs) plans the whole study: every rule of the
    default run, one job per subject, fold and test subject, one atlas (the cohort and the grid are both 1 mm)."""
    for name in ("default", "paper"):
        (tmp_path / name).mkdir()
    default = job_counts(snakemake(tmp_path / "default", "-n", overlays=()).stdout)
    proc = snakemake(tmp_path / "paper", "-n", overlays=("config.paper.yaml",))
    counts = job_counts(proc.stdout)
    assert set(counts) == set(default)
    config = load_config(REPO / "config.paper.yaml")
    paper = yaml.safe_load((REPO / "config.paper.yaml").read_text())
    from virtual_contrast.workflow import plan_study

    study = plan_study(config)
    for rule in PER_SUBJECT:
        assert counts[rule] == config["cohort"]["n_subjects"], (rule, counts)
    assert counts["train"] == paper["split"]["folds"] == 5
    assert counts["predict"] == len(study.test_subjects)
    assert counts["atlas"] == 1


def test_auto_backends_are_resolved_once_when_the_run_is_planned(tmp_path, monkeypatch):
    """`auto` is decided on the machine that plans the run, for every job: with a flirt on its PATH every
    subject is registered with FSL (a node without FSL then fails, naming what to install), never some
    subjects with one tool and some with the other."""
    from virtual_contrast.backends import resolve_backends, with_backends
    from virtual_contrast.preprocess.options import PreprocessOptions

    monkeypatch.delenv("FSLDIR", raising=False)
    path = os.environ["PATH"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "flirt").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "flirt").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    backends = resolve_backends(load_config())
    assert backends["registration"]["backend"] == "fsl"
    assert backends["registration"]["reason"].startswith(f"auto: flirt found at {bin_dir}")
    assert backends["brain_extraction"]["backend"] == "deepbet"  # no HD-BET weights configured
    options = PreprocessOptions.from_config(with_backends(load_config(), backends))
    assert (options.register.backend, options.skull_strip.backend) == ("fsl", "deepbet")
    explicit = load_config({"preprocess": {"register_backend": "simpleitk"}})
    assert resolve_backends(explicit)["registration"] == {
        "configured": "simpleitk",
        "backend": "simpleitk",
        "reason": "configured",
    }
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert resolve_backends(load_config())["registration"]["backend"] == "simpleitk"

    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{path}")
    proc = snakemake(tmp_path, "-n")
    assert f"backends of this run: registration fsl (auto: flirt found at {bin_dir}" in proc.stdout


def _exam_files(folder, subject, *, flair=True) -> dict[str, str]:
    """Empty files standing for one exam (a dry run only checks that they exist)."""
    names = {"t1": "t1.nii.gz", "dwi": "dwi.nii.gz", "bval": "dwi.bval", "low": "low.nii.gz",
             "ref": "ref.nii.gz", **({"flair": "flair.nii.gz"} if flair else {})}  # fmt: skip
    (folder / subject).mkdir(parents=True)
    for name in names.values():
        (folder / subject / name).touch()
    return {key: f"{subject}/{name}" for key, name in names.items()}


def _subjects_table(tmp_path, splits: dict[str, str], *, flair=True):
    rows = [
        {
            "subject": s,
            "split": split,
            "flair": "",
            **_exam_files(tmp_path / "data", s, flair=flair),
        }
        for s, split in splits.items()
    ]
    table = tmp_path / "data" / "subjects.tsv"
    pd.DataFrame(rows).fillna("").to_csv(table, sep="\t", index=False)
    overlay = tmp_path / "subjects.yaml"
    overlay.write_text(yaml.safe_dump({"subjects": str(table)}))
    work = tmp_path / "work"
    work.mkdir()
    return work, overlay


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("virtual-contrast workflow: error: "), lines
    assert "Traceback" not in proc.stdout + proc.stderr and "Job stats" not in proc.stdout
    return lines[0]


def test_until_exclusions_or_qc_works_on_a_study_whose_exams_are_all_excluded(tmp_path):
    """It stopped on "split.folds = 2 but there are only 0 training subject(s)", never showing why."""
    work, overlay = _subjects_table(
        tmp_path, {"e01": "train", "e02": "train", "e03": "test"}, flair=False
    )
    line = _one_error_line(
        snakemake(work, "-n", overlays=("tests/tiny.yaml", overlay), check=False)
    )
    assert "no exam is included" in line and "3 exam(s) excluded: sub-e01: missing FLAIR" in line
    proc = snakemake(work, "-n", "--until", "qc", overlays=("tests/tiny.yaml", overlay))
    printed = proc.stdout + proc.stderr
    assert "every exam is excluded" in printed and "sub-e03: missing FLAIR" in printed
    snakemake(work, "--cores", "1", "--until", "exclusions", overlays=("tests/tiny.yaml", overlay))
    table = pd.read_csv(work / "results/tables/exclusions.tsv", sep="\t", dtype=str)
    assert sorted(table["subject"]) == ["e01", "e02", "e03"]
    assert table["reason"].str.contains("FLAIR").all()


def test_a_study_that_cannot_complete_its_targets_stops_before_the_first_job(tmp_path):
    """One test patient: the reading lists need two. Every fold used to train for minutes first."""
    splits = {"f01": "train", "f02": "train", "f03": "train", "f04": "test"}
    work, overlay = _subjects_table(tmp_path, splits)
    line = _one_error_line(
        snakemake(work, "-n", overlays=("tests/tiny.yaml", overlay), check=False)
    )
    assert "reading lists need at least 2 test patients, there are 1" in line
    # What does not need a second test patient runs, as rule names or as files.
    proc = snakemake(work, "-n", "--until", "voxel_metrics", overlays=("tests/tiny.yaml", overlay))
    assert job_counts(proc.stdout)["train"] == 2
    proc = snakemake(work, "-n", "results/tables/folds.tsv", overlays=("tests/tiny.yaml", overlay))
    assert job_counts(proc.stdout) == {"split": 1}
    # Three folds need three training subjects: asking for the split is enough to stop.
    folds = tmp_path / "folds.yaml"
    folds.write_text("split: {folds: 4}\n")
    line = _one_error_line(
        snakemake(
            work,
            "-n",
            "results/tables/folds.tsv",
            overlays=("tests/tiny.yaml", overlay, folds),
            check=False,
        )  # fmt: skip
    )
    assert "split.folds = 4 but there are only 3 training subject(s)" in line


def test_the_checks_each_rule_needs_grow_along_the_rule_graph(tmp_path):
    """virtual_contrast.checks.RULE_NEEDS lists, for each rule, its own checks and those of every rule it
    depends on: along every edge of Snakemake's rule graph, a rule needs at least what its inputs' rules
    need, and the default target everything."""
    from virtual_contrast.checks import RULE_NEEDS, STUDY_CHECKS

    proc = snakemake(tmp_path, "--rulegraph")
    labels = dict(re.findall(r"^\s*(\d+)\[label = \"(\w+)\"", proc.stdout, re.M))
    edges = re.findall(r"^\s*(\d+) -> (\d+)$", proc.stdout, re.M)
    assert len(labels) > 20 and len(edges) > 40
    for upstream, downstream in edges:
        up, down = labels[upstream], labels[downstream]
        assert RULE_NEEDS.get(up, set()) <= RULE_NEEDS.get(down, set()), (up, down)
    assert RULE_NEEDS["all"] == frozenset(STUDY_CHECKS)
