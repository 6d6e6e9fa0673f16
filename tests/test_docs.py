"""The README and docs/ stay in step with the code: every config key they name is in the schema, every
`virtual-contrast` command (and each of its options) and every `make` target they name exists, and every
relative link, image and repository path they name resolves. Cheap: text, the schema, the CLI parser and the
Makefile; no workflow runs.

Each check is a function of a page's text that returns what it finds wrong, so that the last tests can show
on a fictitious page that each check fails when it should.
"""

from __future__ import annotations

import argparse
import functools
import re
import shlex
import unicodedata
from pathlib import Path

import pytest
import yaml
from workflow_helpers import REPO

from virtual_contrast.cli import build_parser

SCHEMA = REPO / "virtual_contrast" / "schemas" / "config.schema.yaml"
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

#: A dotted word whose last part is one of these is a file (`model.pt`, `train.py`), not a config key.
FILE_EXTENSIONS = {
    "py", "pt", "yaml", "yml", "tsv", "csv", "json", "md", "html", "png", "nii", "gz", "txt", "smk",
    "js", "toml", "cfg", "sh", "log",
}  # fmt: skip
#: Keys written `key: value` in the pages that are Snakemake's, not this workflow's config.
SNAKEMAKE_KEYS = {"resources", "gpu"}
#: Top folders of the repository: a code span that starts with one of them names a path that must exist.
REPO_FOLDERS = ("virtual_contrast/", "benchmarks/", "tests/", "rules/", "profiles/", "envs/",
                "workflow_scripts/", "docs/", ".ci/")  # fmt: skip
#: Paths the pages name that a command creates (ignored by git): `make viewer`, the benchmarks' output.
GENERATED = {"virtual_contrast/reader/static/vendor/", "benchmarks/out/"}

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
SPAN = re.compile(r"`([^`]+)`")
DOTTED = re.compile(r"(?<![\w./-])([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)+)(?![\w/-])")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.M)
CLI_CALL = re.compile(r"virtual-contrast ([a-z][a-z-]*)((?:[^\n|;#`]|\\\n)*)")
MAKE_CALL = re.compile(r"(?<![\w-])make ([a-z][\w-]*)")


# --- what the code defines ---------------------------------------------------------------------------------


@functools.cache
def schema_keys() -> tuple[frozenset[str], frozenset[str]]:
    """(every dotted path of the schema's properties, every property name at any depth)."""
    paths, names = set(), set()

    def walk(node: dict, prefix: str) -> None:
        for name, sub in (node.get("properties") or {}).items():
            path = f"{prefix}{name}"
            paths.add(path)
            names.add(name)
            if isinstance(sub, dict):
                walk(sub, path + ".")
                if isinstance(sub.get("items"), dict):
                    walk(sub["items"], path + ".")

    walk(yaml.safe_load(SCHEMA.read_text()), "")
    return frozenset(paths), frozenset(names)


def top_keys() -> set[str]:
    return {p for p in schema_keys()[0] if "." not in p}


