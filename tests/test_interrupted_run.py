"""Ctrl-C in the middle of the workflow, then the same command again: it finishes, redoes only what was not
done, and the tables equal those of an uninterrupted run.

Cheap by construction: a copy of the session's tiny run with one training fold (and so everything downstream
of it) to redo, interrupted while that fold trains, after its first checkpoint.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from workflow_helpers import REPO, job_counts, snakemake, snakemake_command

pytestmark = pytest.mark.slow

#: The command of the tiny_run fixture (the README's workstation command at the tests' scale).
COMMAND = ("--profile", str(REPO / "profiles" / "workstation"), "--cores", "2")
PREPROCESSING = {"atlas", "cohort", "adc", "register", "skull_strip", "crop", "normalize", "qc"}
FOLD_OUTPUTS = ("model.pt", "train_log.tsv", "loss_curve.png")


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_when(work: Path, ready: Path, log: Path) -> int:
    """Run the workflow in its own process group and send it SIGINT (what Ctrl-C in a terminal sends to the
    foreground group: Snakemake and its running jobs) as soon as ``ready`` exists; the exit status."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            snakemake_command(work, *COMMAND),
            cwd=work,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # A suite started in the background (`make test &`, nohup, some CI runners) inherits SIGINT ignored,
            # and Python then never installs its Ctrl-C handler: give the workflow the terminal's default.
            preexec_fn=_default_sigint,
        )
        try:
            deadline = time.monotonic() + 600
            while not ready.exists():
                assert proc.poll() is None, f"the run ended before {ready} appeared"
                assert time.monotonic() < deadline, f"{ready} did not appear within 10 minutes"
                time.sleep(0.02)
            os.killpg(proc.pid, signal.SIGINT)
            return proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _tables(root: Path) -> dict[str, pd.DataFrame]:
    """Every TSV table of the results (the aggregate tables, the reader study, the fold's training log)."""
    paths = [
        *sorted((root / "results" / "tables").glob("*.tsv")),
        *sorted((root / "results" / "reader_study").glob("*.tsv")),
        root / "results" / "models" / "fold-1" / "train_log.tsv",
    ]
    tables = {}
    for path in paths:
        table = pd.read_csv(path, sep="\t", dtype={"subject": str})
        tables[str(path.relative_to(root))] = table.drop(columns=["seconds"], errors="ignore")
    return tables


def test_an_interrupted_run_reruns_only_what_was_not_done_and_ends_as_an_uninterrupted_one(
    tiny_run, tmp_path
):
    work = shutil.copytree(tiny_run, tmp_path / "run", symlinks=True)
    fold = work / "results" / "models" / "fold-1"
    for name in FOLD_OUTPUTS:
        (fold / name).unlink()
    shutil.rmtree(fold / "checkpoint")
    planned = job_counts(snakemake(work, "-n", *COMMAND).stdout)
    assert planned["train"] == 1 and planned["predict"] >= 1
    assert not PREPROCESSING & set(planned)

    # 1. Interrupted once the fold has written its first checkpoint (epoch 1 of 2).
    first_log = work / "interrupted.log"
    status = _interrupt_when(work, fold / "checkpoint" / "last.pt", first_log)
    first = first_log.read_text()
    assert status != 0 and "Terminating processes on user request" in first, first[-3000:]
    assert "Finished jobid" not in first, "the interruption came after a job had finished"
    assert "Traceback" not in first
    # Nothing half-written: no temporary file of the atomic writers is left, and every output that the
    # interrupted job had already written is flagged incomplete (so no later run takes it as finished).
    leftovers = [p for p in (work / "results").rglob(".*") if p.name != ".snakemake_timestamp"]
    assert leftovers == []
    flagged = {
        base64.b64decode(p.name).decode() for p in (work / ".snakemake" / "incomplete").iterdir()
    }
    for name in FOLD_OUTPUTS:
        if (fold / name).exists():
            assert f"results/models/fold-1/{name}" in flagged

    # 2. The same command again: it finishes, resumes the fold from its checkpoint, redoes nothing else.
    rerun = snakemake(work, *COMMAND)
    assert job_counts(rerun.stdout + rerun.stderr) == planned
    train_log = (work / "logs" / "train" / "fold-1.log").read_text()
    assert "resuming from results/models/fold-1/checkpoint/last.pt after epoch 1" in train_log

    # 3. The tables equal the uninterrupted run's. Same command and thread counts, so they come out bitwise
    # equal here; the tolerance is for bf16 autocast on CPUs with native bf16, whose sums round differently
    # with another thread count (as in tests/test_slurm.py).
    expected, got = _tables(tiny_run), _tables(work)
    assert list(got) == list(expected)
    for name, table in expected.items():
        other = got[name]
        assert list(other.columns) == list(table.columns) and other.shape == table.shape, name
        for column in table.columns:
            if pd.api.types.is_numeric_dtype(table[column]):
                np.testing.assert_allclose(
                    other[column], table[column], rtol=2e-3, atol=1e-6, err_msg=f"{name}:{column}"
                )
            else:
                assert other[column].tolist() == table[column].tolist(), f"{name}:{column}"
