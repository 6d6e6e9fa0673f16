"""Training one fold: fitting, outputs, caching, batches, deterministic resume after a kill."""

from __future__ import annotations

import dataclasses
import logging

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from toy_subjects import make_toy_subjects

from virtual_contrast.cli import main as cli_main
from virtual_contrast.config import schema_defaults
from virtual_contrast.io import InputError, save_image
from virtual_contrast.model import runtime
from virtual_contrast.model.checkpoint import load_checkpoint, load_model
from virtual_contrast.model.config import TrainConfig
from virtual_contrast.model.data import (
    SubjectVolumes,
    VolumeStore,
    cache_subject,
    epoch_plan,
    find_subject_volumes,
    flip_batch,
)
from virtual_contrast.model.ranking import enhancement_rank_loss
from virtual_contrast.model.train import loss_fn, loss_weights, train_fold, train_step
from virtual_contrast.model.train_log import LOG_COLUMNS
from virtual_contrast.model.unet import UNet3D

TINY = TrainConfig(
    width=4, depth=2, epochs=4, batch_size=2, checkpoint_every=2, threads=1, progress=False, seed=3
)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    return make_toy_subjects(folder, 6, (16, 16, 16), seed=1)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _log(folder):
    return pd.read_csv(folder / "train_log.tsv", sep="\t")


def test_tiny_model_fits_a_toy_mapping(toy, tmp_path):
    # 40 epochs × 4 steps; lr 2e-3 (not the paper's 1e-3) to fit in a few seconds.
    cfg = dataclasses.replace(
        TINY, width=8, depth=3, epochs=40, batch_size=1, learning_rate=2e-3, checkpoint_every=20
    )
    model_path = train_fold(toy[:4], toy[4:], tmp_path, cfg)
    log = _log(tmp_path)
    assert log["train_loss"].iloc[-1] < log["train_loss"].iloc[0] / 3  # measured 5-8× on 3 seeds
    ckpt = load_checkpoint(model_path)
    assert ckpt["tune_loss"] < log["tune_loss"].iloc[0] / 3
    assert ckpt["tune_loss"] == pytest.approx(log["tune_loss"].min())
    assert ckpt["epoch"] == int(log.loc[log["tune_loss"].idxmin(), "epoch"])


