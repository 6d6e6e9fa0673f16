"""Subjects table, BIDS discovery, exclusions and the train/test split."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from virtual_contrast.cohort.plan import plan_cohort
from virtual_contrast.config import validate_config
from virtual_contrast.io import InputError
from virtual_contrast.layout import BIDS_SEQUENCES, bids_exam_files
from virtual_contrast.subjects import (
    assign_split,
    check_subject_id,
    discover_bids,
    flowchart_counts,
    read_subjects_table,
    select_exams,
)
from virtual_contrast.workflow import plan_study

#: The sequence files of an exam, as the workflow names them (no bvec: discovery does not need it).
SEQ_FILES = [key for key in BIDS_SEQUENCES if key != "bvec"]


def _touch_exam(root: Path, subject: str, session: str = "", skip: tuple[str, ...] = ()) -> None:
    files = bids_exam_files(root, subject, session)
    for key in SEQ_FILES:
        if key in skip:
            continue
        path = files[key]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


@pytest.mark.parametrize("bad", ["a/b", "..", "a..b", "sub_1", "x y", ""])
def test_invalid_subject_ids_are_rejected_with_the_reason(bad):
    with pytest.raises(InputError) as err:
        check_subject_id(bad)
    assert repr(bad) in str(err.value)
    if "/" in bad:
        assert "path separator" in str(err.value)
    if ".." in bad:
        assert "'..'" in str(err.value)


def test_bids_discovery_keeps_the_earliest_exam_and_excludes_incomplete_ones(tmp_path):
    _touch_exam(tmp_path, "p01")
    _touch_exam(tmp_path, "p02", "01")
    _touch_exam(tmp_path, "p02", "02")
    _touch_exam(tmp_path, "p03", skip=("flair",))
    _touch_exam(tmp_path, "p04", skip=("bval",))
    exams = discover_bids(tmp_path)
    assert len(exams) == 5
    selection = select_exams(exams)
    assert list(selection.included["subject"]) == ["p01", "p02"]
    assert selection.included.set_index("subject").loc["p02", "session"] == "01"
    reasons = selection.excluded.set_index("subject")["reason"].to_dict()
    assert reasons["p02"].startswith("later visit (session 02)")
    assert reasons["p03"] == "missing FLAIR"
    assert reasons["p04"] == "missing DWI b-values"
    assert flowchart_counts(selection) == [
        ("exams", 5),
        ("later visits excluded", 1),
        ("patients (one exam each)", 4),
        ("excluded: missing sequence", 2),
        ("included patients", 2),
    ]


def _table_row(subject: str, session: str = "", **extra: str) -> dict[str, str]:
    files = bids_exam_files("", subject, session)
    row = {"subject": subject, "session": session}
    row.update({k: str(files[k]) for k in SEQ_FILES})
    row.update(extra)
    return row


def _write_table(path: Path, rows: list[dict[str, str]]) -> Path:
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


def test_subjects_table_resolves_paths_and_excludes_exams_with_an_empty_cell(tmp_path):
    _touch_exam(tmp_path, "p01")
    _touch_exam(tmp_path, "p02", skip=("flair",))
    table = _write_table(
        tmp_path / "subjects.tsv", [_table_row("p01"), _table_row("p02", flair="")]
    )
    exams = read_subjects_table(table)
    assert Path(exams.iloc[0]["t1"]).is_absolute()
    selection = select_exams(exams)
    assert list(selection.included["subject"]) == ["p01"]
    assert selection.excluded.iloc[0]["reason"] == "missing FLAIR"


def test_a_listed_file_that_does_not_exist_stops_naming_line_column_and_path(tmp_path):
    _touch_exam(tmp_path, "p01")
    _touch_exam(tmp_path, "p02")
    rows = [_table_row("p01"), _table_row("p02", t1="sub-p02/anat/typo_T1w.nii.gz")]
    table = _write_table(tmp_path / "subjects.tsv", rows)
    with pytest.raises(InputError) as err:
        read_subjects_table(table)
    message = str(err.value)
    assert "subject 'p02'" in message and "subjects.tsv" in message and "line 3" in message
    assert "the t1 file" in message and str(tmp_path / "sub-p02/anat/typo_T1w.nii.gz") in message


@pytest.mark.parametrize("typo", ["tset", "training", "", "tes t"])
def test_a_split_value_other_than_train_or_test_is_an_error_naming_the_row(tmp_path, typo):
    for subject in ("p01", "p02"):
        _touch_exam(tmp_path, subject)
    rows = [_table_row("p01", split="train"), _table_row("p02", split=typo)]
    table = _write_table(tmp_path / "subjects.tsv", rows)
    with pytest.raises(InputError) as err:
        read_subjects_table(table)
    message = str(err.value)
    assert "subject 'p02'" in message and "line 3" in message and f"split {typo!r}" in message
    assert "'train' or 'test'" in message


def test_split_values_are_case_insensitive_and_no_test_subject_reaches_training(tmp_path):
    subjects = [f"p{i:02d}" for i in range(1, 7)]
    for subject in subjects:
        _touch_exam(tmp_path, subject)
    values = ["Train", " TRAIN", "train ", "Test", "TEST", "test"]
    rows = [_table_row(s, split=v) for s, v in zip(subjects, values, strict=True)]
    table = _write_table(tmp_path / "subjects.tsv", rows)
    config = {
        "subjects": str(table),
        "bids_dir": "",
        # A hash split would hold out about none of them: the column must win for every row.
        "split": {"test_fraction": 0.01, "seed": 0},
    }
    study = plan_study(validate_config(config))
    assert study.train_subjects == ["p01", "p02", "p03"]
    assert study.test_subjects == ["p04", "p05", "p06"]
    assert set(study.split_table()["split"]) == {"train", "test"}


@pytest.mark.parametrize("session", ["", "01"])
def test_a_duplicated_exam_is_an_error_naming_both_rows(tmp_path, session):
    _touch_exam(tmp_path, "p01", session)
    _touch_exam(tmp_path, "p02", session)
    rows = [_table_row("p01", session), _table_row("p02", session), _table_row("p01", session)]
    table = _write_table(tmp_path / "subjects.tsv", rows)
    with pytest.raises(InputError) as err:
        read_subjects_table(table)
    message = str(err.value)
    assert "subject 'p01'" in message and "line 2 and line 4 are the same exam" in message
    assert "later visit" not in message
    # Another session of the same subject is a later visit, not a duplicate.
    _touch_exam(tmp_path, "p01", "02")
    rows[2] = _table_row("p01", "02")
    read_subjects_table(_write_table(table, rows))


def test_select_exams_refuses_duplicates_from_any_source():
    exams = pd.DataFrame([{"subject": "p01", "session": "01", **dict.fromkeys(SEQ_FILES, "x")}] * 2)
    with pytest.raises(InputError, match=r"subject 'p01'.*row 1 and row 2 are the same exam"):
        select_exams(exams, check_files=False)


def test_subjects_table_errors_name_the_file_and_the_problem(tmp_path):
    table = tmp_path / "subjects.tsv"
    pd.DataFrame([{"subject": "p01", "t1": "x"}]).to_csv(table, sep="\t", index=False)
    with pytest.raises(InputError, match=r"subjects.tsv.*lacks column\(s\) flair"):
        read_subjects_table(table)
    pd.DataFrame([{"subject": "../etc", **dict.fromkeys(SEQ_FILES, "x")}]).to_csv(
        table, sep="\t", index=False
    )
    with pytest.raises(InputError, match=r"'\.\./etc'.*subjects.tsv.*contains '\.\.'"):
        read_subjects_table(table)


def test_split_is_stable_when_subjects_are_added():
    first = [f"s{i:03d}" for i in range(40)]
    split = assign_split(first, test_fraction=0.25, seed=3)
    more = assign_split(first + [f"t{i:03d}" for i in range(60)], test_fraction=0.25, seed=3)
    assert all(more[s] == split[s] for s in first)
    n_test = sum(v == "test" for v in more.values())
    assert 10 <= n_test <= 40  # about a quarter of 100
    assert assign_split(first, test_fraction=0.25, seed=4) != split


def test_small_cohorts_hold_out_one_and_train_on_two():
    for seed in range(20):
        split = assign_split(["a", "b", "c"], test_fraction=0.25, seed=seed)
        assert sorted(split.values()).count("test") >= 1
        assert sorted(split.values()).count("train") >= 2


def test_cohort_plan_is_deterministic_and_has_the_planned_exclusions():
    plan = plan_cohort(7, extra_visits=2, missing_sequence=3)
    assert len(plan) == 12
    assert sum(bool(e.missing) for e in plan) == 3
    # Growing the cohort only adds exams: what was computed for the others stays valid.
    assert set(plan) < set(plan_cohort(9, extra_visits=2, missing_sequence=3))
    assert sum(e.session == "02" for e in plan) == 2
    config = {
        "subjects": "",
        "bids_dir": "",
        "cohort": {"n_subjects": 7, "seed": 7, "extra_visits": 2, "missing_sequence": 3},
        "split": {"test_fraction": 0.25, "seed": 1},
    }
    study = plan_study(validate_config(config))
    assert len(study.subjects) == 7
    assert set(study.train_subjects) | set(study.test_subjects) == set(study.subjects)
    assert len(study.selection.excluded) == 5
    lacking = [e for e in plan if e.missing]
    assert all(Path(study.raw_inputs(s)["t1"]).name.endswith("_T1w.nii.gz") for s in study.subjects)
    assert not {e.subject for e in lacking} & set(study.subjects)
