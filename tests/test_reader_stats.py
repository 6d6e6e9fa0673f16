"""Reader statistics: the paper's Table 5 reproduced from counts built to match it, the tests by hand, and
clear errors on bad annotation files."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from virtual_contrast import annotations
from virtual_contrast.cli import main
from virtual_contrast.io import InputError
from virtual_contrast.matching import match_lesions
from virtual_contrast.reader import stats
from virtual_contrast.reader.detection import DETECTION_COLUMNS
from virtual_contrast.reader.grades import grade_table
from virtual_contrast.reader.inference import mcnemar_midp, wilcoxon_signed_rank
from virtual_contrast.reader.table5 import _threshold_label, table5_rows
from virtual_contrast.report import format_p

# --------------------------------------------------------------------------------------------------
# A study built to reproduce Table 5 of Ammari et al. 2021: 38 patients, 91 reference lesions read by R1 on
# ref-T1c; R1 and R2 read low-T1c and vir-T1c of every patient.
#
# Reference lesions by long axis (mm) -> {detection pattern: number of lesions}. A pattern gives whether the
# lesion was found by R1 on low, R1 on vir, R2 on low, R2 on vir. The sizes fall in the paper's nested bins
# (91 lesions >= 2.5 mm, 74 >= 5, 52 >= 7.5, 42 >= 10); the patterns were searched so that the per-reader
# counts are Table 5's and the McNemar mid-p values round to the printed ones.
REFERENCE_PATTERNS = {
    3.0: {"0101": 1, "0001": 1, "0000": 15},
    6.0: {"1111": 3, "1000": 1, "0101": 1, "0100": 1, "0001": 3, "0000": 13},
    8.5: {"1111": 3, "1001": 1, "0101": 4, "0001": 2},
    15.0: {"1111": 26, "1110": 1, "1101": 2, "1000": 1, "0101": 6, "0011": 1, "0000": 5},
}
PATTERN_READS = (("R1", "low"), ("R1", "vir"), ("R2", "low"), ("R2", "vir"))
# False positives: (reader, modality) -> long axis -> {patient number: count}; searched so that the FDR
# intervals and the Wilcoxon p-values round to Table 5's.
FALSE_POSITIVES = {
    ("R1", "low"): {15.0: {5: 1, 13: 1, 18: 1, 22: 1}},
    ("R1", "vir"): {
        3.0: {1: 1, 7: 1, 18: 1},
        6.0: {1: 1, 3: 1, 4: 2, 7: 2, 18: 1},
        8.5: {3: 1, 4: 2, 5: 1, 7: 2, 13: 1},
        15.0: {13: 1},
    },
    ("R2", "low"): {6.0: {14: 1}, 8.5: {11: 1}, 15.0: {5: 1, 13: 1}},
    ("R2", "vir"): {
        3.0: {3: 1, 4: 1, 29: 1},
        6.0: {1: 1, 3: 1, 4: 1, 9: 1, 13: 1, 22: 1, 24: 1},
        8.5: {9: 1, 13: 3, 18: 1},
        15.0: {4: 1, 7: 1, 13: 2, 22: 1},
    },
}
N_PATIENTS = 38

# Table 5, transcribed: (reader, modality, threshold) -> (SE %, TP, n_ref, CI low %, CI high %,
#                                                        FDR, FP, ±half-width, PPV %, PPV denominator, F1 %)
TABLE5 = {
    ("R1", "low", 0): (42, 38, 91, 32, 53, "0.11", 4, "0.10", 90, 42, 57),
    ("R1", "vir", 0): (53, 48, 91, 42, 63, "0.47", 18, "0.38", 73, 66, 61),
    ("R2", "low", 0): (37, 34, 91, 27, 48, "0.11", 4, "0.10", 89, 38, 53),
    ("R2", "vir", 0): (59, 54, 91, 49, 70, "0.53", 20, "0.39", 73, 74, 65),
    ("R1", "low", 5): (51, 38, 74, 39, 63, "0.11", 4, "0.10", 90, 42, 66),
    ("R1", "vir", 5): (64, 47, 74, 52, 74, "0.39", 15, "0.33", 76, 62, 69),
    ("R2", "low", 5): (46, 34, 74, 34, 58, "0.11", 4, "0.10", 89, 38, 61),
    ("R2", "vir", 5): (70, 52, 74, 59, 80, "0.45", 17, "0.36", 75, 69, 73),
    ("R1", "low", 7.5): (65, 34, 52, 51, 78, "0.11", 4, "0.10", 89, 38, 76),
    ("R1", "vir", 7.5): (81, 42, 52, 67, 90, "0.21", 8, "0.19", 84, 50, 82),
    ("R2", "low", 7.5): (60, 31, 52, 45, 73, "0.08", 3, "0.09", 91, 34, 72),
    ("R2", "vir", 7.5): (87, 45, 52, 74, 94, "0.26", 10, "0.28", 82, 55, 84),
    ("R1", "low", 10): (71, 30, 42, 55, 84, "0.11", 4, "0.10", 88, 34, 79),
    ("R1", "vir", 10): (83, 35, 42, 69, 93, "0.03", 1, "0.05", 97, 36, 90),
    ("R2", "low", 10): (67, 28, 42, 50, 80, "0.05", 2, "0.07", 93, 30, 78),
    ("R2", "vir", 10): (83, 35, 42, 69, 93, "0.13", 5, "0.14", 88, 40, 85),
}
# Table 5's p-values: (comparison, reader, modality, metric) -> printed p per threshold 0 (all), 5, 7.5, 10.
TABLE5_P = {
    ("low_vs_vir", "R1", "low vs vir", "sensitivity"): ("p=.01", "p=.02", "p=.02", "p=.07"),
    ("low_vs_vir", "R2", "low vs vir", "sensitivity"): ("p<.001", "p<.001", "p<.001", "p=.02"),
    ("low_vs_vir", "R1", "low vs vir", "fdr"): ("p=.04", "p=.07", "p=.23", "p=.08"),
    ("low_vs_vir", "R2", "low vs vir", "fdr"): ("p=.02", "p=.04", "p=.13", "p=.18"),
    ("reader_vs_reader", "R1 vs R2", "low", "sensitivity"): ("p=.13", "p=.13", "p=.22", "p=.38"),
    ("reader_vs_reader", "R1 vs R2", "vir", "sensitivity"): ("p=.07", "p=.11", "p=.22", "p>.99"),
    ("reader_vs_reader", "R1 vs R2", "low", "fdr"): ("p>.99", "p>.99", "p=.56", "p=.16"),
    ("reader_vs_reader", "R1 vs R2", "vir", "fdr"): ("p=.68", "p=.78", "p=.76", "p=.046"),
}
# Reader averages (low, vir): SE %, FDR, PPV %, F1 %.
TABLE5_AVERAGE = {
    0: (("40%", "56%"), ("0.11", "0.50"), ("90%", "73%"), ("55%", "63%")),
    5: (("49%", "67%"), ("0.11", "0.42"), ("90%", "76%"), ("63%", "71%")),
    7.5: (("62%", "84%"), ("0.09", "0.24"), ("90%", "83%"), ("74%", "83%")),
    10: (("69%", "83%"), ("0.08", "0.08"), ("91%", "92%"), ("78%", "88%")),
}


def _patient(i: int) -> str:
    return f"P{i:02d}"


def table5_study() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Lesions and reads CSV tables of the study above (lesions far apart, so matching is unambiguous)."""
    rows = []
    slot = {}
    n = 0
    for size, patterns in REFERENCE_PATTERNS.items():
        for pattern, count in patterns.items():
            for _ in range(count):
                patient = _patient(
                    n % 22 + 1
                )  # 22 patients with lesions, 16 without (as the test sample)
                n += 1
                k = slot[patient] = slot.get(patient, -1) + 1
                centre = np.array([-100.0 + 40.0 * k, 0.0, 0.0])
                axes = (size, 0.6 * size)
                rows.append((patient, "R1", "ref", *centre, *axes))
                for (reader, modality), flag in zip(PATTERN_READS, pattern, strict=True):
                    if flag == "1":
                        rows.append(
                            (patient, reader, modality, *(centre + [0.4, -0.3, 0.2]), *axes)
                        )
    for (reader, modality), by_size in FALSE_POSITIVES.items():
        for size, per_patient in by_size.items():
            for number, count in per_patient.items():
                for j in range(count):
                    y = 150.0 + 40.0 * j + 10 * size
                    rows.append(
                        (_patient(number), reader, modality, 0.0, y, 80.0, size, 0.6 * size)
                    )
    lesions = pd.DataFrame(rows, columns=list(annotations.LESION_COLUMNS))
    reads = []
    for i in range(1, N_PATIENTS + 1):
        for reader, modality in (("R1", "ref"), *PATTERN_READS):
            reads.append(
                (
                    _patient(i),
                    reader,
                    modality,
                    1 + (i * 7 + len(modality + reader)) % 5,
                    60.0 + 3 * i,
                )
            )
    return lesions, pd.DataFrame(reads, columns=list(annotations.READ_COLUMNS))