@functools.cache
def cli_commands() -> dict[str, frozenset[str]]:
    """Each subcommand of `virtual-contrast` and its long options."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {
        name: frozenset(o for a in p._actions for o in a.option_strings if o.startswith("--"))
        for name, p in sub.choices.items()
    }


@functools.cache
def make_targets() -> frozenset[str]:
    text = (REPO / "Makefile").read_text()
    found = re.findall(r"^([A-Za-z_][\w.-]*)\s*:(?!=)", text, re.M)
    phony = re.findall(r"^\.PHONY:(.*)$", text, re.M)
    return frozenset(found) | {t for line in phony for t in line.split()}


# --- what a page names ---------------------------------------------------------------------------------------


def code_of(text: str) -> tuple[list[str], list[str]]:
    """(fenced blocks, inline code spans outside them) of a Markdown text."""
    blocks = FENCE.findall(text)
    spans = SPAN.findall(FENCE.sub("", text))
    return blocks, spans


def is_file_name(dotted: str) -> bool:
    return dotted.rsplit(".", 1)[-1] in FILE_EXTENSIONS


def yaml_paths(data, prefix: str = "") -> list[str]:
    """Dotted paths of the mapping keys of a parsed YAML snippet."""
    if not isinstance(data, dict):
        return []
    out = []
    for key, value in data.items():
        path = f"{prefix}{key}"
        out.append(path)
        out.extend(yaml_paths(value, path + "."))
    return out


def config_key_errors(text: str) -> list[str]:
    """Config keys a page names that the schema lacks: dotted keys in code spans (`low_dose.simulate`,
    `train.rank_weight: 1`), `key: value` spans, YAML blocks of config keys, `--config key=value` and
    printf'd overlays in shell blocks."""
    paths, names = schema_keys()
    tops = top_keys()
    named: list[str] = []  # full dotted paths, checked against the schema's paths
    bare: list[str] = []  # keys given without their section, checked against every property name
    blocks, spans = code_of(text)
    for span in spans:
        for dotted in DOTTED.findall(span):
            if dotted.split(".")[0] in tops and not is_file_name(dotted):
                named.append(dotted)
        if re.match(r"^[a-z_][\w.]*: ", span):
            try:
                data = yaml.safe_load(span)
            except yaml.YAMLError:
                continue
            for key_path in yaml_paths(data):
                head = key_path.split(".")[0]
                if "." in head or head in tops:
                    named.append(key_path)
                elif head not in SNAKEMAKE_KEYS:
                    bare.append(key_path.split(".")[-1])
    for block in blocks:
        snippets = []
        try:
            data = yaml.safe_load(block)
        except yaml.YAMLError:
            data = None
        if isinstance(data, dict) and set(data) & tops:
            snippets.append(data)
        for printed in re.findall(r"printf '([^']*)'", block):
            snippets.append(yaml.safe_load(printed.replace("\\n", "\n")))
        for data in snippets:
            named.extend(yaml_paths(data))
        for key in re.findall(r"--config((?: [a-z_][\w.]*=\S+)+)", block):
            named.extend(item.split("=")[0] for item in key.split())
    errors = [f"config key `{k}` is not in {SCHEMA.name}" for k in named if k not in paths]
    errors += [
        f"config key `{k}` is in no section of {SCHEMA.name}" for k in bare if k not in names
    ]
    return errors


def cli_errors(text: str) -> list[str]:
    """`virtual-contrast` commands and options named in a page's code that the CLI lacks."""
    commands = cli_commands()
    blocks, spans = code_of(text)
    errors = []
    for code in [*blocks, *spans]:
        for command, rest in CLI_CALL.findall(code):
            if command not in commands:
                errors.append(f"`virtual-contrast {command}`: no such command")
                continue
            try:
                words = shlex.split(rest.replace("\\\n", " "), comments=False)
            except ValueError:
                words = rest.split()
            for word in words:
                option = word.split("=")[0]
                if option.startswith("--") and option not in commands[command]:
                    errors.append(f"`virtual-contrast {command} {option}`: no such option")
    return errors


def make_errors(text: str) -> list[str]:
    """`make` targets named in a page's code that the Makefile lacks."""
    blocks, spans = code_of(text)
    targets = make_targets()
    named = [t for code in [*blocks, *spans] for t in MAKE_CALL.findall(code)]
    return [f"`make {t}`: no such target in the Makefile" for t in named if t not in targets]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading).strip().lower()
    text = "".join(c for c in text if c in " -" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(h) for h in HEADING.findall(FENCE.sub("", path.read_text()))}


