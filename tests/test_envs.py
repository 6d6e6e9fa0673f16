"""Conda envs: conda-forge only, every package pinned, and each rule's env provides what its script imports.

The rules are discovered by loading the real workflow with Snakemake's Python API (in a subprocess, so the
API's change of directory and logging set-up stay out of pytest), hence rules added later are checked too.
A rule script's imports are followed through the ``virtual_contrast`` modules (and the local helpers of
``workflow_scripts/``) it imports, function-level imports and ``importlib.import_module("literal")``
included: a backend imported lazily still has to be in the env of the rule that may run it.
A static check, because a gap does not show at run time here: Snakemake's script preamble appends the
sys.path of the Python running Snakemake, so a module an env lacks is silently taken from that install.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from import_scan import import_statements
from workflow_helpers import REPO

ENVS = sorted((REPO / "envs").glob("*.yaml"))
PACKAGE = "virtual_contrast"

# Import name -> the conda (or pip) packages that provide it. Names not listed provide themselves
# (numpy, scipy, pandas, nibabel, nilearn, nipype, tqdm, ...), compared after normalising case and "_"/"-".
IMPORT_TO_PACKAGES: dict[str, tuple[str, ...]] = {
    "sklearn": ("scikit-learn",),
    "skimage": ("scikit-image",),
    "yaml": ("pyyaml",),
    "SimpleITK": ("simpleitk",),
    "torch": ("pytorch", "pytorch-cpu", "pytorch-gpu", "torch"),
    "matplotlib": ("matplotlib-base", "matplotlib"),
    "mpl_toolkits": ("matplotlib-base", "matplotlib"),
    "PIL": ("pillow",),
    "HD_BET": ("hd-bet",),
    "nnunetv2": ("nnunetv2", "hd-bet"),  # hd-bet 2 depends on nnunetv2
    "jsonschema": ("jsonschema",),
}
# Imports inside functions that a rule's env deliberately lacks: (rule, module) -> why the rule never runs
# that code. Everything else a rule's script may import, however lazily, must be in the rule's env.
NOT_NEEDED: dict[tuple[str, str], str] = {
    # (rule, module): why a module imported only inside functions is never needed by that rule.
}
# Snakemake's script preamble puts its own installation on sys.path, so an env need not install it.
PROVIDED_OUTSIDE_ENVS = {"snakemake"}

PIN = re.compile(
    r"^(?P<name>[A-Za-z0-9_.\-]+)\s*(?P<op>==?)\s*(?P<version>\d+\.\d+[0-9A-Za-z.*+\-]*)$"
)


def _name(dependency) -> str:
    """The package name of a dependency line, whatever follows it."""
    return re.split(r"[\s=<>!~\[;]", str(dependency).strip().split("::")[-1], maxsplit=1)[0]


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class CondaEnv:
    path: Path
    channels: tuple[str, ...]
    conda: dict[str, str]  # package -> version spec as written
    pip: dict[str, str]
    problems: tuple[str, ...] = field(default=())

    @property
    def packages(self) -> set[str]:
        return {normalise(n) for n in (*self.conda, *self.pip)}


def read_env(path: Path) -> CondaEnv:
    """Parse an environment file; format problems (unpinned, wrong channel) go to ``problems``."""
    problems: list[str] = []
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        return CondaEnv(path, (), {}, {}, (f"not valid YAML: {exc}",))
    if not isinstance(spec, dict):
        return CondaEnv(path, (), {}, {}, ("not a mapping with channels and dependencies",))
    channels = tuple(spec.get("channels") or ())
    if "conda-forge" not in channels or "nodefaults" not in channels:
        problems.append(f"channels must include conda-forge and nodefaults, got {list(channels)}")
    if set(channels) - {"conda-forge", "nodefaults"}:
        problems.append(
            f"channels other than conda-forge: {sorted(set(channels) - {'conda-forge', 'nodefaults'})}"
        )
    conda: dict[str, str] = {}
    pip: dict[str, str] = {}
    for dep in spec.get("dependencies") or ():
        if isinstance(dep, dict) and set(dep) == {"pip"}:
            for line in dep["pip"] or ():
                m = PIN.match(str(line).strip())
                if not m or m.group("op") != "==":
                    problems.append(f"pip dependency not pinned with ==X.Y: {line!r}")
                pip[_name(line)] = m.group("version") if m else ""
            continue
        m = PIN.match(str(dep).strip())
        if not m or m.group("op") != "=" or "::" in str(dep):
            problems.append(f"conda dependency not pinned as 'name =X.Y': {dep!r}")
        conda[_name(dep)] = m.group("version") if m else ""
    if "python" not in conda:
        problems.append("no pinned python (rule scripts run with the env's interpreter)")
    return CondaEnv(path, channels, conda, pip, tuple(problems))


# --- imports of a rule script ---------------------------------------------------------------------------------


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, bool]]:
    """``(absolute dotted name, inside a function)`` of every import in ``tree``.

    Imports under ``if TYPE_CHECKING:`` never run and are left out. ``from a import b`` yields ``a.b`` as
    well as ``a``: ``b`` may be a submodule. ``importlib.import_module("literal")`` counts as an import.
    """
    names: list[tuple[str, bool]] = []
    for statement in import_statements(tree, module, is_package):
        names.append((statement.base, statement.lazy))
        names.extend((f"{statement.base}.{n}", statement.lazy) for n in statement.names if n != "*")
    return names


def _local_source(name: str, roots: list[Path]) -> tuple[Path, bool] | None:
    """The source file of a local module (package or plain), or None when it is not local."""
    rel = Path(*name.split("."))
    for root in roots:
        if (root / rel / "__init__.py").is_file():
            return root / rel / "__init__.py", True
        if (root / rel).with_suffix(".py").is_file():
            return (root / rel).with_suffix(".py"), False
    return None


@dataclass
class Needed:
    """Where a third-party module is imported, and whether merely importing the script imports it."""

    where: set[str] = field(default_factory=set)
    eager: bool = (
        False  # False: only inside functions (a lazy, optional or backend-specific import)
    )


def third_party_imports(
    script: Path, package_root: Path = REPO, package: str = PACKAGE
) -> dict[str, Needed]:
    """Top-level third-party modules ``script`` may import, with where and how.

    Follows imports of ``package`` (found under ``package_root``) and of modules beside the script
    (``from _common import setup``), transitively; the standard library is left out. A module reached
    only through an import inside a function makes all its own imports lazy too.
    """
    found: dict[str, Needed] = {}
    seen: dict[Path, bool] = {}  # path -> reached only lazily so far
    todo: list[tuple[Path, str, bool, bool]] = [(script, "__main__", False, False)]
    while todo:
        path, module, is_package, lazy_module = todo.pop()
        if path in seen and (not seen[path] or lazy_module):
            continue
        seen[path] = lazy_module
        tree = ast.parse(path.read_text(), filename=str(path))
        for name, lazy_import in _imported_names(tree, module, is_package):
            lazy = lazy_module or lazy_import
            top = name.split(".")[0]
            if not top:
                continue
            local_roots = [package_root] if top == package else [script.parent]
            if top == package or _local_source(top, [script.parent]):
                # Importing a.b.c runs a/__init__.py, a/b/__init__.py and a/b/c.py.
                parts = name.split(".")
                for i in range(1, len(parts) + 1):
                    src = _local_source(".".join(parts[:i]), local_roots)
                    if src:
                        todo.append((src[0], ".".join(parts[:i]), src[1], lazy))
                continue
            if top in sys.stdlib_module_names or top == "__future__":
                continue
            needed = found.setdefault(top, Needed())
            rel = path.relative_to(package_root) if path.is_relative_to(package_root) else path
            needed.where.add(str(rel))
            needed.eager |= not lazy
    return found


def missing_from_env(imports: dict[str, Needed], env: CondaEnv) -> dict[str, Needed]:
    """The imported modules that no package of ``env`` provides."""
    provided = env.packages
    missing = {}
    for module, needed in imports.items():
        if module in PROVIDED_OUTSIDE_ENVS:
            continue
        candidates = IMPORT_TO_PACKAGES.get(module, (module,))
        if not provided & {normalise(c) for c in candidates}:
            missing[module] = needed
    return missing


def env_problems(rule: str, script: Path, env: CondaEnv, **kwargs) -> tuple[list[str], set]:
    """What ``env`` lacks for ``script`` (one line each), and the NOT_NEEDED entries that excused a gap."""
    problems, excused = [], set()
    for module, needed in sorted(
        missing_from_env(third_party_imports(script, **kwargs), env).items()
    ):
        if not needed.eager and (rule, module) in NOT_NEEDED:
            excused.add((rule, module))
            continue
        how = "at import" if needed.eager else "inside functions"
        problems.append(
            f"rule {rule} ({env.path.name}) lacks {module!r}, imported {how} by {sorted(needed.where)}: "
            f"add it to {env.path.name}"
            + (
                ""
                if needed.eager
                else ", or to NOT_NEEDED in this file if the rule never runs that code"
            )
        )
    return problems, excused


# --- the workflow's rules -----------------------------------------------------------------------------------

_LIST_RULES = """
import json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import ConfigSettings, OutputSettings, Quietness, ResourceSettings

