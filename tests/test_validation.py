"""The validation layer: each mistake a user can make on the command line gets one clear line and exit status 2
before any work, no traceback on the terminal (it is saved for developers), outputs keep the umask, and names
built from data stay inside the output folder.

All in-process (``cli.main``) except one real subprocess that shows what a user's terminal gets.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from workflow_helpers import REPO

from virtual_contrast import cli
from virtual_contrast.checks import STUDY_CHECKS, check_config, check_study, requested_checks
from virtual_contrast.io import (
    InputError,
    atomic_path,
    path_inside,
    save_image,
    staged_folder,
    write_json,
    write_table,
    write_text,
)

# Inputs that do not exist: every check below must stop the command before it looks at any file.
ABSENT = "absent.nii.gz"

BAD_ARGUMENTS = {
    "crop shape": (
        ["crop", "--image", ABSENT, "--out", "c.nii.gz", "--shape", "0", "-5", "10"],
        "--shape must be three positive numbers of voxels, got [0, -5, 10]",
    ),
    "normalize percentiles": (
        ["normalize", "--image", ABSENT, "--mask", ABSENT, "--out", "n.nii.gz"]
        + ["--low", "99", "--high", "1"],
        "the low percentile (99) must be below the high one (1)",
    ),
    "normalize percentile range": (
        ["normalize", "--image", ABSENT, "--mask", ABSENT, "--out", "n.nii.gz", "--high", "120"],
        "must lie in [0, 100]",
    ),
    "register output": (
        ["register", "--moving", ABSENT, "--reference", ABSENT, "--out", "x.png"],
        "--out must be a NIfTI file name ending in .nii.gz or .nii",
    ),
    "adc output": (
        ["adc", "--dwi", ABSENT, "--bval", "absent.bval", "--out", "adc.mgz"],
        "--out must be a NIfTI file name",
    ),
    "crop output": (
        ["crop", "--image", ABSENT, "--out", "crop.nii.gz.png"],
        "--out must be a NIfTI file name",
    ),
    "skull-strip output": (
        ["skull-strip", "--t1", ABSENT, "--out", "mask.png"],
        "--out must be a NIfTI file name",
    ),
    "atlas voxel": (
        ["atlas", "--voxel-mm", "0", "--out", "atlas"],
        "must be a positive number",
    ),
    "subject id": (
        ["adc", "--dwi", ABSENT, "--bval", "absent.bval", "--out", "a.nii.gz"]
        + ["--subject", "x/../../escape"],
        "subject 'x/../../escape': --subject: invalid subject id (contains '..')",
    ),
    "predict subject id": (
        ["predict", "--models", "models", "--subject", "x/../../../escape", "--out", "out"],
        "invalid subject id",
    ),
}


@pytest.mark.parametrize("case", BAD_ARGUMENTS)
def test_bad_arguments_get_one_line_and_status_2_before_any_work(
    case, tmp_path, monkeypatch, capsys
):
    argv, expected = BAD_ARGUMENTS[case]
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith(f"virtual-contrast {argv[0]}: error: ")
    assert expected in err
    assert "Traceback" not in captured.err + captured.out
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "something was written"


def test_a_usage_error_is_one_line_pointing_at_help(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli.main(["crop", "--image", ABSENT, "--out", "c.nii.gz", "--shape", "1", "2"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "expected 3 arguments" in err
    assert "(see virtual-contrast crop --help)" in err


def test_an_unexpected_failure_is_one_line_and_its_traceback_is_saved(
    tmp_path, monkeypatch, capsys, error_log_dir
):
    import virtual_contrast.preprocess.crop as crop

    def broken(*args, **kwargs):
        raise RuntimeError("an ITK error\nover two lines")

    monkeypatch.setattr(crop, "crop_images", broken)
    argv = ["crop", "--image", ABSENT, "--out", str(tmp_path / "c.nii.gz")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert "error: RuntimeError: an ITK error over two lines (unexpected; traceback in " in err
    saved = Path(err.rsplit("traceback in ", 1)[1].rstrip(")"))
    assert saved.parent == error_log_dir
    text = saved.read_text()
    assert "Traceback (most recent call last)" in text and "in broken" in text
    assert "crop --image absent.nii.gz" in text


def test_ctrl_c_is_one_line_and_status_130(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    import virtual_contrast.preprocess.crop as crop

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(crop, "crop_images", interrupted)
    assert cli.main(["crop", "--image", ABSENT, "--out", "c.nii.gz"]) == 130
    assert capsys.readouterr().err == "virtual-contrast crop: interrupted\n"


def test_the_terminal_gets_one_line_and_no_traceback(tmp_path):
    """The real command in a subprocess, as a user runs it."""
    argv = ["normalize", "--image", ABSENT, "--mask", ABSENT, "--out", "n.nii.gz"]
    proc = subprocess.run(
        [sys.executable, "-m", "virtual_contrast.cli", *argv, "--low", "99", "--high", "1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("virtual-contrast normalize: error: --low/--high percentiles")
    assert "Traceback" not in proc.stderr + proc.stdout


# --- the split column in the split command -----------------------------------------------------------------


def test_split_command_refuses_a_typo_and_accepts_any_case(tmp_path, capsys):
    table = tmp_path / "subjects.tsv"
    rows = [("p1", "Train"), ("p2", "TRAIN"), ("p3", "train"), ("p4", "tset"), ("p5", "Test")]
    pd.DataFrame(rows, columns=["subject", "split"]).to_csv(table, sep="\t", index=False)
    out = tmp_path / "folds.tsv"
    argv = ["split", "--subjects", str(table), "--k", "2", "--out", str(out)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert (
        "subject 'p4'" in err and "row 4" in err and "split 'tset' must be 'train' or 'test'" in err
    )
    assert not out.exists()

    rows[3] = ("p4", " TEST ")
    pd.DataFrame(rows, columns=["subject", "split"]).to_csv(table, sep="\t", index=False)
    assert cli.main(argv) == 0
    folds = pd.read_csv(out, sep="\t", dtype={"subject": str})
    assert sorted(folds["subject"]) == ["p1", "p2", "p3"]  # test subjects get no fold


# --- outputs: umask, staging, names inside the output folder --------------------------------------------------


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_outputs_keep_the_users_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        written = [
            write_text("x", tmp_path / "a.txt"),
            write_json({"a": 1}, tmp_path / "a.json"),
            write_table(pd.DataFrame({"a": [1]}), tmp_path / "a.tsv"),
            save_image(np.zeros((2, 2, 2)), np.eye(4), tmp_path / "a.nii.gz"),
        ]
    finally:
        os.umask(previous)
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {oct(mode)}


def test_atomic_path_leaves_nothing_when_the_writer_fails(tmp_path):
    with pytest.raises(ZeroDivisionError), atomic_path(tmp_path / "out.nii.gz") as tmp:
        tmp.write_bytes(b"half")
        1 / 0  # noqa: B018
    assert list(tmp_path.iterdir()) == []


def test_staged_folder_moves_everything_at_the_end_or_nothing(tmp_path):
    out = tmp_path / "exam"
    with pytest.raises(RuntimeError), staged_folder(out) as stage:
        write_text("1", stage / "a.txt")
        raise RuntimeError("fails half-way")
    assert not out.exists()  # created by the call, removed again

    out.mkdir()
    write_text("old", out / "a.txt")
    write_text("keep", out / "other.txt")
    with staged_folder(out) as stage:
        write_text("new", stage / "a.txt")
        write_text("2", stage / "work" / "b.txt")
        assert not (out / "work").exists()
    assert (out / "a.txt").read_text() == "new" and (out / "other.txt").read_text() == "keep"
    assert (out / "work" / "b.txt").read_text() == "2"
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "other.txt", "work"]


KILLED_WRITER = """
import sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
from virtual_contrast.io import atomic_path, staged_folder

