"""The workflow's configuration: one schema that holds every default, one way to load and check a config.

``virtual_contrast/schemas/config.schema.yaml`` declares every key, its type and range and its default (closed
objects: a misspelt key is an error). The defaults are the demo scale that ``config.yaml`` documents key by key
(a test keeps the two equal), so that the workflow, the command line, the tests and the benchmarks start from
the same values:

- the workflow (``rules/common.smk``) validates the config Snakemake merged from ``--configfile`` and
  ``--config`` with :func:`validate_config`, which fills in every default;
- tests and benchmarks build the same config with :func:`load_config` (``load_config("tests/tiny.yaml")`` is the
  config of ``snakemake --configfile config.yaml tests/tiny.yaml``);
- the command line takes its defaults from :func:`schema_defaults`, and ``train`` its options from
  :func:`train_options`.

No heavy imports here: the workflow imports this module while it parses.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from virtual_contrast.io import InputError

#: The schema inside the package (also read by the workflow through this module).
SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "config.schema.yaml"
#: Keys of the ``train`` section that size the Snakemake job (threads, memory, wall time), not the training.
TRAIN_JOB_KEYS = ("threads", "mem_mb", "runtime_min")
#: Keys of the ``model`` section that are training options too (the network's shape and inputs).
MODEL_KEYS = ("channels", "width", "depth", "output")


@cache
def _schema_text() -> str:
    return resources.files("virtual_contrast").joinpath("schemas/config.schema.yaml").read_text()


def load_schema() -> dict[str, Any]:
    """The parsed config schema (a fresh copy)."""
    return yaml.safe_load(_schema_text())


def schema_defaults(*keys: str) -> Any:
    """Every default of the schema, nested as a config is; with ``keys`` (e.g. ``"evaluate", "detector"``)
    the defaults of that object or the default of that value."""
    node = load_schema()
    for key in keys:
        try:
            node = node["properties"][key]
        except KeyError as exc:
            raise KeyError(f"the config schema has no key {'.'.join(keys)}") from exc
    return _defaults(node)


def load_config(*overlays: Path | str | Mapping[str, Any]) -> dict[str, Any]:
    """The schema's defaults, with each overlay (a YAML file or a mapping) merged in turn as Snakemake merges
    ``--configfile`` files (mappings key by key, any other value replaced), validated and complete."""
    config = schema_defaults()
    for overlay in overlays:
        merge(config, _read_overlay(overlay))
    return validate_config(config)


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Check ``config`` against the schema and fill in every missing default, in place; returns it.

    A key the schema does not know or a value out of its range is an :class:`InputError` naming the key.
    """
    import jsonschema

    schema = load_schema()
    validator = _validator_with_defaults(jsonschema)(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path)
        raise InputError(f"config {where or '(top level)'}: {error.message}")
    return config


def merge(base: dict[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``overlay`` into ``base`` in place (nested mappings key by key, other values replaced)."""
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def train_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """The training options of a complete config (keyword arguments of
    ``virtual_contrast.model.train.TrainConfig``): the network's keys of ``model`` and every key of ``train``
    but the job's size (:data:`TRAIN_JOB_KEYS`)."""
    options = {key: copy.deepcopy(config["model"][key]) for key in MODEL_KEYS}
    options.update(
        {key: value for key, value in config["train"].items() if key not in TRAIN_JOB_KEYS}
    )
    return options


def leaf_keys(config: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``("section.key", value)`` of every value that is not a mapping, depth first."""
    for key, value in config.items():
        if isinstance(value, Mapping):
            yield from leaf_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


# -- helpers
def _defaults(node: dict[str, Any]) -> Any:
    if node.get("type") == "object" and "properties" in node:
        return {key: _defaults(sub) for key, sub in node["properties"].items()}
    return copy.deepcopy(node.get("default"))


def _read_overlay(overlay: Path | str | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(overlay, Mapping):
        return overlay
    path = Path(overlay)
    if not path.exists():
        raise InputError("config file not found", path=path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"not YAML: {exc}", path=path) from exc
    if not isinstance(values, Mapping):
        raise InputError("a config file is a mapping of keys to values", path=path)
    return values


def _validator_with_defaults(jsonschema):
    """A validator that sets each missing property to its schema default before checking it (the
    recipe of jsonschema's FAQ, as Snakemake's ``validate(..., set_default=True)`` uses it)."""
    base = jsonschema.Draft202012Validator
    check_properties = base.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub:
                    instance.setdefault(key, copy.deepcopy(sub["default"]))
        yield from check_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(base, {"properties": set_defaults})