@pytest.fixture(scope="module")
def table5(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, pd.DataFrame], object]:
    lesions, reads = table5_study()
    out = tmp_path_factory.mktemp("table5")
    tables = stats.reader_stats(lesions, reads, out, thresholds=[0, 2.5, 5, 7.5, 10])
    return tables, out


def test_table5_names_a_simulated_low_dose_so(table5) -> None:
    from virtual_contrast.reader.table5 import table5_markdown

    tables, _ = table5
    plain = table5_markdown(tables["detection"], tables["comparisons"])
    named = table5_markdown(
        tables["detection"], tables["comparisons"], labels={"low": "simulated low-T1c"}
    )
    assert "R1 low-T1c" in plain and "simulated" not in plain
    assert "R1 simulated low-T1c" in named and "R1 low-T1c" not in named


def test_study_counts_match_the_paper() -> None:
    lesions, reads = table5_study()
    ref = lesions[lesions["modality"] == "ref"]
    assert len(ref) == 91
    assert [(ref["long_axis_mm"] >= t).sum() for t in (2.5, 5, 7.5, 10)] == [91, 74, 52, 42]
    assert reads["patient"].nunique() == N_PATIENTS


@pytest.mark.parametrize("key", sorted(TABLE5, key=str))
def test_detection_reproduces_table5(table5, key) -> None:
    tables, _ = table5
    reader, modality, thr = key
    se, tp, n_ref, lo, hi, fdr, fp, half, ppv, n_det, f1 = TABLE5[key]
    det = tables["detection"]
    row = det[
        (det["reader"] == reader) & (det["modality"] == modality) & (det["min_long_axis_mm"] == thr)
    ]
    assert len(row) == 1
    r = row.iloc[0]
    assert (r["true_positives"], r["n_reference"], r["false_positives"], r["n_patients"]) == (
        tp,
        n_ref,
        fp,
        38,
    )
    assert r["n_detections"] == n_det
    assert round(100 * r["sensitivity"]) == se
    assert (round(100 * r["sensitivity_ci_low"]), round(100 * r["sensitivity_ci_high"])) == (lo, hi)
    assert f"{r['fdr']:.2f}" == fdr
    assert f"{(r['fdr_ci_high'] - r['fdr_ci_low']) / 2:.2f}" == half
    assert r["fdr_ci_low"] + r["fdr_ci_high"] == pytest.approx(2 * r["fdr"])
    assert round(100 * r["ppv"]) == ppv
    assert round(100 * r["f1"]) == f1
    assert r["f1"] == pytest.approx(2 * r["sensitivity"] * r["ppv"] / (r["sensitivity"] + r["ppv"]))


