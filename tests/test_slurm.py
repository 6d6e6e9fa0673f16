"""A workflow through profiles/slurm on a real one-node SLURM cluster (marker ``slurm``).

The cluster comes from ``.ci/slurm_cluster.sh`` (installs slurm-wlm and munge when missing; needs
root). Where it cannot be installed or started the test skips and says why; with
``VC_REQUIRE_SLURM=1`` (CI) it fails instead. Every job must go through sbatch: the Snakemake log
names a SLURM job id for each non-local job, and the controller's record of each SLURM job holds its
rule, partition, state and GPU request. The results must equal those of a local run with
profiles/workstation.

The workflow is a parameter: ``VC_SLURM_WORKFLOWS`` (comma-separated) picks among ``toy`` (default:
tests/data/slurm_toy, 5 sbatch jobs in 4 rounds including the retry of a "preempted" train job,
60-90 s on 2 cores, mostly the plugin's status polling: ~14 s per round) and ``tiny`` (the project's
workflow with tests/tiny.yaml; 38 preprocessing jobs took 555 s with 2 at a time).
``VC_SLURM_JOBS`` sets how many SLURM jobs run at once (default 3).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from workflow_helpers import SNAKEMAKE, snakemake_command

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO / ".ci" / "slurm_cluster.sh"
SLURM_PROFILE = REPO / "profiles" / "slurm"
LOCAL_PROFILE = REPO / "profiles" / "workstation"
TOY = REPO / "tests" / "data" / "slurm_toy"


# --- the cluster -------------------------------------------------------------------------------


def _unavailable(reason: str) -> None:
    if os.environ.get("VC_REQUIRE_SLURM", "") == "1":
        pytest.fail(f"{reason} (and VC_REQUIRE_SLURM=1)")
    pytest.skip(reason)


@dataclass(frozen=True)
class Cluster:
    directory: Path
    env: dict[str, str]  # environment for sbatch/squeue/scontrol and for Snakemake

    def pids(self) -> dict[str, int]:
        files = {
            "munged": self.directory / "munge" / "munged.pid",
            "slurmctld": self.directory / "run" / "slurmctld.pid",
            "slurmd": self.directory / "run" / "slurmd.pid",
        }
        return {name: int(f.read_text()) for name, f in files.items() if f.exists()}

    def job_record(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o ID`` as a dict (finished jobs stay for MinJobAge = 600 s)."""
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))


def _cluster_script(action: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), action],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,  # apt-get on a cold machine
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def slurm_cluster() -> Iterator[Cluster]:
    """A running one-node cluster with its state in a fresh directory; stopped and checked after."""
    if shutil.which("bash") is None:
        _unavailable("no bash to run .ci/slurm_cluster.sh")
    # mkdtemp, not tmp_path: the munge user must traverse every directory above its socket.
    directory = Path(tempfile.mkdtemp(prefix="vc-slurm-"))
    directory.chmod(0o755)
    env = {**os.environ, "VC_SLURM_DIR": str(directory)}
    started = _cluster_script("start", env)
    if started.returncode != 0:
        _cluster_script("stop", env)
        shutil.rmtree(directory, ignore_errors=True)
        tail = (started.stderr or started.stdout).strip().splitlines()[-6:]
        _unavailable(
            f"no SLURM test cluster (.ci/slurm_cluster.sh start exited {started.returncode}): "
            + " | ".join(tail)
        )
    cluster = Cluster(directory, {**env, "SLURM_CONF": str(directory / "etc" / "slurm.conf")})
    pids = cluster.pids()
    try:
        assert set(pids) == {"munged", "slurmctld", "slurmd"}, started.stderr
        yield cluster
    finally:
        stopped = _cluster_script("stop", env)
        stopped_again = _cluster_script("stop", env)  # stop is idempotent
        survivors = {name: pid for name, pid in pids.items() if _alive(pid)}
        leftover_conf = (
            Path("/etc/slurm/slurm.conf").exists()
            and str(directory) in Path("/etc/slurm/slurm.conf").read_text()
        )
        shutil.rmtree(directory, ignore_errors=True)
        assert stopped.returncode == 0, stopped.stderr
        assert stopped_again.returncode == 0, stopped_again.stderr
        assert not survivors, f"daemons still running after stop: {survivors}"
        assert not leftover_conf, "/etc/slurm/slurm.conf of the test cluster was left behind"


