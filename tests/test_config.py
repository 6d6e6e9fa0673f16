"""One source of defaults: the config schema. config.yaml repeats it, the command line takes its defaults from
it, and load_config builds the config of any overlay as Snakemake does."""

from __future__ import annotations

import argparse
import dataclasses
import functools

import pytest
import yaml
from workflow_helpers import REPO

from virtual_contrast.cli import build_parser
from virtual_contrast.config import (
    TRAIN_JOB_KEYS,
    leaf_keys,
    load_config,
    schema_defaults,
    train_options,
)
from virtual_contrast.io import InputError

#: Command-line options that set what a config key sets: (subcommand, option) -> (key, its value in a config).
COUNTERPARTS = {
    ("cohort", "seed"): ("cohort.seed", lambda c: c["cohort"]["seed"]),
    # The workflow simulates the cohort from the atlas resampled to the cohort's own voxel size.
    ("cohort", "voxel_mm"): ("cohort.native_voxel_mm", lambda c: c["cohort"]["native_voxel_mm"]),
    ("cohort", "native_voxel_mm"): (
        "cohort.native_voxel_mm",
        lambda c: c["cohort"]["native_voxel_mm"],
    ),
    ("cohort", "extra_visits"): ("cohort.extra_visits", lambda c: c["cohort"]["extra_visits"]),
    ("cohort", "missing_sequence"): (
        "cohort.missing_sequence",
        lambda c: c["cohort"]["missing_sequence"],
    ),
    ("atlas", "t1"): ("atlas.t1", lambda c: c["atlas"]["t1"]),
    ("atlas", "brain_mask"): ("atlas.brain_mask", lambda c: c["atlas"]["brain_mask"]),
    ("skull-strip", "backend"): (
        "preprocess.skull_strip_backend",
        lambda c: c["preprocess"]["skull_strip_backend"],
    ),
    ("skull-strip", "hdbet2_weights"): (
        "preprocess.hdbet2_weights",
        lambda c: c["preprocess"]["hdbet2_weights"],
    ),
    ("skull-strip", "hdbet_mode"): (
        "preprocess.hdbet_mode",
        lambda c: c["preprocess"]["hdbet_mode"],
    ),
    ("crop", "shape"): ("grid.crop_shape", lambda c: c["grid"]["crop_shape"]),
    ("normalize", "low"): (
        "preprocess.normalize_percentiles[0]",
        lambda c: c["preprocess"]["normalize_percentiles"][0],
    ),
    ("normalize", "high"): (
        "preprocess.normalize_percentiles[1]",
        lambda c: c["preprocess"]["normalize_percentiles"][1],
    ),
    ("register", "backend"): (
        "preprocess.register_backend",
        lambda c: c["preprocess"]["register_backend"],
    ),
    ("register", "skull_strip_backend"): (
        "preprocess.skull_strip_backend",
        lambda c: c["preprocess"]["skull_strip_backend"],
    ),
    ("register", "hdbet2_weights"): (
        "preprocess.hdbet2_weights",
        lambda c: c["preprocess"]["hdbet2_weights"],
    ),
    ("register", "hdbet_mode"): (
        "preprocess.hdbet_mode",
        lambda c: c["preprocess"]["hdbet_mode"],
    ),
    ("register", "gate_scale_range"): (
        "preprocess.registration_gate.scale_range",
        lambda c: c["preprocess"]["registration_gate"]["scale_range"],
    ),
    ("register", "gate_min_correlation"): (
        "preprocess.registration_gate.min_correlation",
        lambda c: c["preprocess"]["registration_gate"]["min_correlation"],
    ),
    ("register", "gate_min_brain_dice"): (
        "preprocess.registration_gate.min_brain_dice",
        lambda c: c["preprocess"]["registration_gate"]["min_brain_dice"],
    ),
    ("register", "gate_min_brain_coverage"): (
        "preprocess.registration_gate.min_brain_coverage",
        lambda c: c["preprocess"]["registration_gate"]["min_brain_coverage"],
    ),
    **{
        ("simulate-low-dose", key): (f"low_dose.{key}", lambda c, key=key: c["low_dose"][key])
        for key in ("dose_fraction", "model", "t10_s", "seed")
    },
    ("simulate-low-dose", "backend"): (
        "preprocess.register_backend",
        lambda c: c["preprocess"]["register_backend"],
    ),
    ("split", "k"): ("split.folds", lambda c: c["split"]["folds"]),
    ("split", "seed"): ("split.seed", lambda c: c["split"]["seed"]),
    ("predict", "register_backend"): (
        "preprocess.register_backend",
        lambda c: c["preprocess"]["register_backend"],
    ),
    ("predict", "skull_strip_backend"): (
        "preprocess.skull_strip_backend",
        lambda c: c["preprocess"]["skull_strip_backend"],
    ),
    ("predict", "hdbet2_weights"): (
        "preprocess.hdbet2_weights",
        lambda c: c["preprocess"]["hdbet2_weights"],
    ),
    ("predict", "device"): ("predict.device", lambda c: c["predict"]["device"]),
    ("predict", "tta"): ("predict.tta", lambda c: c["predict"]["tta"]),
    ("tune-detector", "thresholds"): (
        "evaluate.froc.threshold_min, threshold_max, threshold_step",
        lambda c: [
            c["evaluate"]["froc"][k] for k in ("threshold_min", "threshold_max", "threshold_step")
        ],
    ),
    ("tune-detector", "max_fp"): (
        "evaluate.froc.max_fp_per_patient",
        lambda c: c["evaluate"]["froc"]["max_fp_per_patient"],
    ),
    ("tune-detector", "prior_enhancement"): (
        "evaluate.prior.enhancement",
        lambda c: c["evaluate"]["prior"]["enhancement"],
    ),
    ("tune-detector", "prior_fraction"): (
        "evaluate.prior.fraction",
        lambda c: c["evaluate"]["prior"]["fraction"],
    ),
    **{
        (command, key): (
            f"evaluate.detector.{key}",
            lambda c, key=key: c["evaluate"]["detector"][key],
        )
        for command in ("detect-lesions", "tune-detector")
        for key in schema_defaults("evaluate", "detector")
    },
    ("reader-stats", "reads"): ("reader_study.reads", lambda c: c["reader_study"]["reads"]),
    ("reader-stats", "reference_reader"): (
        "reader_study.reference_reader",
        lambda c: c["reader_study"]["reference_reader"],
    ),
    ("reader-stats", "thresholds"): (
        "reader_study.thresholds",
        lambda c: c["reader_study"]["thresholds"],
    ),
    ("reading-lists", "reference_reader"): (
        "reader_study.reference_reader",
        lambda c: c["reader_study"]["reference_reader"],
    ),
    # The workflow draws the reading lists with the split's seed.
    ("reading-lists", "seed"): ("split.seed", lambda c: c["split"]["seed"]),
    ("reading-lists", "image_format"): (
        "reader_study.image_format",
        lambda c: c["reader_study"]["image_format"],
    ),
    ("import-dicom", "series_map"): ("dicom.series_map", lambda c: c["dicom"]["series_map"]),
}
#: Options named like a config key that are not that key, and why.
NOT_THE_CONFIG = {
    (
        "skull-strip",
        "device",
    ): "the workflow's brain extraction has no device key: it runs on the CPU",
    ("register", "threads"): "threads of one registration; train.threads sizes a training job",
    ("predict", "t1"): "the exam's T1, not the atlas template (atlas.t1)",
    (
        "predict",
        "hdbet_mode",
    ): "default: as recorded in the models (a setting of the method, not code)",
    ("import-markups", "reads"): "a file the command writes, not reads",
    (
        "export-dicom",
        "model",
    ): "the fold models the series names, not the dose model (low_dose.model)",
}