def test_threshold_zero_and_smallest_lesion_threshold_agree(table5) -> None:
    det = table5[0]["detection"].drop(columns="min_long_axis_mm")
    t0 = det[table5[0]["detection"]["min_long_axis_mm"] == 0].reset_index(drop=True)
    t25 = det[table5[0]["detection"]["min_long_axis_mm"] == 2.5].reset_index(drop=True)
    pd.testing.assert_frame_equal(t0, t25)


@pytest.mark.parametrize("key", sorted(TABLE5_P, key=str))
def test_comparisons_reproduce_table5_p_values(table5, key) -> None:
    comp = table5[0]["comparisons"]
    kind, reader, modality, metric = key
    sel = comp[
        (comp["comparison"] == kind)
        & (comp["reader"] == reader)
        & (comp["modality"] == modality)
        & (comp["metric"] == metric)
    ]
    got = [
        format_p(sel.loc[sel["min_long_axis_mm"] == t, "p_value"].item()) for t in (0, 5, 7.5, 10)
    ]
    assert got == list(TABLE5_P[key])


def _fagerland_midp(b: int, c: int) -> float:
    """The mid-p of Fagerland et al. 2013 (their equation 4), written out with binomial coefficients."""
    n, k = b + c, min(b, c)
    one_sided = sum(math.comb(n, i) for i in range(k)) / 2**n + 0.5 * math.comb(n, k) / 2**n
    return 2 * one_sided


