"""A model file is data, never configuration of code: what `model.pt` records about pre-processing is compared
with what this installation runs; backends and weights folders come from the user's command line only."""

from __future__ import annotations

import pickle
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from virtual_contrast.cli import main as cli_main
from virtual_contrast.config import schema_defaults
from virtual_contrast.io import InputError
from virtual_contrast.model import predict_exam as pe
from virtual_contrast.model.config import DEFAULT_CHANNELS
from virtual_contrast.preprocess.options import default_options
from virtual_contrast.preprocess.registration import fsl

#: Paths opened while an `opened_under` watch is on (the audit hook stays installed, watching nothing, after).
_WATCH: dict[str, list] = {"roots": [], "opened": []}


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _WATCH["roots"] and isinstance(args[0], str | bytes | Path):
        path = str(args[0] if not isinstance(args[0], bytes) else args[0].decode())
        if any(path.startswith(root) for root in _WATCH["roots"]):
            _WATCH["opened"].append(path)


sys.addaudithook(_audit)


@pytest.fixture
def opened_under():
    """``watch(folder)`` -> the list of files under ``folder`` that anything in this process opens."""

    def watch(folder: Path) -> list:
        _WATCH["roots"].append(str(folder))
        return _WATCH["opened"]

    yield watch
    _WATCH["roots"].clear()
    _WATCH["opened"].clear()


