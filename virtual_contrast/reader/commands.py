"""Command-line subcommands of this area (registered by virtual_contrast.cli)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from virtual_contrast.io import InputError, staged_folder


def _reader_stats(args: argparse.Namespace) -> int:
    from virtual_contrast.annotations import load_lesions, load_reads
    from virtual_contrast.reader.stats import reader_stats

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
    from virtual_contrast.annotations import load_lesions
    from virtual_contrast.reader.slicer import lesions_to_markups

    lesions = load_lesions(args.lesions)
    with staged_folder(args.out) as stage:
        written = lesions_to_markups(lesions, stage)
    print(f"wrote {len(written)} markup files under {args.out}")
    return 0


def _reading_lists(args: argparse.Namespace) -> int:
    from virtual_contrast.reader.protocol import (
        case_sources,
        check_key_apart,
        check_pattern,
        export_reading_images,
        make_reading_lists,
        read_patients,
        write_reading_lists,
    )

    patients = read_patients(args.patients, split=args.split)
    check_key_apart(args.out, args.key)
    key = make_reading_lists(
        patients, args.readers, reference_reader=args.reference_reader, seed=args.seed
    )
    image_format = args.image_format
    if image_format == "auto":  # as the workflow: both for DICOM exams, else NIfTI
        image_format = "both" if args.dicom_source else "nifti"
    patterns = {
        "image_pattern": args.image_pattern,
        "pre_pattern": args.pre_pattern,
        "flair_pattern": args.flair_pattern,
    }
    # Every pattern and every source file is checked before anything is written.
    cases = case_sources(key, **patterns) if args.image_pattern else []
    if args.dicom_source:
        check_pattern(args.dicom_source, "dicom_source", flag="--dicom-source")
    # The readers' folder is filled in a staging folder and appears whole; the key comes last.
    with staged_folder(args.out) as stage:
        write_reading_lists(key, out_dir=stage)
        if args.image_pattern and image_format in ("nifti", "both"):
            export_reading_images(key, stage, **patterns)
        if args.image_pattern and image_format in ("dicom", "both"):
            from virtual_contrast.dicom.deid import export_reading_dicom

            export_reading_dicom(
                cases,
                stage,
                source_of=(lambda p: args.dicom_source.format(patient=p))
                if args.dicom_source
                else None,
            )
    write_reading_lists(key, key_path=args.key)
    print(json.dumps({"cases": len(key), "readers": args.readers, "key": str(args.key)}))
    return 0


def _review_maps(workdir: Path, lists: Path, key: Path) -> dict[str, Path]:
    """Each test patient's vir-T1c uncertainty map (atlas space) in the workflow directory ``workdir``."""
    from virtual_contrast.layout import predict_files
    from virtual_contrast.reader.protocol import load_key

    patients = sorted(set(load_key(key)["patient"].astype(str)))
    return {p: workdir / predict_files(p)["uncertainty"] for p in patients}


def _read(args: argparse.Namespace) -> int:
    from virtual_contrast.layout import default_readings_folder
    from virtual_contrast.reader.protocol import KEY_NAME
    from virtual_contrast.reader.server import serve
    from virtual_contrast.reader.session import ReadingSession, session_lock

    lists = args.lists
    session = ReadingSession(
        lists,
        args.key or lists.parent / KEY_NAME,
        args.reader,
        args.out or default_readings_folder(lists),
        phase=args.phase,
        allow_changed_images=args.allow_changed_images,
        review_maps=_review_maps(args.review, lists, args.key or lists.parent / KEY_NAME)
        if args.review
        else None,
    )
    with session_lock(session):
        try:
            server = serve(session, args.host, args.port)
        except OSError as exc:
            raise InputError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from exc
        summary = session.summary()
        print(
            f"reader {session.reader}, phase {session.phase}: {len(session.cases)} cases, "
            f"{summary['n_read']} read{' (closed)' if session.closed else ''}; "
            f"results in {session.lesions_path} and {session.reads_path}"
        )
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(
                f"warning: listening on {args.host}: anyone who has the URL can open this session"
            )
        print(f"open {server.url} in a browser (Ctrl-C stops the server; saved cases are kept)")
        if args.open:
            import webbrowser

            webbrowser.open(server.url)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("stopped")
        finally:
            server.server_close()
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
    """Add this area's subcommands (defaults from the config schema, as the workflow's)."""
    from virtual_contrast.config import schema_defaults

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
        default=schema_defaults("reader_study", "thresholds"),
        help="minimum long axes (mm) of the nested size classes (default: %(default)s)",
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
    p.add_argument(
        "--seed",
        type=int,
        default=schema_defaults("split", "seed"),
        help="default: %(default)s (the workflow draws the lists with the config's split.seed)",
    )
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
    p.add_argument(
        "--flair-pattern",
        help="path pattern of the FLAIR shown beside each case ({patient})",
    )
    p.add_argument(
        "--image-format",
        choices=("auto", "nifti", "dicom", "both"),
        default=schema_defaults("reader_study", "image_format"),
        help="copy the images as NIfTI, as de-identified DICOM series (<reader>/phase-<k>/<case_id>/post/, "
        "pre/; for any DICOM viewer), or both; auto (default): both with --dicom-source, else NIfTI",
    )
    p.add_argument(
        "--dicom-source",
        help="with DICOM images: a DICOM file (or folder) of each patient's exam ({patient}) whose "
        "acquisition attributes (field strength, TR, TE...) are kept; nothing identifying is copied",
    )
    p.set_defaults(func=_reading_lists)

    p = subparsers.add_parser(
        "read",
        help="the reading tool: one reader's session of the reading lists in the browser (NiiVue)",
        description="Serve one reader's cases of one phase, in the list's order and under their case ids, to a "
        "browser on this machine: the post-contrast image beside the pre-contrast T1 and the FLAIR, a line for "
        "each lesion's long and short axis, an image-quality grade, the reading time. Each finished case is "
        "added at once to the lesions and reads CSV files that reader-stats reads; reopening resumes at the "
        "first unread case.",
    )
    p.add_argument(
        "--lists", type=Path, required=True, help="the reading lists folder (reading-lists --out)"
    )
    p.add_argument("--reader", required=True, help="the reader's name in the reading lists")
    p.add_argument(
        "--phase", type=int, help="reading phase (default: the reader's first phase not yet closed)"
    )
    p.add_argument(
        "--key",
        type=Path,
        help="the reading key (default: reading_key.tsv beside the lists folder); never shown to the reader",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="folder of lesions.csv, reads.csv and the sessions (default: readings/ beside the results/ "
        "folder that holds the lists, never inside it; else beside the lists folder)",
    )
    p.add_argument(
        "--allow-changed-images",
        action="store_true",
        help="go on although the session's images changed since its first opening (their SHA-256 is "
        "recorded then): its earlier reads were made on other images",
    )
    p.add_argument(
        "--review",
        type=Path,
        metavar="WORKDIR",
        help="a non-blinded review of a CLOSED phase: vir-T1c cases also show vir-T1c's uncertainty map "
        "(from the workflow directory WORKDIR, results/sub-*/predict/); refused on a phase not yet closed",
    )
    p.add_argument("--port", type=int, default=8765, help="port (0: any free port)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only)",
    )
    p.add_argument("--open", action="store_true", help="open the page in the default browser")
    p.set_defaults(func=_read)

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
    from virtual_contrast.annotations import LESION_COLUMNS

    return LESION_COLUMNS
