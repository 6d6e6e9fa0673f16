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


#: Command-line options of the detector: option name -> (DetectorSettings field, help). Their defaults come
#: from the config schema (evaluate.detector), as the workflow's do.
DETECTOR_OPTIONS = {
    "--threshold": (
        "threshold",
        "decision threshold on the lesion score: peak enhancement x (1 - tubularity) x (1 - prior overlap)",
    ),
    "--candidate-floor": ("candidate_floor", "enhancement above which voxels form candidates"),
    "--edge-fraction": ("edge_fraction", "a lesion is its voxels above this fraction of its peak"),
    "--smoothing-mm": ("smoothing_mm", "Gaussian sigma (mm) applied before subtraction"),
    "--min-volume": ("min_volume_mm3", "smallest lesion volume (mm3)"),
    "--min-depth": ("min_depth_mm", "a lesion reaches at least this deep into the brain mask (mm)"),
    "--max-prior-overlap": (
        "max_prior_overlap",
        "largest fraction of a lesion in the --prior mask",
    ),
    "--min-axis-ratio": (
        "min_axis_ratio",
        "smallest inertia axis ratio (tubes and sheets are below)",
    ),
    "--min-fill": (
        "min_fill",
        "smallest fill of the inertia ellipsoid (branching vessels are below)",
    ),
    "--max-tubularity": ("max_tubularity", "largest Frangi tubularity at the lesion's own scale"),
}


def _settings(args: argparse.Namespace):
    from virtual_contrast.evaluate.lesions import DetectorSettings

    return DetectorSettings(
        **{field: getattr(args, field) for field, _ in DETECTOR_OPTIONS.values()}
    )


def _normalised_copy(path: Path, mask: Path, folder: Path, subject: str | None) -> Path:
    from virtual_contrast.evaluate.metrics import normalize_percentiles
    from virtual_contrast.io import load_array, save_image

    data, affine = load_array(path, subject=subject)
    brain = load_array(mask, subject=subject)[0] > 0
    if data.shape != brain.shape:
        raise InputError("is not on the brain mask's grid", subject=subject, path=path)
    out = folder / f"norm_{path.name}"
    save_image(normalize_percentiles(data, brain), affine, out)
    return out


def _detect_lesions(args: argparse.Namespace) -> int:
    import tempfile

    from virtual_contrast.evaluate.lesions import find_candidates, load_detection_images
    from virtual_contrast.io import save_image, write_table

    settings = _settings(args)
    with tempfile.TemporaryDirectory() as tmp:
        post, pre = args.post, args.pre
        if args.normalize:
            post = _normalised_copy(args.post, args.mask, Path(tmp), args.subject)
            pre = _normalised_copy(args.pre, args.mask, Path(tmp), args.subject)
        arrays, affine = load_detection_images(
            post=post, pre=pre, mask=args.mask, subject=args.subject, prior=args.prior
        )
    found = find_candidates(
        arrays["post"], arrays["pre"], arrays["mask"], affine, settings, prior=arrays.get("prior")
    )
    table = found.lesions(settings.threshold).drop(columns="candidate_id")
    if args.subject is not None:
        table.insert(0, "subject", args.subject)
    write_table(table, args.out)
    if args.candidates:
        write_table(found.table, args.candidates)
    if args.labels:
        save_image(found.lesion_labels(settings.threshold), affine, args.labels, dtype="int16")
    if args.overlay:
        from virtual_contrast.evaluate.overlays import plot_detection_overlay

        plot_detection_overlay(
            {"post": arrays["post"]},
            {"post": found.lesion_labels(settings.threshold)},
            {"post": table},
            affine,
            args.overlay,
            title=f"{args.subject or args.post.name}: {len(table)} lesions (threshold {settings.threshold:g})",
        )
    print(f"{len(table)} lesions -> {args.out}")
    return 0


def _tune_detector(args: argparse.Namespace) -> int:
    import pandas as pd

    from virtual_contrast.evaluate.figures import plot_froc
    from virtual_contrast.evaluate.froc import threshold_grid, tune_detector
    from virtual_contrast.evaluate.lesions import load_detection_images
    from virtual_contrast.io import write_json, write_table

    n = len(args.subjects)
    if not (len(args.post) == len(args.pre) == len(args.mask) == n):
        raise InputError(
            f"give one --post, --pre and --mask per subject: {n} subjects, {len(args.post)} post, "
            f"{len(args.pre)} pre, {len(args.mask)} masks"
        )
    files = dict(zip(args.subjects, zip(args.post, args.pre, args.mask, strict=True), strict=True))

    def load(subject):
        post, pre, mask = files[subject]
        arrays, affine = load_detection_images(post=post, pre=pre, mask=mask, subject=subject)
        return arrays["post"], arrays["pre"], arrays["mask"], affine

    if not args.truth.exists():
        raise InputError("truth table not found", path=args.truth)
    truth = pd.read_csv(args.truth, sep="\t", dtype={"subject": str})
    froc, point, candidates = tune_detector(
        load,
        args.subjects,
        truth,
        _settings(args),
        prior_enhancement=args.prior_enhancement,
        prior_fraction=args.prior_fraction,
        thresholds=threshold_grid(*args.thresholds),
        max_fp_per_patient=args.max_fp,
    )
    from virtual_contrast import layout

    def out(path: str) -> Path:  # the workflow's file names (rule detector_froc), in --out-dir
        return args.out_dir / Path(path).name

    write_table(froc, out(layout.table("detector_froc")))
    write_table(candidates, out(layout.table("detector_froc_candidates")))
    write_json(point, out(layout.table("detector_operating_point", ".json")))
    plot_froc(froc, out(layout.figure("detector_froc")), operating_point=point)
    print(json.dumps(point, indent=2))
    return 0


