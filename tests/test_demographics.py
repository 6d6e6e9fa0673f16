"""Table 1 demographics: the paper's Fisher p-values reproduced from its counts, Mann-Whitney on ages."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from virtual_contrast.cli import main
from virtual_contrast.reader.demographics import (
    demographics_table,
    fisher_exact_2xk,
)


def paper_table1_subjects() -> pd.DataFrame:
    """107 training and 38 test patients with Table 1's sex and indication counts (ages and weights made up)."""
    rng = np.random.default_rng(0)
    rows = []
    for split, women, indications in (
        ("train", 58, {"glioma": 22, "metastases": 52, "meningioma": 1, "none": 32}),
        ("test", 22, {"glioma": 8, "metastases": 14, "meningioma": 0, "none": 16}),
    ):
        labels = [k for k, n in indications.items() for _ in range(n)]
        for i, indication in enumerate(labels):
            rows.append(
                {
                    "subject": f"{split}{i:03d}",
                    "split": split,
                    "sex": "F" if i < women else "M",
                    "age": float(rng.normal(55 if split == "train" else 62, 13)),
                    "weight": float(rng.normal(70, 18)),
                    "indication": indication,
                }
            )
    return pd.DataFrame(rows)


def test_table1_reproduces_the_papers_fisher_p_values() -> None:
    table = demographics_table(paper_table1_subjects())
    rows = table.set_index(["variable", "level"])
    assert (
        rows.loc[("patients", ""), "train"] == "107" and rows.loc[("patients", ""), "test"] == "38"
    )
    assert rows.loc[("sex", "F"), "train"] == "54% (58/107)"
    assert rows.loc[("sex", "F"), "test"] == "58% (22/38)"
    assert round(rows.loc[("sex", "F"), "p_value"], 2) == 0.71  # paper: p=.71
    first_indication = table[table["variable"] == "indication"].iloc[0]
    assert round(first_indication["p_value"], 2) == 0.51  # paper: p=.51
    assert rows.loc[("indication", "metastases"), "test"] == "37% (14/38)"
    assert rows.loc[("indication", "meningioma"), "test"] == "0% (0/38)"


def test_continuous_variables_use_mann_whitney() -> None:
    subjects = paper_table1_subjects()
    table = demographics_table(subjects).set_index("variable")
    ages = [subjects.loc[subjects["split"] == s, "age"] for s in ("train", "test")]
    expected = stats.mannwhitneyu(ages[0], ages[1], alternative="two-sided").pvalue
    assert table.loc["age", "p_value"] == pytest.approx(expected)
    assert table.loc["age", "statistical_test"] == "Mann-Whitney U"
    assert table.loc["age", "train"].endswith(" y") and "(±" in table.loc["age", "train"]


@pytest.mark.parametrize(
    "table", [[[3, 1], [1, 3]], [[10, 2], [3, 15]], [[0, 5], [5, 0]], [[7, 7], [7, 7]]]
)
def test_fisher_equals_scipy_on_2x2(table) -> None:
    assert fisher_exact_2xk(np.array(table)) == pytest.approx(
        stats.fisher_exact(table).pvalue, rel=1e-9
    )


def test_no_demographic_column_gives_no_table_and_missing_values_are_skipped() -> None:
    assert demographics_table(pd.DataFrame({"subject": ["a"], "split": ["test"]})) is None
    subjects = paper_table1_subjects()
    subjects.loc[0, "age"] = np.nan
    table = demographics_table(subjects[["subject", "split", "age"]])
    assert list(table["variable"]) == ["patients", "age"]
    assert np.isfinite(table.loc[1, "p_value"])


def test_cohort_column_names_are_accepted() -> None:
    subjects = paper_table1_subjects().rename(columns={"weight": "weight_kg"})
    table = demographics_table(subjects)
    assert "weight" in set(table["variable"])
    assert table.set_index("variable").loc["weight", "train"].endswith(" kg")


def test_cli_writes_table_and_markdown(tmp_path, capsys) -> None:
    path = tmp_path / "subjects.tsv"
    paper_table1_subjects().to_csv(path, sep="\t", index=False)
    code = main(
        [
            "demographics",
            "--subjects",
            str(path),
            "--out",
            str(tmp_path / "t1.tsv"),
            "--markdown",
            str(tmp_path / "t1.md"),
        ]
    )
    assert code == 0
    md = (tmp_path / "t1.md").read_text()
    assert "| sex: F | 54% (58/107) | 58% (22/38) | p=.71 |" in md
    tsv = pd.read_csv(tmp_path / "t1.tsv", sep="\t")
    assert list(tsv.columns) == [
        "variable",
        "level",
        "train",
        "test",
        "p_value",
        "statistical_test",
    ]
    assert tsv.loc[tsv["variable"] == "sex", "p_value"].iloc[0] == pytest.approx(0.7092, abs=1e-4)