@functools.cache
def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _same(cli_default, config_value) -> bool:
    """Equal, with an empty config string meaning what an absent option (None) means."""
    if config_value == "" and cli_default is None:
        return True
    if isinstance(config_value, list):
        return cli_default is not None and list(cli_default) == config_value
    return cli_default == config_value


def test_config_yaml_documents_every_key_with_the_schema_default():
    """The demo scale is the default: config.yaml and the schema hold the same values, key by key."""
    documented = yaml.safe_load((REPO / "config.yaml").read_text())
    defaults = schema_defaults()
    assert dict(leaf_keys(documented)) == dict(leaf_keys(defaults))
    assert documented == defaults == load_config()


def test_load_config_merges_overlays_as_snakemake_does(tmp_path):
    tiny = load_config(REPO / "tests/tiny.yaml")
    assert (
        tiny["model"]["width"] == 4 and tiny["model"]["output"] == "enhancement"
    )  # untouched key kept
    assert tiny["grid"] == {"voxel_mm": 4.0, "crop_shape": [40, 48, 40]}
    paper = load_config(
        REPO / "tests/tiny.yaml", REPO / "config.paper.yaml", {"train": {"seed": 7}}
    )
    assert paper["grid"]["crop_shape"] == [160, 192, 160] and paper["train"]["seed"] == 7
    assert paper["model"]["output"] == "direct" and paper["split"]["folds"] == 5
    # The real-data overlay validates, and nothing in its model or loss reads T1c minus T1 as enhancement
    # (public data's T1 and T1c are often different sequences): docs/real-data.md.
    real = load_config(REPO / "config.real.yaml")
    assert real["low_dose"]["simulate"] and "ADC" not in real["model"]["channels"]
    assert real["model"]["output"] == "residual" and real["train"]["rank_weight"] == 0
    assert real["train"]["enhancement_weight"] == 0
    assert load_config()["model"]["width"] == 8  # nothing leaks between calls
    with pytest.raises(InputError, match=r"config train: Additional properties .*'epoch'"):
        load_config({"train": {"epoch": 3}})
    with pytest.raises(InputError, match=r"config grid.crop_shape: \[40, 48\] is too short"):
        load_config({"grid": {"crop_shape": [40, 48]}})
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(InputError, match="a config file is a mapping"):
        load_config(tmp_path / "list.yaml")