repo, workdir = Path(sys.argv[1]), Path(sys.argv[2])
rules = []
with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
    workflow = api.workflow(
        resource_settings=ResourceSettings(),
        config_settings=ConfigSettings(configfiles=[repo / "config.yaml"]),
        snakefile=repo / "Snakefile",
        workdir=workdir,
    )._workflow
    for rule in workflow.rules:
        base = Path(str(rule.basedir))
        rules.append({
            "name": rule.name,
            "conda_env": str(base / rule.conda_env) if isinstance(rule.conda_env, str) else None,
            "script": str(base / rule.script) if rule.script else None,
            "runs_code": bool(rule.shellcmd or rule.script or rule.notebook or rule.wrapper or rule.run_func)
            and not rule.norun,
        })
print("RULES-JSON " + json.dumps(rules))
"""


@pytest.fixture(scope="module")
def workflow_rules(tmp_path_factory) -> list[dict]:
    workdir = tmp_path_factory.mktemp("envs-workdir")
    proc = subprocess.run(
        [sys.executable, "-c", _LIST_RULES, str(REPO), str(workdir)],
        capture_output=True,
        text=True,
        cwd=workdir,
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RULES-JSON ")), None)
    assert proc.returncode == 0 and line, proc.stdout[-4000:] + proc.stderr[-4000:]
    rules = json.loads(line.removeprefix("RULES-JSON "))
    assert {"register", "skull_strip"} <= {
        r["name"] for r in rules
    }  # the loader really saw the workflow
    return rules


# --- tests --------------------------------------------------------------------------------------------------


def test_there_are_envs():
    assert ENVS, "no envs/*.yaml"


@pytest.mark.parametrize("path", ENVS, ids=[p.name for p in ENVS])
def test_env_file_is_conda_forge_only_and_fully_pinned(path):
    env = read_env(path)
    assert not env.problems, f"{path.name}: " + "; ".join(env.problems)


def test_every_env_pins_the_same_versions_of_shared_packages():
    """A package in two envs at two versions would make results depend on which rule ran."""
    versions: dict[str, dict[str, str]] = {}
    for path in ENVS:
        for name, version in read_env(path).conda.items():
            versions.setdefault(name, {})[path.name] = version
    inconsistent = {n: v for n, v in versions.items() if len(set(v.values())) > 1}
    assert not inconsistent, inconsistent


def test_every_rule_that_runs_code_names_an_existing_conda_env(workflow_rules):
    problems = []
    for rule in workflow_rules:
        if not rule["runs_code"]:
            continue
        if rule["conda_env"] is None:
            problems.append(f"rule {rule['name']}: no conda env")
        elif not Path(rule["conda_env"]).is_file():
            problems.append(f"rule {rule['name']}: {rule['conda_env']} does not exist")
    assert not problems, problems


def test_every_rule_env_provides_the_modules_its_script_imports(workflow_rules):
    problems, excused, checked = [], set(), 0
    for rule in workflow_rules:
        if not (rule["script"] and rule["conda_env"] and Path(rule["conda_env"]).is_file()):
            continue
        script = Path(rule["script"])
        assert script.suffix == ".py", (
            f"rule {rule['name']}: only Python scripts are checked: {script}"
        )
        found, used = env_problems(rule["name"], script, read_env(Path(rule["conda_env"])))
        problems += found
        excused |= used
        checked += 1
    assert checked >= 5
    assert not problems, "\n".join(problems)
    stale = set(NOT_NEEDED) - excused
    assert not stale, (
        f"NOT_NEEDED entries that excuse nothing any more (remove them): {sorted(stale)}"
    )


# --- the checker itself, on synthetic cases -----------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def synthetic(tmp_path):
    """A package ``pkg`` with lazy and transitive imports, a script and its local helper."""
    _write(tmp_path / "pkg" / "__init__.py", "import json\n")
    _write(tmp_path / "pkg" / "sub" / "__init__.py", "")
    _write(
        tmp_path / "pkg" / "sub" / "a.py",
        "import numpy as np\nfrom . import b\n\n"
        "def f():\n    import SimpleITK as sitk\n    from pkg import c, d\n",
    )
    _write(
        tmp_path / "pkg" / "sub" / "b.py",
        "from typing import TYPE_CHECKING\nimport importlib\n"
        "if TYPE_CHECKING:\n    import only_for_typing\n"
        "def g():\n    importlib.import_module('HD_BET')\n",
    )
    _write(tmp_path / "pkg" / "c.py", "import nipype\n")  # reached only from inside f(): lazy
    _write(tmp_path / "pkg" / "d.py", "import pandas\n")  # also imported by the helper: eager
    _write(
        tmp_path / "scripts" / "_helper.py",
        "from skimage.filters import threshold_otsu\nimport pkg.d\n",
    )
    script = _write(
        tmp_path / "scripts" / "rule.py",
        "from _helper import threshold_otsu\nfrom pkg.sub.a import f\nimport snakemake\n",
    )
    return tmp_path, script


def _env(tmp_path: Path, deps: list) -> CondaEnv:
    path = _write(
        tmp_path / "env.yaml",
        yaml.safe_dump({"channels": ["conda-forge", "nodefaults"], "dependencies": deps}),
    )
    return read_env(path)


def test_imports_are_followed_through_package_helpers_and_lazy_imports(synthetic):
    root, script = synthetic
    found = third_party_imports(script, package_root=root, package="pkg")
    assert set(found) == {
        "numpy",
        "SimpleITK",
        "HD_BET",
        "skimage",
        "snakemake",
        "nipype",
        "pandas",
    }
    assert found["SimpleITK"].where == {"pkg/sub/a.py"}
    eager = {module for module, needed in found.items() if needed.eager}
    assert eager == {"numpy", "skimage", "snakemake", "pandas"}


FULL = [
    "python =3.11",
    "numpy =2.4",
    "pandas =3.1",
    "nipype =1.11",
    "simpleitk =2.5",
    "scikit-image =0.26",
    {"pip": ["hd-bet==2.0.1"]},
]


def test_checker_reports_a_module_the_env_lacks(synthetic):
    root, script = synthetic
    imports = third_party_imports(script, package_root=root, package="pkg")
    complete = _env(root, FULL)
    assert not complete.problems
    assert missing_from_env(imports, complete) == {}
    lacking = _env(root, [d for d in FULL if d != "simpleitk =2.5"])
    assert set(missing_from_env(imports, lacking)) == {"SimpleITK"}
    problems, _ = env_problems("r", script, lacking, package_root=root, package="pkg")
    assert len(problems) == 1 and "'SimpleITK'" in problems[0] and "env.yaml" in problems[0]


def test_only_lazy_imports_can_be_excused(synthetic, monkeypatch):
    root, script = synthetic
    lacking = _env(root, [d for d in FULL if d not in ("nipype =1.11", "pandas =3.1")])
    excuses = {("r", "nipype"): "never runs that code", ("r", "pandas"): "no"}
    monkeypatch.setattr(sys.modules[__name__], "NOT_NEEDED", excuses)
    problems, excused = env_problems("r", script, lacking, package_root=root, package="pkg")
    assert excused == {("r", "nipype")}
    assert len(problems) == 1 and "'pandas'" in problems[0] and "at import" in problems[0]
    # The excuse is per rule: another rule with the same script and env is not excused.
    problems, _ = env_problems("other", script, lacking, package_root=root, package="pkg")
    assert len(problems) == 2


@pytest.mark.parametrize(
    ("deps", "channels", "problem"),
    [
        (["python =3.11", "numpy"], ["conda-forge", "nodefaults"], "numpy"),
        (["python =3.11", "numpy >=2"], ["conda-forge", "nodefaults"], "numpy >=2"),
        (["python =3.11", "tqdm =4"], ["conda-forge", "nodefaults"], "tqdm =4"),
        (["python =3.11", {"pip": ["hd-bet"]}], ["conda-forge", "nodefaults"], "hd-bet"),
        (["python =3.11"], ["conda-forge"], "nodefaults"),
        (["python =3.11"], ["conda-forge", "defaults", "nodefaults"], "defaults"),
        (["numpy =2.4"], ["conda-forge", "nodefaults"], "python"),
    ],
)
def test_env_format_problems_are_reported(tmp_path, deps, channels, problem):
    path = _write(
        tmp_path / "env.yaml", yaml.safe_dump({"channels": channels, "dependencies": deps})
    )
    problems = read_env(path).problems
    assert problems and any(problem in p for p in problems), problems