# --- the workflows ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkflowCase:
    """How to run one workflow in a fresh directory, and what to compare between two runs."""

    name: str
    available: Callable[[], str | None]  # None, or why this workflow cannot run here
    args: Callable[[Path], list[str]]  # snakemake arguments for a run in this working directory
    compared: tuple[str, ...]  # globs (relative to the working directory) compared between runs
    slurm_args: tuple[str, ...] = ()  # only for the SLURM run
    rel_tol: float = 0.0  # 0: byte-identical files; else numbers compared within rel/abs tolerance
    abs_tol: float = 0.0
    # (glob, rel_tol, abs_tol): files among COMPARED that get their own, wider tolerance
    tolerances: tuple[tuple[str, float, float], ...] = ()
    timeout_s: int = 600  # per Snakemake run: a hung status poll must fail the test, not the CI job
    extra_checks: Callable[[Path, Cluster, dict[str, list[str]]], None] | None = None


def _toy_args(workdir: Path) -> list[str]:
    return ["--snakefile", str(TOY / "Snakefile"), "--directory", str(workdir)]


def _check_toy(workdir: Path, cluster: Cluster, submissions: dict[str, list[str]]) -> None:
    """Each job recorded the SLURM job that ran it; GPU jobs saw the granted GPU; train resumed."""
    final_ids = {ids[-1] for ids in submissions.values()}
    logs = sorted((workdir / "logs").glob("*.env"))
    assert len(logs) == 4  # prepare x2, train, predict
    for log in logs:
        lines = log.read_text().splitlines()
        record = dict(item.split("=", 1) for item in lines[-1].split("\t"))
        assert record["SLURM_JOB_ID"] in final_ids, log.name
        # The venv reached the job (PATH exported by sbatch --export=ALL).
        assert Path(record["python"]).parent == Path(sys.executable).parent, log.name
        gpu_rule = log.name.startswith(("train", "predict"))
        assert record["CUDA_VISIBLE_DEVICES"] == ("0" if gpu_rule else ""), log.name
    # --config preempt_once=true: the first train job stopped after its checkpoint, the retry
    # (profile: retries) resumed from it and removed it.
    [train_ids] = [ids for ids in submissions.values() if len(ids) > 1]
    assert len(train_ids) == 2
    assert cluster.job_record(train_ids[0])["JobState"] == "FAILED"
    assert not (workdir / "results" / "model" / "train.ckpt").exists()


TOY_CASE = WorkflowCase(
    name="toy",
    available=lambda: None,
    args=_toy_args,
    compared=("results/**/*.tsv",),
    slurm_args=("--config", "preempt_once=true"),
    extra_checks=_check_toy,
)


def _tiny_available() -> str | None:
    missing = [
        p for p in ("Snakefile", "config.yaml", "tests/tiny.yaml") if not (REPO / p).exists()
    ]
    return f"the tiny workflow is missing {missing}" if missing else None


def _tiny_args(workdir: Path) -> list[str]:
    # The repository's Snakefile run in a scratch working directory with config.yaml and tests/tiny.yaml.
    return snakemake_command(workdir)[len(SNAKEMAKE) :]


