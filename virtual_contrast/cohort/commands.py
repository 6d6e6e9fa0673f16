"""The embedded synthetic cohort: multi-sequence brain exams with enhancing lesions, in native scanner space.

``virtual-contrast cohort``: the whole cohort into one folder
(:func:`~virtual_contrast.cohort.writer.make_cohort`).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """``virtual-contrast cohort``: write the embedded synthetic cohort (defaults: the config's cohort)."""
    from virtual_contrast.config import schema_defaults

    defaults = schema_defaults("cohort")
    p = subparsers.add_parser(
        "cohort",
        help="write the embedded synthetic cohort (BIDS-like, native scanner space)",
        description=(__doc__ or "").split("\n\n")[0],
    )
    p.add_argument("--n", type=int, required=True, help="number of complete patients")
    p.add_argument(
        "--seed",
        type=int,
        default=defaults["seed"],
        help="random seed (the cohort is deterministic given it; default: %(default)s)",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--voxel-mm",
        type=float,
        default=defaults["native_voxel_mm"],
        help="atlas grid the anatomy comes from (mm; default: %(default)s, as the workflow simulates it)",
    )
    p.add_argument(
        "--native-voxel-mm",
        type=float,
        default=defaults["native_voxel_mm"],
        help="T1 voxel of the synthetic scans (mm; default: %(default)s)",
    )
    p.add_argument(
        "--extra-visits",
        type=int,
        default=defaults["extra_visits"],
        help="patients with a later (excluded) visit (default: %(default)s)",
    )
    p.add_argument(
        "--missing-sequence",
        type=int,
        default=defaults["missing_sequence"],
        help="extra patients lacking one sequence (default: %(default)s)",
    )
    p.add_argument(
        "--atlas-brain-mask", type=Path, default=None, help="official ICBM 2009a brain mask"
    )
    p.add_argument(
        "--atlas-head-mask", type=Path, default=None, help="official ICBM 2009a head mask"
    )
    p.set_defaults(func=_run_cohort)


def _run_cohort(args: argparse.Namespace) -> int:
    from virtual_contrast.atlas import build_atlas
    from virtual_contrast.cohort.writer import make_cohort

    atlas, _ = build_atlas(
        args.voxel_mm, brain_mask=args.atlas_brain_mask, head_mask=args.atlas_head_mask
    )
    out = make_cohort(
        args.out,
        n=args.n,
        seed=args.seed,
        atlas=atlas,
        native_voxel_mm=args.native_voxel_mm,
        extra_visits=args.extra_visits,
        missing_sequence=args.missing_sequence,
        progress=True,
    )
    print(f"cohort written to {out}")
    return 0
