"""The tiny workflow end to end with real Snakemake on the CPU, then reruns after changes."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from workflow_helpers import REPO, job_counts, snakemake, tiny_study

from virtual_contrast import layout
from virtual_contrast.config import load_config
from virtual_contrast.layout import NATIVE_SPACE, exam_work_name, normalize_files, predicted_name

pytestmark = pytest.mark.slow


def test_every_subject_is_preprocessed_with_its_qc_and_provenance(tiny_run):
    study = tiny_study()
    assert study.subjects
    crop = [40, 48, 40]
    for subject in study.subjects:
        base = tiny_run / "results" / f"sub-{subject}"
        for channel in ("T1w", "FLAIR", "ADC", "lowT1c", "refT1c"):
            img = nib.load(base / "normalize" / f"sub-{subject}_desc-norm_{channel}.nii.gz")
            data = np.asanyarray(img.dataobj)
            assert list(data.shape) == crop
            brain = (
                np.asanyarray(
                    nib.load(base / "normalize" / f"sub-{subject}_desc-brain_mask.nii.gz").dataobj
                )
                > 0
            )
            # tests/tiny.yaml's percentiles (0.5, 99.5) at 0 and 1, nothing clipped, 0 outside the brain
            assert np.percentile(data[brain], [0.5, 99.5]) == pytest.approx([0, 1], abs=1e-4)
            assert data[brain].max() > 1.0 and (data[~brain] == 0).all()
        provenance = json.loads((base / "provenance.json").read_text())
        assert provenance["register"]["backend"] == "simpleitk"  # no FSL on test machines
        assert provenance["skull_strip"]["backend"] == "deepbet"  # no HD-BET weights configured
        assert provenance["register"]["gate"]["passed"]
        # `auto` was resolved once when the run was planned, and every job ran what was resolved.
        assert provenance["backends"]["registration"] == {
            "configured": "auto",
            "backend": "simpleitk",
            "reason": "auto: no FSL (no flirt on PATH and FSLDIR is not set)",
        }
        assert provenance["preprocess_options"]["register"]["backend"] == "simpleitk"
        assert provenance["backends"]["brain_extraction"]["backend"] == "deepbet"
        assert provenance["preprocess_options"]["skull_strip"]["backend"] == "deepbet"
        assert (base / f"sub-{subject}_qc.png").stat().st_size > 10_000
        log = (tiny_run / "logs" / "register" / f"sub-{subject}.log").read_text()
        assert "simpleitk" in log and "brain_coverage" in log
        gate = (tiny_run / "logs" / "registration_gate" / f"sub-{subject}.log").read_text()
        assert "registration quality gate passed" in gate
        assert "deepbet" in (tiny_run / "logs" / "skull_strip" / f"sub-{subject}.log").read_text()


def test_training_reads_its_declared_inputs_and_no_test_subject(tiny_run):
    """What each fold's training read (its log lists every file), against what the train rule declares
    (the normalised volumes of the training subjects): the same files, and nothing of a test subject."""
    study = tiny_study()
    config = load_config(REPO / "tests/tiny.yaml")
    keys = [*config["model"]["channels"], "refT1c"]
    declared = {
        path
        for s in study.train_subjects
        for key, path in normalize_files(s, keys).items()
        if key != "provenance"
    }
    for fold in range(config["split"]["folds"]):
        log = (tiny_run / "logs" / "train" / f"fold-{fold}.log").read_text()
        lines = re.findall(r"reads sub-(\w+): (.+)$", log, re.M)
        read = {path for _, paths in lines for path in paths.split()}
        assert {s for s, _ in lines} == set(study.train_subjects)  # every one trains or tunes
        assert read == declared
        assert not any(f"sub-{s}" in path for s in study.test_subjects for path in read)


def test_every_atlas_space_brain_mask_agrees_with_the_atlas_brain_mask(tiny_run):
    """Brain extraction in native space, carried by the registration: no skull ring in the mask."""
    atlas = (
        np.asanyarray(
            nib.load(tiny_run / "results/atlas/res-4.0mm/atlas_desc-brain_mask.nii.gz").dataobj
        )
        > 0
    )
    quality = pd.read_csv(tiny_run / "results/tables/registration_quality.tsv", sep="\t")
    assert sorted(quality["subject"]) == sorted(tiny_study().subjects) and quality["passed"].all()
    for subject in tiny_study().subjects:
        path = (
            tiny_run
            / f"results/sub-{subject}/register/sub-{subject}_space-ICBM09a_desc-brain_mask.nii.gz"
        )
        mask = np.asanyarray(nib.load(path).dataobj) > 0
        dice = 2 * (mask & atlas).sum() / (mask.sum() + atlas.sum())
        assert dice >= 0.85 and 0.8 <= mask.sum() / atlas.sum() <= 1.2, (
            subject,
            dice,
        )  # measured 0.98


def test_exclusions_are_listed_with_their_reason(tiny_run):
    table = pd.read_csv(tiny_run / "results/tables/exclusions.tsv", sep="\t", dtype=str)
    assert set(table["step"]) == {"later visit", "missing sequence"}
    assert table["reason"].str.len().min() > 10
    assert (tiny_run / "results/figures/flowchart.png").exists()
    truth = pd.read_csv(tiny_run / "results/cohort/lesions.tsv", sep="\t")
    assert set(truth["subject"]) == set(tiny_study().subjects)


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def test_a_changed_raw_file_reruns_only_that_subject_and_the_aggregates(tiny_run, tmp_path):
    work = _copy_run(tiny_run, tmp_path / "run")
    study = tiny_study()
    subject = study.test_subjects[0]
    raw = Path(work / study.raw_inputs(subject)["t1"])
    img = nib.load(raw)
    data = np.asanyarray(img.dataobj).astype(np.float32) * 1.01
    nib.save(nib.Nifti1Image(data, img.affine, img.header), raw)
    proc = snakemake(work, "-n", "--cores", "2")
    counts = job_counts(proc.stdout)
    for rule in ("register", "skull_strip", "crop", "normalize", "qc"):
        assert counts.get(rule) == 1, (rule, counts)
    assert "adc" not in counts and "cohort" not in counts and "atlas" not in counts
    # A test subject: its prediction is redone with the existing models; no fold is retrained.
    assert counts.get("predict") == 1 and "train" not in counts and "split" not in counts
    # Every job that would run is about this subject (or is an aggregate without a subject wildcard).
    rerun_subjects = set(re.findall(r"wildcards: .*subject=(\w+)", proc.stdout))
    assert rerun_subjects == {subject}


def test_a_corrupt_raw_file_fails_that_subject_only_naming_subject_and_file(tiny_run, tmp_path):
    work = _copy_run(tiny_run, tmp_path / "run")
    study = tiny_study()
    subject = study.subjects[0]
    raw = Path(work / study.raw_inputs(subject)["flair"])
    blob = raw.read_bytes()
    raw.write_bytes(blob[: len(blob) // 2])  # truncated gzip stream
    registered = (
        work
        / "results"
        / f"sub-{subject}"
        / "register"
        / f"sub-{subject}_space-ICBM09a_FLAIR.nii.gz"
    )
    proc = snakemake(work, "--cores", "2", "--keep-going", check=False)
    assert proc.returncode != 0
    # The terminal gets one line from the job (its traceback is in the job's log), not a Python traceback.
    assert f"register subject={subject}: error: subject '{subject}', file " in proc.stderr
    assert "Traceback (most recent call last)" not in proc.stdout + proc.stderr
    log = (work / "logs" / "register" / f"sub-{subject}.log").read_text()
    assert f"subject '{subject}'" in log and raw.name in log and "truncated or corrupt" in log
    # Snakemake removed the failed job's outputs; nothing half-written is left behind.
    assert not registered.exists()
    assert not list(registered.parent.glob(".*"))


def test_vir_t1c_is_written_for_every_test_subject_in_atlas_and_native_space(tiny_run):
    study = tiny_study()
    for subject in study.test_subjects:
        base = tiny_run / "results" / f"sub-{subject}" / "predict"
        atlas = nib.load(base / f"sub-{subject}_space-ICBM09a_desc-virtual_T1c.nii.gz")
        assert atlas.shape == (40, 48, 40)
        vir = np.asanyarray(atlas.dataobj)
        assert np.isfinite(vir).all() and vir.max() > 0.05
        native = nib.load(base / f"sub-{subject}_space-native_desc-virtual_T1c.nii.gz")
        low = nib.load(tiny_run / study.raw_inputs(subject)["low"])
        assert native.shape == low.shape
        assert np.allclose(native.affine, low.affine, atol=1e-4)
        # The brain of the prediction lands on the brain of the native low-dose series.
        nat = np.asanyarray(native.dataobj)
        low_data = np.asanyarray(low.dataobj)
        assert np.mean(low_data[nat > 0]) > 2 * np.mean(low_data[nat == 0])
        # Zero outside the brain, one face-connected body inside, within the low-dose T1c's brain range.
        labels, n = ndimage.label(nat != 0)
        assert n == 1, f"sub-{subject}: {n} separate bodies of non-zero voxels"
        rng = json.loads(
            (tiny_run / f"results/sub-{subject}/normalize/sub-{subject}_normalize.json").read_text()
        )
        lo, hi = rng["lowT1c"]["low_value"], rng["lowT1c"]["high_value"]
        # the prediction's own range mapped linearly onto the low dose's percentiles, not clipped at them; the
        # native detail (the low dose's own, finer than the grid) goes no lower than its bottom
        bottom = lo + min(vir.min(), 0.0) * (hi - lo)
        assert bottom - 1e-2 <= nat[nat != 0].min()
        log = (tiny_run / layout.log("predict", subject)).read_text()
        assert "native detail (the low-dose T1c's, its enhancement x4)" in log
    for fold in (0, 1):
        log = pd.read_csv(tiny_run / f"results/models/fold-{fold}/train_log.tsv", sep="\t")
        assert len(log) == 2 and np.isfinite(log["tune_loss"]).all()


def test_predict_command_on_a_raw_exam_repeats_the_workflow(tiny_run, tmp_path):
    """`virtual-contrast predict` on one raw exam runs the same chain as the workflow: same vir-T1c."""
    from virtual_contrast.cli import main as cli_main

    study = tiny_study()
    subject = study.test_subjects[0]
    raw = {key: tiny_run / path for key, path in study.raw_inputs(subject).items()}
    out = tmp_path / "exam"
    rc = cli_main(["predict", "--models", str(tiny_run / "results" / "models"),
                   "--t1", str(raw["t1"]), "--flair", str(raw["flair"]), "--dwi", str(raw["dwi"]),
                   "--bval", str(raw["bval"]), "--low", str(raw["low"]), "--subject", subject,
                   "--atlas", str(tiny_run / "results" / "atlas" / "res-4.0mm"),
                   "--device", "cpu", "--out", str(out)])  # fmt: skip
    assert rc == 0
    workflow = tiny_run / "results" / f"sub-{subject}" / "predict"
    expected = nib.load(workflow / f"sub-{subject}_space-ICBM09a_desc-virtual_T1c.nii.gz")
    # The command names its files as the workflow does (virtual_contrast.layout).
    assert (workflow / predicted_name(subject)).exists()
    got = nib.load(out / predicted_name(subject))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got.affine, expected.affine, atol=1e-4)
    np.testing.assert_allclose(got.get_fdata(), expected.get_fdata(), atol=1e-3)
    native = nib.load(out / predicted_name(subject, NATIVE_SPACE))
    expected_native = nib.load(workflow / f"sub-{subject}_space-native_desc-virtual_T1c.nii.gz")
    assert native.shape == nib.load(raw["low"]).shape
    np.testing.assert_allclose(native.get_fdata(), expected_native.get_fdata(), rtol=1e-3, atol=1.0)
    provenance = json.loads(
        (out / exam_work_name(subject) / f"sub-{subject}_provenance.json").read_text()
    )
    assert provenance["register"]["backend"] == "simpleitk"
    assert provenance["skull_strip"]["backend"] == "deepbet"
    # The option that tests/tiny.yaml changes (percentiles 0.5/99.5, default 1/99) came with the models.
    import yaml

    tiny = yaml.safe_load((REPO / "tests/tiny.yaml").read_text())["preprocess"]
    assert (
        provenance["options"]["normalize_percentiles"]
        == tiny["normalize_percentiles"]
        == [0.5, 99.5]
    )
    assert provenance["normalize"]["T1w"]["low_percentile"] == 0.5
    assert provenance["normalize"]["lowT1c"]["high_percentile"] == 99.5
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            f"sub-{subject}_space-ICBM09a_desc-virtual_T1c.nii.gz",
            f"sub-{subject}_space-native_desc-virtual_T1c.nii.gz",
            f"sub-{subject}_space-ICBM09a_desc-uncertainty_T1c.nii.gz",
            f"sub-{subject}_space-native_desc-uncertainty_T1c.nii.gz",
            f"sub-{subject}_space-ICBM09a_desc-spread_T1c.nii.gz",
            f"sub-{subject}_work",
        ]
    )
    # The workflow's calibration (beside the fold folders) was found: the same uncertainty map, but for the
    # few voxels whose features (vir-T1c agrees within 1e-3) fall on the other side of a bin edge.
    for space in ("ICBM09a", NATIVE_SPACE):
        name = f"sub-{subject}_space-{space}_desc-uncertainty_T1c.nii.gz"
        got, expected = nib.load(out / name).get_fdata(), nib.load(workflow / name).get_fdata()
        assert got.shape == expected.shape and expected.max() > 0
        close = np.isclose(got, expected, rtol=1e-2, atol=1e-3 if space == "ICBM09a" else 1.0)
        assert close.mean() > 0.995, f"{space}: {close.mean():.4f} of the voxels agree"


def test_the_uncertainty_map_is_written_beside_vir_t1c_calibrated_out_of_fold(tiny_run):
    study = tiny_study()
    results = tiny_run / "results"
    calibration = json.loads((results / "models/uncertainty_calibration.json").read_text())
    # Fitted on the training subjects' out-of-fold predictions only, never on a test subject.
    assert sorted(calibration["subjects"]) == sorted(study.train_subjects)
    assert not set(calibration["subjects"]) & set(study.test_subjects)
    for subject in study.test_subjects:
        base = results / f"sub-{subject}" / "predict"
        vir = nib.load(base / f"sub-{subject}_space-ICBM09a_desc-virtual_T1c.nii.gz").get_fdata()
        unc = nib.load(base / f"sub-{subject}_space-ICBM09a_desc-uncertainty_T1c.nii.gz")
        spread = nib.load(base / f"sub-{subject}_space-ICBM09a_desc-spread_T1c.nii.gz")
        mask = nib.load(results / f"sub-{subject}/normalize/sub-{subject}_desc-brain_mask.nii.gz")
        brain = mask.get_fdata() > 0.5
        u = unc.get_fdata()
        assert u.shape == vir.shape and (u[~brain] == 0).all() and (u[brain] > 0).all()
        assert spread.shape == (*vir.shape, 3) and spread.get_fdata()[..., 1][brain].max() > 0
        native = nib.load(base / f"sub-{subject}_space-native_desc-uncertainty_T1c.nii.gz")
        native_vir = nib.load(base / f"sub-{subject}_space-native_desc-virtual_T1c.nii.gz")
        assert native.shape == native_vir.shape
        np.testing.assert_allclose(native.affine, native_vir.affine, atol=1e-4)
        n = native.get_fdata()
        # Masked to the same native brain as vir-T1c, in its intensity units (not the normalised ones).
        assert (n[native_vir.get_fdata() == 0] == 0).all() and n.min() >= 0
        assert np.median(n[n > 0]) > 10 * np.median(u[brain])
        detections = pd.read_csv(
            results / f"sub-{subject}/lesions/sub-{subject}_detections.tsv", sep="\t"
        )
        assert "mean_uncertainty" in detections.columns
    for subject in study.train_subjects:
        folder = results / f"sub-{subject}" / "out_of_fold"
        assert (folder / f"sub-{subject}_space-ICBM09a_desc-uncertainty_T1c.nii.gz").exists()
    summary = pd.read_csv(results / "tables/uncertainty_calibration_summary.tsv", sep="\t")
    assert set(summary["map"]) == {"calibrated", "std_passes", "std_folds", "std_mirrors"}
    assert (summary["n_subjects"] == len(study.test_subjects)).all()
    lesions = pd.read_csv(results / "tables/uncertainty_lesions_summary.tsv", sep="\t")
    assert set(lesions["group"]) <= {"test", "train (out of fold)"}
    assert set(lesions["map"]) == {"calibrated", "std_passes"}
    assert (results / "figures/uncertainty_reliability.png").exists()


def _max_concurrent_gpu_jobs(log: str) -> tuple[int, int]:
    """(most GPU jobs running at once, GPU jobs seen) from the order of Snakemake's start/finish lines."""
    running, most, seen = set(), 0, 0
    blocks = re.split(r"\n(?=\[\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}\]\n)", log)
    for block in blocks:
        start = re.search(
            r"^(?:local)?rule (\w+):$.*?^\s+jobid: (\d+)$.*?^\s+resources: (.*)$",
            block,
            re.M | re.S,
        )
        if start and re.search(r"\bgpu=1\b", start.group(3)):
            running.add(start.group(2))
            seen += 1
            most = max(most, len(running))
        for jobid in re.findall(r"^Finished jobid: (\d+)", block, re.M):
            running.discard(jobid)
    return most, seen