class _Exploit:
    """Unpickled with weights_only=False (as nnU-Net reads HD-BET 2 checkpoints), it writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def hostile_weights(tmp_path) -> tuple[Path, Path]:
    """A complete-looking HD-BET 2 weights folder whose checkpoint runs code when unpickled; and the marker
    file that code would create."""
    folder, marker = tmp_path / "hostile_weights", tmp_path / "code_ran"
    (folder / "fold_all").mkdir(parents=True)
    (folder / "dataset.json").write_text('{"file_ending": ".nii.gz"}')
    (folder / "plans.json").write_text("{}")
    (folder / "fold_all" / "checkpoint_final.pth").write_bytes(pickle.dumps(_Exploit(marker)))
    return folder, marker


@pytest.fixture
def no_fsl(monkeypatch):
    monkeypatch.setattr(fsl, "find_flirt", lambda: (None, "no flirt on PATH (test)"))


def _recorded(**strip):
    options = default_options()
    recorded = replace(options, skull_strip=replace(options.skull_strip, **strip))
    return replace(recorded, register=replace(recorded.register, backend="simpleitk"))


def _tools(**values) -> pe.PreprocessTools:
    return pe.PreprocessTools(
        **{
            "skull_strip_backend": "auto",
            "hdbet2_weights": "",
            "register_backend": "auto",
            **values,
        }
    )


# --- the check ----------------------------------------------------------------------------------------------


def test_a_recorded_backend_and_weights_folder_are_compared_not_followed(no_fsl):
    recorded = _recorded(backend="hdbet2", hdbet2_weights="/their/weights")
    with pytest.raises(InputError) as err:
        pe.exam_options(recorded, _tools(), source=Path("model.pt"))
    message = str(err.value)
    assert "\n" not in message and "model.pt" in message
    assert "trained on volumes pre-processed with brain extraction hdbet2 (HD-BET 2)" in message
    assert "this run would use deepbet (auto: no HD-BET 2 weights configured)" in message
    assert "--skull-strip-backend hdbet2 --hdbet2-weights <your HD-BET 2 weights folder>" in message
    assert "--accept-preprocess-mismatch" in message and "/their/weights" not in message
    # Accepted: the installation's tool runs, and the recorded folder is nowhere in what runs.
    options, check = pe.exam_options(recorded, _tools(accept_mismatch=True))
    assert options.skull_strip.backend == "deepbet" and options.skull_strip.hdbet2_weights == ""
    assert check["accepted"] and check["differences"] == ["brain_extraction"]
    assert check["trained_with"]["brain_extraction"] == "hdbet2 (HD-BET 2)"
    # The user's own HD-BET 2 folder replaces the recorded one.
    options, check = pe.exam_options(
        recorded, _tools(skull_strip_backend="hdbet2", hdbet2_weights="/mine")
    )
    assert options.skull_strip.hdbet2_weights == "/mine" and not check["differences"]
    options, _ = pe.exam_options(recorded, _tools(skull_strip_backend="hdbet2"))
    assert options.skull_strip.hdbet2_weights == ""  # then HD-BET 2's own folder, never the model's


def test_the_recorded_registration_backend_is_compared_with_this_machine(no_fsl, monkeypatch):
    recorded = replace(
        _recorded(backend="deepbet"),
        register=replace(default_options().register, backend="fsl"),
    )
    with pytest.raises(InputError, match=r"registration fsl, but this run would use simpleitk "):
        pe.exam_options(recorded, _tools())
    with pytest.raises(InputError, match="--register-backend fsl"):
        pe.exam_options(recorded, _tools())
    monkeypatch.setattr(fsl, "find_flirt", lambda: ("/opt/fsl/bin/flirt", "flirt found"))
    options, check = pe.exam_options(recorded, _tools())
    assert options.register.backend == "fsl" and not check["differences"]


def test_hdbet_mode_is_taken_as_recorded_and_a_different_one_is_a_mismatch(no_fsl):
    recorded = _recorded(backend="hdbet", hdbet_mode="accurate")
    with pytest.raises(InputError, match="--skull-strip-backend hdbet"):
        pe.exam_options(recorded, _tools())
    options, check = pe.exam_options(recorded, _tools(skull_strip_backend="hdbet"))
    assert (options.skull_strip.backend, options.skull_strip.hdbet_mode) == ("hdbet", "accurate")
    assert check["this_run"]["brain_extraction"] == "hdbet (HD-BET v1, accurate)"
    with pytest.raises(InputError, match=r"hdbet \(HD-BET v1, fast\).*--hdbet-mode accurate"):
        pe.exam_options(recorded, _tools(skull_strip_backend="hdbet", hdbet_mode="fast"))

    # Models of another tool record no HD-BET mode: HD-BET v1 chosen for them runs the schema's default mode.
    recorded = _recorded(backend="deepbet", hdbet_mode="")
    options, check = pe.exam_options(
        recorded, _tools(skull_strip_backend="hdbet", accept_mismatch=True)
    )
    assert options.skull_strip.hdbet_mode == schema_defaults("preprocess", "hdbet_mode")
    assert check["this_run"]["brain_extraction"] == "hdbet (HD-BET v1, ensemble)"


def test_a_recorded_auto_means_what_its_recorded_configuration_resolves_to(no_fsl):
    recorded = replace(_recorded(backend="auto"), register=default_options().register)
    options, check = pe.exam_options(recorded, _tools())
    assert options.skull_strip.backend == "deepbet" and options.register.backend == "simpleitk"
    assert not check["differences"]
    with pytest.raises(InputError, match="hdbet2"):
        pe.exam_options(_recorded(backend="auto", hdbet2_weights="/w"), _tools())


# --- the command, with a crafted but loadable model.pt ----------------------------------------------------------


def _crafted_model(folder: Path, preprocess: dict) -> Path:
    from virtual_contrast.model.checkpoint import model_checkpoint, save_checkpoint
    from virtual_contrast.model.config import TrainConfig
    from virtual_contrast.model.unet import UNet3D

    cfg = TrainConfig(width=2, depth=2)
    ckpt = model_checkpoint(
        UNet3D(cfg.spec), cfg, (8, 8, 8), affine=np.eye(4), epoch=0, train_loss=0.0,
        tune_loss=0.0, train_ids=[], tune_ids=[], preprocess=preprocess,
    )  # fmt: skip
    path = folder / "fold-0" / "model.pt"
    path.parent.mkdir(parents=True)
    save_checkpoint(ckpt, path)
    return path


def _raw_exam_args(tmp_path: Path) -> list[str]:
    args = []
    for key in pe.raw_exam_files(list(DEFAULT_CHANNELS)):
        (tmp_path / key).write_text("not read before the tools are checked")
        args += [f"--{key}", str(tmp_path / key)]
    return args


def test_predict_never_loads_from_a_weights_folder_named_in_model_pt(
    tmp_path, hostile_weights, opened_under, monkeypatch, capsys, no_fsl
):
    """The issue's case: a model.pt (it loads with weights_only=True) naming HD-BET 2 and a folder of
    weights that run code when nnU-Net unpickles them, with HD-BET 2 installed. predict stops with one line
    before any work; with the override it pre-processes with this installation's tools. Nothing under the
    folder is ever opened."""
    from virtual_contrast.model.checkpoint import load_checkpoint
    from virtual_contrast.preprocess import exam, hdbet2

    folder, marker = hostile_weights
    monkeypatch.setattr(
        hdbet2, "hdbet2_import_error", lambda: None
    )  # as if HD-BET 2 were installed
    preprocess = default_options().to_dict()
    preprocess["skull_strip"].update(backend="hdbet2", hdbet2_weights=str(folder))
    model = _crafted_model(tmp_path / "models", preprocess)
    assert load_checkpoint(model)["preprocess"]["skull_strip"]["hdbet2_weights"] == str(folder)
    opened = opened_under(folder)
    out = tmp_path / "out"
    command = ["predict", "--models", str(tmp_path / "models"), "--out", str(out)]
    command += _raw_exam_args(tmp_path)

    assert cli_main(command) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.count("\n") == 0
        and "hdbet2 (HD-BET 2)" in err
        and "--accept-preprocess-mismatch" in err
    )
    assert not out.exists()

    handed = {}

    def stop(**kwargs):  # what predict hands to the pre-processing, then stop there
        handed.update(kwargs)
        raise InputError("stopped by the test")

    monkeypatch.setattr(exam, "preprocess_exam", stop)
    assert cli_main([*command, "--accept-preprocess-mismatch"]) == 2
    assert "stopped by the test" in capsys.readouterr().err
    strip = handed["options"].skull_strip
    assert (strip.backend, strip.hdbet2_weights) == ("deepbet", "")
    assert handed["tools_check"]["accepted"] is True
    assert not opened and not marker.exists()


@pytest.mark.slow
def test_accepted_mismatch_runs_this_installations_tools_and_says_so(
    tiny_run, tmp_path, hostile_weights, opened_under, monkeypatch, capsys
):
    """The tiny run's models, their record altered to name HD-BET 2 and the hostile folder: with the
    override the whole raw-exam prediction runs with deepbet, and the exam's provenance says which tools ran
    and that they differ from the models'."""
    import json
    import shutil

    import torch
    from workflow_helpers import tiny_study

    from virtual_contrast.preprocess import hdbet2

    folder, marker = hostile_weights
    monkeypatch.setattr(hdbet2, "hdbet2_import_error", lambda: None)
    models = tmp_path / "models"
    for path in sorted((tiny_run / "results" / "models").rglob("model.pt")):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        ckpt["preprocess"]["skull_strip"].update(backend="hdbet2", hdbet2_weights=str(folder))
        (models / path.parent.name).mkdir(parents=True)
        torch.save(ckpt, models / path.parent.name / "model.pt")
    study = tiny_study()
    subject = study.test_subjects[0]
    raw = study.raw_inputs(subject)
    command = ["predict", "--models", str(models), "--device", "cpu", "--subject", "p03"]
    for key in pe.raw_exam_files(list(DEFAULT_CHANNELS)):
        command += [
            f"--{key}",
            str(shutil.copy(tiny_run / raw[key], tmp_path / Path(raw[key]).name)),
        ]
    opened = opened_under(folder)
    out = tmp_path / "out"
    assert cli_main([*command, "--out", str(out), "--accept-preprocess-mismatch"]) == 0
    capsys.readouterr()
    work = out / "sub-p03_work"
    provenance = json.loads((work / "sub-p03_provenance.json").read_text())
    assert provenance["skull_strip"]["backend"] == "deepbet"
    assert provenance["options"]["skull_strip"]["hdbet2_weights"] == ""
    check = provenance["tools_check"]
    assert check["accepted"] and check["trained_with"]["brain_extraction"] == "hdbet2 (HD-BET 2)"
    assert check["this_run"]["brain_extraction"] == "deepbet"
    assert (out / "sub-p03_space-native_desc-virtual_T1c.nii.gz").exists()
    assert not opened and not marker.exists()
