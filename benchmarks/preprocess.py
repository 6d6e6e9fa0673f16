"""Seconds per pre-processing stage per subject, on the embedded demo cohort, through the real workflow.

    python benchmarks/preprocess.py [--subjects 3] [--cores 2] [--overlay config.paper.yaml]

Runs Snakemake up to the `normalize` outputs of the first N demo subjects in a scratch folder and reads
Snakemake's own per-job `benchmark:` records (wall seconds, peak memory). Also prints each stage's share of
the total, so runs on different machines compare by ratio.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
STAGES = ["adc", "register", "skull_strip", "crop", "normalize"]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--subjects", type=int, default=3)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--overlay", action="append", default=[], help="extra config overlay(s)")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep results here (default: a temp dir)"
    )
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vc-bench-"))
    sys.path.insert(0, str(REPO))
    import yaml

    from virtual_contrast.workflow import plan_study

    config: dict = {}
    for path in [REPO / "config.yaml", *map(Path, args.overlay)]:
        _merge(config, yaml.safe_load(Path(path).read_text()))
    subjects = plan_study(_with_defaults(config)).subjects[: args.subjects]
    targets = [f"results/sub-{s}/normalize/sub-{s}_desc-norm_T1w.nii.gz" for s in subjects]
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "-d",
        str(workdir),
        "--cores",
        str(args.cores),
        "--configfile",
        str(REPO / "config.yaml"),
        *args.overlay,
        "--",
        *targets,
    ]
    print("running:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)

    rows = []
    for stage in ["cohort", *STAGES]:
        for s in subjects:
            pattern = f"sub-{s}_ses-*.tsv" if stage == "cohort" else f"sub-{s}.tsv"
            for f in sorted((workdir / "results/benchmarks" / stage).glob(pattern)):
                b = pd.read_csv(f, sep="\t")
                rows.append(
                    {
                        "stage": stage,
                        "subject": s,
                        "seconds": float(b["s"].iloc[0]),
                        "max_rss_mb": float(b["max_rss"].iloc[0]),
                    }
                )
    table = pd.DataFrame(rows)
    wide = table.pivot(index="subject", columns="stage", values="seconds")[["cohort", *STAGES]]
    wide["preprocess_total"] = wide[STAGES].sum(axis=1)
    print("\nseconds per stage per subject (wall clock, Snakemake benchmark records):")
    print(wide.round(1).to_string())
    mean = wide.mean()
    print("\nshare of pre-processing time per stage:")
    print((mean[STAGES] / mean["preprocess_total"]).round(3).to_string())
    print(
        f"\nmean pre-processing per subject: {mean['preprocess_total']:.1f} s (goal: <= 60 s on 2 cores at 1 mm)"
    )
    print(f"results in {workdir}")
    return 0


def _merge(base: dict, extra: dict) -> None:
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def _with_defaults(config: dict) -> dict:
    config.setdefault("split", {}).setdefault("test_fraction", 0.25)
    config["split"].setdefault("seed", 2021)
    return config


if __name__ == "__main__":
    sys.exit(main())