def test_mcnemar_mid_p_equals_fagerland_on_hand_counted_pairs(table5) -> None:
    """Discordant pairs counted by hand from the patterns (all lesions, R1 low vs vir): low-only lesions
    are patterns 1 0 x x, vir-only 0 1 x x."""
    low_only = vir_only = 0
    for patterns in REFERENCE_PATTERNS.values():
        for pattern, count in patterns.items():
            low_only += count * (pattern[:2] == "10")
            vir_only += count * (pattern[:2] == "01")
    assert (low_only, vir_only) == (3, 13)
    comp = table5[0]["comparisons"]
    row = comp[
        (comp["comparison"] == "low_vs_vir")
        & (comp["reader"] == "R1")
        & (comp["metric"] == "sensitivity")
        & (comp["min_long_axis_mm"] == 0)
    ].iloc[0]
    assert (row["only_first"], row["only_second"], row["n_pairs"]) == (3, 13, 91)
    assert row["p_value"] == pytest.approx(_fagerland_midp(3, 13), abs=1e-12)
    assert row["p_value"] == pytest.approx(0.01273, abs=1e-5)


@pytest.mark.parametrize("b,c", [(0, 0), (5, 1), (1, 5), (4, 4), (0, 7), (13, 3), (30, 12)])
def test_mcnemar_mid_p_formula(b, c) -> None:
    assert mcnemar_midp(b, c) == pytest.approx(min(1.0, _fagerland_midp(b, c)) if b + c else 1.0)


def test_wilcoxon_matches_hand_computation() -> None:
    # Table 5, R1 >= 10 mm: 4 patients with one low false positive, one of them also with a vir one.
    low = np.zeros(38)
    vir = np.zeros(38)
    low[:4] = 1
    vir[0] = 1
    stat, p = wilcoxon_signed_rank(low, vir)
    # Three +1 differences, zeros dropped: T- = 0, mean 3, variance 3.5 - (27 - 3) / 48 = 3.
    assert stat == 0
    assert p == pytest.approx(2 * (1 - 0.5 * (1 + math.erf(math.sqrt(3) / math.sqrt(2)))), rel=1e-9)
    assert wilcoxon_signed_rank(low, low) == (0.0, 1.0)


