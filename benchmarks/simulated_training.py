"""Networks trained on simulated low doses, tested on the held-out patients' acquired ones.

    python benchmarks/simulated_training.py --workdir /tmp/vc-simtrain [--cores 2]

The experiment that says whether a study without a low-dose series can train the model: on the embedded cohort
at the demo's settings (config.yaml: 20 patients, 8 held out, 3 folds),

1. ``acquired/``: the plain demo (Snakemake, ``config.yaml``): networks trained on the acquired quarter doses;
2. the simulated quarter dose of each training patient (``virtual-contrast simulate-low-dose``'s library
   function, the configuration's ``low_dose`` defaults: dose 0.25, ``auto`` model, which takes the spoiled-
   gradient-echo equation from the sidecars' TR and flip angle), from the cohort's pre-contrast T1 and full
   dose, written to ``simulated/simulated_low/``;
3. ``simulated/``: the same workflow on a subjects table with the demo's split, whose training rows point
   ``low`` at the simulated files and whose test rows at the acquired ones: the networks are trained on
   simulated low doses and predict, and are scored on, the held-out patients' acquired low doses. The demo's
   results are copied there first, so Snakemake redoes only what the simulated files change (the training
   patients' registration onwards, the training, the test patients' predictions and scores);
4. both runs' Table 3 rows of the held-out patients (``results/tables/voxel_metrics.tsv``, the workflow's own
   metrics) side by side: vir-T1c trained on simulated minus trained on acquired, per patient, paired t-test.
   Goal: PSNR within 1 dB, SSIM within 0.2 points. The low-T1c rows must agree (the same acquired inputs).

Training is not bit-reproducible on the CPU (bf16, threads): two demo runs differ by a few tenths of a dB.
On a machine shared with other jobs give both runs ``--overlay`` with ``train: {threads: 1}``: one training
step of the demo network took 1.3 s with one thread and 17 s with two on 2 cores at a load of 16, where the
demo's two threads wait for each other. About 2 h per run then (two folds at once, 10 s per epoch); stages whose
outputs exist are not redone (delete a folder to redo it).
Prints the table and writes ``benchmarks/out/simulated_training.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from virtual_contrast import layout  # noqa: E402
from virtual_contrast.config import load_config  # noqa: E402
from virtual_contrast.preprocess.low_dose import (  # noqa: E402
    LowDoseOptions,
    simulate_low_dose,
)
from virtual_contrast.subjects import discover_bids  # noqa: E402

GOALS = {"psnr": 1.0, "ssim": 0.2}  # dB, percentage points
COLUMNS = ("t1", "flair", "dwi", "bval", "low", "ref")


def snakemake(workdir: Path, cores: int, overlays: list[Path], *extra: str) -> float:
    """Run the workflow in ``workdir`` (``config.yaml`` and ``overlays``); returns the minutes it took."""
    start = time.perf_counter()
    cmd = [
        str(Path(sys.executable).with_name("snakemake")),
        "-s",
        str(REPO / "Snakefile"),
        "--configfile",
        str(REPO / "config.yaml"),
        *(str(p.resolve()) for p in overlays),
        "--cores",
        str(cores),
        "--rerun-incomplete",
        *extra,
    ]
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "snakemake.log", "a") as log:
        subprocess.run(cmd, cwd=workdir, check=True, stdout=log, stderr=subprocess.STDOUT)
    return (time.perf_counter() - start) / 60


def demo_exams(acquired: Path) -> pd.DataFrame:
    """The demo's exams (one per patient, the first session) and its split, with relative file paths."""
    cohort = acquired / layout.COHORT_DIR
    exams = discover_bids(cohort)
    folds = pd.read_csv(acquired / layout.table("folds"), sep="\t", dtype={"subject": str})
    train = set(folds["subject"])
    exams = exams.sort_values(["subject", "session"]).groupby("subject").head(1)
    exams = exams[exams[list(COLUMNS)].ne("").all(axis=1)].copy()
    exams["split"] = ["train" if s in train else "test" for s in exams["subject"]]
    for column in COLUMNS:
        exams[column] = [str(Path(p).relative_to(acquired)) for p in exams[column]]
    return exams


def simulate_training_lows(acquired: Path, exams: pd.DataFrame, out: Path) -> dict[str, str]:
    """The simulated low dose of each training exam (relative to the simulated run's folder)."""
    defaults = load_config()["low_dose"]
    options = LowDoseOptions.from_config({"low_dose": defaults})
    paths = {}
    for row in exams[exams["split"] == "train"].itertuples():
        target = out / f"sub-{row.subject}_ses-{row.session}_desc-simulated_ce-low_T1w.nii.gz"
        if not target.exists():
            record = simulate_low_dose(
                acquired / row.t1,
                acquired / row.ref,
                target,
                options=options,
                subject=row.subject,
                sidecar=target.with_name(target.name.replace(".nii.gz", ".json")),
            )
            print(
                f"  {row.subject}: {record['dose_model']} model, noise sigma "
                f"{record['noise']['sigma']:.1f} ({record['noise']['source']}), "
                f"{record['seconds']:.0f} s",
                flush=True,
            )
        paths[row.subject] = str(target.relative_to(out.parent))
    return paths