with staged_folder({out!r}) as stage, atomic_path(stage / "big.nii.gz") as tmp:
    with atomic_path(Path({out!r}) / "table.tsv"):
        print("writing", flush=True)
        time.sleep(600)
"""


def test_a_writer_killed_with_sigkill_leaves_nothing_once_the_same_outputs_are_written_again(
    tmp_path,
):
    """kill -9 leaves the writer's hidden temporary files (0 bytes when it had not written yet); the next
    writer of the same outputs removes them (the killed process is gone), and its own."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER.format(repo=str(REPO), out=str(out))],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.kill()  # SIGKILL: no handler runs
        proc.wait()
    left = sorted(p.name for p in out.iterdir())
    assert len(left) == 2 and all(name.startswith(".") for name in left), left
    assert any(name.startswith(".table.") and name.endswith(".tsv") for name in left)
    assert (out / next(n for n in left if n.startswith(".table."))).stat().st_size == 0
    # The same command again: the same outputs written, the killed writer's temporaries gone.
    with staged_folder(out) as stage:
        save_image(np.zeros((2, 2, 2)), np.eye(4), stage / "big.nii.gz")
    write_table(pd.DataFrame({"a": [1]}), out / "table.tsv")
    assert sorted(p.name for p in out.iterdir()) == ["big.nii.gz", "table.tsv"]
    # A live writer's temporary file is left alone.
    with atomic_path(out / "table.tsv") as mine:
        write_table(pd.DataFrame({"a": [2]}), out / "other.tsv")
        assert mine.exists()