def test_reference_reader_is_not_evaluated_on_its_own_reads(table5) -> None:
    det = table5[0]["detection"]
    assert set(map(tuple, det[["reader", "modality"]].drop_duplicates().to_numpy())) == set(
        PATTERN_READS
    )


def test_table5_markdown_and_html(table5) -> None:
    tables, out = table5
    md = (out / "table5.md").read_text()
    assert "| All lesions | SE | 42% (38/91) [32; 53] | 53% (48/91) [42; 63] | p=.01 |" in md
    assert "0.47 (18/38) [±0.38]" in md
    assert "97% (35/36)" in md
    html = (out / "table5.html").read_text()
    assert html.startswith("<table") and "59% (54/91) [49; 70]" in html
    header, body = table5_rows(tables["detection"], tables["comparisons"])
    assert header[-2:] == ["average low-T1c", "average vir-T1c"]
    for thr, expected in TABLE5_AVERAGE.items():
        lines = [b for b in body if b[0] == _threshold_label(thr)]
        assert [tuple(line[-2:]) for line in lines] == list(expected)


def test_written_tables_have_the_documented_columns(table5) -> None:
    _, out = table5
    det = pd.read_csv(out / "detection.tsv", sep="\t")
    assert tuple(det.columns) == DETECTION_COLUMNS
    comp = pd.read_csv(out / "comparisons.tsv", sep="\t")
    assert tuple(comp.columns[:8]) == (
        "comparison",
        "reader",
        "modality",
        "min_long_axis_mm",
        "metric",
        "test",
        "statistic",
        "p_value",
    )
    assert set(comp["comparison"]) == {"low_vs_vir", "reader_vs_reader"}
    # fractions, not percents
    assert det["sensitivity"].between(0, 1).all() and det["ppv"].between(0, 1).all()
    for name in ("quality.tsv", "reading_times.tsv"):
        assert (out / name).exists()


def test_grade_tables_are_paired_t_tests() -> None:
    reads = pd.DataFrame(
        [
            ("P1", "R1", "low", 2, 100.0),
            ("P2", "R1", "low", 3, 160.0),
            ("P3", "R1", "low", 2, 90.0),
            ("P1", "R1", "vir", 4, 120.0),
            ("P2", "R1", "vir", 3, 150.0),
            ("P3", "R1", "vir", 5, 130.0),
            ("P1", "R2", "low", 1, 300.0),
            ("P2", "R2", "low", 2, 260.0),
            ("P3", "R2", "low", 2, np.nan),
        ],
        columns=list(annotations.READ_COLUMNS),
    )
    q = grade_table(reads, "quality")
    summary = q[(q["kind"] == "summary") & (q["reader"] == "R1") & (q["modality"] == "vir")].iloc[0]
    assert summary["mean"] == pytest.approx(4.0) and summary["sd"] == pytest.approx(1.0)
    test = q[(q["kind"] == "modality_comparison") & (q["reader"] == "R1")].iloc[0]
    assert test["modality"] == "low vs vir"
    # paired differences vir - low = 2, 0, 3: t = mean / (sd / sqrt(3))
    d = np.array([2.0, 0.0, 3.0])
    assert abs(test["statistic"]) == pytest.approx(d.mean() / (d.std(ddof=1) / math.sqrt(3)))
    t = grade_table(reads, "reading_time_s")
    between = t[(t["kind"] == "reader_comparison") & (t["modality"] == "low")].iloc[0]
    assert between["reader"] == "R1 vs R2" and between["n"] == 2  # P3 has no time for R2


# ------------------------------------------------------------------------------------- matching
def _frame(rows):
    return pd.DataFrame(rows, columns=["x_mm", "y_mm", "z_mm", "long_axis_mm", "short_axis_mm"])