def _validate_detector(args: argparse.Namespace) -> int:
    import pandas as pd

    from virtual_contrast.evaluate.froc import validate_detector
    from virtual_contrast.io import write_table

    def read(path: Path) -> pd.DataFrame:
        if not path.exists():
            raise InputError("table not found", path=path)
        return pd.read_csv(path, sep="\t", dtype={"subject": str})

    detections = pd.concat([read(p) for p in args.detections], ignore_index=True)
    if (
        "modality" in detections.columns
    ):  # the workflow's detections: the full-dose reads are validated
        detections = detections[detections["modality"] == "ref"]
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
        "Images must share one grid and be normalised: 1st and 99th brain percentiles at 0 and 1 (or "
        "pass --normalize).",
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
        help="first map each image's 1st and 99th brain percentiles to 0 and 1 (not clipped)",
    )
    p.set_defaults(func=_metrics)

    from virtual_contrast.config import schema_defaults

    defaults = schema_defaults("evaluate")
    p = subparsers.add_parser(
        "detect-lesions",
        help="automated enhancing-lesion detection (reader 'auto'): centres and RANO-like axes",
        description="Enhancing blobs and rings of a post-contrast T1 against the pre-contrast T1; vessels "
        "(tubes), dura and sinuses (sheets, branching networks at the surface) rejected by their shape. "
        "Defaults are the workflow's (config evaluate.detector).",
    )
    p.add_argument("--post", type=Path, required=True, help="post-contrast T1 (normalised)")
    p.add_argument(
        "--pre", type=Path, required=True, help="pre-contrast T1 (normalised), same grid"
    )
    p.add_argument("--mask", type=Path, required=True, help="brain mask, same grid")
    p.add_argument("--out", type=Path, required=True, help="output TSV")
    p.add_argument("--subject", help="subject id (added as a column)")
    p.add_argument("--prior", type=Path, help="physiological-enhancement mask, same grid")
    p.add_argument(
        "--normalize",
        action="store_true",
        help="first map the 1st and 99th brain percentiles of post and pre to 0 and 1 (not clipped)",
    )
    p.add_argument("--candidates", type=Path, help="also write every candidate with its features")
    p.add_argument("--labels", type=Path, help="also write the detections' label image (NIfTI)")
    p.add_argument("--overlay", type=Path, help="also draw the detections on the post image (PNG)")
    _add_detector_options(p, defaults["detector"])
    p.set_defaults(func=_detect_lesions)

    p = subparsers.add_parser(
        "tune-detector",
        help="FROC of the detector on training subjects with known lesions; the operating point",
        description="Sweeps the decision threshold on the given (training) subjects against their true "
        "lesions (world mm of the images) and chooses the lowest threshold within --max-fp false positives "
        "per patient. Each subject is read with a physiological-enhancement prior from the others.",
    )
    p.add_argument(
        "--subjects", nargs="+", required=True, help="subject ids, in the order of the images"
    )
    p.add_argument(
        "--post", type=Path, nargs="+", required=True, help="normalised post-contrast T1s"
    )
    p.add_argument("--pre", type=Path, nargs="+", required=True, help="normalised pre-contrast T1s")
    p.add_argument("--mask", type=Path, nargs="+", required=True, help="brain masks")
    p.add_argument(
        "--truth",
        type=Path,
        required=True,
        help="true lesions TSV (subject, x_mm, ..., short_axis_mm)",
    )
    p.add_argument("--out-dir", type=Path, required=True)
    froc, prior = defaults["froc"], defaults["prior"]
    p.add_argument(
        "--thresholds",
        type=float,
        nargs=3,
        metavar=("MIN", "MAX", "STEP"),
        default=[froc["threshold_min"], froc["threshold_max"], froc["threshold_step"]],
        help="decision thresholds swept (default: %(default)s)",
    )
    p.add_argument(
        "--max-fp",
        type=float,
        default=froc["max_fp_per_patient"],
        help="target false positives per patient (default: %(default)s)",
    )
    p.add_argument("--prior-enhancement", type=float, default=prior["enhancement"])
    p.add_argument("--prior-fraction", type=float, default=prior["fraction"])
    _add_detector_options(p, defaults["detector"])
    p.set_defaults(func=_tune_detector)

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


def _add_detector_options(parser: argparse.ArgumentParser, defaults: dict) -> None:
    for option, (field, text) in DETECTOR_OPTIONS.items():
        parser.add_argument(
            option,
            dest=field,
            type=float,
            default=defaults[field],
            help=f"{text} (default: %(default)s)",
        )
