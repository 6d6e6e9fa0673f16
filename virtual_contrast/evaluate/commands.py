"""Command-line subcommands of this area (registered by virtual_contrast.cli)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from virtual_contrast.io import InputError


def _metrics(args: argparse.Namespace) -> int:
    from virtual_contrast.evaluate.metrics import voxel_metrics_from_files

    result = voxel_metrics_from_files(
        pred=args.pred,
        ref=args.ref,
        pre=args.pre,
        mask=args.mask,
        subject=args.subject,
        normalize=args.normalize,
    )
    result.pop("roc_tpr")
    result = {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()
    }
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def _detect_lesions(args: argparse.Namespace) -> int:
    from virtual_contrast.evaluate.lesions import detect_lesions_from_files
    from virtual_contrast.io import write_table

    table = detect_lesions_from_files(
        post=args.post,
        pre=args.pre,
        mask=args.mask,
        subject=args.subject,
        threshold=args.threshold,
        min_volume_mm3=args.min_volume,
    )
    write_table(table, args.out)
    print(f"{len(table)} lesions -> {args.out}")
    return 0


def _validate_detector(args: argparse.Namespace) -> int:
    import pandas as pd

    from virtual_contrast.evaluate.lesions import validate_detector
    from virtual_contrast.io import write_table

    def read(path: Path) -> pd.DataFrame:
        if not path.exists():
            raise InputError("table not found", path=path)
        return pd.read_csv(path, sep="\t", dtype={"subject": str})

    detections = pd.concat([read(p) for p in args.detections], ignore_index=True)
    table = validate_detector(detections, read(args.truth))
    write_table(table, args.out)
    print(table.to_string(index=False))
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add this area's subcommands."""
    p = subparsers.add_parser(
        "metrics",
        help="SSIM, PSNR and enhancement ROC AUC of a synthesised T1c against the reference (JSON)",
        description="Brain-voxel SSIM (Gaussian window, sigma 1.5), PSNR (data range 1) and ROC AUC of the "
        "enhancement map (post minus pre, clipped at 0; reference binarised by Otsu) with the Youden point. "
        "Images must share one grid and be normalised to [0, 1] (or pass --normalize).",
    )
    p.add_argument(
        "--pred", type=Path, required=True, help="synthesised (or low-dose) post-contrast T1"
    )
    p.add_argument("--ref", type=Path, required=True, help="reference full-dose post-contrast T1")
    p.add_argument("--pre", type=Path, required=True, help="pre-contrast T1")
    p.add_argument("--mask", type=Path, required=True, help="brain mask")
    p.add_argument("--subject", help="subject id, for error messages")
    p.add_argument(
        "--normalize",
        action="store_true",
        help="first clip each image at its 1st/99th brain percentiles and map it to [0, 1]",
    )
    p.set_defaults(func=_metrics)

    p = subparsers.add_parser(
        "detect-lesions",
        help="automated enhancing-lesion detection (reader 'auto'): centres and RANO-like axes",
    )
    p.add_argument("--post", type=Path, required=True, help="post-contrast T1 (normalised)")
    p.add_argument("--pre", type=Path, required=True, help="pre-contrast T1 (normalised)")
    p.add_argument("--mask", type=Path, required=True, help="brain mask")
    p.add_argument("--out", type=Path, required=True, help="output TSV")
    p.add_argument("--subject", help="subject id (added as a column)")
    p.add_argument(
        "--threshold", type=float, default=0.15, help="enhancement threshold (normalised units)"
    )
    p.add_argument("--min-volume", type=float, default=10.0, help="minimum lesion volume (mm3)")
    p.set_defaults(func=_detect_lesions)

    p = subparsers.add_parser(
        "validate-detector",
        help="sensitivity and PPV of detected lesions against true lesions, per size bin",
    )
    p.add_argument(
        "--detections",
        type=Path,
        nargs="+",
        required=True,
        help="detect-lesions TSVs (with subject)",
    )
    p.add_argument(
        "--truth",
        type=Path,
        required=True,
        help="true lesions TSV (subject, x_mm, ..., short_axis_mm)",
    )
    p.add_argument("--out", type=Path, required=True, help="output TSV")
    p.set_defaults(func=_validate_detector)