def link_errors(text: str, page: Path) -> list[str]:
    """Relative links and images that do not resolve (file, and anchor for Markdown pages), and repository
    paths named in code spans that do not exist."""
    errors = []
    for target in LINK.findall(FENCE.sub("", text)):
        if re.match(r"^[a-z]+:", target):
            continue  # https:, mailto:
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            errors.append(f"link {target}: {file_part} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            errors.append(f"link {target}: no heading #{anchor} in {dest.name}")
    for span in code_of(text)[1]:
        path = span.strip()
        if path.startswith(REPO_FOLDERS) and not re.search(r"[*<>{}\s]", path):
            if path not in GENERATED and not (REPO / path).exists():
                errors.append(f"path `{path}` does not exist in the repository")
    return errors


# --- the pages ---------------------------------------------------------------------------------------------


def page_id(page: Path) -> str:
    return str(page.relative_to(REPO))


def test_pages_exist():
    """The README names at least three pages of docs/, each linked from it, and stays short."""
    readme = (REPO / "README.md").read_text()
    docs = sorted((REPO / "docs").glob("*.md"))
    assert len(docs) >= 3
    assert [d.name for d in docs if f"(docs/{d.name}" not in readme] == []
    assert len(readme.splitlines()) <= 300
    assert "make demo" in readme and "make test" in readme


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_config_keys_exist(page):
    assert config_key_errors(page.read_text()) == []


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_cli_commands_exist(page):
    assert cli_errors(page.read_text()) == []


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_make_targets_exist(page):
    assert make_errors(page.read_text()) == []


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_links_resolve(page):
    assert link_errors(page.read_text(), page) == []


def test_no_private_paths():
    """The repository stands alone: no page points at a folder outside it."""
    for page in PAGES:
        assert "../shared" not in page.read_text() and "/work/" not in page.read_text(), page


# --- the checks can fail -------------------------------------------------------------------------------------

FICTITIOUS = """
Set `low_dose.simulated` (a misspelling) and `train.rank_weight: 1` (real), `enhancement_wieght: 3`.

```yaml
preprocess:
  skull_strip_backend: deepbet
  skull_strip_tool: hdbet
```

```bash
snakemake --config bids_folder=/data
printf 'cohort:\\n  native_voxel: 2.5\\n' > x.yaml
virtual-contrast simulate-low-dose --t1 a --ref b --out c --dose-fraction 0.25
virtual-contrast segment --in x
make demo-fast
```

See [the method](docs/nowhere.md), [a heading](README.md#no-such-heading) and `benchmarks/nothing.py`.
"""


def test_checks_fail_on_a_fictitious_page():
    assert sorted(config_key_errors(FICTITIOUS)) == sorted(
        [
            "config key `low_dose.simulated` is not in config.schema.yaml",
            "config key `preprocess.skull_strip_tool` is not in config.schema.yaml",
            "config key `cohort.native_voxel` is not in config.schema.yaml",
            "config key `bids_folder` is not in config.schema.yaml",
            "config key `enhancement_wieght` is in no section of config.schema.yaml",
        ]
    )
    assert cli_errors(FICTITIOUS) == [
        "`virtual-contrast simulate-low-dose --dose-fraction`: no such option",
        "`virtual-contrast segment`: no such command",
    ]
    assert make_errors(FICTITIOUS) == ["`make demo-fast`: no such target in the Makefile"]
    assert link_errors(FICTITIOUS, REPO / "README.md") == [
        "link docs/nowhere.md: docs/nowhere.md does not exist",
        "link README.md#no-such-heading: no heading #no-such-heading in README.md",
        "path `benchmarks/nothing.py` does not exist in the repository",
    ]


def test_real_names_pass():
    """The same checks accept what exists, so the failures above are about the names, not the checks."""
    page = """
`low_dose.simulate`, `reader_study.image_format: dicom`, `grid: {voxel_mm: 2.0, crop_shape: [80, 96, 80]}`,
`model.pt`, `train.py`, `virtual-contrast skull-strip --backend`, `make viewer`,
[method](docs/method.md#the-steps), `benchmarks/README.md`.
"""
    assert config_key_errors(page) == []
    assert cli_errors(page) == []
    assert make_errors(page) == []
    assert link_errors(page, REPO / "README.md") == []
