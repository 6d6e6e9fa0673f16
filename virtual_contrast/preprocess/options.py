"""The pre-processing options: one typed object for the workflow's rules and for ``virtual-contrast predict``.

:class:`PreprocessOptions` holds every choice that changes what a subject's pre-processed volumes look like
(atlas, grid, backends, registration quality gate, normalisation percentiles). The workflow builds it from its
config (:meth:`PreprocessOptions.from_config`) and hands each rule the part it uses, the ``train`` rule stores
the whole object in every ``model.pt``, and ``predict`` reads it back from there, as nnU-Net stores its plans
with the model: a model is always fed the way it was trained. What in it names code (the backends, HD-BET 2's
weights folder) ``predict`` compares with the tools of its own installation and command line, and never
follows (``virtual_contrast.model.predict_exam.exam_options``): a model file is data.

There are no default values here: they live in the config schema (``virtual_contrast/schemas/
config.schema.yaml``), and :func:`default_options` builds the options of its defaults for callers without a
config (the command line's single steps).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict, dataclass
from functools import cache
from typing import Any

from virtual_contrast.io import InputError

log = logging.getLogger(__name__)


class BackendUnavailableError(InputError):
    """The backend an option names cannot run on this machine (a package, its weights or an executable are
    missing); raised before any work, with what to install."""


@dataclass(frozen=True)
class SkullStripOptions:
    """Brain extraction on the native T1 (config ``preprocess.skull_strip_backend``, ``hdbet_mode``,
    ``hdbet2_weights``)."""

    backend: str  # auto | deepbet | hdbet (HD-BET v1) | hdbet2 (HD-BET 2)
    hdbet_mode: str  # HD-BET v1: fast (fold 0) | ensemble (5 folds) | accurate (5 folds x 8 mirrorings); "" else
    hdbet2_weights: str  # HD-BET 2 weights folder; "" = none configured


@dataclass(frozen=True)
class GateOptions:
    """Limits of the registration quality gate (config ``preprocess.registration_gate``)."""

    scale_range: tuple[float, float]  # allowed singular values of the atlas -> subject affine
    min_correlation: (
        float  # Pearson correlation of the registered brain with the template, atlas brain
    )
    min_brain_dice: float  # Dice of the carried brain mask with the atlas brain mask
    min_brain_coverage: float  # fraction of the atlas brain in each sequence's field of view


@dataclass(frozen=True)
class RegisterOptions:
    """Registration to the atlas (config ``preprocess.register_backend`` and the gate)."""

    backend: str  # auto | fsl | simpleitk
    gate: GateOptions


@dataclass(frozen=True)
class PreprocessOptions:
    """Everything that defines a subject's pre-processed volumes; see the module docstring."""

    atlas_t1: str  # config atlas.t1 ("" = the template inside nilearn)
    atlas_brain_mask: str  # config atlas.brain_mask ("" = the template thresholded)
    voxel_mm: float  # config grid.voxel_mm
    crop_shape: tuple[int, int, int]  # config grid.crop_shape
    skull_strip: SkullStripOptions
    register: RegisterOptions
    normalize_percentiles: tuple[float, float]  # config preprocess.normalize_percentiles

    @classmethod
    def from_config(cls, config: dict) -> PreprocessOptions:
        """The options of a validated workflow config (every key present, as the schema fills them in)."""
        pre, gate = config["preprocess"], config["preprocess"]["registration_gate"]
        strip_backend = str(pre["skull_strip_backend"])
        return cls(
            atlas_t1=str(config["atlas"]["t1"]),
            atlas_brain_mask=str(config["atlas"]["brain_mask"]),
            voxel_mm=float(config["grid"]["voxel_mm"]),
            crop_shape=tuple(int(s) for s in config["grid"]["crop_shape"]),
            skull_strip=SkullStripOptions(
                backend=strip_backend,
                # HD-BET v1's mode only where HD-BET v1 runs: with another tool neither the masks nor the
                # models depend on it, and a changed mode must not re-run their jobs ("" = not HD-BET v1).
                hdbet_mode=str(pre["hdbet_mode"]) if strip_backend == "hdbet" else "",
                hdbet2_weights=str(pre["hdbet2_weights"]),
            ),
            register=RegisterOptions(
                backend=str(pre["register_backend"]),
                gate=GateOptions(
                    scale_range=tuple(float(s) for s in gate["scale_range"]),
                    min_correlation=float(gate["min_correlation"]),
                    min_brain_dice=float(gate["min_brain_dice"]),
                    min_brain_coverage=float(gate["min_brain_coverage"]),
                ),
            ),
            normalize_percentiles=tuple(float(p) for p in pre["normalize_percentiles"]),
        )

    def to_dict(self) -> dict:
        """Plain JSON types (lists for tuples), as stored in ``model.pt`` and passed as rule params."""
        return _plain(asdict(self))

    @classmethod
    def from_dict(
        cls, values: dict, *, source: str = "pre-processing options"
    ) -> PreprocessOptions:
        """Inverse of :meth:`to_dict`; an unknown or missing key is an :class:`InputError` naming it."""
        return _build(cls, values, source)


