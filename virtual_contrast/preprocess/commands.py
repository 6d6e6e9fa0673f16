"""Command-line subcommands of this area (registered by virtual_contrast.cli).

``adc``, ``skull-strip``, ``crop`` and ``normalize`` work on files and print what they did; ``register`` comes
from :mod:`virtual_contrast.preprocess.register`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from virtual_contrast.checks import (
    check_nifti_output,
    check_percentiles,
    check_positive,
    check_shape,
)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add this area's subcommands."""
    p = subparsers.add_parser(
        "adc", help="ADC map (mm²/s) from a DWI series with b=0 and b≈1000 volumes"
    )
    p.add_argument("--dwi", type=Path, required=True, help="4D DWI NIfTI")
    p.add_argument("--bval", type=Path, required=True, help="FSL b-value file (one row)")
    p.add_argument("--out", type=Path, required=True, help="ADC map to write (.nii.gz)")
    p.add_argument("--b0-out", type=Path, help="also write the mean b=0 image here")
    p.add_argument(
        "--allow-degenerate",
        action="store_true",
        help="write the ADC even when it is degenerate (no b0 signal, negative series, b≈1000 brighter "
        "than b0 in most tissue), with a warning instead of an error",
    )
    p.add_argument("--subject", help="subject id, for messages")
    p.set_defaults(func=_adc)

    p = subparsers.add_parser(
        "skull-strip", help="brain mask of a T1 registered to the atlas (HD-BET or the atlas prior)"
    )
    p.add_argument("--t1", type=Path, required=True, help="T1 on the atlas grid")
    p.add_argument("--out", type=Path, required=True, help="brain mask to write (uint8 .nii.gz)")
    p.add_argument("--backend", choices=("auto", "hdbet", "atlas"), default="auto")
    prior = p.add_mutually_exclusive_group()
    prior.add_argument("--atlas-brain-mask", type=Path, help="atlas brain mask on the T1's grid")
    prior.add_argument(
        "--voxel-mm",
        type=float,
        help="build the atlas (nilearn's template) on this isotropic grid instead",
    )
    p.add_argument("--hdbet-weights", type=Path, help="HD-BET 2 weights folder")
    p.add_argument("--device", default="cpu", help="HD-BET device: cpu or cuda (default cpu)")
    p.add_argument(
        "--apply",
        type=Path,
        nargs=2,
        action="append",
        metavar=("IMAGE", "OUT"),
        default=[],
        help="also write IMAGE zeroed outside the mask to OUT (repeatable)",
    )
    p.add_argument("--subject", help="subject id, for messages")
    p.set_defaults(func=_skull_strip)

    p = subparsers.add_parser(
        "crop", help="crop or zero-pad an atlas-space image to the network's shape"
    )
    p.add_argument("--image", type=Path, required=True, help="image on the atlas grid")
    p.add_argument("--out", type=Path, required=True, help="cropped image to write")
    p.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=[160, 192, 160],
        metavar=("X", "Y", "Z"),
        help="output shape in voxels (default: the paper's 160 192 160 at 1 mm)",
    )
    p.add_argument(
        "--reference-mask",
        type=Path,
        help="atlas brain mask: centre the box on its bounding box (default: the grid centre)",
    )
    p.add_argument("--subject", help="subject id, for messages")
    p.set_defaults(func=_crop)

    p = subparsers.add_parser(
        "normalize",
        help="clip at brain percentiles and map linearly to [0, 1] (0 outside the brain)",
    )
    p.add_argument("--image", type=Path, required=True, help="skull-stripped image")
    p.add_argument("--mask", type=Path, required=True, help="brain mask on the image's grid")
    p.add_argument("--out", type=Path, required=True, help="normalised image to write")
    p.add_argument("--low", type=float, default=1.0, help="lower percentile (default 1)")
    p.add_argument("--high", type=float, default=99.0, help="upper percentile (default 99)")
    p.add_argument("--subject", help="subject id, for messages")
    p.set_defaults(func=_normalize)

    # Imported here so that a problem in the registration module does not hide the other subcommands' code.
    from virtual_contrast.preprocess.register import add_register_command

    add_register_command(subparsers)


def _adc(args: argparse.Namespace) -> int:
    from virtual_contrast.preprocess.adc import adc_from_files

    check_nifti_output(args.out)
    if args.b0_out is not None:
        check_nifti_output(args.b0_out, what="--b0-out")
    prov = adc_from_files(
        args.dwi,
        args.bval,
        args.out,
        args.b0_out,
        subject=args.subject,
        allow_degenerate=args.allow_degenerate,
    )
    print(
        f"ADC from {prov['n_b0']} b=0 and {prov['n_b1000']} b≈1000 volumes (mean b "
        f"{prov['b1000_mean']:.1f} s/mm²), median {prov['adc_median_mm2_s']:.2e} mm²/s over the tissue "
        f"voxels -> {args.out}" + (f"; mean b0 -> {args.b0_out}" if args.b0_out else "")
    )
    for problem in prov["problems"]:
        print(f"warning: {problem}")
    return 0


def _skull_strip(args: argparse.Namespace) -> int:
    from virtual_contrast.preprocess.skull_strip import apply_mask, skull_strip

    check_nifti_output(args.out)
    for _, out in args.apply:
        check_nifti_output(out, what="--apply OUT")
    if args.voxel_mm is not None:
        check_positive(args.voxel_mm, what="--voxel-mm")
    atlas = None
    if args.voxel_mm is not None:
        from virtual_contrast.atlas import build_atlas

        atlas, _ = build_atlas(args.voxel_mm)
    prov = skull_strip(
        args.t1,
        args.out,
        backend=args.backend,
        atlas=atlas,
        atlas_brain_mask=args.atlas_brain_mask,
        hdbet_weights=args.hdbet_weights,
        device=args.device,
        subject=args.subject,
    )
    print(
        f"brain mask ({prov['backend']}: {prov['reason']}) of {prov['brain_volume_ml']:.0f} mL "
        f"in {prov['seconds']:.1f} s -> {args.out}"
    )
    if args.apply:
        images, outs = zip(*args.apply, strict=True)
        for out in apply_mask(list(images), args.out, list(outs), subject=args.subject):
            print(f"masked image -> {out}")
    return 0


def _crop(args: argparse.Namespace) -> int:
    from virtual_contrast.preprocess.crop import crop_images

    check_nifti_output(args.out)
    check_shape(args.shape, what="--shape")
    prov = crop_images(
        {"image": args.image},
        {"image": args.out},
        tuple(args.shape),
        args.reference_mask,
        subject=args.subject,
    )
    kept = prov.get("brain_fraction_kept")
    print(
        f"cropped to {tuple(prov['shape'])} from voxel {tuple(prov['start'])}"
        + (f", {100 * kept:.1f} % of the reference brain kept" if kept is not None else "")
        + f" -> {args.out}"
    )
    return 0


def _normalize(args: argparse.Namespace) -> int:
    from virtual_contrast.preprocess.normalize import normalize_image

    check_nifti_output(args.out)
    check_percentiles(args.low, args.high, what="--low/--high percentiles")
    prov = normalize_image(
        args.image, args.mask, args.out, low=args.low, high=args.high, subject=args.subject
    )
    print(
        f"clipped to [{prov['low_value']:g}, {prov['high_value']:g}] (percentiles {args.low:g}, "
        f"{args.high:g} over the brain), mapped to [0, 1] -> {args.out}"
    )
    return 0
