"""Seconds to build the workflow's DAG (a Snakemake dry run) for large synthetic subject tables.

    python benchmarks/dag.py [--subjects 200 1000] [--repeats 1] [--quiet-jobs] [--profile]

For each size, writes a subjects TSV and empty placeholder files for every sequence in a scratch folder
(the table layout; ids ``p0001``...), then times ``snakemake -n`` with the real Snakefile, config.yaml and
an overlay ``subjects: TSV``, and prints the wall time and the jobs per rule from Snakemake's "Job stats".
Nothing is executed, so the placeholders are enough. Goals: ≤ 10 s for 200 subjects, ≤ 40 s
for 1000. CPU seconds are printed beside wall seconds: on a busy machine they are the fairer figure.
``--quiet-jobs`` also times ``-n --quiet rules`` (the DAG without Snakemake listing every job);
``--profile`` runs the largest size once more under cProfile and prints where the time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from virtual_contrast.layout import bids_exam_files
from virtual_contrast.subjects import SEQUENCES

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from workflow_helpers import job_counts  # noqa: E402

GOALS_S = {200: 10.0, 1000: 40.0}


def write_study(root: Path, n: int) -> Path:
    """``n`` subjects with empty placeholder files, a subjects TSV (relative paths) and a config overlay."""
    lines = ["\t".join(["subject", *SEQUENCES])]
    for i in range(1, n + 1):
        subject = f"p{i:04d}"
        paths = []
        files = bids_exam_files("raw", subject)
        for key in SEQUENCES:
            rel = files[key]
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).touch()
            paths.append(str(rel))
        lines.append("\t".join([subject, *paths]))
    table = root / "subjects.tsv"
    table.write_text("\n".join(lines) + "\n")
    overlay = root / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"subjects": str(table)}))
    return overlay


def snakemake_cmd(workdir: Path, overlay: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "-d",
        str(workdir),
        "--configfile",
        str(REPO / "config.yaml"),
        str(overlay),
        "-n",
    ]


def dry_run(workdir: Path, overlay: Path, extra: list[str]) -> tuple[float, float, dict[str, int]]:
    """Wall seconds, CPU seconds (user + system: robust to a busy machine) and jobs per rule."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(
        snakemake_cmd(workdir, overlay) + extra, capture_output=True, text=True, cwd=workdir
    )
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"dry run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds, cpu, job_counts(proc.stdout + proc.stderr)


def profile(workdir: Path, overlay: Path, top: int = 20) -> str:
    """The dry run in this process under cProfile: the project's functions, then Snakemake's."""
    from snakemake.cli import main as snakemake_main

    argv = snakemake_cmd(workdir, overlay)[3:]
    prof = cProfile.Profile()
    sink = io.StringIO()
    cwd = Path.cwd()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        prof.enable()
        try:
            snakemake_main(argv)
        except SystemExit:
            pass
        prof.disable()
    os.chdir(cwd)
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out).sort_stats("cumulative")
    stats.print_stats(r"virtual_contrast|\.smk|Snakefile", top)
    stats.print_stats(r"snakemake/(dag|jobs|rules|workflow)\.py", top)
    return out.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--subjects", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--repeats", type=int, default=1, help="dry runs per size (best kept)")
    parser.add_argument(
        "--quiet-jobs",
        action="store_true",
        help="also time `-n --quiet rules` (the DAG without printing every job)",
    )
    parser.add_argument("--profile", action="store_true", help="cProfile the largest size")
    args = parser.parse_args()

    variants = {"snakemake -n": []}
    if args.quiet_jobs:
        variants["snakemake -n --quiet rules"] = ["--quiet", "rules"]
    failed = False
    for n in args.subjects:
        with tempfile.TemporaryDirectory(prefix="vc-dag-") as tmp:
            root = Path(tmp)
            t0 = time.perf_counter()
            overlay = write_study(root, n)
            print(f"{n} subjects (placeholders written in {time.perf_counter() - t0:.1f} s)")
            counts: dict[str, int] = {}
            for name, extra in variants.items():
                runs = [dry_run(root, overlay, extra) for _ in range(args.repeats)]
                seconds, cpu, counts = min(runs, key=lambda r: r[0])
                goal = GOALS_S.get(n)
                verdict = ""
                if goal is not None and not extra:
                    verdict = f"  goal ≤ {goal:.0f} s: {'met' if seconds <= goal else 'MISSED'}"
                    failed |= seconds > goal
                print(f"  {name:<28}{seconds:7.1f} s wall {cpu:7.1f} s CPU{verdict}")
            print(f"  jobs: {sum(counts.values())}")
            width = max(map(len, counts), default=0) + 2
            for rule, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
                print(f"    {rule:<{width}}{count:>6}")
            if args.profile and n == max(args.subjects):
                print(profile(root, overlay))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
