"""Seconds per pre-processing stage of one subject: the five sequences, through the workflow's own steps.

    python benchmarks/preprocess.py [--subjects 1] [--cores 2] [--overlay config.paper.yaml] [--real]

1. The embedded cohort through the real workflow: Snakemake runs up to the `normalize` outputs of the first N
   subjects in a scratch folder, and the per-job `benchmark:` records give each stage's wall seconds (imports
   and file I/O included, as a user waits for them). With `--overlay config.paper.yaml` the grid is 1 mm.
2. `--real`: the raw TCGA-FG-6692 exam (../shared/data; T1 with skull, 0.9 x 0.9 x 5.5 mm oblique slices)
   through the same step functions in this process at 1 mm: brain extraction, registration of the five
   sequences (T1; FLAIR; T2 standing in for the DWI's b0, which the exam lacks; T1c as low- and full-dose), crop
   and normalisation. (No ADC stage: there is no DWI.)

Prints each stage's seconds, its share of the subject's total, and the total against the goal of 60 s per
subject on 2 cores (ratio), with the load average: wall time on a shared machine says little by itself.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
STAGES = ["adc", "skull_strip", "register", "crop", "normalize"]
GOAL_S = 60.0
SHARED = Path(os.environ.get("VC_SHARED_DATA", REPO.parent / "shared" / "data"))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--subjects", type=int, default=1)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--overlay", action="append", default=[], help="extra config overlay(s)")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep results here (default: a temp dir)"
    )
    parser.add_argument("--real", action="store_true", help="also time the raw TCGA exam at 1 mm")
    parser.add_argument("--no-cohort", action="store_true", help="skip the workflow run")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    if not args.no_cohort:
        workflow_run(args)
    if args.real:
        real_exam(args.workdir or Path(tempfile.mkdtemp(prefix="vc-bench-real-")))
    return 0


def workflow_run(args: argparse.Namespace) -> None:
    from virtual_contrast import layout
    from virtual_contrast.config import load_config
    from virtual_contrast.workflow import plan_study

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vc-bench-"))
    config = load_config(REPO / "config.yaml", *args.overlay)
    subjects = plan_study(config).subjects[: args.subjects]
    targets = [layout.normalize_files(s, ["T1w"])["T1w"] for s in subjects]
    cmd = [
        sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
        "--cores", str(args.cores), "--configfile", str(REPO / "config.yaml"), *args.overlay,
        "--", *targets,
    ]  # fmt: skip
    print("running:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    rows = []
    for stage in ["cohort", *STAGES]:
        for s in subjects:
            pattern = layout.benchmark(stage, s, "*" if stage == "cohort" else None)
            for f in sorted(workdir.glob(pattern)):
                b = pd.read_csv(f, sep="\t")
                rows.append(
                    {
                        "stage": stage,
                        "subject": s,
                        "seconds": float(b["s"].iloc[0]),
                        "cpu_seconds": float(b["cpu_time"].iloc[0]),
                    }
                )
    table = pd.DataFrame(rows)
    for column, what in (("seconds", "wall clock"), ("cpu_seconds", "CPU time, all threads")):
        wide = table.pivot(index="subject", columns="stage", values=column)[["cohort", *STAGES]]
        wide["preprocess_total"] = wide[STAGES].sum(axis=1)
        print(f"\n{column} per stage per subject ({what}, Snakemake benchmark records):")
        print(wide.round(1).to_string())
        mean = wide.mean()
        if column == "seconds":
            print("\nshare of pre-processing wall time per stage:")
            print((mean[STAGES] / mean["preprocess_total"]).round(3).to_string())
            wall = float(mean["preprocess_total"])
    _verdict(wall, float(mean["preprocess_total"]))
    print(f"results in {workdir}")


def real_exam(workdir: Path) -> None:
    from virtual_contrast.atlas import ATLAS_FILES, load_atlas, prepare_atlas
    from virtual_contrast.preprocess.crop import crop_images
    from virtual_contrast.preprocess.normalize import normalize_images
    from virtual_contrast.preprocess.options import default_options
    from virtual_contrast.preprocess.register import register_subject
    from virtual_contrast.preprocess.skull_strip import skull_strip

    folder = SHARED / "tcga_fg_6692_raw"
    if not (folder / "t1.nii.gz").exists():
        print(f"TCGA case not found under {folder}: skipped")
        return
    options = default_options()
    atlas_dir = workdir / "atlas"
    if not (atlas_dir / ATLAS_FILES["t1"]).exists():
        prepare_atlas(atlas_dir, 1.0)
    atlas = load_atlas(atlas_dir)
    channels = ["T1w", "FLAIR", "ADC", "lowT1c", "refT1c"]
    sources = {"FLAIR": "flair", "ADC": "t2", "lowT1c": "t1c", "refT1c": "t1c"}
    seconds, cpu = {}, {}
    t, c = time.perf_counter(), time.process_time()
    mask = workdir / "t1_brain_mask.nii.gz"
    skull_strip(folder / "t1.nii.gz", mask, options.skull_strip, threads=2, subject="TCGA")
    seconds["skull_strip"], cpu["skull_strip"] = time.perf_counter() - t, time.process_time() - c
    reg = {ch: workdir / f"reg_{ch}.nii.gz" for ch in channels}
    t, c = time.perf_counter(), time.process_time()
    prov = register_subject(
        folder / "t1.nii.gz",
        mask,
        {ch: (folder / f"{sources[ch]}.nii.gz",) * 2 for ch in channels[1:]},
        atlas,
        {"T1": reg["T1w"], **{ch: reg[ch] for ch in channels[1:]}},
        {"T1": workdir / "T1w_xfm.txt", **{ch: workdir / f"{ch}_xfm.txt" for ch in channels[1:]}},
        workdir / "reg_mask.nii.gz",
        options.register.backend,
        subject="TCGA",
    )
    seconds["register"], cpu["register"] = time.perf_counter() - t, time.process_time() - c
    cropped = {ch: workdir / f"crop_{ch}.nii.gz" for ch in [*channels, "mask"]}
    t, c = time.perf_counter(), time.process_time()
    crop_images(
        {**reg, "mask": workdir / "reg_mask.nii.gz"},
        cropped,
        shape=(160, 192, 160),
        atlas_brain_mask=atlas_dir / ATLAS_FILES["brain_mask"],
    )
    seconds["crop"], cpu["crop"] = time.perf_counter() - t, time.process_time() - c
    t, c = time.perf_counter(), time.process_time()
    normalize_images(
        {ch: cropped[ch] for ch in channels},
        cropped["mask"],
        {ch: workdir / f"norm_{ch}.nii.gz" for ch in channels},
        percentiles=options.normalize_percentiles,
    )
    seconds["normalize"], cpu["normalize"] = time.perf_counter() - t, time.process_time() - c
    total = sum(seconds.values())
    print("\nraw TCGA-FG-6692 exam at 1 mm, step functions in one process (no ADC: no DWI):")
    for stage, s in seconds.items():
        print(f"  {stage:<12} {s:6.1f} s wall ({100 * s / total:4.1f} %), {cpu[stage]:6.1f} s CPU")
    per_channel = {c: v.get("resample_seconds") for c, v in prov["channels"].items()}
    print(f"  registration: quality {prov['quality']}, resampling s per channel {per_channel}")
    _verdict(total, sum(cpu.values()))


def _verdict(wall: float, cpu: float) -> None:
    print(
        f"\npre-processing per subject: {wall:.1f} s wall = {wall / GOAL_S:.2f} x the goal of {GOAL_S:g} s "
        f"on 2 cores ({cpu:.1f} s of CPU time, all threads); load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cores"
    )


if __name__ == "__main__":
    sys.exit(main())