@pytest.mark.parametrize("name", ["../escape", "a/../../escape", "/etc", "", "..", "a/.."])
def test_names_from_data_cannot_leave_the_output_folder(tmp_path, name):
    with pytest.raises(InputError, match="output folder"):
        path_inside(tmp_path / "out", "sub-1", name)
    assert (
        path_inside(tmp_path / "out", "R1", "p01", "low") == tmp_path / "out" / "R1" / "p01" / "low"
    )


def test_export_markups_refuses_a_patient_id_that_climbs_out(tmp_path, capsys):
    lesions = tmp_path / "lesions.csv"
    row = {"patient": "../../evil", "reader": "R1", "modality": "low", "x_mm": 0.0, "y_mm": 0.0}
    row |= {"z_mm": 0.0, "long_axis_mm": 10.0, "short_axis_mm": 5.0}
    good = {**row, "patient": "p01"}
    pd.DataFrame([good, row]).to_csv(lesions, index=False)
    out = tmp_path / "a" / "b" / "markups"
    assert cli.main(["export-markups", "--lesions", str(lesions), "--out", str(out)]) == 2
    assert "would be written outside the output folder" in capsys.readouterr().err
    assert not (tmp_path / "a" / "evil").exists() and not (tmp_path / "evil").exists()
    # The valid patient's markups were staged, not left behind: a failed command writes nothing.
    assert not out.exists()
    pd.DataFrame([good]).to_csv(lesions, index=False)
    assert cli.main(["export-markups", "--lesions", str(lesions), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.rglob("*.mrk.json")) == [
        "lesion-001-long.mrk.json",
        "lesion-001-short.mrk.json",
    ]
    assert [p.name for p in out.iterdir()] == ["R1"]  # no staging folder left


# --- the workflow's config, checked at parse time ---------------------------------------------------------------


def _config(**sections) -> dict:
    config = {
        "subjects": "",
        "bids_dir": "",
        "atlas": {"t1": "", "brain_mask": "", "head_mask": ""},
        "grid": {"crop_shape": [40, 48, 40]},
        "preprocess": {"normalize_percentiles": [1.0, 99.0], "hdbet2_weights": ""},
        "split": {"folds": 2},
        "model": {"depth": 4},
        "reader_study": {"lesions": "", "reads": ""},
    }
    for section, values in sections.items():
        config[section] = {**config[section], **values} if isinstance(values, dict) else values
    return config


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        (
            {"preprocess": {"normalize_percentiles": [99, 1]}},
            "config preprocess.normalize_percentiles = [99, 1]: the low percentile (99) must be below",
        ),
        (
            {"preprocess": {"normalize_percentiles": [5, 5]}},
            "preprocess.normalize_percentiles = [5, 5]",
        ),
        (
            {"model": {"depth": 5}},
            "config grid.crop_shape = [40, 48, 40] with model.depth = 5: a depth-5 UNet cannot process",
        ),
        ({"grid": {"crop_shape": [40, 44, 40]}}, "44 is not"),
        ({"atlas": {"brain_mask": "/nonexistent/mask.nii.gz"}}, "config atlas.brain_mask"),
        ({"reader_study": {"reads": "/nonexistent/reads.csv"}}, "config reader_study.reads"),
        ({"subjects": "/nonexistent/s.tsv"}, "config subjects: subjects table not found"),
    ],
)
def test_config_values_are_checked_against_their_meaning(sections, expected):
    check_config(_config())
    with pytest.raises(InputError) as err:
        check_config(_config(**sections))
    assert expected in str(err.value)