def test_outputs_are_self_describing(toy, tmp_path):
    model_path = train_fold(toy[:3], toy[3:5], tmp_path, TINY)
    assert model_path == tmp_path / "model.pt"
    for name in ("last.pt", "train_log.tsv", "loss_curve.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = _log(tmp_path)
    assert list(log.columns) == LOG_COLUMNS
    assert list(log["epoch"]) == [1, 2, 3, 4]
    assert (log["lr"] == TINY.learning_rate).all()
    ckpt = load_checkpoint(model_path)
    assert ckpt["channels"] == ["ADC", "FLAIR", "T1w", "lowT1c"]
    assert ckpt["grid"] == [16, 16, 16]
    assert ckpt["spec"]["width"] == 4 and ckpt["spec"]["depth"] == 2
    assert ckpt["train_subjects"] == ["toy00", "toy01", "toy02"]
    assert ckpt["tune_subjects"] == ["toy03", "toy04"]
    assert ckpt["config"]["epochs"] == 4
    # The saved weights are the selected epoch's: their tuning loss is the logged one.
    model, _ = load_model(model_path)
    losses = []
    cpu = torch.device("cpu")
    with torch.no_grad(), runtime.autocast(cpu, runtime.resolve_amp(TINY.amp, cpu)):
        for sv in toy[3:5]:
            arr = torch.from_numpy(np.load(cache_subject(sv, tmp_path / "cache", TINY.channels)))
            x, y = arr[None, :4].float(), arr[None, 4:5]
            losses.append(float(loss_fn(model(x), y, None)))
    assert np.mean(losses) == pytest.approx(ckpt["tune_loss"], rel=1e-5)


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_killed_and_resumed_run_equals_an_uninterrupted_run(toy, tmp_path):
    cfg = dataclasses.replace(TINY, epochs=5, checkpoint_every=2)
    full = tmp_path / "full"
    train_fold(toy[:3], toy[3:5], full, cfg, cache_dir=tmp_path / "cache")

    class Killed(Exception):
        pass

    def kill_after_3(epoch, row):
        if epoch == 3:  # one epoch after the checkpoint of epoch 2: that epoch is lost and redone
            raise Killed

    cut = tmp_path / "cut"
    with pytest.raises(Killed):
        train_fold(
            toy[:3], toy[3:5], cut, cfg, cache_dir=tmp_path / "cache", on_epoch_end=kill_after_3
        )
    assert torch.load(cut / "last.pt", weights_only=True)["epoch"] == 2
    torch.manual_seed(12345)  # a different global RNG state must not matter
    np.random.seed(7)
    train_fold(toy[:3], toy[3:5], cut, cfg, cache_dir=tmp_path / "cache")

    for name in ("last.pt", "model.pt"):
        a, b = _weights(full / name), _weights(cut / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    la, lb = _log(full), _log(cut)
    pd.testing.assert_frame_equal(la.drop(columns="seconds"), lb.drop(columns="seconds"))
    assert load_checkpoint(full / "model.pt")["epoch"] == load_checkpoint(cut / "model.pt")["epoch"]


def test_run_in_slices_equals_one_run_and_finished_run_is_not_redone(toy, tmp_path, caplog):
    cfg = dataclasses.replace(TINY, epochs=4, checkpoint_every=3)
    train_fold(toy[:3], toy[3:5], tmp_path / "one", cfg, cache_dir=tmp_path / "cache")
    sliced = tmp_path / "sliced"
    for _ in range(2):
        train_fold(
            toy[:3], toy[3:5], sliced, cfg, cache_dir=tmp_path / "cache", max_epochs_this_run=2
        )
    a, b = _weights(tmp_path / "one" / "last.pt"), _weights(sliced / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Snakemake deletes a job's outputs before rerunning it: the rerun restores them without training.
    selected = _weights(sliced / "model.pt")
    for name in ("model.pt", "train_log.tsv", "loss_curve.png"):
        (sliced / name).unlink()
    with caplog.at_level(logging.INFO):
        train_fold(toy[:3], toy[3:5], sliced, cfg, cache_dir=tmp_path / "cache")
    assert "already complete" in caplog.text
    restored = _weights(sliced / "model.pt")
    assert all(torch.equal(selected[k], restored[k]) for k in selected)
    assert len(_log(sliced)) == 4 and (sliced / "loss_curve.png").exists()


def test_without_tuning_subjects_the_last_epoch_is_kept(toy, tmp_path):
    cfg = dataclasses.replace(TINY, epochs=2)
    model_path = train_fold(toy[:3], [], tmp_path, cfg)
    ckpt = load_checkpoint(model_path)
    assert ckpt["epoch"] == 2 and np.isnan(ckpt["tune_loss"])
    last = _weights(tmp_path / "last.pt")
    assert all(torch.equal(last[k], ckpt["state_dict"][k]) for k in last)
    assert _log(tmp_path)["tune_loss"].isna().all()


def test_checkpoint_of_another_configuration_is_not_resumed(toy, tmp_path, caplog):
    cfg = dataclasses.replace(TINY, epochs=2)
    other = dataclasses.replace(cfg, learning_rate=0.01)
    train_fold(toy[:3], toy[3:5], tmp_path / "a", other, cache_dir=tmp_path / "cache")
    train_fold(toy[:3], toy[3:5], tmp_path / "b", cfg, cache_dir=tmp_path / "cache")
    # Rerun cfg in the folder of the other configuration: starts afresh and ends like a fresh run.
    with caplog.at_level(logging.WARNING):
        train_fold(toy[:3], toy[3:5], tmp_path / "a", cfg, cache_dir=tmp_path / "cache")
    assert "starting from scratch" in caplog.text
    a, b = _weights(tmp_path / "a" / "model.pt"), _weights(tmp_path / "b" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_rejects_leaks_and_bad_grids(toy, tmp_path):
    with pytest.raises(InputError, match="both training and tuning"):
        train_fold(toy[:3], toy[2:4], tmp_path, TINY)
    with pytest.raises(InputError, match="no training subjects"):
        train_fold([], toy[2:4], tmp_path, TINY)
    with pytest.raises(InputError, match="depth-6 UNet cannot process a 16×16×16 grid"):
        train_fold(toy[:3], toy[3:4], tmp_path, dataclasses.replace(TINY, depth=6))


def test_channel_on_another_grid_is_named(toy, tmp_path):
    bad = tmp_path / "bad_flair.nii.gz"
    save_image(np.zeros((16, 16, 12), np.float32), np.eye(4), bad)
    sv = dataclasses.replace(toy[0], channels={**toy[0].channels, "FLAIR": bad})
    with pytest.raises(InputError, match=r"subject 'toy00'.*bad_flair.*grid \(16, 16, 12\)"):
        cache_subject(sv, tmp_path / "cache", TINY.channels)


def test_residual_output_trains_and_round_trips(toy, tmp_path):
    cfg = dataclasses.replace(TINY, epochs=3, output="residual", channels=("T1w", "lowT1c"))
    assert cfg.spec.residual_channel == 1
    model_path = train_fold(toy[:3], toy[3:5], tmp_path, cfg)
    model, ckpt = load_model(model_path)
    assert ckpt["spec"]["output"] == "residual" and model.spec.residual_channel == 1
    log = _log(tmp_path)
    assert log["train_loss"].iloc[-1] < log["train_loss"].iloc[0]
    with pytest.raises(InputError, match="needs the low-dose T1c"):
        dataclasses.replace(cfg, channels=("T1w", "FLAIR"))


def test_enhancement_output_trains_and_round_trips(toy, tmp_path):
    cfg = dataclasses.replace(TINY, epochs=3, output="enhancement", channels=("T1w", "lowT1c"))
    assert (cfg.spec.residual_channel, cfg.spec.precontrast_channel) == (1, 0)
    model_path = train_fold(toy[:3], toy[3:5], tmp_path, cfg)
    model, ckpt = load_model(model_path)
    assert ckpt["spec"]["output"] == "enhancement" and model.spec.precontrast_channel == 0
    assert model.head.out_channels == 2
    log = _log(tmp_path)
    assert log["train_loss"].iloc[-1] < log["train_loss"].iloc[0]
    with pytest.raises(InputError, match="needs the pre-contrast T1w"):
        dataclasses.replace(cfg, channels=("FLAIR", "lowT1c"))


def test_config_validation():
    assert TrainConfig.from_dict({"epochs": 3, "channels": ["T1w", "lowT1c"]}).spec.in_channels == 2
    with pytest.raises(InputError, match="unknown training option"):
        TrainConfig.from_dict({"epoch": 3})
    with pytest.raises(InputError, match="invalid model channels"):
        TrainConfig(channels=("T1w", "PDw"))
    with pytest.raises(InputError, match="invalid model channels"):
        TrainConfig(channels=("T1w", "refT1c"))  # the target is never an input
    with pytest.raises(InputError, match="batch_size must be >= 1"):
        TrainConfig(batch_size=0)


def test_cache_is_reused_and_refreshed(toy, tmp_path):
    first = cache_subject(toy[0], tmp_path, TINY.channels)
    assert cache_subject(toy[0], tmp_path, TINY.channels) == first
    arr = np.load(first)
    assert arr.shape == (6, 16, 16, 16) and arr.dtype == np.float16
    assert set(np.unique(arr[5])) <= {0.0, 1.0}  # mask channel
    # Another channel order is another cache file.
    assert cache_subject(toy[0], tmp_path, ("lowT1c", "T1w")) != first
    # A rewritten input is a new cache file.
    data = np.asarray(np.load(first)[0], np.float32) * 0.5
    path = tmp_path / "adc.nii.gz"
    save_image(data, np.eye(4), path)
    sv = dataclasses.replace(toy[0], channels={**toy[0].channels, "ADC": path})
    changed = cache_subject(sv, tmp_path, TINY.channels)
    assert changed != first
    np.testing.assert_allclose(np.load(changed)[0], data, atol=1e-3)


def test_streamed_batches_equal_resident_batches(toy, tmp_path):
    paths = [cache_subject(sv, tmp_path, TINY.channels) for sv in toy[:5]]
    order, flips = epoch_plan(5, seed=0, epoch=3, augment=True)
    dev = torch.device("cpu")
    resident = list(VolumeStore(paths, dev, resident=True).batches(2, order, flips))
    streamed = list(VolumeStore(paths, dev, resident=False).batches(2, order, flips))
    assert [b.shape[0] for b in resident] == [2, 2, 1]
    for a, b in zip(resident, streamed, strict=True):
        assert torch.equal(a, b)
    # An abandoned stream does not hang.
    it = VolumeStore(paths, dev, resident=False).batches(1, order)
    next(it)
    it.close()


def test_epoch_plan_is_a_function_of_seed_and_epoch():
    o1, f1 = epoch_plan(10, seed=1, epoch=4, augment=True)
    o2, f2 = epoch_plan(10, seed=1, epoch=4, augment=True)
    assert torch.equal(o1, o2) and torch.equal(f1, f2)
    assert sorted(o1.tolist()) == list(range(10))
    o3, _ = epoch_plan(10, seed=1, epoch=5, augment=True)
    assert not torch.equal(o1, o3)
    _, none = epoch_plan(10, seed=1, epoch=4, augment=False)
    assert none is None
    # Over many samples each axis flips about half of the time.
    _, flips = epoch_plan(4000, seed=0, epoch=0, augment=True)
    assert np.allclose(flips.float().mean(0).numpy(), 0.5, atol=0.03)


def test_flip_batch_mirrors_each_sample_on_its_axes():
    x = torch.arange(2 * 2 * 2 * 3 * 4, dtype=torch.float32).reshape(2, 2, 2, 3, 4)
    flips = torch.tensor([[True, False, True], [False, False, False]])
    y = flip_batch(x, flips)
    assert torch.equal(y[0], torch.flip(x[0], [1, 3]))
    assert torch.equal(y[1], x[1])


def test_train_config_from_the_workflow_config():
    """The train rule's options: the config's model and train sections but the job's cluster resources."""
    config = schema_defaults()
    config["model"]["width"], config["train"]["epochs"] = 8, 7
    cfg = TrainConfig.from_config(config, threads=1)
    options = {**config["model"], **config["train"], "threads": 1}
    for resource in ("mem_mb", "runtime_min"):
        del options[resource]
    assert {key: cfg.to_dict()[key] for key in options} == options
    assert (cfg.width, cfg.epochs) == (8, 7)
    config["train"]["epoch"] = 3  # not a training option: refused, not ignored
    with pytest.raises(InputError, match=r"unknown training option\(s\) \['epoch'\]"):
        TrainConfig.from_config(config)


def test_brain_loss_ignores_background():
    pred = torch.tensor([0.5, 0.5, 0.9])
    target = torch.tensor([0.5, 0.0, 0.0])
    mask = torch.tensor([1.0, 0.0, 0.0])
    assert float(loss_fn(pred, target, mask)) == 0.0
    assert float(loss_fn(pred, target, None)) == pytest.approx((0.25 + 0.81) / 3)


def test_enhancement_weight_weighs_each_voxel_by_its_enhancement():
    """weight = 1 + w * max(target - pre, 0); the loss is the weighted mean, plain L2 when w = 0."""
    pre = torch.tensor([0.5, 0.5, 0.5, 0.0]).reshape(1, 1, 4)
    x = torch.cat([torch.zeros_like(pre), pre], dim=1)  # channels (FLAIR, T1w): T1w is channel 1
    target = torch.tensor([0.5, 0.9, 0.3, 0.0]).reshape(1, 1, 4)
    assert loss_weights(x, target, 1, 0.0) is None
    weight = loss_weights(x, target, 1, 10.0)
    assert weight.flatten().tolist() == pytest.approx([1.0, 5.0, 1.0, 1.0])
    pred = target + torch.tensor([0.1, 0.1, 0.1, 0.1]).reshape(1, 1, 4)
    assert float(loss_fn(pred, target, None, weight)) == pytest.approx(0.01)
    pred = target + torch.tensor([0.0, 0.2, 0.0, 0.0]).reshape(1, 1, 4)
    assert float(loss_fn(pred, target, None, weight)) == pytest.approx(5 * 0.04 / 8)
    assert float(loss_fn(pred, target, None)) == pytest.approx(0.04 / 4)
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0]).reshape(1, 1, 4)
    assert float(loss_fn(pred, target, mask, weight)) == pytest.approx(5 * 0.04 / 6)


def test_enhancement_weighted_training_runs_and_needs_the_pre_contrast_t1(toy, tmp_path):
    cfg = dataclasses.replace(
        TINY, epochs=2, output="enhancement", channels=("T1w", "lowT1c"), enhancement_weight=10.0
    )
    model_path = train_fold(toy[:3], toy[3:5], tmp_path, cfg)
    assert load_checkpoint(model_path)["config"]["enhancement_weight"] == 10.0
    with pytest.raises(InputError, match="needs the T1w channel"):
        dataclasses.replace(cfg, output="direct", channels=("FLAIR", "lowT1c"))
    with pytest.raises(InputError, match="enhancement_weight must be >= 0"):
        dataclasses.replace(cfg, enhancement_weight=-1.0)


def test_rank_weight_adds_the_ranking_loss_to_each_step():
    """The step's loss is the L2 plus rank_weight x the ranking loss of the step's own prediction."""
    cfg = dataclasses.replace(
        TINY, output="enhancement", channels=("T1w", "lowT1c"), rank_weight=2.0
    )
    gen = torch.Generator().manual_seed(0)
    pre = torch.rand((1, 1, 8, 8, 8), generator=gen) * 0.5
    low = pre + 0.1 * (torch.rand((1, 1, 8, 8, 8), generator=gen) > 0.9)
    target = pre + 4 * (low - pre)
    mask = torch.ones_like(pre)
    batch = torch.cat([pre, low, target, mask], dim=1)
    torch.manual_seed(0)
    model = UNet3D(cfg.spec)
    with torch.no_grad():  # a head that is not zero, so the prediction is not the low-dose input
        model.head.weight.normal_(0.0, 0.1)
    pred = model(batch[:, :2]).detach()
    expected_l2 = float(loss_fn(pred, target, None))
    expected_rank = float(enhancement_rank_loss(pred, target, pre, mask))
    assert expected_rank > 0
    kw = dict(n_inputs=2, amp_dtype=None, brain_loss=False, channels_last=False, pre_channel=0)
    for weight in (0.0, 2.0):
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        loss = train_step(model, opt, None, batch, rank_weight=weight, **kw)
        assert float(loss) == pytest.approx(expected_l2 + weight * expected_rank, rel=1e-5)


def test_rank_weighted_training_runs_and_needs_the_pre_contrast_t1(toy, tmp_path):
    cfg = dataclasses.replace(
        TINY, epochs=2, output="enhancement", channels=("T1w", "lowT1c"), rank_weight=1.0
    )
    model_path = train_fold(toy[:3], toy[3:5], tmp_path, cfg)
    assert load_checkpoint(model_path)["config"]["rank_weight"] == 1.0
    assert np.isfinite(_log(tmp_path)["train_loss"]).all()
    with pytest.raises(InputError, match="rank_weight > 0 ranks the enhancement"):
        dataclasses.replace(cfg, channels=("FLAIR", "lowT1c"))
    with pytest.raises(InputError, match="rank_weight must be >= 0"):
        dataclasses.replace(cfg, rank_weight=-1.0)


def test_find_subject_volumes(toy):
    folder = toy[0].target.parent
    sv = find_subject_volumes(folder, "toy02", ("T1w", "lowT1c"), target=True)
    assert sv.channels["T1w"].name == "sub-toy02_desc-norm_T1w.nii.gz"
    assert sv.target.name == "sub-toy02_desc-norm_refT1c.nii.gz"
    assert sv.mask.name == "sub-toy02_desc-brain_mask.nii.gz"
    with pytest.raises(InputError, match="sub-nope_desc-norm_T1w.nii.gz not found"):
        find_subject_volumes(folder, "nope", ("T1w",))


def test_find_subject_volumes_prefers_the_mask_beside_the_channels(toy, tmp_path):
    # The workflow keeps sub-X_desc-brain_mask.nii.gz in both crop/ and normalize/.
    sv = toy[0]
    for sub in ("crop", "normalize"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / sv.mask.name).write_bytes(sv.mask.read_bytes())
    (tmp_path / "normalize" / sv.channels["T1w"].name).write_bytes(sv.channels["T1w"].read_bytes())
    found = find_subject_volumes(tmp_path, sv.subject, ("T1w",), target=False)
    assert found.mask == tmp_path / "normalize" / sv.mask.name
    (tmp_path / "crop" / sv.channels["T1w"].name).write_bytes(sv.channels["T1w"].read_bytes())
    with pytest.raises(InputError, match="found 2 times"):
        find_subject_volumes(tmp_path, sv.subject, ("T1w",), target=False)


def test_train_command(toy, tmp_path):
    folds = tmp_path / "folds.tsv"
    pd.DataFrame({"subject": [s.subject for s in toy[:4]], "fold": [0, 0, 1, 1]}).to_csv(
        folds, sep="\t", index=False
    )
    data = toy[0].target.parent
    rc = cli_main(
        ["train", "--folds", str(folds), "--fold", "1", "--data", str(data), "--out", str(tmp_path / "f1"),
         "--epochs", "1", "--width", "2", "--depth", "2", "--threads", "1", "--channels", "T1w,lowT1c"]
    )  # fmt: skip
    assert rc == 0
    ckpt = load_checkpoint(tmp_path / "f1" / "model.pt")
    assert ckpt["train_subjects"] == ["toy00", "toy01"]
    assert ckpt["tune_subjects"] == ["toy02", "toy03"]
    assert ckpt["channels"] == ["T1w", "lowT1c"]
    assert cli_main(["train", "--folds", str(folds), "--fold", "7", "--data", str(data),
                     "--out", str(tmp_path / "f7")]) == 2  # fmt: skip


def test_subject_volumes_is_hashable_record(toy):
    assert isinstance(toy[0], SubjectVolumes)
    assert toy[0].subject == "toy00"


def test_mixed_precision_choice_on_the_cpu(monkeypatch):
    cpu = torch.device("cpu")
    assert runtime.resolve_amp("off", cpu) is None and runtime.resolve_amp(False, cpu) is None
    assert runtime.resolve_amp("bf16", cpu) == torch.bfloat16
    with pytest.raises(InputError, match="fp16 mixed precision needs a CUDA GPU"):
        runtime.resolve_amp("fp16", cpu)
    # auto: bf16 only where the processor computes it natively (5x faster there, slower elsewhere).
    for native, expected in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda native=native: native)
        assert runtime.resolve_amp("auto", cpu) == expected
        assert runtime.resolve_amp(True, cpu) == expected


def _saturation(model_path, subject) -> float:
    """Fraction of the brain where the model's sigmoid output is saturated, on one toy subject."""
    from virtual_contrast.model.schedule import saturated_fraction
    from virtual_contrast.model.unet import OUTPUT_CEILING

    model, ckpt = load_model(model_path)
    channels = [
        np.asanyarray(nib.load(subject.channels[c]).dataobj, np.float32) for c in ckpt["channels"]
    ]
    mask = np.asanyarray(nib.load(subject.mask).dataobj) > 0
    with torch.no_grad():
        pred = model(torch.from_numpy(np.stack(channels))[None])
    return saturated_fraction(pred[0, 0], torch.from_numpy(mask), OUTPUT_CEILING)


def test_divergence_guard_prevents_the_saturated_sigmoid_collapse(toy, tmp_path):
    """An absurd learning rate throws the direct (sigmoid) network into saturation, where its gradient
    vanishes and the loss stays at a constant image's for good; the guard undoes such epochs and halves the
    learning rate, and the run ends fitted. Gradient clipping alone does not prevent it (Adam's step does not
    scale with the gradient's norm). (At 0.3, since the sigmoid reaches 4 instead of 1, the guard no longer
    recovers: the weights it remembers after the epoch of the best average loss were already thrown by that
    epoch's last steps, and it stops with an error after 10 halvings; 0.1 shows the same collapse.)"""
    cfg = dataclasses.replace(
        TINY, epochs=12, batch_size=1, learning_rate=0.1, output="direct", checkpoint_every=12
    )
    unguarded = dataclasses.replace(cfg, divergence_guard=0.0)
    train_fold(toy[:4], toy[4:], tmp_path / "unguarded", unguarded)
    log = _log(tmp_path / "unguarded")
    assert log["train_loss"].iloc[-1] > 0.5  # the output is at one end of the sigmoid everywhere
    assert log["train_loss"].iloc[-3:].std() < 1e-4  # stuck
    assert _saturation(tmp_path / "unguarded" / "model.pt", toy[0]) > 0.9

    guarded = train_fold(toy[:4], toy[4:], tmp_path / "guarded", cfg)
    log = _log(tmp_path / "guarded")
    assert log["train_loss"].iloc[-1] < 0.04  # measured 0.02-0.03; a constant image scores >= 0.047
    assert log["lr"].iloc[-1] < 0.1 / 8  # at least three halvings
    assert _saturation(guarded, toy[0]) < 0.2
    resume = torch.load(tmp_path / "guarded" / "last.pt", weights_only=True)
    assert len(resume["guard"]["rollbacks"]) >= 3


def test_learning_rate_schedules():
    from virtual_contrast.model.schedule import learning_rate_at

    assert learning_rate_at(1e-3, "constant", 99, 100) == 1e-3
    assert learning_rate_at(1e-3, "poly", 0, 100) == 1e-3
    assert learning_rate_at(1e-3, "poly", 50, 100) == pytest.approx(1e-3 * 0.5**0.9)
    assert learning_rate_at(1e-3, "poly", 99, 100) < 2e-5
    with pytest.raises(InputError, match="lr_schedule"):
        TrainConfig(lr_schedule="cosine")
    with pytest.raises(InputError, match="divergence_guard"):
        TrainConfig(divergence_guard=-1)
