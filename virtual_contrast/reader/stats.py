"""Reader-study statistics: lesion detection (the paper's Table 5), image quality (Table 4), reading times
(Table 6).

Inputs are two tables:

- lesions, one row per marked lesion: ``patient, reader, modality, x_mm, y_mm, z_mm, long_axis_mm,
  short_axis_mm`` with modality ``ref`` (the reference standard), ``low`` or ``vir``; centres in world mm;
- reads, one row per read image: ``patient, reader, modality, quality, reading_time_s`` (quality on a 1-5 Likert
  scale, both may be empty). The reads say which images were read, so that a read without lesions still counts
  one patient in the false detection rate.

Definitions (paper, Statistical analysis), for a reader, a modality and a size threshold T on the long axis:

- lesions are matched per patient by :func:`virtual_contrast.reader.matching.match_lesions` (centres closer
  than half the mean of the two lesions' long and short axes; one-to-one), on all lesions; thresholds are
  applied afterwards, with ``long_axis_mm >= T``: to the reference lesion's long axis for the reference count
  and the true positives, to the detection's own long axis for the false positives;
- SE = true positives / reference lesions, with a Clopper-Pearson 95 % interval;
- FDR = false positives per patient (mean over the patients read), with a Student-t 95 % interval of that mean
  (mean ± t(0.975, n-1)·sd/√n, not clipped at 0, as the paper's "[±0.10]");
- PPV = true positives / (true positives + false positives); F1 = 2·SE·PPV / (SE + PPV);
- low vs vir (same reader) and reader vs reader (same modality): McNemar mid-p on the paired detection of each
  reference lesion (Fagerland et al. 2013: ``2·P(X <= min(b, c)) - P(X = min(b, c))``, X ~ Bin(b + c, 1/2))
  and a Wilcoxon signed-rank test on the per-patient false-positive counts (zero differences discarded,
  normal approximation with tie correction and no continuity correction; the exact distribution when there
  are at most 25 pairs, no zero and no tie: SciPy 1.5's defaults, which the paper used). Pairs are the
  patients (lesions) both reads cover.
- quality and reading times: mean, sd per reader and modality; two-tailed paired t-tests (pairs: the same
  patient) between modalities for each reader and between readers for each modality.

All outputs are fractions (not percents) in tab-separated tables; the markdown/HTML Table 5 shows percents.
"""

from __future__ import annotations

import html
import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from virtual_contrast.io import InputError, write_table, write_text
from virtual_contrast.layout import READER_STATS_FILES
from virtual_contrast.reader.matching import MatchRule, match_lesions

log = logging.getLogger(__name__)

MODALITIES = ("ref", "low", "vir")
LESION_COLUMNS = (
    "patient",
    "reader",
    "modality",
    "x_mm",
    "y_mm",
    "z_mm",
    "long_axis_mm",
    "short_axis_mm",
)
READ_COLUMNS = ("patient", "reader", "modality", "quality", "reading_time_s")
DEFAULT_THRESHOLDS = (0.0, 2.5, 5.0, 7.5, 10.0)
DETECTION_COLUMNS = (
    "reader",
    "modality",
    "min_long_axis_mm",
    "n_reference",
    "true_positives",
    "n_detections",
    "false_positives",
    "n_patients",
    "sensitivity",
    "sensitivity_ci_low",
    "sensitivity_ci_high",
    "fdr",
    "fdr_ci_low",
    "fdr_ci_high",
    "ppv",
    "f1",
)
COMPARISON_COLUMNS = (
    "comparison",
    "reader",
    "modality",
    "min_long_axis_mm",
    "metric",
    "test",
    "statistic",
    "p_value",
    "n_pairs",
    "only_first",
    "only_second",
)