TINY_CASE = WorkflowCase(
    name="tiny",
    available=_tiny_available,
    args=_tiny_args,
    compared=("results/tables/*.tsv",),
    # Both runs train on the CPU, but possibly with different thread counts (the SLURM job gets
    # the rule's threads as cpus-per-task, the local run shares the cores), so float sums may
    # differ. On a CPU with native bf16 the network runs in bf16 (8-bit mantissa), where a different
    # split of a sum moves the metrics of table3.tsv by up to 2e-4 relative (measured); 2e-3 leaves
    # room and still catches any real difference of the pipeline (a wrong subject, fold or model).
    rel_tol=2e-3,
    abs_tol=1e-5,
    # The uncertainty tables are statistics of the spread between nearly equal predictions (a
    # voxel's spread is ~2e-4 of the brain's intensity range), so the same float differences move
    # them far more: a Spearman rho by 4e-5, a reliability bin's error by 1.1e-4 (2.6 %, voxels
    # change bins), a lesion's mean uncertainty by 4e-4 (measured, local vs SLURM, CI's numbers
    # too). They are reported to two decimals; a wrong subject, fold or map still changes the
    # voxel and lesion counts, compared exactly.
    tolerances=(("results/tables/uncertainty_*.tsv", 2e-2, 1e-3),),
    timeout_s=900,  # per run; `make test` kills any test after 1200 s (pytest-timeout)
)

CASES = {case.name: case for case in (TOY_CASE, TINY_CASE)}
SELECTED = [s.strip() for s in os.environ.get("VC_SLURM_WORKFLOWS", "toy").split(",") if s.strip()]


# --- helpers -----------------------------------------------------------------------------------------


def run_snakemake(
    args: list[str], workdir: Path, env: dict[str, str], log: Path, timeout_s: int = 600
) -> float:
    """Run Snakemake with its output in LOG; fail with the log's tail; return the wall time."""
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with log.open("w") as out:
        try:
            proc = subprocess.run(
                [*SNAKEMAKE, *args],
                cwd=workdir,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"snakemake ran over {timeout_s} s:\n{log.read_text()[-4000:]}")
    if proc.returncode != 0:
        pytest.fail(f"snakemake exited {proc.returncode}:\n{log.read_text()[-6000:]}")
    return time.monotonic() - start


@dataclass(frozen=True)
class LoggedJob:
    rule: str
    jobid: str
    local: bool
    resources: dict[str, str]


def parse_jobs(log: str) -> dict[str, LoggedJob]:
    """Snakemake job id -> the job block printed when the job was scheduled."""
    jobs: dict[str, LoggedJob] = {}
    for block in re.finditer(r"^(localrule|rule) (\w+):\n((?:    .*\n)+)", log, flags=re.M):
        fields = dict(re.findall(r"^    (\w+): (.*)$", block.group(3), flags=re.M))
        resources = dict(re.findall(r"(\w+)=([^,]*)", fields.get("resources", "")))
        jobid = fields["jobid"]
        jobs[jobid] = LoggedJob(block.group(2), jobid, block.group(1) == "localrule", resources)
    return jobs


def parse_submissions(log: str) -> dict[str, list[str]]:
    """Snakemake job id -> the SLURM job ids it was submitted as, in order (retries add ids)."""
    submissions: dict[str, list[str]] = {}
    for jobid, slurm_id in re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", log):
        submissions.setdefault(jobid, []).append(slurm_id)
    return submissions


def compare_outputs(
    reference: Path,
    candidate: Path,
    patterns: tuple[str, ...],
    rel_tol: float,
    abs_tol: float,
    tolerances: tuple[tuple[str, float, float], ...] = (),
) -> list[str]:
    """Differences between the files matching PATTERNS in two working directories ([] if equal).

    With both tolerances 0 files must be byte-identical; otherwise they are read as tab-separated
    tables whose numeric cells must agree within the tolerances and whose other cells must be equal.
    A file matching a glob of TOLERANCES is compared with that entry's (rel_tol, abs_tol) instead.
    """
    ref_files = {p.relative_to(reference) for pat in patterns for p in reference.glob(pat)}
    cand_files = {p.relative_to(candidate) for pat in patterns for p in candidate.glob(pat)}
    if not ref_files:
        return [f"no file matches {patterns} in the local run"]
    problems = []
    if ref_files != cand_files:
        problems.append(f"different files: {sorted(map(str, ref_files ^ cand_files))}")
    for rel in sorted(ref_files & cand_files):
        a, b = (reference / rel).read_text(), (candidate / rel).read_text()
        if a == b:
            continue
        rel_tol, abs_tol = next(
            ((r, t) for pat, r, t in tolerances if rel.match(pat)), (rel_tol, abs_tol)
        )
        if rel_tol == 0 and abs_tol == 0:
            problems.append(f"{rel}: files differ")
            continue
        rows_a = [line.split("\t") for line in a.splitlines()]
        rows_b = [line.split("\t") for line in b.splitlines()]
        if [len(r) for r in rows_a] != [len(r) for r in rows_b]:
            problems.append(f"{rel}: tables of different shapes")
            continue
        for i, (row_a, row_b) in enumerate(zip(rows_a, rows_b, strict=True)):
            for j, (x, y) in enumerate(zip(row_a, row_b, strict=True)):
                if x != y and not _close(x, y, rel_tol, abs_tol):
                    problems.append(f"{rel} line {i + 1} column {j + 1}: {x!r} != {y!r}")
    return problems