def test_matching_threshold_is_half_the_mean_axis_of_both_lesions() -> None:
    ref = _frame([(0, 0, 0, 10, 6)])
    # threshold (10 + 6 + 6 + 2) / 8 = 3 mm: 2.9 pairs, 3.0 does not (strict "smaller than")
    assert match_lesions(ref, _frame([(2.9, 0, 0, 6, 2)]))[0].tolist() == [0]
    assert match_lesions(ref, _frame([(3.0, 0, 0, 6, 2)]))[0].tolist() == [-1]
    # reference-only rule: (10 + 6) / 4 = 4 mm
    assert match_lesions(ref, _frame([(3.5, 0, 0, 6, 2)]), rule="reference")[0].tolist() == [0]


def test_matching_is_one_to_one_and_maximal() -> None:
    ref = _frame([(0, 0, 0, 10, 10), (6, 0, 0, 10, 10)])  # pairing radius 5 mm
    # detection 0 is closest to ref 1, but only it can reach ref 0: pairing greedily by distance would
    # match one lesion, the maximal matching pairs both.
    det = _frame([(3.5, 0, 0, 10, 10), (9, 0, 0, 10, 10)])
    ref_to_det, det_to_ref = match_lesions(ref, det)
    assert ref_to_det.tolist() == [0, 1] and det_to_ref.tolist() == [0, 1]
    # a second detection of the same lesion is a false positive
    ref_to_det, det_to_ref = match_lesions(
        ref.iloc[:1], _frame([(0.5, 0, 0, 10, 10), (1, 0, 0, 10, 10)])
    )
    assert ref_to_det.tolist() == [0] and det_to_ref.tolist() == [0, -1]


# ------------------------------------------------------------------------------------- bad inputs
def _small_study() -> tuple[pd.DataFrame, pd.DataFrame]:
    lesions = pd.DataFrame(
        [
            ("A", "R1", "ref", 0, 0, 0, 10, 8),
            ("A", "R1", "low", 0.5, 0, 0, 9, 7),
            ("A", "R2", "vir", 40, 0, 0, 5, 4),
        ],
        columns=list(annotations.LESION_COLUMNS),
    )
    reads = pd.DataFrame(
        [
            ("A", "R1", "ref", 3, 200),
            ("A", "R1", "low", 2, 100),
            ("A", "R2", "vir", 4, 90),
            ("B", "R1", "ref", 3, 100),
            ("B", "R1", "low", 2, 80),
            ("B", "R2", "vir", 4, 70),
        ],
        columns=list(annotations.READ_COLUMNS),
    )
    return lesions, reads


def test_small_study_counts_patients_without_lesions(tmp_path) -> None:
    lesions, reads = _small_study()
    tables = stats.reader_stats(lesions, reads, tmp_path, thresholds=[0])
    det = tables["detection"].set_index(["reader", "modality"])
    assert det.loc[("R1", "low"), "sensitivity"] == 1.0
    assert det.loc[("R2", "vir"), "false_positives"] == 1
    assert det.loc[("R2", "vir"), "n_patients"] == 2  # patient B was read, without any lesion
    assert det.loc[("R2", "vir"), "fdr"] == 0.5


def _write(tmp_path, lesions, reads=None):
    lp = tmp_path / "lesions.csv"
    lesions.to_csv(lp, index=False)
    rp = None
    if reads is not None:
        rp = tmp_path / "reads.csv"
        reads.to_csv(rp, index=False)
    return lp, rp


def _cli(tmp_path, lp, rp, capsys, *extra):
    argv = ["reader-stats", "--lesions", str(lp), "--out", str(tmp_path / "out"), *extra]
    if rp is not None:
        argv += ["--reads", str(rp)]
    code = main(argv)
    return code, capsys.readouterr().err


def test_cli_writes_every_output(tmp_path, capsys) -> None:
    lesions, reads = _small_study()
    lp, rp = _write(tmp_path, lesions, reads)
    code, err = _cli(tmp_path, lp, rp, capsys, "--thresholds", "0", "5")
    assert code == 0, err
    for name in (
        "detection.tsv",
        "comparisons.tsv",
        "quality.tsv",
        "reading_times.tsv",
        "table5.md",
        "table5.html",
    ):
        assert (tmp_path / "out" / name).exists()
    det = pd.read_csv(tmp_path / "out" / "detection.tsv", sep="\t")
    assert sorted(det["min_long_axis_mm"].unique()) == [0, 5]