@pytest.mark.parametrize(
    ("option", "counterpart"),
    COUNTERPARTS.items(),
    # Ids without the lambdas' addresses: pytest-xdist's workers must collect the same test names.
    ids=[f"{command}--{dest}" for command, dest in COUNTERPARTS],
)
def test_every_cli_default_with_a_config_counterpart_is_the_schema_default(option, counterpart):
    command, dest = option
    key, value_of = counterpart
    action = next(a for a in _subcommands()[command]._actions if a.dest == dest)
    assert not action.required
    assert _same(action.default, value_of(schema_defaults())), (
        f"virtual-contrast {command} {action.option_strings[0]}: default {action.default!r}, "
        f"config {key}: {value_of(schema_defaults())!r}"
    )


def test_every_option_named_like_a_config_key_is_accounted_for():
    """An option named like a config key either defaults to that key's schema default (above) or says why
    it is another thing; `train` takes all of its defaults from the config (below)."""
    names = {key.rsplit(".", 1)[-1] for key, _ in leaf_keys(schema_defaults())}
    unaccounted = [
        (command, action.dest)
        for command, parser in _subcommands().items()
        for action in parser._actions
        if action.dest in names and not action.required and command != "train"
        if (command, action.dest) not in COUNTERPARTS | NOT_THE_CONFIG
    ]
    assert not unaccounted


def test_train_command_defaults_are_the_workflow_training_options(tmp_path):
    """`virtual-contrast train` trains as the workflow's train rule does unless told otherwise: the schema's
    options, then a --config file's, then the flags'."""
    from virtual_contrast.model.commands import train_values
    from virtual_contrast.model.train import TrainConfig

    required = ["train", "--folds", "f.tsv", "--fold", "0", "--data", "d", "--out", "o"]
    parser = build_parser()
    config = load_config()
    values = train_values(parser.parse_args(required))
    assert values == {**train_options(config), "threads": config["train"]["threads"]}
    TrainConfig.from_dict(values)
    (tmp_path / "train.yaml").write_text("epochs: 7\nwidth: 6\n")
    args = parser.parse_args([*required, "--config", str(tmp_path / "train.yaml"), "--width", "5"])
    defaults = {"epochs": config["train"]["epochs"], "width": config["model"]["width"]}
    assert train_values(args) | defaults == values
    assert (train_values(args)["epochs"], train_values(args)["width"]) == (7, 5)


def test_every_training_key_of_the_config_reaches_training():
    """The train rule passes train_options(config): each key of the config's train section (the job's size
    apart) and the network's keys of model are TrainConfig fields, with the config's values."""
    from virtual_contrast.model.train import TrainConfig

    config = load_config({"train": {"amp": "off", "loss_region": "brain", "augment": False}})
    options = train_options(config)
    assert set(config["train"]) - set(TRAIN_JOB_KEYS) <= set(options)
    cfg = TrainConfig(**options)
    for key, value in options.items():
        assert getattr(cfg, key) == (tuple(value) if isinstance(value, list) else value), key
    assert (cfg.amp, cfg.loss_region, cfg.augment) == ("off", "brain", False)
    assert {"amp", "loss_region", "augment"} <= {f.name for f in dataclasses.fields(TrainConfig)}