# --------------------------------------------------------------------------------------------- inputs
def _read_csv(path: Path | str, what: str) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} file not found", path=path)
    sep = "\t" if path.suffix.lower() in {".tsv", ".tab", ".txt"} else ","
    try:
        return pd.read_csv(path, sep=sep, dtype={"patient": str, "reader": str, "modality": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot be read as a {what} table: {exc}", path=path) from exc


def _rows(index: pd.Index | np.ndarray, limit: int = 8) -> str:
    """Line numbers in the file (header is line 1) of the given 0-based data rows."""
    lines = [str(int(i) + 2) for i in list(index)[:limit]]
    more = len(index) - limit
    return ", ".join(lines) + (f" and {more} more" if more > 0 else "")


def _check_columns(df: pd.DataFrame, required: Sequence[str], what: str, source: object) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(
            f"{what} table lacks column(s) {', '.join(missing)}; expected header: {','.join(required)}",
            path=source,
        )


def _check_ids_and_modality(df: pd.DataFrame, what: str, source: object) -> pd.DataFrame:
    df = df.copy()
    for col in ("patient", "reader", "modality"):
        df[col] = df[col].astype("string").str.strip()
        empty = df.index[df[col].isna() | (df[col] == "")]
        if len(empty):
            raise InputError(f"{what}: empty {col} on line(s) {_rows(empty)}", path=source)
    df["modality"] = df["modality"].str.lower()
    bad = df.index[~df["modality"].isin(MODALITIES)]
    if len(bad):
        values = sorted(set(df.loc[bad, "modality"]))
        raise InputError(
            f"{what}: unknown modality {', '.join(map(repr, values))} on line(s) {_rows(bad)}; "
            f"expected one of {', '.join(MODALITIES)}",
            path=source,
        )
    return df.astype({"patient": str, "reader": str, "modality": str})


def validate_lesions(df: pd.DataFrame, *, source: Path | str | None = None) -> pd.DataFrame:
    """Check a lesions table and return it with clean types; :class:`InputError` names the bad lines."""
    _check_columns(df, LESION_COLUMNS, "lesions", source)
    df = _check_ids_and_modality(df[list(LESION_COLUMNS)], "lesions", source)
    for col in LESION_COLUMNS[3:]:
        values = pd.to_numeric(df[col], errors="coerce")
        bad = df.index[~np.isfinite(values.to_numpy(float))]
        if len(bad):
            raise InputError(
                f"lesions: {col} is missing or not a number on line(s) {_rows(bad)}", path=source
            )
        df[col] = values.astype(float)
    for col in ("long_axis_mm", "short_axis_mm"):
        bad = df.index[df[col] < 0]
        if len(bad):
            raise InputError(f"lesions: negative {col} on line(s) {_rows(bad)}", path=source)
    bad = df.index[df["long_axis_mm"] <= 0]
    if len(bad):
        raise InputError(f"lesions: long_axis_mm must be > 0 on line(s) {_rows(bad)}", path=source)
    bad = df.index[df["short_axis_mm"] > df["long_axis_mm"] + 1e-9]
    if len(bad):
        raise InputError(
            f"lesions: short_axis_mm exceeds long_axis_mm on line(s) {_rows(bad)} (columns swapped?)",
            path=source,
        )
    return df.reset_index(drop=True)


def validate_reads(df: pd.DataFrame, *, source: Path | str | None = None) -> pd.DataFrame:
    """Check a reads table (one row per read image; quality 1-5 or empty, time >= 0 or empty)."""
    _check_columns(df, READ_COLUMNS, "reads", source)
    df = _check_ids_and_modality(df[list(READ_COLUMNS)], "reads", source)
    for col in ("quality", "reading_time_s"):
        raw = df[col]
        values = pd.to_numeric(raw, errors="coerce")
        bad = df.index[values.isna() & raw.notna() & (raw.astype(str).str.strip() != "")]
        if len(bad):
            raise InputError(f"reads: {col} is not a number on line(s) {_rows(bad)}", path=source)
        df[col] = values.astype(float)
    bad = df.index[df["quality"].notna() & ~df["quality"].isin([1, 2, 3, 4, 5])]
    if len(bad):
        raise InputError(
            f"reads: quality must be an integer grade 1-5 on line(s) {_rows(bad)}", path=source
        )
    bad = df.index[df["reading_time_s"] < 0]
    if len(bad):
        raise InputError(f"reads: negative reading_time_s on line(s) {_rows(bad)}", path=source)
    dup = df.index[df.duplicated(["patient", "reader", "modality"], keep="first")]
    if len(dup):
        raise InputError(
            f"reads: the same (patient, reader, modality) is read twice, line(s) {_rows(dup)}",
            path=source,
        )
    return df.reset_index(drop=True)


def load_lesions(path: Path | str) -> pd.DataFrame:
    """Read and validate a lesions CSV (comma-separated; tab-separated for .tsv)."""
    return validate_lesions(_read_csv(path, "lesions"), source=path)


def load_reads(path: Path | str) -> pd.DataFrame:
    """Read and validate a reads CSV (comma-separated; tab-separated for .tsv)."""
    return validate_reads(_read_csv(path, "reads"), source=path)


def reads_from_lesions(lesions: pd.DataFrame) -> pd.DataFrame:
    """Reads implied by a lesions table when no reads table exists.

    Every reader is assumed to have read, in each modality they marked lesions in, every patient of the
    lesions table. Patients without any marked lesion are unknown and do not count in the FDR.
    """
    patients = sorted(lesions["patient"].unique())
    pairs = lesions[["reader", "modality"]].drop_duplicates().itertuples(index=False)
    rows = [(p, r, m) for r, m in pairs for p in patients]
    log.warning(
        "no reads table: assuming each reader read all %d patients of the lesions table in each modality "
        "they annotated; patients with no lesion at all are not counted",
        len(patients),
    )
    out = pd.DataFrame(rows, columns=["patient", "reader", "modality"])
    out["quality"] = np.nan
    out["reading_time_s"] = np.nan
    return out


def check_consistency(
    lesions: pd.DataFrame, reads: pd.DataFrame, reference_reader: str | None
) -> str:
    """Check that every lesion belongs to a read and every read patient has a reference read.

    Returns the reference reader (the only reader with ``ref`` reads unless given).
    """
    read_keys = set(reads[["patient", "reader", "modality"]].itertuples(index=False, name=None))
    orphan = [
        (i, key)
        for i, key in enumerate(
            lesions[["patient", "reader", "modality"]].itertuples(index=False, name=None)
        )
        if key not in read_keys
    ]
    if orphan:
        shown = "; ".join(
            f"patient {p!r}, reader {r!r}, modality {m!r}" for _, (p, r, m) in orphan[:5]
        )
        raise InputError(
            f"{len(orphan)} lesion(s) belong to no read in the reads table (lesions line(s) "
            f"{_rows([i for i, _ in orphan])}): {shown}; add the read (patient, reader, modality) to the reads"
        )
    ref_readers = sorted(reads.loc[reads["modality"] == "ref", "reader"].unique())
    if reference_reader is None:
        if not ref_readers:
            raise InputError(
                "no reader read any ref image: the reference standard (ref reads) is missing"
            )
        if len(ref_readers) > 1:
            raise InputError(
                f"several readers read ref images ({', '.join(ref_readers)}); choose one with --reference-reader"
            )
        reference_reader = ref_readers[0]
    elif reference_reader not in ref_readers:
        raise InputError(
            f"reference reader {reference_reader!r} has no ref read; readers with ref reads: {ref_readers or 'none'}"
        )
    ref_patients = set(
        reads.loc[(reads["modality"] == "ref") & (reads["reader"] == reference_reader), "patient"]
    )
    evaluated = reads[~((reads["modality"] == "ref") & (reads["reader"] == reference_reader))]
    missing = sorted(set(evaluated["patient"]) - ref_patients)
    if missing:
        raise InputError(
            f"patient(s) {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''} have reads but no ref "
            f"read by the reference reader {reference_reader!r}, so they have no reference lesions"
        )
    return reference_reader


# ------------------------------------------------------------------------------------------- matching
@dataclass(frozen=True)
class StudyMatches:
    """Outcome of matching every evaluated read with the reference read of the same patient."""

    reference_reader: str
    #: one row per (evaluated read, reference lesion): patient, reader, modality, ref_lesion, ref_long_axis_mm,
    #: detected
    hits: pd.DataFrame
    #: one row per unmatched detection: patient, reader, modality, long_axis_mm
    false_positives: pd.DataFrame
    #: the evaluated reads: patient, reader, modality
    reads: pd.DataFrame


def match_study(
    lesions: pd.DataFrame, reads: pd.DataFrame, reference_reader: str, *, rule: MatchRule = "both"
) -> StudyMatches:
    """Match each evaluated read (every read but the reference reader's ref reads) to the reference."""
    ref_sel = (lesions["reader"] == reference_reader) & (lesions["modality"] == "ref")
    reference = {p: g.reset_index(drop=True) for p, g in lesions[ref_sel].groupby("patient")}
    marked = {
        k: g.reset_index(drop=True)
        for k, g in lesions[~ref_sel].groupby(["patient", "reader", "modality"])
    }
    evaluated = reads.loc[
        ~((reads["reader"] == reference_reader) & (reads["modality"] == "ref")),
        ["patient", "reader", "modality"],
    ].reset_index(drop=True)
    empty = lesions.iloc[0:0]
    hits, fps = [], []
    for patient, reader, modality in evaluated.itertuples(index=False, name=None):
        ref = reference.get(patient, empty)
        det = marked.get((patient, reader, modality), empty)
        ref_to_det, det_to_ref = match_lesions(ref, det, rule=rule)
        hits.append(
            pd.DataFrame(
                {
                    "patient": patient,
                    "reader": reader,
                    "modality": modality,
                    "ref_lesion": np.arange(len(ref)),
                    "ref_long_axis_mm": ref["long_axis_mm"].to_numpy(float),
                    "detected": ref_to_det >= 0,
                }
            )
        )
        fps.append(
            pd.DataFrame(
                {
                    "patient": patient,
                    "reader": reader,
                    "modality": modality,
                    "long_axis_mm": det["long_axis_mm"].to_numpy(float)[det_to_ref < 0],
                }
            )
        )
    hit_cols = ["patient", "reader", "modality", "ref_lesion", "ref_long_axis_mm", "detected"]
    fp_cols = ["patient", "reader", "modality", "long_axis_mm"]
    return StudyMatches(
        reference_reader=reference_reader,
        hits=pd.concat(hits, ignore_index=True) if hits else pd.DataFrame(columns=hit_cols),
        false_positives=pd.concat(fps, ignore_index=True) if fps else pd.DataFrame(columns=fp_cols),
        reads=evaluated,
    )


# ----------------------------------------------------------------------------------------- statistics
def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval of a binomial proportion k/n; (nan, nan) when n = 0."""
    if n == 0:
        return np.nan, np.nan
    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="exact")
    return float(ci.low), float(ci.high)


def t_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Student-t interval of a mean, mean ± t·sd/√n (nan with fewer than 2 values)."""
    values = np.asarray(values, float)
    if values.size < 2:
        return np.nan, np.nan
    mean = values.mean()
    half = (
        stats.t.ppf(0.5 + confidence / 2, values.size - 1)
        * values.std(ddof=1)
        / np.sqrt(values.size)
    )
    return float(mean - half), float(mean + half)


def mcnemar_midp(b: int, c: int) -> float:
    """Two-sided McNemar mid-p (Fagerland, Lydersen & Laake 2013) from the discordant counts b and c.

    ``2·P(X <= min(b, c)) - P(X = min(b, c))`` with X ~ Binomial(b + c, 1/2); 1 when there is no discordant
    pair.
    """
    n = int(b) + int(c)
    if n == 0:
        return 1.0
    k = min(int(b), int(c))
    # Exact integer arithmetic (one correctly rounded division), so that e.g. b=5, c=1 gives exactly 0.125.
    numerator = 2 * sum(math.comb(n, i) for i in range(k)) + math.comb(n, k)
    return min(1.0, numerator / 2**n)


def wilcoxon_signed_rank(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Two-sided Wilcoxon signed-rank test of paired samples as SciPy 1.5 computed it by default.

    Zero differences are discarded; exact distribution when at most 25 pairs remain with no tie, else the
    normal approximation with tie correction, no continuity correction. All differences zero: (0, 1).
    """
    d = np.asarray(x, float) - np.asarray(y, float)
    nonzero = d[d != 0]
    if nonzero.size == 0:
        return 0.0, 1.0
    ties = np.unique(np.abs(nonzero)).size < nonzero.size
    method = "exact" if (d.size <= 25 and nonzero.size == d.size and not ties) else "asymptotic"
    res = stats.wilcoxon(nonzero, zero_method="wilcox", correction=False, method=method)
    return float(res.statistic), float(res.pvalue)


def _fp_per_patient(m: StudyMatches, reader: str, modality: str, threshold: float) -> pd.Series:
    patients = m.reads.loc[
        (m.reads["reader"] == reader) & (m.reads["modality"] == modality), "patient"
    ]
    fp = m.false_positives
    sel = fp[
        (fp["reader"] == reader) & (fp["modality"] == modality) & (fp["long_axis_mm"] >= threshold)
    ]
    return sel.groupby("patient").size().reindex(sorted(patients), fill_value=0).astype(int)


def _hits(m: StudyMatches, reader: str, modality: str, threshold: float) -> pd.Series:
    h = m.hits
    sel = h[
        (h["reader"] == reader) & (h["modality"] == modality) & (h["ref_long_axis_mm"] >= threshold)
    ]
    return sel.set_index(["patient", "ref_lesion"])["detected"].astype(bool)


def evaluated_pairs(m: StudyMatches) -> list[tuple[str, str]]:
    """(reader, modality) of the evaluated reads, readers in order of appearance, then low, vir, ref."""
    order = {mod: i for i, mod in enumerate(("low", "vir", "ref"))}
    pairs = m.reads[["reader", "modality"]].drop_duplicates()
    readers = list(dict.fromkeys(pairs["reader"]))
    return sorted(
        map(tuple, pairs.to_numpy()), key=lambda rm: (readers.index(rm[0]), order.get(rm[1], 9))
    )


def detection_table(
    m: StudyMatches, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
) -> pd.DataFrame:
    """SE, FDR, PPV, F1 with intervals for each evaluated (reader, modality) and size threshold."""
    rows = []
    for reader, modality in evaluated_pairs(m):
        for thr in thresholds:
            hits = _hits(m, reader, modality, thr)
            fp = _fp_per_patient(m, reader, modality, thr)
            n_ref, tp, n_fp, n_pat = len(hits), int(hits.sum()), int(fp.sum()), len(fp)
            se = tp / n_ref if n_ref else np.nan
            ppv = tp / (tp + n_fp) if tp + n_fp else np.nan
            f1 = (
                2 * se * ppv / (se + ppv)
                if (np.isfinite(se) and np.isfinite(ppv) and se + ppv > 0)
                else np.nan
            )
            if np.isfinite(se) and np.isfinite(ppv) and se + ppv == 0:
                f1 = 0.0
            se_lo, se_hi = clopper_pearson(tp, n_ref)
            fdr_lo, fdr_hi = t_interval(fp.to_numpy())
            rows.append(
                {
                    "reader": reader,
                    "modality": modality,
                    "min_long_axis_mm": float(thr),
                    "n_reference": n_ref,
                    "true_positives": tp,
                    "n_detections": tp + n_fp,
                    "false_positives": n_fp,
                    "n_patients": n_pat,
                    "sensitivity": se,
                    "sensitivity_ci_low": se_lo,
                    "sensitivity_ci_high": se_hi,
                    "fdr": n_fp / n_pat if n_pat else np.nan,
                    "fdr_ci_low": fdr_lo,
                    "fdr_ci_high": fdr_hi,
                    "ppv": ppv,
                    "f1": f1,
                }
            )
    return pd.DataFrame(rows, columns=list(DETECTION_COLUMNS))


def _compare(
    m: StudyMatches, first: tuple[str, str], second: tuple[str, str], threshold: float
) -> list[dict]:
    """McNemar mid-p on SE and Wilcoxon on FP counts between two reads, paired on what both cover."""
    h1, h2 = _hits(m, *first, threshold), _hits(m, *second, threshold)
    common = h1.index.intersection(h2.index)
    a, b = h1.loc[common].to_numpy(), h2.loc[common].to_numpy()
    only_first, only_second = int((a & ~b).sum()), int((~a & b).sum())
    f1, f2 = _fp_per_patient(m, *first, threshold), _fp_per_patient(m, *second, threshold)
    patients = f1.index.intersection(f2.index)
    w_stat, w_p = wilcoxon_signed_rank(f1.loc[patients].to_numpy(), f2.loc[patients].to_numpy())
    return [
        {
            "metric": "sensitivity",
            "test": "McNemar mid-p",
            "statistic": float(min(only_first, only_second)),
            "p_value": mcnemar_midp(only_first, only_second),
            "n_pairs": len(common),
            "only_first": only_first,
            "only_second": only_second,
        },
        {
            "metric": "fdr",
            "test": "Wilcoxon signed-rank",
            "statistic": w_stat,
            "p_value": w_p,
            "n_pairs": len(patients),
            "only_first": int(f1.loc[patients].sum()),
            "only_second": int(f2.loc[patients].sum()),
        },
    ]


def comparison_table(
    m: StudyMatches,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    *,
    baseline: str = "low",
    candidate: str = "vir",
) -> pd.DataFrame:
    """low vs vir per reader, and reader vs reader per modality, for each size threshold.

    ``only_first`` / ``only_second``: for SE the discordant lesions (found by the first read only / the second
    only); for FDR the total false positives of each read over the paired patients. In ``low_vs_vir`` rows
    the first read is the baseline (low); in ``reader_vs_reader`` rows ``reader`` is ``"R1 vs R2"``.
    """
    pairs = evaluated_pairs(m)
    readers = list(dict.fromkeys(r for r, _ in pairs))
    rows = []
    for thr in thresholds:
        for reader in readers:
            if (reader, baseline) in pairs and (reader, candidate) in pairs:
                for row in _compare(m, (reader, baseline), (reader, candidate), thr):
                    rows.append(
                        {
                            "comparison": f"{baseline}_vs_{candidate}",
                            "reader": reader,
                            "modality": f"{baseline} vs {candidate}",
                            "min_long_axis_mm": float(thr),
                            **row,
                        }
                    )
        for r1, r2 in itertools.combinations(readers, 2):
            for modality in (baseline, candidate):
                if (r1, modality) in pairs and (r2, modality) in pairs:
                    for row in _compare(m, (r1, modality), (r2, modality), thr):
                        rows.append(
                            {
                                "comparison": "reader_vs_reader",
                                "reader": f"{r1} vs {r2}",
                                "modality": modality,
                                "min_long_axis_mm": float(thr),
                                **row,
                            }
                        )
    return pd.DataFrame(rows, columns=list(COMPARISON_COLUMNS))


def grade_table(reads: pd.DataFrame, column: str) -> pd.DataFrame:
    """Mean and sd of ``column`` (quality or reading_time_s) per reader and modality, and paired t-tests.

    Rows of kind ``summary`` (reader, modality, n, mean, sd); ``modality_comparison`` (reader, modality =
    ``"low vs vir"`` ...); ``reader_comparison`` (reader = ``"R1 vs R2"``, modality). Tests pair the patients
    both reads graded; fewer than 2 pairs or no variation gives no p-value.
    """
    data = reads.dropna(subset=[column])
    readers = list(dict.fromkeys(reads["reader"]))
    present = [m for m in ("low", "vir", "ref") if (reads["modality"] == m).any()]
    rows = []
    wide = {
        (r, mod): g.set_index("patient")[column]
        for (r, mod), g in data.groupby(["reader", "modality"])
    }
    for reader in readers:
        for mod in present:
            v = wide.get((reader, mod))
            if v is None:
                continue
            rows.append(
                {
                    "kind": "summary",
                    "reader": reader,
                    "modality": mod,
                    "n": int(v.size),
                    "mean": float(v.mean()),
                    "sd": float(v.std(ddof=1)) if v.size > 1 else np.nan,
                }
            )

    def ttest(a: pd.Series | None, b: pd.Series | None) -> dict:
        if a is None or b is None:
            return {}
        common = a.index.intersection(b.index)
        x, y = a.loc[common].to_numpy(float), b.loc[common].to_numpy(float)
        if len(common) < 2 or np.std(x - y) == 0:
            return {
                "n": len(common),
                "test": "paired t-test",
                "statistic": np.nan,
                "p_value": np.nan,
            }
        res = stats.ttest_rel(x, y)
        return {
            "n": len(common),
            "test": "paired t-test",
            "statistic": float(res.statistic),
            "p_value": float(res.pvalue),
        }

    for reader in readers:
        for m1, m2 in itertools.combinations(present, 2):
            res = ttest(wide.get((reader, m1)), wide.get((reader, m2)))
            if res:
                rows.append(
                    {
                        "kind": "modality_comparison",
                        "reader": reader,
                        "modality": f"{m1} vs {m2}",
                        **res,
                    }
                )
    for r1, r2 in itertools.combinations(readers, 2):
        for mod in present:
            res = ttest(wide.get((r1, mod)), wide.get((r2, mod)))
            if res:
                rows.append(
                    {"kind": "reader_comparison", "reader": f"{r1} vs {r2}", "modality": mod, **res}
                )
    columns = ["kind", "reader", "modality", "n", "mean", "sd", "test", "statistic", "p_value"]
    return pd.DataFrame(rows, columns=columns)


# ----------------------------------------------------------------------------------------- Table 5
def _p(p: float) -> str:
    from virtual_contrast.evaluate.metrics import format_p

    return format_p(p)


def _threshold_label(thr: float) -> str:
    return "All lesions" if thr == 0 else f"≥ {thr:g} mm"


def table5_rows(
    detection: pd.DataFrame,
    comparisons: pd.DataFrame,
    *,
    baseline: str = "low",
    candidate: str = "vir",
) -> tuple[list[str], list[list[str]]]:
    """Header and body of the Table-5-like table (strings), shared by the markdown and HTML renderings."""
    readers = list(dict.fromkeys(detection["reader"]))
    readers = [
        r
        for r in readers
        if {baseline, candidate} & set(detection.loc[detection["reader"] == r, "modality"])
    ]
    header = ["size", "metric"]
    for r in readers:
        header += [f"{r} {baseline}-T1c", f"{r} {candidate}-T1c", f"{r} {baseline} vs. {candidate}"]
    pairs = list(itertools.combinations(readers, 2))
    for r1, r2 in pairs:
        header += [f"{r1} vs. {r2} {baseline}-T1c", f"{r1} vs. {r2} {candidate}-T1c"]
    if len(readers) > 1:
        header += [f"average {baseline}-T1c", f"average {candidate}-T1c"]

    def det(reader: str, modality: str, thr: float) -> pd.Series | None:
        sel = detection[
            (detection["reader"] == reader)
            & (detection["modality"] == modality)
            & (detection["min_long_axis_mm"] == thr)
        ]
        return None if sel.empty else sel.iloc[0]

    def comp(kind: str, reader: str, modality: str, thr: float, metric: str) -> str:
        sel = comparisons[
            (comparisons["comparison"] == kind)
            & (comparisons["reader"] == reader)
            & (comparisons["modality"] == modality)
            & (comparisons["min_long_axis_mm"] == thr)
            & (comparisons["metric"] == metric)
        ]
        return "n/a" if sel.empty else _p(float(sel["p_value"].iloc[0]))

    def pct(x: float) -> str:
        return "n/a" if not np.isfinite(x) else f"{100 * x:.0f}%"

    def cell(row: pd.Series | None, metric: str) -> str:
        if row is None:
            return ""
        if metric == "SE":
            lo, hi = row["sensitivity_ci_low"], row["sensitivity_ci_high"]
            ci = f" [{100 * lo:.0f}; {100 * hi:.0f}]" if np.isfinite(lo) else ""
            return f"{pct(row['sensitivity'])} ({row['true_positives']}/{row['n_reference']}){ci}"
        if metric == "FDR":
            half = (row["fdr_ci_high"] - row["fdr_ci_low"]) / 2
            ci = f" [±{half:.2f}]" if np.isfinite(half) else ""
            return f"{row['fdr']:.2f} ({row['false_positives']}/{row['n_patients']}){ci}"
        if metric == "PPV":
            return f"{pct(row['ppv'])} ({row['true_positives']}/{row['n_detections']})"
        return pct(row["f1"])

    column = {"SE": "sensitivity", "FDR": "fdr", "PPV": "ppv", "F1": "f1"}
    tested = {"SE": "sensitivity", "FDR": "fdr"}
    body = []
    for thr in sorted(detection["min_long_axis_mm"].unique()):
        for metric in ("SE", "FDR", "PPV", "F1"):
            line = [_threshold_label(thr), metric]
            for r in readers:
                line += [cell(det(r, baseline, thr), metric), cell(det(r, candidate, thr), metric)]
                line.append(
                    comp(
                        f"{baseline}_vs_{candidate}",
                        r,
                        f"{baseline} vs {candidate}",
                        thr,
                        tested[metric],
                    )
                    if metric in tested
                    else ""
                )
            for r1, r2 in pairs:
                for mod in (baseline, candidate):
                    line.append(
                        comp("reader_vs_reader", f"{r1} vs {r2}", mod, thr, tested[metric])
                        if metric in tested
                        else ""
                    )
            if len(readers) > 1:
                for mod in (baseline, candidate):
                    vals = [det(r, mod, thr) for r in readers]
                    vals = [float(v[column[metric]]) for v in vals if v is not None]
                    mean = float(np.nanmean(vals)) if vals and np.isfinite(vals).any() else np.nan
                    line.append(
                        f"{mean:.2f}" if metric == "FDR" and np.isfinite(mean) else pct(mean)
                    )
            body.append(line)
    return header, body


TABLE5_CAPTION = (
    "Sensitivity (SE: true positives / reference lesions, Clopper-Pearson 95 % CI), false detection rate (FDR: "
    "false positives per patient, Student-t 95 % CI), positive predictive value (PPV: true positives / "
    "detections) and F1 (harmonic mean of SE and PPV), for lesions whose long axis is at least the threshold "
    "(the reference lesion's for SE and true positives, the detection's for false positives). low vs. vir and "
    "reader vs. reader: McNemar mid-p for SE, Wilcoxon signed-rank for FDR, two-tailed."
)


def table5_markdown(detection: pd.DataFrame, comparisons: pd.DataFrame) -> str:
    """The paper's Table 5 layout as a markdown table."""
    header, body = table5_rows(detection, comparisons)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n\n" + TABLE5_CAPTION + "\n"


def table5_html(detection: pd.DataFrame, comparisons: pd.DataFrame) -> str:
    """The paper's Table 5 layout as a standalone HTML table."""
    header, body = table5_rows(detection, comparisons)
    out = ["<table class='table5'>", "<thead><tr>"]
    out += [f"<th>{html.escape(h)}</th>" for h in header]
    out.append("</tr></thead><tbody>")
    for row in body:
        out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    out.append("</tbody></table>")
    out.append(f"<p>{html.escape(TABLE5_CAPTION)}</p>")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------ driver
def reader_stats(
    lesions: pd.DataFrame,
    reads: pd.DataFrame | None,
    out_dir: Path | str,
    *,
    reference_reader: str | None = None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    rule: MatchRule = "both",
) -> dict[str, pd.DataFrame]:
    """Validate the annotations, compute every reader-study table, write them to ``out_dir``.

    Writes ``detection.tsv``, ``comparisons.tsv``, ``quality.tsv``, ``reading_times.tsv``, ``table5.md`` and
    ``table5.html``; returns the four tables by name.
    """
    lesions = validate_lesions(lesions)
    reads = reads_from_lesions(lesions) if reads is None else validate_reads(reads)
    thresholds = sorted({float(t) for t in thresholds})
    if any(t < 0 for t in thresholds):
        raise InputError(f"size thresholds must be >= 0, got {thresholds}")
    reference_reader = check_consistency(lesions, reads, reference_reader)
    matches = match_study(lesions, reads, reference_reader, rule=rule)
    if matches.reads.empty:
        raise InputError(f"no read to evaluate besides the reference reads of {reference_reader!r}")
    tables = {
        "detection": detection_table(matches, thresholds),
        "comparisons": comparison_table(matches, thresholds),
        "quality": grade_table(reads, "quality"),
        "reading_times": grade_table(reads, "reading_time_s"),
    }
    out_dir, names = Path(out_dir), READER_STATS_FILES
    for name, table in tables.items():
        write_table(table, out_dir / names[name])
    detection, comparisons = tables["detection"], tables["comparisons"]
    write_text(table5_markdown(detection, comparisons), out_dir / names["table5_md"])
    write_text(table5_html(detection, comparisons), out_dir / names["table5"])
    log.info(
        "reader statistics: reference reader %s, %d evaluated reads, written to %s",
        reference_reader,
        len(matches.reads),
        out_dir,
    )
    return tables
