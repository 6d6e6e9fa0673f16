"""Run the real Snakemake workflow of this repository in a temporary working directory."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def snakemake_command(
    workdir: Path, *args: str, overlays: tuple[str | Path, ...] = ("tests/tiny.yaml",)
) -> list[str]:
    """``snakemake -s REPO/Snakefile --directory WORKDIR --configfile config.yaml [overlays] ARGS``."""
    configfiles = [str(REPO / "config.yaml")]
    configfiles += [str(o) if Path(o).is_absolute() else str(REPO / o) for o in overlays]
    return [
        *SNAKEMAKE,
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        *configfiles,
        *args,
    ]


def snakemake(
    workdir: Path,
    *args: str,
    overlays: tuple[str | Path, ...] = ("tests/tiny.yaml",),
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run :func:`snakemake_command` to the end."""
    cmd = snakemake_command(workdir, *args, overlays=overlays)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"snakemake failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def job_counts(snakemake_output: str) -> dict[str, int]:
    """Snakemake's 'Job stats' table (printed by a dry run or a run) as {rule: count}, without the total."""
    counts: dict[str, int] = {}
    for line in snakemake_output.split("Job stats:", 1)[-1].splitlines()[2:]:
        m = re.match(r"^(\w+)\s+(\d+)\s*$", line.strip())
        if not m:
            if counts:
                break
            continue
        if m.group(1) != "total":
            counts[m.group(1)] = int(m.group(2))
    return counts


def tiny_study():
    """The study of the tiny workflow (tests/tiny.yaml over the defaults), as its parse plans it."""
    from virtual_contrast.config import load_config
    from virtual_contrast.workflow import plan_study

    return plan_study(load_config(REPO / "tests/tiny.yaml"))
