"""Cross-validation folds: only training subjects, balanced, stratified, seeded, stable when subjects are added."""

from __future__ import annotations

import pandas as pd
import pytest

from virtual_contrast.cli import main as cli_main
from virtual_contrast.io import InputError
from virtual_contrast.model.folds import fold_members, make_folds, read_folds


def _table(n_train=107, n_test=38, strata=("2019-11", "2019-12", "2020-01", "2020-02")):
    rows = [
        {"subject": f"{i:03d}", "split": "train", "stratum": strata[i % len(strata)]}
        for i in range(n_train)
    ]
    rows += [
        {"subject": f"{n_train + i:03d}", "split": "test", "stratum": strata[i % len(strata)]}
        for i in range(n_test)
    ]
    return pd.DataFrame(rows)


def test_paper_sizes_and_only_training_subjects():
    subjects = _table()
    folds = make_folds(subjects, k=5, seed=2021)
    assert list(folds.columns) == ["subject", "fold"]
    train = set(subjects.loc[subjects["split"] == "train", "subject"])
    assert set(folds["subject"]) == train  # every training subject exactly once, no test subject
    assert folds["subject"].is_unique
    # The paper: 21 or 22 patients per fold.
    assert sorted(folds["fold"].value_counts()) == [21, 21, 21, 22, 22]


def test_folds_are_stratified():
    subjects = _table(n_train=60, n_test=0, strata=("a", "a", "b", "c"))
    folds = make_folds(subjects, k=5, seed=0).merge(subjects, on="subject")
    per = folds.groupby(["stratum", "fold"]).size().unstack(fill_value=0)
    assert (per.max(axis=1) - per.min(axis=1)).max() <= 1
    sizes = folds["fold"].value_counts()
    assert sizes.max() - sizes.min() <= 1


def test_folds_depend_on_seed_and_subjects_not_on_row_order():
    subjects = _table(n_train=40, n_test=5)
    a = make_folds(subjects, k=5, seed=1)
    shuffled = subjects.sample(frac=1, random_state=3)
    pd.testing.assert_frame_equal(a, make_folds(shuffled, k=5, seed=1))
    b = make_folds(subjects, k=5, seed=2)
    assert not a.equals(b)


def test_no_stratum_column():
    subjects = _table(n_train=23, n_test=4).drop(columns="stratum")
    folds = make_folds(subjects, k=4, seed=0)
    assert sorted(folds["fold"].value_counts()) == [5, 6, 6, 6]


def test_adding_subjects_keeps_existing_folds_and_balance():
    old = _table(n_train=50, n_test=10)
    first = make_folds(old, k=5, seed=0)
    added = pd.DataFrame(
        [{"subject": f"new{i}", "split": "train", "stratum": "2020-01"} for i in range(7)]
        + [{"subject": "newtest", "split": "test", "stratum": "2020-01"}]
    )
    grown = pd.concat([old, added], ignore_index=True)
    second = make_folds(grown, k=5, seed=0, previous=first)
    merged = first.merge(second, on="subject", suffixes=("_old", "_new"))
    assert len(merged) == len(first)
    assert (merged["fold_old"] == merged["fold_new"]).all()
    assert set(second["subject"]) == set(first["subject"]) | {f"new{i}" for i in range(7)}
    sizes = second["fold"].value_counts()
    assert sizes.max() - sizes.min() <= 1
    # Without the previous assignment a new deal would move existing subjects.
    fresh = make_folds(grown, k=5, seed=0).merge(first, on="subject", suffixes=("_new", "_old"))
    assert (fresh["fold_old"] != fresh["fold_new"]).any()


def test_removed_and_retagged_subjects_leave_the_folds():
    subjects = _table(n_train=30, n_test=5)
    first = make_folds(subjects, k=3, seed=0)
    later = subjects[subjects["subject"] != "000"].copy()
    later.loc[later["subject"] == "001", "split"] = "test"
    second = make_folds(later, k=3, seed=0, previous=first)
    assert "000" not in set(second["subject"]) and "001" not in set(second["subject"])
    kept = first[~first["subject"].isin(["000", "001"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(second, kept)


def test_fold_members_are_disjoint_and_exclude_test_subjects():
    subjects = _table(n_train=20, n_test=6)
    folds = make_folds(subjects, k=5, seed=0)
    test = set(subjects.loc[subjects["split"] == "test", "subject"])
    tunes = []
    for f in range(5):
        train, tune = fold_members(folds, f)
        assert not set(train) & set(tune)
        assert not (set(train) | set(tune)) & test
        assert len(train) + len(tune) == 20
        tunes += tune
    assert sorted(tunes) == sorted(folds["subject"])  # each subject tunes exactly one fold
    with pytest.raises(InputError, match="fold 9 not in the folds table"):
        fold_members(folds, 9)


@pytest.mark.parametrize(
    ("table", "kwargs", "message"),
    [
        (pd.DataFrame({"subject": ["a", "a", "b"], "split": "train"}), {"k": 2}, "more than once"),
        (
            pd.DataFrame({"subject": ["a", "b"], "split": ["train", "val"]}),
            {"k": 2},
            "'train' or 'test'",
        ),
        (
            pd.DataFrame({"subject": ["a", "b", "c"], "split": "train"}),
            {"k": 4},
            "cannot fill 4 folds",
        ),
        (pd.DataFrame({"subject": ["a", "b"], "split": "train"}), {"k": 1}, "at least 2 folds"),
        (pd.DataFrame({"subject": ["a", "b"]}), {"k": 2}, "no 'split' column"),
    ],
)
def test_bad_tables(table, kwargs, message):
    with pytest.raises(InputError, match=message):
        make_folds(table, **kwargs)


def test_previous_with_more_folds_is_rejected():
    subjects = _table(n_train=20, n_test=0)
    with pytest.raises(InputError, match="incompatible with k=3"):
        make_folds(subjects, k=3, previous=make_folds(subjects, k=5))


def test_split_command(tmp_path):
    subjects = _table(n_train=12, n_test=3)
    table = tmp_path / "subjects.tsv"
    subjects.to_csv(table, sep="\t", index=False)
    out = tmp_path / "tables" / "folds.tsv"
    assert (
        cli_main(["split", "--subjects", str(table), "--k", "3", "--seed", "4", "--out", str(out)])
        == 0
    )
    folds = read_folds(out)
    assert folds["subject"].tolist() == [f"{i:03d}" for i in range(12)]  # ids stay strings
    pd.testing.assert_frame_equal(folds, make_folds(subjects, k=3, seed=4))
    more = pd.concat(
        [subjects, pd.DataFrame([{"subject": "999", "split": "train", "stratum": "x"}])]
    )
    more.to_csv(table, sep="\t", index=False)
    out2 = tmp_path / "folds2.tsv"
    assert cli_main(["split", "--subjects", str(table), "--k", "3", "--previous", str(out),
                     "--out", str(out2)]) == 0  # fmt: skip
    assert read_folds(out2).merge(folds, on="subject").pipe(lambda d: (d.fold_x == d.fold_y).all())