def test_missing_column_is_a_clear_error(tmp_path, capsys) -> None:
    lesions, reads = _small_study()
    lp, rp = _write(tmp_path, lesions.drop(columns="short_axis_mm"), reads)
    code, err = _cli(tmp_path, lp, rp, capsys)
    assert code == 2
    assert "short_axis_mm" in err and "lesions.csv" in err and "expected header" in err


def test_unknown_modality_is_a_clear_error(tmp_path, capsys) -> None:
    lesions, reads = _small_study()
    lesions.loc[1, "modality"] = "T1c"
    lp, rp = _write(tmp_path, lesions, reads)
    code, err = _cli(tmp_path, lp, rp, capsys)
    assert code == 2
    assert "unknown modality 't1c'" in err and "line(s) 3" in err and "ref, low, vir" in err


def test_negative_axis_is_a_clear_error(tmp_path, capsys) -> None:
    lesions, reads = _small_study()
    lesions.loc[2, "short_axis_mm"] = -4
    lp, rp = _write(tmp_path, lesions, reads)
    code, err = _cli(tmp_path, lp, rp, capsys)
    assert code == 2
    assert "negative short_axis_mm" in err and "line(s) 4" in err


def test_lesion_of_a_patient_with_no_read_is_a_clear_error(tmp_path, capsys) -> None:
    lesions, reads = _small_study()
    reads = reads[~((reads["patient"] == "A") & (reads["reader"] == "R2"))]
    lp, rp = _write(tmp_path, lesions, reads)
    code, err = _cli(tmp_path, lp, rp, capsys)
    assert code == 2
    assert "belong to no read" in err and "patient 'A', reader 'R2', modality 'vir'" in err


def test_patient_without_reference_read_is_a_clear_error(tmp_path, capsys) -> None:
    lesions, reads = _small_study()
    reads = reads[~((reads["patient"] == "B") & (reads["modality"] == "ref"))]
    lp, rp = _write(tmp_path, lesions, reads)
    code, err = _cli(tmp_path, lp, rp, capsys)
    assert code == 2
    assert "patient(s) B" in err and "no ref read" in err


def test_bad_quality_grade_and_duplicate_read_are_errors() -> None:
    _, reads = _small_study()
    bad = reads.copy()
    bad.loc[0, "quality"] = 7
    with pytest.raises(InputError, match="quality must be an integer grade 1-5 on line"):
        annotations.validate_reads(bad)
    with pytest.raises(InputError, match="read twice"):
        annotations.validate_reads(pd.concat([reads, reads.iloc[[0]]], ignore_index=True))


def test_several_reference_readers_need_a_choice(tmp_path) -> None:
    lesions, reads = _small_study()
    reads = pd.concat(
        [
            reads,
            pd.DataFrame(
                [("A", "R2", "ref", 3, 10), ("B", "R2", "ref", 3, 10)], columns=reads.columns
            ),
        ]
    )
    with pytest.raises(InputError, match="--reference-reader"):
        stats.reader_stats(lesions, reads, tmp_path)
    tables = stats.reader_stats(lesions, reads, tmp_path, reference_reader="R1", thresholds=[0])
    # R2's own ref reads are then evaluated against R1's
    assert ("R2", "ref") in set(map(tuple, tables["detection"][["reader", "modality"]].to_numpy()))


def test_without_reads_every_reader_read_every_annotated_patient(tmp_path) -> None:
    lesions, _ = _small_study()
    tables = stats.reader_stats(lesions, None, tmp_path, thresholds=[0])
    det = tables["detection"].set_index(["reader", "modality"])
    assert det.loc[("R2", "vir"), "n_patients"] == 1
