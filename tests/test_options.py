"""The pre-processing options: one object from the config, stored in model.pt, read back strictly."""

from __future__ import annotations

import pytest
import yaml
from workflow_helpers import REPO

from virtual_contrast.io import InputError
from virtual_contrast.preprocess.options import (
    PreprocessOptions,
    default_options,
    register_options,
    schema_defaults,
    skull_strip_options,
)


def _config() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


def test_the_workflow_config_gives_every_option():
    options = PreprocessOptions.from_config(_config())
    assert options.skull_strip.backend == "auto" and options.register.backend == "auto"
    assert options.register.gate.scale_range == (0.67, 1.5)
    assert options.normalize_percentiles == (1.0, 99.0)
    assert options.crop_shape == (40, 48, 40) and options.voxel_mm == 4.0


def test_round_trip_through_plain_types():
    options = PreprocessOptions.from_config(_config())
    plain = options.to_dict()
    assert PreprocessOptions.from_dict(plain) == options
    assert skull_strip_options(plain["skull_strip"]) == options.skull_strip
    assert register_options(plain["register"]) == options.register
    assert isinstance(
        plain["crop_shape"], list
    )  # as torch.load(weights_only=True) and JSON keep it


def test_unknown_or_missing_keys_are_named():
    plain = default_options().to_dict()
    plain["register"]["gate"]["max_shear"] = 0.2
    del plain["normalize_percentiles"]
    with pytest.raises(InputError) as err:
        PreprocessOptions.from_dict(plain, source="options in model.pt")
    assert "missing: normalize_percentiles" in str(err.value)
    plain["normalize_percentiles"] = [1, 99]
    with pytest.raises(InputError, match="unknown: max_shear"):
        PreprocessOptions.from_dict(plain)


def test_defaults_come_from_the_schema():
    defaults = schema_defaults()
    assert defaults["preprocess"]["registration_gate"]["min_brain_dice"] == 0.8
    assert default_options().skull_strip.backend == defaults["preprocess"]["skull_strip_backend"]
