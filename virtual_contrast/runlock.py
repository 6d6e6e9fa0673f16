"""A run killed with ``kill -9`` (or a power cut) leaves Snakemake's lock behind; the next run removes it when it
can tell that nothing of the killed run is left.

Snakemake locks the files a run will read and write (``.snakemake/locks/``) and refuses a second run that would
touch them, asking for ``--unlock`` when no other run is active; it cannot tell, because its lock does not say
who holds it. The workflow therefore records each run it starts (:func:`record_run`: host, process id and
process group, from Snakemake's ``onstart``, i.e. once the lock is taken) and forgets it when the run ends
(:func:`forget_run`, ``onsuccess``/``onerror``). When a run is planned, :func:`clear_stale_lock` removes the
lock if every recorded run was started on this machine and none of its processes is alive: neither the
Snakemake process nor any job of its process group (jobs of a killed Snakemake go on running unless killed
too). A lock with no record, or a record of another machine (a shared file system), is left to Snakemake's
own message (``--unlock``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from virtual_contrast.io import process_alive

#: Folder of the run records, inside Snakemake's ``.snakemake`` folder.
RUNS_FOLDER = "virtual-contrast-runs"


@dataclass(frozen=True)
class RunRecord:
    """A run of the workflow that holds (or held) Snakemake's lock."""

    host: str
    pid: int  # the Snakemake process
    pgid: int  # its process group: its jobs too, unless they were killed
    started: str
    command: str

    @property
    def file_name(self) -> str:
        return f"{self.host}-{self.pid}.json"


def _host() -> str:
    return socket.gethostname()


def _proc_stat(pid: str) -> tuple[str, int] | None:
    """(state, process group) of a process from Linux's /proc, or None when it cannot be read."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[-1].split()  # after "pid (command)": state, ppid, pgrp, ...
    return fields[0], int(fields[2])


def group_alive(pgid: int) -> bool:
    """Whether any process of process group ``pgid`` runs on this machine (zombies aside)."""
    if Path("/proc/self/stat").exists():
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                stat = _proc_stat(entry.name)
                if stat is not None and stat[1] == pgid and stat[0] != "Z":
                    return True
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def record_run(snakemake_dir: Path | str) -> Path:
    """Record this process as the run holding the lock (call it from Snakemake's ``onstart``)."""
    record = RunRecord(
        host=_host(),
        pid=os.getpid(),
        pgid=os.getpgid(0),
        started=time.strftime("%Y-%m-%d %H:%M:%S"),
        command=" ".join(sys.argv),
    )
    folder = Path(snakemake_dir) / RUNS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / record.file_name
    path.write_text(json.dumps(asdict(record)))
    return path


def forget_run(snakemake_dir: Path | str) -> None:
    """Remove this process's record (call it when the run ends: ``onsuccess``, ``onerror``)."""
    record = Path(snakemake_dir) / RUNS_FOLDER / f"{_host()}-{os.getpid()}.json"
    record.unlink(missing_ok=True)


def _records(folder: Path) -> list[tuple[Path, RunRecord | None]]:
    found = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            found.append((path, RunRecord(**json.loads(path.read_text()))))
        except (OSError, ValueError, TypeError):
            found.append((path, None))  # unreadable: say nothing about its run
    return found


def _left_behind(record: RunRecord) -> bool:
    """Whether nothing of a run recorded on this machine is alive (its process, or its jobs' group unless
    that is this process's own group, where the jobs cannot be told from this run)."""
    if process_alive(record.pid):
        return False
    return record.pgid == os.getpgid(0) or not group_alive(record.pgid)


def clear_stale_lock(snakemake_dir: Path | str) -> str | None:
    """Remove Snakemake's lock when every run recorded as holding it is gone (see the module docstring).

    Returns a sentence saying what was removed, or None when there was no lock or it was left in place.
    """
    snakemake_dir = Path(snakemake_dir)
    locks = snakemake_dir / "locks"
    if not locks.is_dir() or not any(locks.glob("*.lock")):
        return None
    records = _records(snakemake_dir / RUNS_FOLDER)
    if not records or any(r is None or r.host != _host() for _, r in records):
        return None
    if not all(_left_behind(r) for _, r in records if r is not None):
        return None
    shutil.rmtree(locks, ignore_errors=True)
    for path, _ in records:
        path.unlink(missing_ok=True)
    runs = "; ".join(f"process {r.pid} started {r.started}" for _, r in records if r is not None)
    return f"removed Snakemake's lock, left by a run that no longer runs ({runs}; killed?)"
