"""The workflow's config schema as data, so that code outside the workflow (the command line) takes its
defaults from the one place that holds them: ``virtual_contrast/schemas/config.schema.yaml``."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "config.schema.yaml"


@lru_cache(maxsize=1)
def load_schema() -> dict[str, Any]:
    """The parsed config schema."""
    return yaml.safe_load(SCHEMA_PATH.read_text())


def schema_defaults(*keys: str) -> dict[str, Any]:
    """Defaults of the object at ``keys`` (e.g. ``("evaluate", "detector")``), nested objects included."""
    node = load_schema()
    for key in keys:
        try:
            node = node["properties"][key]
        except KeyError as exc:
            raise KeyError(f"the config schema has no object {'.'.join(keys)}") from exc
    return _defaults(node)


def _defaults(node: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, prop in node.get("properties", {}).items():
        if prop.get("type") == "object" and "properties" in prop:
            out[key] = _defaults(prop)
        elif "default" in prop:
            out[key] = prop["default"]
    return out