def test_reads_without_lesions_and_table_with_bids_are_refused(tmp_path):
    reads = tmp_path / "reads.csv"
    reads.write_text("patient\n")
    with pytest.raises(InputError, match="reads is set but reader_study.lesions is empty"):
        check_config(_config(reader_study={"reads": str(reads)}))
    with pytest.raises(InputError, match="one of subjects .* not subjects and bids_dir"):
        check_config(_config(subjects=str(reads), bids_dir=str(tmp_path)))


def test_the_study_needs_a_training_subject_per_fold_and_a_test_subject():
    check_study(_config(), n_train=2, n_test=2, source="x")
    with pytest.raises(InputError) as err:
        check_study(_config(split={"folds": 5}), n_train=3, n_test=1, source="subjects table s.tsv")
    assert str(err.value) == (
        "config split.folds = 5 but there are only 3 training subject(s): each fold needs at least one "
        "(lower the number of folds or add training subjects) (subjects table s.tsv)"
    )
    with pytest.raises(InputError, match=r"no test subject \(x\)"):
        check_study(_config(), n_train=4, n_test=0, source="x")


def test_each_check_of_the_study_belongs_to_the_targets_that_need_it():
    """--until exclusions or qc needs nothing of the study; the reading lists need two test patients, which
    used to fail only after every fold had trained."""
    assert requested_checks(["all"], ["exclusions"]) == frozenset()
    assert requested_checks(["all"], ["qc", "registration_quality"]) == frozenset()
    assert requested_checks(["exclusions"]) == frozenset()
    assert requested_checks(["all"]) == frozenset(STUDY_CHECKS)
    assert requested_checks(["voxel_metrics"]) == {"folds", "test"}
    assert requested_checks(["all"], ["voxel_metrics"]) == {"folds", "test"}
    assert "reading" in requested_checks(["reading_lists"])
    excluded = [(f"sub-{i:02d}", "missing FLAIR") for i in range(7)]
    check_study(_config(), n_train=0, n_test=0, source="x", checks=frozenset(), excluded=excluded)
    with pytest.raises(InputError) as err:
        check_study(_config(), n_train=0, n_test=0, source="BIDS folder b", excluded=excluded)
    message = str(err.value)
    assert message.startswith("no exam is included (BIDS folder b; 7 exam(s) excluded: ")
    assert "sub-00: missing FLAIR" in message and "and 2 more" in message and "\n" not in message
    check_study(
        _config(), n_train=3, n_test=1, source="x", checks=requested_checks(["voxel_metrics"])
    )
    with pytest.raises(
        InputError, match="reading lists need at least 2 test patients, there are 1"
    ):
        check_study(_config(), n_train=3, n_test=1, source="x")
    with pytest.raises(InputError, match="threshold on the training subjects: it needs at least 2"):
        check_study(_config(), n_train=1, n_test=2, source="x", checks={"detector"}, embedded=True)


# --- rule scripts: one line on stderr, the traceback in the job's log, SIGTERM cleans up -------------------------

JOB = """
import os, signal, sys, types
sys.path.insert(0, {scripts!r})
from _common import setup
from virtual_contrast.io import InputError, atomic_path

snakemake = types.SimpleNamespace(log=[{log!r}], rule="demo", wildcards={{"subject": "p1"}})
setup(snakemake)
with atomic_path({out!r}) as tmp:
    tmp.write_bytes(b"half-written")
    if sys.argv[1] == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
    raise InputError("what is wrong", subject="p1", path="in.nii.gz")
"""


@pytest.mark.parametrize("how", ["error", "sigterm"])
def test_a_rule_script_that_stops_leaves_one_line_a_log_and_no_temporary_file(tmp_path, how):

    log, out = tmp_path / "demo.log", tmp_path / "out" / "x.nii.gz"
    script = tmp_path / "job.py"
    script.write_text(
        JOB.format(scripts=str(REPO / "workflow_scripts"), log=str(log), out=str(out))
    )
    proc = subprocess.run(
        [sys.executable, str(script), how], capture_output=True, text=True, timeout=120
    )
    assert list(out.parent.iterdir()) == []  # the atomic writer's temporary file is gone
    if how == "sigterm":
        assert proc.returncode == 128 + 15
        assert "stopped by signal 15" in log.read_text()
        return
    assert proc.returncode == 1
    assert proc.stderr == (
        f"demo subject=p1: error: subject 'p1', file 'in.nii.gz': what is wrong (traceback in {log})\n"
    )
    assert "Traceback (most recent call last)" in log.read_text()
