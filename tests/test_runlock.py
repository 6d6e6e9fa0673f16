"""A run killed with kill -9: the same command again removes Snakemake's lock it left, and finishes the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from workflow_helpers import snakemake, snakemake_command

from virtual_contrast import layout, runlock


def _locked(snakemake_dir: Path) -> None:
    (snakemake_dir / "locks").mkdir(parents=True)
    (snakemake_dir / "locks" / "0.output.lock").write_text("results/x\n")


def _record(snakemake_dir: Path, **fields) -> None:
    record = {"host": runlock._host(), "pid": os.getpid(), "pgid": os.getpgid(0)}
    record |= {"started": "2026-12-06 10:00:00", "command": "snakemake", **fields}
    folder = snakemake_dir / runlock.RUNS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{record['host']}-{record['pid']}.json").write_text(json.dumps(record))


def _dead_process() -> int:
    """The id of a process (leader of its own group) that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    proc.wait()
    return proc.pid


def test_a_lock_whose_run_is_gone_is_removed_and_any_other_is_left(tmp_path):
    smk = tmp_path / ".snakemake"
    assert runlock.clear_stale_lock(smk) is None  # no lock
    _locked(smk)
    assert runlock.clear_stale_lock(smk) is None  # a lock nobody recorded: Snakemake's own message
    _record(smk)  # this (live) process holds it
    assert runlock.clear_stale_lock(smk) is None and (smk / "locks").exists()
    for path in (smk / runlock.RUNS_FOLDER).iterdir():
        path.unlink()
    dead = _dead_process()
    _record(smk, pid=dead, pgid=dead, host="elsewhere")  # another machine: cannot tell
    assert runlock.clear_stale_lock(smk) is None and (smk / "locks").exists()
    for path in (smk / runlock.RUNS_FOLDER).iterdir():
        path.unlink()
    _record(smk, pid=dead, pgid=dead)
    message = runlock.clear_stale_lock(smk)
    assert message and f"process {dead}" in message and not (smk / "locks").exists()
    assert not list((smk / runlock.RUNS_FOLDER).iterdir())


def test_a_run_records_itself_and_forgets_itself(tmp_path):
    smk = tmp_path / ".snakemake"
    path = runlock.record_run(smk)
    record = json.loads(path.read_text())
    assert record["pid"] == os.getpid() and record["host"] == runlock._host()
    runlock.forget_run(smk)
    assert not path.exists()


@pytest.mark.slow
def test_the_same_command_after_kill_9_finishes_the_run(tmp_path):
    """Snakemake's lock stopped the next run ("Directory cannot be locked ... --unlock"), contrary to the
    README's "run the same command again"."""
    targets = list(layout.atlas_files(4.0).values())
    args = ("--cores", "1", "--rerun-incomplete", *targets)
    proc = subprocess.Popen(
        snakemake_command(tmp_path, *args), cwd=tmp_path, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    runs = tmp_path / ".snakemake" / runlock.RUNS_FOLDER
    try:
        deadline = time.monotonic() + 300
        while not (runs.is_dir() and any(runs.iterdir())) and proc.poll() is None:
            assert time.monotonic() < deadline, "the run never started"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole run: Snakemake and its job
        proc.wait()
    assert list((tmp_path / ".snakemake" / "locks").glob("*.lock")), "the run ended before the kill"
    again = snakemake(tmp_path, *args)
    assert "removed Snakemake's lock" in again.stdout + again.stderr
    assert all((tmp_path / target).exists() for target in targets)
    hidden = [p for folder in ("results", "logs") for p in (tmp_path / folder).rglob(".*")]
    assert not hidden, hidden