def _close(x: str, y: str, rel_tol: float, abs_tol: float) -> bool:
    try:
        fx, fy = float(x), float(y)
    except ValueError:
        return False
    if math.isnan(fx) and math.isnan(fy):
        return True
    return math.isclose(fx, fy, rel_tol=rel_tol, abs_tol=abs_tol)


def _profile_partitions() -> Callable[[str], str]:
    """rule -> the partition profiles/slurm sends it to (its set-resources, else the default)."""
    profile = yaml.safe_load((SLURM_PROFILE / "config.yaml").read_text())
    default = profile["default-resources"]["slurm_partition"]
    per_rule = {
        rule: res["slurm_partition"]
        for rule, res in profile.get("set-resources", {}).items()
        if "slurm_partition" in res
    }
    return lambda rule: per_rule.get(rule, default)


# --- unit tests of the helpers (no cluster needed) ---------------------------------------------------


def test_compare_outputs_reports_differences_beyond_the_tolerance(tmp_path):
    for name, value in (("a", "0.500000"), ("b", "0.500001")):
        (tmp_path / name / "results").mkdir(parents=True)
        (tmp_path / name / "results" / "m.tsv").write_text(f"subject\tssim\ns01\t{value}\n")
    a, b = tmp_path / "a", tmp_path / "b"
    assert compare_outputs(a, b, ("results/*.tsv",), 0, 0) == ["results/m.tsv: files differ"]
    assert compare_outputs(a, b, ("results/*.tsv",), 1e-4, 0) == []
    assert compare_outputs(a, b, ("results/*.tsv",), 1e-7, 0) != []
    assert compare_outputs(a, b, ("missing/*.tsv",), 0, 0) != []
    # A file's own tolerance replaces the shared one, for the files its glob matches only.
    assert compare_outputs(a, b, ("results/*.tsv",), 1e-7, 0, (("results/m.tsv", 1e-4, 0),)) == []
    assert compare_outputs(a, b, ("results/*.tsv",), 1e-4, 0, (("results/m.tsv", 1e-7, 0),)) != []
    assert compare_outputs(a, b, ("results/*.tsv",), 1e-7, 0, (("results/u_*.tsv", 1e-4, 0),)) != []


def test_parse_log_pairs_each_job_with_its_slurm_submissions():
    log = (
        "[Tue]\nrule train:\n    jobid: 4\n    resources: mem_mb=2000, slurm_partition=gpu, gpu=1\n"
        "Job 4 has been submitted with SLURM jobid 3 (log: x).\nError in rule train:\n    jobid: 4\n"
        "Job 4 has been submitted with SLURM jobid 4 (log: y).\n"
        "[Tue]\nlocalrule all:\n    input: a\n    jobid: 0\n    resources: tmpdir=/tmp\n"
    )
    jobs = parse_jobs(log)
    assert jobs["4"].rule == "train" and not jobs["4"].local
    assert jobs["4"].resources["gpu"] == "1"
    assert jobs["0"].local
    assert parse_submissions(log) == {"4": ["3", "4"]}


