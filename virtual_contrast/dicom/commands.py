"""Command-line subcommands of this area (registered by virtual_contrast.cli): import-dicom, export-dicom."""

from __future__ import annotations

import argparse
from pathlib import Path


def _import_dicom(args: argparse.Namespace) -> int:
    from virtual_contrast.dicom.convert import import_exam
    from virtual_contrast.dicom.rules import ROLE_LABELS, load_series_map
    from virtual_contrast.layout import bids_exam_files, exam_record
    from virtual_contrast.subjects import check_session_label, check_subject_id

    subject = check_subject_id(args.subject)
    if args.session:
        check_session_label(args.session, source="--session")
    series_map = load_series_map(args.series_map)
    targets = bids_exam_files(args.out, subject, args.session or "")
    report_path = exam_record(args.out, subject, args.session or "", "dicom.tsv")
    result = import_exam(args.dicom, targets, report_path, series_map=series_map, subject=subject)
    for row in result.report.itertuples():
        role = f"{row.role} -> {row.file}" if row.status == "used" else row.status
        print(f"series {row.series_number} {row.series_description!r}: {role} ({row.reason})")
    missing = [
        label for role, label in ROLE_LABELS.items() if role not in result.classification.roles
    ]
    print(f"report: {report_path}")
    if missing:
        print(
            f"not found: {', '.join(missing)} (the workflow excludes an exam that lacks any of them)"
        )
    return 0


def _export_dicom(args: argparse.Namespace) -> int:
    from virtual_contrast import __version__
    from virtual_contrast.dicom.export import export_series

    derivation = f"virtual-contrast {__version__}: {args.model}"
    written = export_series(
        args.image,
        args.like,
        args.out,
        series_uid=args.series_uid,
        description=args.description,
        derivation=derivation,
        kind="uncertainty" if args.uncertainty else "synthetic",
    )
    print(f"wrote {len(written)} DICOM files to {args.out}")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add this area's subcommands."""
    p = subparsers.add_parser(
        "import-dicom",
        help="one DICOM exam -> the BIDS-like layout (T1w, FLAIR, DWI, low-dose and full-dose T1c)",
        description="Reads every header under --dicom, chooses each sequence's series by rules on the headers "
        "(series description, image type, contrast agent, acquisition order) and a site's --series-map, "
        "converts them with dcm2niix (BIDS sidecars kept) and writes a report of every series used or "
        "ignored. Two candidates for one sequence stop the import (exit 2), naming both series.",
    )
    p.add_argument("--dicom", type=Path, required=True, help="folder of one exam (any sub-folders)")
    p.add_argument(
        "--out", type=Path, required=True, help="BIDS-like folder to write sub-<ID>/ into"
    )
    p.add_argument("--subject", required=True, help="subject id (letters and digits)")
    p.add_argument(
        "--session",
        default="",
        help="session label: letters and digits, the <label> of ses-<label> (e.g. 01); none by default",
    )
    p.add_argument(
        "--series-map", type=Path, help="YAML rules for this site's series (see the README)"
    )
    p.set_defaults(func=_import_dicom)

    p = subparsers.add_parser(
        "export-dicom",
        help="a NIfTI image (vir-T1c) as a derived DICOM series over a reference series",
        description="Writes --image as a DICOM series in the study and frame of reference of the series in "
        "--like (new series and instance UIDs, ImageType DERIVED\\SECONDARY, a synthetic-image series "
        "description, geometry from the image), so that a viewer places it over the reference.",
    )
    p.add_argument("--image", type=Path, required=True, help="3D NIfTI on the reference's grid")
    p.add_argument("--like", type=Path, required=True, help="folder of the reference DICOM series")
    p.add_argument("--out", type=Path, required=True, help="new folder for the series")
    p.add_argument(
        "--series-uid", help="the reference series' UID when --like holds several series"
    )
    p.add_argument(
        "--description",
        help="series description (default: says synthetic, or uncertainty, and not for diagnosis)",
    )
    p.add_argument(
        "--uncertainty",
        action="store_true",
        help="--image is vir-T1c's uncertainty map (desc-uncertainty, native grid): its own series, "
        "described 'vir-T1c UNCERTAINTY - NOT FOR DIAGNOSIS'",
    )
    p.add_argument(
        "--model",
        default="vir-T1c from a 3D UNet (pre-contrast T1, FLAIR, ADC, low-dose T1c)",
        help="model written into DerivationDescription, after the software and version",
    )
    p.set_defaults(func=_export_dicom)
