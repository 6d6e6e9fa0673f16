"""The pre-processing options: one object from the config, stored in model.pt, read back strictly."""

from __future__ import annotations

import pytest
import yaml
from workflow_helpers import REPO

from virtual_contrast.config import schema_defaults
from virtual_contrast.io import InputError
from virtual_contrast.preprocess.options import (
    PreprocessOptions,
    default_options,
    register_options,
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
    assert defaults["preprocess"]["registration_gate"]["min_brain_dice"] == 0.9
    assert default_options().skull_strip.backend == defaults["preprocess"]["skull_strip_backend"]


def test_train_command_stores_the_options_it_is_given(tmp_path, one_torch_thread):
    """`virtual-contrast train` outside the workflow: --preprocess-options (a subject's provenance.json)
    goes into model.pt, where `predict` reads it back."""
    import json

    import pandas as pd
    from toy_subjects import make_toy_subjects

    from virtual_contrast.cli import main as cli_main
    from virtual_contrast.model.checkpoint import load_checkpoint

    toy = make_toy_subjects(tmp_path / "data", 4, (8, 8, 8), seed=1)
    folds = tmp_path / "folds.tsv"
    pd.DataFrame({"subject": [s.subject for s in toy], "fold": [0, 0, 1, 1]}).to_csv(
        folds, sep="\t", index=False
    )
    options = default_options().to_dict()
    options["normalize_percentiles"] = [2.0, 98.0]
    provenance = tmp_path / "provenance.json"
    provenance.write_text(json.dumps({"subject": "x", "preprocess_options": options}))
    args = ["train", "--folds", str(folds), "--fold", "1", "--data", str(toy[0].target.parent),
            "--epochs", "1", "--width", "2", "--depth", "2", "--threads", "1"]  # fmt: skip
    assert (
        cli_main([*args, "--out", str(tmp_path / "f1"), "--preprocess-options", str(provenance)])
        == 0
    )
    assert load_checkpoint(tmp_path / "f1" / "model.pt")["preprocess"] == options
    options["skull_strip_backend"] = (
        "deepbet"  # a config key, not an option name: refused before training
    )
    provenance.write_text(json.dumps(options))
    assert (
        cli_main([*args, "--out", str(tmp_path / "f2"), "--preprocess-options", str(provenance)])
        == 2
    )
    assert not (tmp_path / "f2").exists()


def test_the_paper_overlay_extracts_brains_with_the_papers_tool_and_the_demo_with_deepbet():
    from virtual_contrast.backends import resolve_backends
    from virtual_contrast.config import load_config

    paper = PreprocessOptions.from_config(load_config(REPO / "config.paper.yaml"))
    assert (paper.skull_strip.backend, paper.skull_strip.hdbet_mode) == ("hdbet", "accurate")
    demo = resolve_backends(load_config())["brain_extraction"]
    assert (demo["configured"], demo["backend"]) == ("auto", "deepbet")


def test_hdbet_mode_is_part_of_the_options_only_where_hdbet_v1_runs():
    """A changed HD-BET mode re-runs HD-BET's masks, never another tool's (Snakemake compares the params)."""
    from virtual_contrast.config import load_config

    def options(backend: str, mode: str) -> PreprocessOptions:
        return PreprocessOptions.from_config(
            load_config({"preprocess": {"skull_strip_backend": backend, "hdbet_mode": mode}})
        )

    assert options("deepbet", "fast") == options("deepbet", "accurate")
    assert options("deepbet", "fast").skull_strip.hdbet_mode == ""
    assert options("hdbet", "fast") != options("hdbet", "ensemble")
    assert options("hdbet", "fast").skull_strip.hdbet_mode == "fast"
