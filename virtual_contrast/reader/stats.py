"""Reader-study statistics: lesion detection (the paper's Table 5), image quality (Table 4), reading times
(Table 6), from the lesions and reads tables of :mod:`virtual_contrast.annotations` alone.

:func:`reader_stats` validates the two tables, matches every read to the reference reader's
(:mod:`virtual_contrast.reader.detection`, with the intervals and tests of
:mod:`virtual_contrast.reader.inference`), grades quality and reading times (:mod:`virtual_contrast.reader.grades`)
and renders Table 5 (:mod:`virtual_contrast.reader.table5`).

All outputs are fractions (not percents) in tab-separated tables; the markdown/HTML Table 5 shows percents.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from virtual_contrast.annotations import (
    check_consistency,
    reads_from_lesions,
    validate_lesions,
    validate_reads,
)
from virtual_contrast.io import InputError, write_table, write_text
from virtual_contrast.layout import READER_STATS_FILES
from virtual_contrast.matching import MatchRule
from virtual_contrast.reader.detection import (
    DEFAULT_THRESHOLDS,
    comparison_table,
    detection_table,
    match_study,
)
from virtual_contrast.reader.grades import grade_table
from virtual_contrast.reader.table5 import table5_html, table5_markdown

log = logging.getLogger(__name__)


def reader_stats(
    lesions: pd.DataFrame,
    reads: pd.DataFrame | None,
    out_dir: Path | str,
    *,
    reference_reader: str | None = None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    rule: MatchRule = "both",
    labels: Mapping[str, str] | None = None,
) -> dict[str, pd.DataFrame]:
    """Validate the annotations, compute every reader-study table, write them to ``out_dir``.

    Writes ``detection.tsv``, ``comparisons.tsv``, ``quality.tsv``, ``reading_times.tsv``, ``table5.md`` and
    ``table5.html`` (its modalities named by ``labels``, e.g. a simulated low dose); returns the four tables
    by name.
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
    write_text(table5_markdown(detection, comparisons, labels=labels), out_dir / names["table5_md"])
    write_text(table5_html(detection, comparisons, labels=labels), out_dir / names["table5"])
    log.info(
        "reader statistics: reference reader %s, %d evaluated reads, written to %s",
        reference_reader,
        len(matches.reads),
        out_dir,
    )
    return tables
