"""vir-T1c of real patients, leave one out: the workflow with ``config.real.yaml`` on real standard-dose exams.

    python benchmarks/real_cases.py --data DIR [--table tests/data/real_cases.tsv] [--workdir DIR] [--cores 2]
        [--overlay FILE ...]

``--table`` lists real exams (columns subject, t1, t2, flair, ref; paths relative to ``--data``, the folder
that holds the public cases; the test suite's ``VC_SHARED_DATA``): a pre-contrast T1, a T2, a FLAIR and a
full-dose T1c, no DWI and no low dose. Each exam in turn is the test patient and the others train: for each,
a subjects table with that split is written and the workflow runs (``config.yaml`` + ``config.real.yaml``,
one working folder for every turn, so each exam is pre-processed, and its low dose simulated, once) up to the
test patient's voxel metrics, montage and automated-reader overlay. Prints, per held-out patient, SSIM and
PSNR of the simulated low-T1c and of vir-T1c against its full-dose T1c (brain voxels, the ``metrics`` rule's
own numbers, on the paper's scale and on the full range) and the time of each turn; writes ``<workdir>/real_cases.tsv`` and keeps each turn's figures in
``<workdir>/turn-<subject>/``.

Each turn's *training* patients are scored too, out of fold (each by the fold model that tuned on it and did
not train on it, the workflow's own out-of-fold prediction): the rows with ``set`` = ``train`` in
``<workdir>/real_cases_out_of_fold.tsv``. Choose settings on those rows, never on the held-out ones. A setting
to compare is given as ``--overlay FILE`` (YAML, read after ``config.real.yaml``; one working folder per setting).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from virtual_contrast import layout  # noqa: E402
from virtual_contrast.evaluate.metrics import voxel_metrics_from_files  # noqa: E402


def turn_table(cases: pd.DataFrame, data: Path, test: str, out: Path) -> Path:
    """The subjects table of one turn: absolute paths, ``test`` held out, the others training."""
    table = cases.copy()
    for column in table.columns.drop("subject"):
        table[column] = [str((data / p).resolve()) for p in table[column]]
    table.insert(1, "split", ["test" if s == test else "train" for s in table["subject"]])
    table.to_csv(out, sep="\t", index=False)
    return out


def run_turn(
    workdir: Path,
    table: Path,
    subject: str,
    training: list[str],
    cores: int,
    overlays: Sequence[Path] = (),
) -> float:
    """Run the workflow up to the held-out subject's metrics, montage and detection overlay and the training
    subjects' out-of-fold vir-T1c; seconds."""
    targets = [
        layout.metrics_files(subject)["metrics"],
        layout.figure("montage", subject),
        layout.figure("detections", subject),
        layout.predict_files(subject)["native"],
        *(layout.out_of_fold_files(s)["atlas"] for s in training),
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
        *(str(o.resolve()) for o in overlays),
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


def out_of_fold_rows(workdir: Path, turn: str, training: list[str]) -> list[dict]:
    """SSIM and PSNR (the metrics rule's own, paper's scale) of each training subject's simulated low-T1c
    and out-of-fold vir-T1c against its full-dose T1c."""
    rows = []
    for subject in training:
        norm = {
            k: workdir / v
            for k, v in layout.normalize_files(subject, ("T1w", "lowT1c", "refT1c")).items()
        }
        candidates = {
            "low": norm["lowT1c"],
            "vir": workdir / layout.out_of_fold_files(subject)["atlas"],
        }
        for modality, pred in candidates.items():
            m = voxel_metrics_from_files(
                pred=pred, ref=norm["refT1c"], pre=norm["T1w"], mask=norm["mask"], subject=subject
            )
            rows.append(
                {
                    "turn": turn,
                    "set": "train",
                    "subject": subject,
                    "modality": modality,
                    "ssim_pct": 100 * m["ssim"],
                    "psnr_db": m["psnr"],
                }
            )
    return rows


def beats_low(wide: pd.DataFrame) -> pd.Series:
    """Per row of a (metric, modality) table: vir-T1c above the simulated low-T1c on SSIM and on PSNR."""
    return (wide[("ssim_pct", "vir")] > wide[("ssim_pct", "low")]) & (
        wide[("psnr_db", "vir")] > wide[("psnr_db", "low")]
    )


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
    p.add_argument(
        "--overlay",
        type=Path,
        action="append",
        default=[],
        help="a configuration file read after config.real.yaml (a setting to compare)",
    )
    args = p.parse_args(argv)
    if args.data is None or not Path(args.data).is_dir():
        p.error("--data: the folder of the public cases is needed (or set VC_SHARED_DATA)")
    cases = pd.read_csv(args.table, sep="\t", dtype=str)
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows, oof_rows = [], []
    total = time.perf_counter()
    for subject in cases["subject"]:
        table = turn_table(
            cases, Path(args.data), subject, args.workdir / f"subjects_{subject}.tsv"
        )
        training = [s for s in cases["subject"] if s != subject]
        seconds = run_turn(args.workdir, table, subject, training, args.cores, args.overlay)
        oof_rows += out_of_fold_rows(args.workdir, subject, training)
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
    oof = pd.DataFrame(oof_rows)
    oof.to_csv(args.workdir / "real_cases_out_of_fold.tsv", sep="\t", index=False)
    oof_wide = oof.pivot(
        index=["turn", "subject"], columns="modality", values=["ssim_pct", "psnr_db"]
    )
    print(
        "training patients, out of fold (by turn: the held-out patient; choose settings on these):"
    )
    print(oof_wide.round(2).to_string())
    oof_better = beats_low(oof_wide)
    print(
        f"out of fold, vir-T1c beats the simulated low-T1c on SSIM and PSNR for {int(oof_better.sum())} "
        f"of {len(oof_better)} training patients' turns"
    )
    table = pd.DataFrame(rows)
    table.to_csv(args.workdir / "real_cases.tsv", sep="\t", index=False)
    wide = table.pivot(
        index="subject",
        columns="modality",
        values=["ssim_pct", "psnr_db", "auc_pct", "ssim_full_range_pct", "psnr_full_range_db"],
    )
    print(wide.round(2).to_string())
    better = beats_low(wide)
    print(
        f"vir-T1c beats the simulated low-T1c on SSIM and PSNR for {int(better.sum())} of {len(better)} "
        f"held-out patients; {(time.perf_counter() - total) / 60:.1f} min in all"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