def test_a_workstation_with_one_gpu_never_runs_two_gpu_jobs_at_once(tiny_run):
    log = (tiny_run / "snakemake_run.log").read_text()
    most, seen = _max_concurrent_gpu_jobs(log)
    study = tiny_study()
    # 2 train folds, one predict per test subject, one out-of-fold prediction per training subject.
    assert seen == 2 + len(study.test_subjects) + len(study.train_subjects)
    assert most == 1


def test_the_gpu_log_parser_sees_overlapping_jobs():
    log = "\n".join(
        [
            "[Wed Nov 25 00:12:03 2026]",
            "rule train:",
            "    jobid: 3",
            "    resources: tmpdir=/tmp, gpu=1",
            "[Wed Nov 25 00:12:04 2026]",
            "rule train:",
            "    jobid: 4",
            "    resources: tmpdir=/tmp, gpu=1",
            "[Wed Nov 25 00:12:09 2026]",
            "Finished jobid: 3 (Rule: train)",
        ]
    )
    assert _max_concurrent_gpu_jobs(log) == (2, 2)


def test_the_gate_is_its_own_step_its_table_lists_every_subject_and_new_limits_register_nothing(
    tiny_run, tmp_path
):
    """Gate limits that the largest brains exceed: those subjects' registration_gate jobs fail naming them,
    the others carry on with --keep-going, the study table lists every subject with its verdict, the failed
    run ends by listing the rejected subjects, and no registration is redone (the limits are not the
    register rule's); a coverage limit above every subject's rejects each at the gate too."""
    work = _copy_run(tiny_run, tmp_path / "run")
    quality = pd.read_csv(work / "results/tables/registration_quality.tsv", sep="\t")
    subjects = list(quality["subject"])
    largest = quality.set_index("subject")["scales"].map(lambda s: max(map(float, s.split())))
    ordered = largest.sort_values()
    gaps = ordered.diff().iloc[1:]
    cut = int(np.argmax(gaps.to_numpy())) + 1  # the widest gap between consecutive subjects
    assert gaps.max() > 0.02, ordered  # far from every subject: reruns cannot cross the limit
    high = float(ordered.iloc[cut - 1] + ordered.iloc[cut]) / 2
    rejected, passed = sorted(ordered.index[cut:]), sorted(ordered.index[:cut])
    overlay = tmp_path / "gate.yaml"
    overlay.write_text(f"preprocess:\n  registration_gate:\n    scale_range: [0.5, {high:.4f}]\n")
    registrations = {s: work / f"results/sub-{s}/register/sub-{s}_register.json" for s in subjects}
    registered = {s: path.stat().st_mtime_ns for s, path in registrations.items()}
    gates = [f"results/sub-{s}/register/sub-{s}_gate.json" for s in subjects]
    proc = snakemake(
        work, "--cores", "2", "--keep-going", *gates, "results/tables/registration_quality.tsv",
        overlays=("tests/tiny.yaml", overlay), check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    counts = job_counts(proc.stdout + proc.stderr)
    assert counts == {"registration_gate": len(subjects), "registration_quality": 1}, counts
    assert {s: p.stat().st_mtime_ns for s, p in registrations.items()} == registered
    table = pd.read_csv(work / "results/tables/registration_quality.tsv", sep="\t")
    verdicts = dict(zip(table["subject"], table["passed"], strict=True))
    assert verdicts == {s: s in passed for s in subjects}
    assert all(f"[0.5, {high:.4f}]" in f for f in table[~table["passed"]]["failures"])
    for subject in passed:  # rerun with the new limits (a changed param), and passed
        verdict = json.loads((work / gates[subjects.index(subject)]).read_text())
        assert verdict["passed"] and verdict["limits"]["scale_range"][1] == round(high, 4)
    listed = pd.read_csv(work / "results/tables/registration_rejected.tsv", sep="\t")
    assert sorted(listed["subject"]) == rejected
    for subject in rejected:
        folder = work / "results" / f"sub-{subject}" / "register"
        log = (work / "logs" / "registration_gate" / f"sub-{subject}.log").read_text()
        assert f"subject '{subject}'" in log and "rejected by the quality gate" in log
        assert (folder / f"sub-{subject}_desc-rejected_registration.png").exists()
        assert not (folder / f"sub-{subject}_gate.json").exists()
        assert registrations[subject].exists()
        assert f"sub-{subject}: scale" in proc.stderr
    # Back to the configured limits: the gates and what the rejection held back run again, no registration.
    proc = snakemake(work, "-n", "--cores", "2")
    counts = job_counts(proc.stdout)
    assert "register" not in counts and counts["registration_gate"] == len(subjects), counts
    # Coverage: every sequence of every tiny subject holds the atlas brain; a slab of a third of one subject's
    # low-dose T1c does not, and the default limit rejects it at the gate (the slab's own Dice would pass).
    coverage = table["brain_coverage"].map(
        lambda s: dict(zip(s.split()[::2], map(float, s.split()[1::2]), strict=True))
    )
    assert all(set(c) == {"T1", "FLAIR", "ADC", "lowT1c", "refT1c"} for c in coverage)
    assert float(table["least_brain_coverage"].min()) > 0.9  # the default limit passes them
    subject = passed[0]
    low = work / tiny_study().raw_inputs(subject)["low"]
    img = nib.load(low)
    n = img.shape[2]
    slab = img.slicer[:, :, n // 3 : n // 3 + max(2, n // 3)]
    nib.save(nib.Nifti1Image(np.asanyarray(slab.dataobj), slab.affine), low)
    proc = snakemake(
        work, "--cores", "2", "--keep-going", gates[subjects.index(subject)], check=False
    )
    assert proc.returncode != 0
    assert job_counts(proc.stdout + proc.stderr).get("register") == 1
    assert f"sub-{subject}: the lowT1c's field of view holds" in proc.stderr, proc.stderr[-3000:]
    covered = json.loads(registrations[subject].read_text())["quality"]["brain_coverage"]
    assert covered["lowT1c"] < 0.9 and covered["T1"] > 0.9, covered  # measured 0.64
