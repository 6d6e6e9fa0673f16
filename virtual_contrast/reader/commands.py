"""Command-line subcommands of this area (registered by virtual_contrast.cli)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from virtual_contrast.io import InputError, staged_folder


def _reader_stats(args: argparse.Namespace) -> int:
    from virtual_contrast.reader.stats import load_lesions, load_reads, reader_stats

    lesions = load_lesions(args.lesions)
    reads = load_reads(args.reads) if args.reads else None
    # All tables or none: they are written in a staging folder and moved into --out at the end.
    with staged_folder(args.out) as stage:
        tables = reader_stats(
            lesions,
            reads,
            stage,
            reference_reader=args.reference_reader,
            thresholds=args.thresholds,
            rule=args.matching,
        )
    print(
        f"wrote {', '.join(f'{name}.tsv' for name in tables)}, table5.md, table5.html to {args.out}"
    )
    return 0


def _import_markups(args: argparse.Namespace) -> int:
    from virtual_contrast.io import write_table
    from virtual_contrast.reader.protocol import load_key
    from virtual_contrast.reader.slicer import import_annotations

    key = load_key(args.key)
    lesions, reads = import_annotations(args.annotations, key, forms=args.forms)
    if args.lesions.suffix == ".tsv":
        write_table(lesions, args.lesions)
    else:
        _write_csv(lesions, args.lesions)
    print(
        f"{len(lesions)} lesions from {lesions[['patient', 'reader', 'modality']].drop_duplicates().shape[0]} reads"
    )
    if args.reads is not None:
        if reads is None:
            raise InputError(
                "--reads needs --forms (the filled-in reading forms) to know the grades and times"
            )
        _write_csv(reads, args.reads)
    return 0


def _write_csv(df, path: Path) -> None:
    from virtual_contrast.io import atomic_path

    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def _export_markups(args: argparse.Namespace) -> int:
    from virtual_contrast.reader.slicer import lesions_to_markups
    from virtual_contrast.reader.stats import load_lesions

    lesions = load_lesions(args.lesions)
    with staged_folder(args.out) as stage:
        written = lesions_to_markups(lesions, stage)
    print(f"wrote {len(written)} markup files under {args.out}")
    return 0


def _reading_lists(args: argparse.Namespace) -> int:
    from virtual_contrast.reader.protocol import (
        export_reading_images,
        make_reading_lists,
        read_patients,
    )

    patients = read_patients(args.patients, split=args.split)
    lists = make_reading_lists(
        patients,
        args.readers,
        out_dir=args.out,
        key_path=args.key,
        reference_reader=args.reference_reader,
        seed=args.seed,
    )
    if args.image_pattern:
        export_reading_images(
            lists,
            args.out,
            image_pattern=args.image_pattern,
            pre_pattern=args.pre_pattern,
        )
    print(json.dumps({"cases": len(lists), "readers": args.readers, "key": str(args.key)}))
    return 0


def _demographics(args: argparse.Namespace) -> int:
    import pandas as pd

    from virtual_contrast.io import write_table, write_text
    from virtual_contrast.reader.demographics import demographics_markdown, demographics_table

    path = Path(args.subjects)
    if not path.exists():
        raise InputError("subjects table not found", path=path)
    subjects = pd.read_csv(path, sep="\t" if path.suffix != ".csv" else ",", dtype={"subject": str})
    table = demographics_table(subjects, group_column=args.group_column)
    if table is None:
        print(
            "no demographic column (age, sex, weight, indication) in the subjects table: nothing to do"
        )
        return 0
    write_table(table, args.out)
    if args.markdown:
        write_text(demographics_markdown(table), args.markdown)
    print(demographics_markdown(table))
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add this area's subcommands."""
    p = subparsers.add_parser(
        "reader-stats",
        help="lesion detection, image quality and reading-time statistics of a reader study (Table 5)",
        description="Match each read's lesions to the reference reader's ref-T1c lesions and compute SE, FDR, "
        "PPV, F1 with confidence intervals and tests (McNemar mid-p, Wilcoxon, t-tests).",
    )
    p.add_argument(
        "--lesions", type=Path, required=True, help="CSV: " + ",".join(_lesion_columns())
    )
    p.add_argument(
        "--reads",
        type=Path,
        help="CSV: patient,reader,modality,quality,reading_time_s (which reads happened; without it every "
        "reader is assumed to have read every patient of the lesions file)",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--reference-reader",
        help="reader whose ref reads are the reference (default: the only one)",
    )
    p.add_argument(
        "--thresholds",
        type=float,
        nargs="+",
        default=[0.0, 2.5, 5.0, 7.5, 10.0],
        help="minimum long axes (mm) of the nested size classes",
    )
    p.add_argument(
        "--matching",
        choices=("both", "reference"),
        default="both",
        help="pairing distance: half the mean of both lesions' axes (default) or of the reference's only",
    )
    p.set_defaults(func=_reader_stats)

    p = subparsers.add_parser(
        "reading-lists",
        help="pseudonymised two-phase reading lists (and images) for a reader study",
        description="Each reader reads half of the exams as low-T1c and half as vir-T1c in phase 1 and the "
        "mirror in phase 2, in random order, under random case ids; the key is written to a separate file.",
    )
    p.add_argument(
        "--patients",
        type=Path,
        required=True,
        help="text file, one patient id per line (or a TSV with a 'subject' or 'patient' column)",
    )
    p.add_argument("--split", help="with a subjects TSV: keep only rows of this split (e.g. test)")
    p.add_argument("--readers", nargs="+", required=True, help="reader names, e.g. R1 R2")
    p.add_argument(
        "--reference-reader", help="reader who also reads every ref-T1c, in a last phase"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="folder handed to the readers")
    p.add_argument(
        "--key",
        type=Path,
        required=True,
        help="the key (case id -> patient, modality); keep it apart",
    )
    p.add_argument(
        "--image-pattern",
        help="path pattern of the images to read, with {patient} and {modality} (low, vir, ref); "
        "copies them, renamed by case id, into the readers' folders",
    )
    p.add_argument(
        "--pre-pattern",
        help="path pattern of the pre-contrast T1 shown beside each case ({patient})",
    )
    p.set_defaults(func=_reading_lists)

    p = subparsers.add_parser(
        "import-markups",
        help="3D Slicer line markups (long and short axis per lesion) to the lesions CSV",
        description="Reads ANNOTATIONS/<case_id>/*.mrk.json, pairs each lesion's two lines, un-blinds the case "
        "ids with the key and writes the lesions CSV (and the reads CSV from the filled-in forms).",
    )
    p.add_argument(
        "--annotations", type=Path, required=True, help="folder with one sub-folder per case id"
    )
    p.add_argument("--key", type=Path, required=True, help="the key written by reading-lists")
    p.add_argument(
        "--forms",
        type=Path,
        nargs="*",
        default=None,
        help="filled-in reading forms (TSV) of the readers",
    )
    p.add_argument("--lesions", type=Path, required=True, help="output lesions CSV")
    p.add_argument("--reads", type=Path, help="output reads CSV (needs --forms)")
    p.set_defaults(func=_import_markups)

    p = subparsers.add_parser(
        "export-markups",
        help="lesions CSV to 3D Slicer line markups (to review detections in Slicer)",
    )
    p.add_argument("--lesions", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_export_markups)

    p = subparsers.add_parser(
        "demographics",
        help="Table-1-style demographics by split (Fisher exact, Mann-Whitney)",
    )
    p.add_argument(
        "--subjects",
        type=Path,
        required=True,
        help="subjects table with age, sex, weight, indication",
    )
    p.add_argument("--group-column", default="split")
    p.add_argument("--out", type=Path, required=True, help="output TSV")
    p.add_argument("--markdown", type=Path, help="also write the table as markdown")
    p.set_defaults(func=_demographics)


def _lesion_columns() -> tuple[str, ...]:
    from virtual_contrast.reader.stats import LESION_COLUMNS

    return LESION_COLUMNS