def test_profiles_resolve_the_resources_of_the_gpu_rules(tmp_path):
    """Both profiles parse; profiles/slurm sends GPU rules to its GPU partition (dry runs, no SLURM)."""
    for profile in (SLURM_PROFILE, LOCAL_PROFILE):
        proc = subprocess.run(
            [*SNAKEMAKE, "--profile", str(profile), "-n", *_toy_args(tmp_path / profile.name)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        jobs = parse_jobs(proc.stdout)
        train = next(job for job in jobs.values() if job.rule == "train")
        prepare = next(job for job in jobs.values() if job.rule == "prepare")
        assert train.resources["gpu"] == "1"
        if profile == SLURM_PROFILE:
            partition_of = _profile_partitions()
            assert train.resources["slurm_partition"] == partition_of("train") != partition_of("x")
            assert prepare.resources["slurm_partition"] == partition_of("prepare")
            assert prepare.resources["cpus_per_task"] == "1"  # the rule's threads
        else:
            assert "slurm_partition" not in train.resources


# --- the cluster test ------------------------------------------------------------------------------


@pytest.mark.slurm
@pytest.mark.parametrize("case_name", SELECTED)
def test_workflow_runs_through_slurm_like_locally(case_name, slurm_cluster, tmp_path, request):
    if case_name not in CASES:
        pytest.fail(f"VC_SLURM_WORKFLOWS names {case_name!r}; known: {sorted(CASES)}")
    case = CASES[case_name]
    if (why := case.available()) is not None:
        pytest.skip(why)
    env = {**slurm_cluster.env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    slurm_dir = tmp_path / "slurm"
    # Few jobs at once: the test node declares 16 CPUs it does not have (.ci/slurm_cluster.sh).
    max_jobs = os.environ.get("VC_SLURM_JOBS", "3")
    slurm_s = run_snakemake(
        [
            "--profile",
            str(SLURM_PROFILE),
            "--jobs",
            max_jobs,
            *case.args(slurm_dir),
            *case.slurm_args,
        ],
        slurm_dir,
        env,
        tmp_path / "slurm.log",
        case.timeout_s,
    )
    if case.name == "tiny":
        # The suite's shared local run of the tiny workflow (tests/conftest.py) is the reference, asked for
        # only now: under pytest-xdist another worker makes it while SLURM runs.
        local_dir, local_s = request.getfixturevalue("tiny_run"), float("nan")
    else:
        local_dir = tmp_path / "local"
        local_s = run_snakemake(
            ["--profile", str(LOCAL_PROFILE), "--cores", "2", *case.args(local_dir)],
            local_dir,
            env,
            tmp_path / "local.log",
            case.timeout_s,
        )
    print(f"{case.name}: local run {local_s:.1f} s, SLURM run {slurm_s:.1f} s")
    log = (tmp_path / "slurm.log").read_text()

    # Every non-local job went through sbatch, and nothing else did.
    jobs = parse_jobs(log)
    submissions = parse_submissions(log)
    remote = {jobid for jobid, job in jobs.items() if not job.local}
    assert remote, "the SLURM run scheduled no job"
    assert set(submissions) == remote, log[-4000:]

    # The controller's record of every SLURM job: its rule, partition, GPU request and state.
    partition_of = _profile_partitions()
    for jobid, slurm_ids in submissions.items():
        job = jobs[jobid]
        for n, slurm_id in enumerate(slurm_ids):
            record = slurm_cluster.job_record(slurm_id)
            last = n == len(slurm_ids) - 1
            assert record["JobState"] == ("COMPLETED" if last else "FAILED"), (job.rule, record)
            assert record["Comment"].startswith(f"rule_{job.rule}"), record
            wants_gpu = int(job.resources.get("gpu", "0") or 0) > 0
            assert record["Partition"] == partition_of(job.rule), record
            assert ("gpu:1" in record.get("TresPerJob", "")) == wants_gpu, record

    problems = compare_outputs(
        local_dir, slurm_dir, case.compared, case.rel_tol, case.abs_tol, case.tolerances
    )
    assert not problems, problems
    if case.extra_checks is not None:
        case.extra_checks(slurm_dir, slurm_cluster, submissions)