def skull_strip_options(values: dict) -> SkullStripOptions:
    """:class:`SkullStripOptions` from their ``to_dict`` form (a rule's params)."""
    return _build(SkullStripOptions, values, "skull_strip options")


def gate_options(values: dict) -> GateOptions:
    """:class:`GateOptions` from their ``to_dict`` form (a rule's params)."""
    return _build(GateOptions, values, "registration gate options")


def register_options(values: dict) -> RegisterOptions:
    """:class:`RegisterOptions` from their ``to_dict`` form (a rule's params)."""
    return _build(RegisterOptions, values, "register options")


def brain_extraction_label(provenance: dict) -> str:
    """Which brain extraction ran, in a few words, from its provenance (``skull_strip.json``), for figures
    and logs: ``deepbet``, ``hdbet (HD-BET v1, accurate)``, ``hdbet2 (HD-BET 2)``."""
    backend = provenance["backend"]
    if backend == "hdbet":
        return f"hdbet (HD-BET v1, {provenance.get('mode', 'mode not recorded')})"
    if backend == "hdbet2":
        return "hdbet2 (HD-BET 2)"
    return str(backend)


@cache
def default_options() -> PreprocessOptions:
    """The options of the schema's defaults (for the single-step commands, which have no config)."""
    from virtual_contrast.config import load_config

    return PreprocessOptions.from_config(load_config())


# -- helpers
def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _recorded_before_coverage_gate(values: dict, source: str) -> dict:
    """Gate options stored by a model trained before ``min_brain_coverage`` existed: the schema's default
    applies, and the log says so (the options the prediction used, in its provenance, show the value)."""
    if "min_brain_coverage" in values:
        return values
    default = default_options().register.gate.min_brain_coverage
    log.warning(
        "%s: no min_brain_coverage (recorded before the coverage gate existed): the default %g applies",
        source,
        default,
    )
    return {**values, "min_brain_coverage": default}


def _build(cls: type, values: Any, source: str):
    if not isinstance(values, dict):
        raise InputError(f"{source}: expected a mapping, got {type(values).__name__}")
    if cls is GateOptions:
        values = _recorded_before_coverage_gate(values, source)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    missing = sorted(set(fields) - set(values))
    if unknown or missing:
        raise InputError(
            f"{source} do not match this version of virtual-contrast"
            + (f"; unknown: {', '.join(unknown)}" if unknown else "")
            + (f"; missing: {', '.join(missing)}" if missing else "")
        )
    kwargs = {}
    for name, field in fields.items():
        value = values[name]
        nested = {
            "SkullStripOptions": SkullStripOptions,
            "RegisterOptions": RegisterOptions,
            "GateOptions": GateOptions,
        }.get(str(field.type))
        if nested is not None:
            value = _build(nested, value, f"{source}: {name}")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)
