"""Shared fixtures: the real public MRI files in ../shared/data, and small synthetic images."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("VC_SHARED_DATA", REPO.parent / "shared" / "data"))


# `make test` runs the suite on two pytest-xdist workers that take whole modules in this order
# (--dist loadscope --no-loadscope-reorder): the longest first, so that none of them starts last. The SLURM run
# waits on its cluster most of the time; the other worker makes the shared tiny run meanwhile.
LONGEST_MODULES_FIRST = (
    "test_slurm.py",
    "test_blinding.py",
    "test_standard_dose.py",
    "test_skull_strip.py",
    "test_interrupted_run.py",
    "test_workflow_run.py",
    "test_register.py",
    "test_predict_exam.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    first = {name: rank for rank, name in enumerate(LONGEST_MODULES_FIRST)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))


def _require_shared() -> bool:
    return os.environ.get("VC_REQUIRE_SHARED_DATA", "") == "1"


@pytest.fixture(scope="session", autouse=True)
def error_log_dir(tmp_path_factory) -> Path:
    """Saved tracebacks of failing commands (virtual_contrast.cli) go here, not to the user's home; the
    variable is inherited by the Snakemake runs of the tests."""
    folder = tmp_path_factory.mktemp("error_logs")
    previous = os.environ.get("VIRTUAL_CONTRAST_LOG_DIR")
    os.environ["VIRTUAL_CONTRAST_LOG_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("VIRTUAL_CONTRAST_LOG_DIR", None)
    else:
        os.environ["VIRTUAL_CONTRAST_LOG_DIR"] = previous


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data; skips (or fails when VC_REQUIRE_SHARED_DATA=1) when it is absent."""
    if not (SHARED_DATA / "SOURCES.md").exists():
        msg = f"real MRI files not found at {SHARED_DATA} (set VC_SHARED_DATA to their folder)"
        if _require_shared():
            pytest.fail(msg + " and VC_REQUIRE_SHARED_DATA=1")
        pytest.skip(msg)
    return SHARED_DATA


@pytest.fixture(scope="session")
def atlas_masks(shared_data: Path) -> dict[str, Path]:
    """The official ICBM 2009a brain and head masks (NIAK distribution)."""
    folder = shared_data / "mni_icbm152_09a_sym_masks_niak"
    return {
        "brain_mask": folder / "mni_icbm152_t1_tal_nlin_sym_09a_mask.mnc.gz",
        "head_mask": folder / "mni_icbm152_t1_tal_nlin_sym_09a_headmask.mnc.gz",
    }


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A complete local run of the tiny workflow (tests/tiny.yaml), shared by every test that needs one.

    Tests must not modify it: copy it first (shutil.copytree) to change anything. Under pytest-xdist the
    first worker that asks runs it into the folder all workers share; the others wait for it (a lock).
    """
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return _run_tiny_workflow(tmp_path_factory.mktemp("tiny"))
    from filelock import FileLock

    workdir = tmp_path_factory.getbasetemp().parent / "tiny"
    done = workdir / "snakemake_run.log"
    with FileLock(str(workdir) + ".lock"):
        if not done.exists():
            shutil.rmtree(workdir, ignore_errors=True)
            workdir.mkdir()
            _run_tiny_workflow(workdir)
    return workdir


def _run_tiny_workflow(workdir: Path) -> Path:
    from workflow_helpers import REPO, snakemake

    # As on a workstation with one GPU: the profile sets resources gpu=1 (tests/test_workflow_run.py checks
    # from this log that no two GPU jobs ran at once).
    proc = snakemake(workdir, "--profile", str(REPO / "profiles" / "workstation"), "--cores", "2")
    (workdir / "snakemake_run.log").write_text(proc.stdout + proc.stderr)
    return workdir


@pytest.fixture
def one_torch_thread():
    """Run torch on one thread: tiny convolutions are slower with 2 threads on a shared 2-core machine."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="session")
def tcga_brain_mask(shared_data: Path, tmp_path_factory) -> Path:
    """deepbet's brain mask of the raw TCGA-FG-6692 T1, made once with `virtual-contrast skull-strip`."""
    from virtual_contrast.cli import main

    out = tmp_path_factory.mktemp("tcga") / "t1_brain_mask.nii.gz"
    t1 = shared_data / "tcga_fg_6692_raw" / "t1.nii.gz"
    assert main(["skull-strip", "--t1", str(t1), "--out", str(out)]) == 0
    return out