def prepare_simulated_run(acquired: Path, simulated: Path) -> None:
    """Start the simulated run from the demo's results (but its models) and Snakemake's records of them."""
    if (simulated / "results").exists():
        return
    # Not the trained models: the simulated run trains its own from scratch.
    models = (acquired / layout.model_dir(0)).parent.resolve()
    shutil.copytree(
        acquired / "results",
        simulated / "results",
        symlinks=True,
        ignore=lambda folder, names: [n for n in names if Path(folder, n).resolve() == models],
    )
    metadata = acquired / ".snakemake" / "metadata"
    if metadata.exists():
        shutil.copytree(metadata, simulated / ".snakemake" / "metadata")


def held_out_metrics(run: Path) -> pd.DataFrame:
    table = pd.read_csv(run / layout.table("voxel_metrics"), sep="\t", dtype={"subject": str})
    return table.set_index(["subject", "modality"])[["ssim", "psnr", "auc"]]


def compare(acquired: pd.DataFrame, simulated: pd.DataFrame) -> tuple[list[str], dict]:
    """Per-metric means and the paired differences of vir-T1c (simulated − acquired training)."""
    subjects = sorted(set(acquired.index.get_level_values(0)))
    scale = {"ssim": 100.0, "psnr": 1.0, "auc": 100.0}
    unit = {"ssim": "%", "psnr": "dB", "auc": "%"}
    lines = [
        f"{'metric':<6} {'low-T1c':>14} {'vir, acquired':>14} {'vir, simulated':>15} "
        f"{'simulated - acquired':>24} {'p':>6} {'goal':>9}"
    ]
    summary: dict = {"subjects": subjects}
    for metric in ("ssim", "psnr", "auc"):

        def values(table: pd.DataFrame, modality: str, metric: str = metric) -> np.ndarray:
            return np.array([table.loc[(s, modality), metric] for s in subjects]) * scale[metric]

        low_a, low_s = values(acquired, "low"), values(simulated, "low")
        vir_a, vir_s = values(acquired, "vir"), values(simulated, "vir")
        gap = vir_s - vir_a
        p = float(stats.ttest_rel(vir_s, vir_a).pvalue) if len(subjects) > 1 else float("nan")
        goal = GOALS.get(metric)
        verdict = "-" if goal is None else ("met" if abs(gap.mean()) <= goal else "MISSED")
        lines.append(
            f"{metric:<6} {low_a.mean():>11.3f} {unit[metric]:<2} {vir_a.mean():>11.3f} "
            f"{unit[metric]:<2} {vir_s.mean():>12.3f} {unit[metric]:<2} "
            f"{gap.mean():>+8.3f} ± {gap.std(ddof=1):.3f} ({(gap > 0).sum()}/{len(gap)} up) "
            f"{p:>6.3f} {verdict:>9}"
        )
        summary[metric] = {
            "low": low_a.tolist(),
            "low_in_simulated_run": low_s.tolist(),
            "vir_trained_on_acquired": vir_a.tolist(),
            "vir_trained_on_simulated": vir_s.tolist(),
            "gap_mean": float(gap.mean()),
            "gap_sd": float(gap.std(ddof=1)),
            "p": p,
            "goal": goal,
            "low_rows_agree": bool(np.allclose(low_a, low_s, rtol=1e-4, atol=0)),
        }
    return lines, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True, help="folder of the two runs")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument(
        "--overlay",
        type=Path,
        action="append",
        default=[],
        help="config overlay of both runs (e.g. train: {threads: 1} on a busy machine)",
    )
    args = parser.parse_args(argv)
    acquired, simulated = args.workdir / "acquired", args.workdir / "simulated"
    minutes = {}

    print("1. the demo, trained on acquired low doses", flush=True)
    minutes["acquired run"] = snakemake(acquired, args.cores, args.overlay)

    print("2. simulated low doses of the training patients", flush=True)
    start = time.perf_counter()
    exams = demo_exams(acquired)
    sim_paths = simulate_training_lows(acquired, exams, simulated / "simulated_low")
    minutes["simulation"] = (time.perf_counter() - start) / 60

    print("3. the workflow trained on them, tested on the acquired ones", flush=True)
    prepare_simulated_run(acquired, simulated)
    table = exams.copy()
    table["low"] = [
        sim_paths.get(s, low) for s, low in zip(table["subject"], table["low"], strict=True)
    ]
    table[["subject", "session", "split", *COLUMNS]].to_csv(
        simulated / "subjects.tsv", sep="\t", index=False
    )
    minutes["simulated run"] = snakemake(
        simulated, args.cores, args.overlay, "--config", "subjects=subjects.tsv"
    )

    print("4. held-out patients (acquired low-dose inputs), Table 3 metrics\n", flush=True)
    lines, summary = compare(held_out_metrics(acquired), held_out_metrics(simulated))
    print("\n".join(lines))
    print("\nminutes: " + ", ".join(f"{k} {v:.1f}" for k, v in minutes.items()))
    summary["minutes"] = minutes
    out = REPO / "benchmarks" / "out" / "simulated_training.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
