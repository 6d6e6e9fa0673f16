"""vir-T1c of real patients, leave one out: the workflow with ``config.real.yaml`` on real standard-dose exams.

    python benchmarks/real_cases.py --data DIR [--table tests/data/real_cases.tsv] [--workdir DIR] [--cores 2]

``--table`` lists real exams (columns subject, t1, t2, flair, ref; paths relative to ``--data``, the folder
that holds the public cases; the test suite's ``VC_SHARED_DATA``): a pre-contrast T1, a T2, a FLAIR and a
full-dose T1c, no DWI and no low dose. Each exam in turn is the test patient and the others train: for each,
a subjects table with that split is written and the workflow runs (``config.yaml`` + ``config.real.yaml``,
one working folder for every turn, so each exam is pre-processed, and its low dose simulated, once) up to the
test patient's voxel metrics, montage and automated-reader overlay. Prints, per held-out patient, SSIM and
PSNR of the simulated low-T1c and of vir-T1c against its full-dose T1c (brain voxels, the ``metrics`` rule's
own numbers, on the paper's scale and on the full range) and the time of each turn; writes ``<workdir>/real_cases.tsv`` and keeps each turn's figures in
``<workdir>/turn-<subject>/``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from virtual_contrast import layout  # noqa: E402


def turn_table(cases: pd.DataFrame, data: Path, test: str, out: Path) -> Path:
    """The subjects table of one turn: absolute paths, ``test`` held out, the others training."""
    table = cases.copy()
    for column in table.columns.drop("subject"):
        table[column] = [str((data / p).resolve()) for p in table[column]]
    table.insert(1, "split", ["test" if s == test else "train" for s in table["subject"]])
    table.to_csv(out, sep="\t", index=False)
    return out


def run_turn(workdir: Path, table: Path, subject: str, cores: int) -> float:
    """Run the workflow up to the held-out subject's metrics, montage and detection overlay; seconds."""
    targets = [
        layout.metrics_files(subject)["metrics"],
        layout.figure("montage", subject),
        layout.figure("detections", subject),
        layout.predict_files(subject)["native"],
    ]
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(REPO / "config.yaml"),
        str(REPO / "config.real.yaml"),
        "--config",
        f"subjects={table}",
        "--cores",
        str(cores),
        "--rerun-incomplete",
        *targets,
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    (workdir / f"snakemake_{subject}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"turn {subject} failed (exit {proc.returncode}): {proc.stderr[-3000:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data",
        type=Path,
        default=os.environ.get("VC_SHARED_DATA"),
        help="folder the table's paths are relative to (default: $VC_SHARED_DATA)",
    )
    p.add_argument("--table", type=Path, default=REPO / "tests" / "data" / "real_cases.tsv")
    p.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / "out" / "real_cases")
    p.add_argument("--cores", type=int, default=2)
    args = p.parse_args(argv)
    if args.data is None or not Path(args.data).is_dir():
        p.error("--data: the folder of the public cases is needed (or set VC_SHARED_DATA)")
    cases = pd.read_csv(args.table, sep="\t", dtype=str)
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    total = time.perf_counter()
    for subject in cases["subject"]:
        table = turn_table(
            cases, Path(args.data), subject, args.workdir / f"subjects_{subject}.tsv"
        )
        seconds = run_turn(args.workdir, table, subject, args.cores)
        metrics = pd.read_csv(
            args.workdir / layout.metrics_files(subject)["metrics"],
            sep="\t",
            dtype={"subject": str},
        )
        keep = args.workdir / f"turn-{subject}"
        keep.mkdir(exist_ok=True)
        for name in ("montage", "detections"):
            shutil.copy(args.workdir / layout.figure(name, subject), keep)
        for row in metrics.itertuples():
            rows.append(
                {
                    "subject": subject,
                    "modality": row.modality,
                    "ssim_pct": 100 * row.ssim,
                    "psnr_db": row.psnr,
                    "auc_pct": 100 * row.auc,
                    "ssim_full_range_pct": 100 * row.ssim_full_range,
                    "psnr_full_range_db": row.psnr_full_range,
                    "turn_s": round(seconds),
                }
            )
        print(f"{subject}: {seconds / 60:.1f} min", flush=True)
    table = pd.DataFrame(rows)
    table.to_csv(args.workdir / "real_cases.tsv", sep="\t", index=False)
    wide = table.pivot(
        index="subject",
        columns="modality",
        values=["ssim_pct", "psnr_db", "auc_pct", "ssim_full_range_pct", "psnr_full_range_db"],
    )
    print(wide.round(2).to_string())
    better = [
        s
        for s in cases["subject"]
        if wide.loc[s, ("ssim_pct", "vir")] > wide.loc[s, ("ssim_pct", "low")]
        and wide.loc[s, ("psnr_db", "vir")] > wide.loc[s, ("psnr_db", "low")]
    ]
    print(
        f"vir-T1c beats the simulated low-T1c on SSIM and PSNR for {len(better)} of {len(cases)} "
        f"held-out patients; {(time.perf_counter() - total) / 60:.1f} min in all"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
