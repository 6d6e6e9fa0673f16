"""Brain extraction on the three real heads: HD-BET v1 (fast and accurate) against deepbet, time and agreement.

    python benchmarks/skull_strip.py [--modes fast accurate] [--heads TCGA-FG-6692 ...] [--threads 2]

The heads (../shared/data, or VC_SHARED_DATA): the raw TCGA-FG-6692 T1 (skull, 0.9 x 0.9 x 5.5 mm oblique
slices, LAS), the skull-stripped BraTS-MET-00110 (RAS) and BraTS-GLI-00001 (LPS) T1s at 1 mm. Each tool runs
through the library's `skull_strip` (as the workflow's rule and `virtual-contrast skull-strip` do), on the CPU
with `--threads` torch threads. Prints, per head and tool, the network's wall seconds (from the provenance:
image loading and writing excluded), the CPU seconds of the whole call (all threads; what bounds the time on
an unshared machine), the ratio to deepbet's wall time, the brain volume and the Dice with deepbet's mask
(and, for TCGA-FG-6692, with the brain mask shipped with the exam); then the load average, since wall time on
a shared machine says little alone. Writes benchmarks/out/skull_strip.json and a figure of every mask on
every head (benchmarks/out/skull_strip_masks.png).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VC_SHARED_DATA", REPO.parent / "shared" / "data"))
HEADS = {
    "TCGA-FG-6692": "tcga_fg_6692_raw/t1.nii.gz",
    "BraTS-MET-00110": "brats_met_00110/BraTS-MET-00110-000-t1n.nii.gz",
    "BraTS-GLI-00001": "brats_gli_00001/BraTS-GLI-00001-000-t1n.nii.gz",
}
SHIPPED = {"TCGA-FG-6692": "tcga_fg_6692_raw/t1c_brainmask.nii.gz"}  # on the T1's grid


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--modes", nargs="+", default=["fast", "ensemble", "accurate"])
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    import nibabel as nib
    import numpy as np
    import torch

    from virtual_contrast.figures import plot_brain_masks
    from virtual_contrast.preprocess.options import SkullStripOptions, brain_extraction_label
    from virtual_contrast.preprocess.quality import dice
    from virtual_contrast.preprocess.skull_strip import skull_strip

    torch.set_num_threads(args.threads)
    tools = [("deepbet", "fast")] + [("hdbet", mode) for mode in args.modes]
    rows, panels = [], []
    with tempfile.TemporaryDirectory(prefix="vc-bench-bet-") as tmp:
        for case in args.heads:
            t1 = SHARED / HEADS[case]
            image = nib.load(t1)
            masks, seconds = {}, {}
            for backend, mode in tools:
                out = Path(tmp) / f"{case}_{backend}_{mode}.nii.gz"
                options = SkullStripOptions(backend=backend, hdbet_mode=mode, hdbet2_weights="")
                cpu = _cpu_seconds()
                prov = skull_strip(t1, out, options, subject=case.replace("-", ""))
                cpu = round(_cpu_seconds() - cpu, 1)
                label = brain_extraction_label(prov)
                masks[label] = np.asanyarray(nib.load(out).dataobj) > 0
                seconds[label] = prov["seconds"]
                rows.append(
                    {
                        "head": case,
                        "tool": label,
                        "seconds": prov["seconds"],
                        "cpu_seconds": cpu,
                        "brain_ml": prov["brain_volume_ml"],
                    }
                )
                print(
                    f"{case}: {label}: {prov['seconds']:.1f} s ({cpu:.0f} CPU s), "
                    f"{prov['brain_volume_ml']:.0f} mL"
                )
            reference = masks["deepbet"]
            shipped = None
            if case in SHIPPED:
                shipped = np.asanyarray(nib.load(SHARED / SHIPPED[case]).dataobj) > 0
            for row in rows[-len(tools) :]:
                row["ratio_to_deepbet"] = round(row["seconds"] / seconds["deepbet"], 2)
                row["dice_deepbet"] = round(dice(masks[row["tool"]], reference), 4)
                if shipped is not None:
                    row["dice_shipped"] = round(dice(masks[row["tool"]], shipped), 4)
            data = np.asanyarray(image.dataobj, dtype=np.float32)
            panels.append((case, data, image.affine, masks))
    args.out.mkdir(parents=True, exist_ok=True)
    figure = plot_brain_masks(panels, args.out / "skull_strip_masks.png")
    load = os.getloadavg()
    print()
    print(
        f"{'head':17s} {'tool':30s} {'s':>7s} {'CPU s':>7s} {'x deepbet':>9s} {'mL':>6s} "
        f"{'Dice deepbet':>12s} shipped"
    )
    for row in rows:
        print(
            f"{row['head']:17s} {row['tool']:30s} {row['seconds']:7.1f} {row['cpu_seconds']:7.0f} "
            f"{row['ratio_to_deepbet']:9.2f} {row['brain_ml']:6.0f} {row['dice_deepbet']:12.4f} "
            f"{row.get('dice_shipped', '')}"
        )
    print(f"\ntorch threads {args.threads}; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    result = {"threads": args.threads, "load_average": load, "rows": rows}
    (args.out / "skull_strip.json").write_text(json.dumps(result, indent=1))
    print(f"figure: {figure}\ntable: {args.out / 'skull_strip.json'}")
    return 0


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    raise SystemExit(main())
