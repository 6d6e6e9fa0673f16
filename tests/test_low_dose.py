"""The simulated low-dose T1c: like an acquisition (noise of the full dose's level, independent of it),
faithful where the truth exists (an embedded-cohort exam's acquired quarter dose), refusing bad input.

The cohort exam is tiny (4 mm, seed 1: nodules and a ring of 12-23 mm); benchmarks/simulate_low_dose.py
measures the same at the demo's 2 mm on 20 patients.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from low_dose_checks import ExamTruth, enhancement_ratios, noise_measures
from scipy import ndimage

from virtual_contrast import cli
from virtual_contrast.atlas import build_atlas
from virtual_contrast.cohort.exam import make_exam
from virtual_contrast.io import InputError, load_image, save_image
from virtual_contrast.preprocess import low_dose, noise
from virtual_contrast.preprocess.enhancement import (
    local_wiener,
    match_intensities,
    scale_enhancement,
    spgr_r1,
    spgr_relative,
)
from virtual_contrast.preprocess.registration import select_backend

SUBJECT = "vc001"  # seed 1 at 4 mm: three lesions of 12-23 mm (test_cohort.py)


@pytest.fixture(scope="module")
def exam(tmp_path_factory) -> dict[str, Path]:
    """One cohort exam with its truth, and its low dose simulated by the command line."""
    folder = tmp_path_factory.mktemp("low_dose")
    paths = {k: folder / f"{k}.nii.gz" for k in ("t1", "low", "ref")}
    make_exam(
        paths,
        folder / "lesions.tsv",
        subject=SUBJECT,
        session="",
        seed=1,
        atlas=build_atlas(4.0)[0],
        native_voxel_mm=4.0,
        truth_dir=folder / "truth",
    )
    out = folder / "sim" / "low_sim.nii.gz"
    argv = ["simulate-low-dose", "--t1", str(paths["t1"]), "--ref", str(paths["ref"])]
    assert cli.main([*argv, "--out", str(out), "--subject", SUBJECT, "--backend", "simpleitk"]) == 0
    return {
        **paths,
        "sim": out,
        "lesions": folder / "lesions.tsv",
        "truth": folder / "truth" / f"sub-{SUBJECT}" / "anat",
    }


def _data(path: Path) -> np.ndarray:
    return np.asanyarray(load_image(path).dataobj, dtype=np.float32)


def test_simulated_low_dose_is_like_the_acquired_one(exam):
    """On the full dose's grid and data type; lesions enhance as on the acquired quarter dose; noise of the
    full dose's level in the air, independent of the full dose's noise."""
    ref_img, sim_img = nib.load(exam["ref"]), nib.load(exam["sim"])
    assert sim_img.shape == ref_img.shape and np.allclose(sim_img.affine, ref_img.affine)
    assert sim_img.get_data_dtype() == ref_img.get_data_dtype() == np.int16
    sim, acquired, ref, pre = (_data(exam[k]) for k in ("sim", "low", "ref", "t1"))
    truth = ExamTruth.load(exam["truth"], exam["lesions"])
    ratios = [row["ratio"] for row in enhancement_ratios(sim, acquired, pre, truth)]
    assert len(ratios) == 3
    assert 0.85 <= np.mean(ratios) <= 1.15 and all(0.7 <= r <= 1.3 for r in ratios), ratios
    measured = noise_measures(sim, ref, pre, truth)
    assert 0.8 <= measured["noise_ratio"] <= 1.2, measured
    assert abs(measured["air_r_ref"]) < 0.2 and abs(measured["air_r_pre"]) < 0.2, measured
    # The acquired quarter dose passes the same checks (they measure what an acquisition is).
    assert abs(noise_measures(acquired, ref, pre, truth)["air_r_ref"]) < 0.2
    record = json.loads(exam["sim"].with_name("low_sim.json").read_text())
    assert record["simulated"] is True and record["image"] == "simulated low-dose T1c"
    assert (record["dose_model"], record["tr_ms"], record["flip_deg"]) == ("spgr", 8.0, 12.0)
    assert record["noise"]["source"] == "air"


def test_plain_subtraction_fails_the_same_checks(exam):
    """ref − 0.75 (ref − pre), from the same alignment: the full dose's own noise (r ≈ 0.35 in the air) at
    too low a level; the checks above would catch a simulator that did this."""
    pre_img, ref_img = load_image(exam["t1"]), load_image(exam["ref"])
    pre, covered, _ = low_dose.align_pre_contrast(pre_img, ref_img, select_backend("simpleitk"))
    ref = _data(exam["ref"])
    match = match_intensities(pre, ref, covered & (ref > 0.2 * ref.max()))
    plain = ref - 0.75 * (ref - match.apply(pre))
    truth = ExamTruth.load(exam["truth"], exam["lesions"])
    measured = noise_measures(plain, ref, _data(exam["t1"]), truth)
    assert measured["air_r_ref"] > 0.2 and measured["noise_ratio"] < 0.8, measured


def test_bad_input_is_refused_naming_the_file(exam, tmp_path):
    """A 4D image, a blank one, a T1 that does not overlap the T1c: one InputError naming the file, nothing
    written; through the command line, exit status 2."""
    ref = load_image(exam["ref"])
    data = np.asanyarray(ref.dataobj)
    bad = {
        "4d": save_image(np.stack([data, data], -1), ref.affine, tmp_path / "4d.nii.gz"),
        "blank": save_image(np.zeros_like(data), ref.affine, tmp_path / "blank.nii.gz"),
    }
    far = ref.affine.copy()
    far[:3, 3] += 1000.0
    bad["far"] = save_image(data, far, tmp_path / "far.nii.gz")
    out = tmp_path / "out.nii.gz"
    for key, message in (("4d", "expected a 3D image"), ("blank", "no signal"), ("far", "overlap")):
        with pytest.raises(InputError, match=message) as info:
            low_dose.simulate_low_dose(bad[key], exam["ref"], out, subject="x")
        assert info.value.path == bad[key]
        assert not out.exists()
    with pytest.raises(InputError, match="no signal") as info:
        low_dose.simulate_low_dose(exam["t1"], bad["blank"], out)
    assert info.value.path == bad["blank"]
    argv = ["simulate-low-dose", "--t1", str(bad["far"]), "--ref", str(exam["ref"])]
    assert cli.main([*argv, "--out", str(out)]) == 2
    assert not out.exists()


# --- the steps, on synthetic images --------------------------------------------------------------------------


def _skull_stripped_pair(seed: int = 0):
    """A skull-stripped head (zero outside a ball): pre, ref (scaled, one enhancing blob), their noise."""
    shape = (40, 40, 40)
    rng = np.random.default_rng(seed)
    grid = np.indices(shape) - 19.5
    radius = np.sqrt((grid**2).sum(0))
    brain = radius < 16
    anatomy = np.where(radius < 8, 600.0, 800.0) * brain
    blob = 400.0 * (np.sqrt(((grid - np.array([11.5, 0, 0])[:, None, None, None]) ** 2).sum(0)) < 3)
    sigma = 10.0
    n_pre, n_ref = (sigma * rng.standard_normal(shape) for _ in range(2))
    pre = np.where(brain, anatomy + n_pre, 0.0)
    ref = np.where(brain, 1.3 * anatomy + blob + 1.3 * n_ref, 0.0)
    return pre, ref, brain, blob, 1.3 * n_ref


def test_skull_stripped_image_keeps_its_background_and_gets_fresh_noise():
    """No air: the noise is measured on the pre/post difference; the zero background stays zero; the brain gets
    noise of the T1c's level that is not the T1c's; the plain subtraction's is."""
    pre, ref, brain, blob, ref_noise = _skull_stripped_pair()
    options = low_dose.LowDoseOptions(dose_fraction=0.25, model="linear", t10_s=1.4, seed=3)
    covered = np.ones(pre.shape, bool)
    sim, record = low_dose.simulate_arrays(
        pre, ref, covered, np.ones(3), options, low_dose.subject_rng(3, "a")
    )
    assert record["noise"]["source"] == "difference" and record["air_voxels"] == 0
    assert abs(record["noise"]["sigma"] / 13.0 - 1) < 0.15
    assert np.all(sim[~brain] == 0) and np.all(sim[brain] > 0)
    radius = np.sqrt(((np.indices(pre.shape) - 19.5) ** 2).sum(0))
    expected = 1.3 * np.where(radius < 8, 600, 800)
    flat = ndimage.binary_dilation(blob > 0, iterations=2) | (np.abs(radius - 8) < 2)
    inner = ndimage.binary_erosion(brain, iterations=3) & ~flat
    residual = (sim - expected)[inner]
    assert 0.8 < residual.std() / 13.0 < 1.2
    assert abs(np.corrcoef(residual, ref_noise[inner])[0, 1]) < 0.2
    plain = ref - 0.75 * (ref - 1.3 * pre)
    assert np.corrcoef((plain - expected)[inner], ref_noise[inner])[0, 1] > 0.2
    # The blob keeps a quarter of its enhancement (linear model).
    core = ndimage.binary_erosion(blob > 0, iterations=1)
    assert abs((sim - expected)[core].mean() / 100.0 - 1) < 0.15


def test_different_sequences_take_the_t1c_contrast(monkeypatch):
    """A T1c whose contrast differs from the T1's at the scale of tissue regions (public data pair different
    sequences): the simulated low dose has the T1c's, which the T1's line alone does not give."""
    pre, _, brain, blob, _ = _skull_stripped_pair()
    grid = np.indices(pre.shape)
    shading = 1.0 + 0.4 * (grid[0] - 19.5) / 16.0  # a contrast that varies across the brain
    rng = np.random.default_rng(5)
    ref = np.where(
        brain, 1.3 * (pre * shading) + blob + 1.3 * 10.0 * rng.standard_normal(pre.shape), 0
    )
    expected = 1.3 * pre * shading + 0.25 * blob
    options = low_dose.LowDoseOptions(dose_fraction=0.25, model="linear", t10_s=1.4, seed=3)
    inner = ndimage.binary_erosion(brain, iterations=4)

    def error() -> tuple[float, dict]:
        sim, record = low_dose.simulate_arrays(
            pre, ref, np.ones(pre.shape, bool), np.ones(3), options, low_dose.subject_rng(3)
        )
        return float(np.abs(ndimage.uniform_filter(sim - expected, 5))[inner].mean()), record

    corrected, record = error()
    assert record["intensity_match"]["contrast_field_weight"] == 1.0
    monkeypatch.setattr(low_dose, "MISMATCH_RANGE", (1e3, 2e3))
    uncorrected, _ = error()
    assert corrected < 30.0 and uncorrected > 3 * corrected, (corrected, uncorrected)


def test_simulation_is_deterministic_given_seed_and_subject():
    pre, ref, *_ = _skull_stripped_pair()
    options = low_dose.LowDoseOptions(dose_fraction=0.25, model="linear", t10_s=1.4, seed=3)
    covered = np.ones(pre.shape, bool)

    def run(seed, subject):
        rng = low_dose.subject_rng(seed, subject)
        return low_dose.simulate_arrays(pre, ref, covered, np.ones(3), options, rng)[0]

    first = run(3, "a")
    assert np.array_equal(first, run(3, "a"))
    assert not np.array_equal(first, run(3, "b")) and not np.array_equal(first, run(4, "a"))


def test_noise_level_and_texture_are_measured_in_the_air_and_reproduced():
    """Pure magnitude noise of a known texture (white noise smoothed along two axes): σ and the neighbours'
    correlation come back from the magnitudes, and fresh noise of the model has that correlation."""
    rng = np.random.default_rng(1)
    shape = (60, 60, 40)
    sigma = 7.0
    width = (0.8, 0.8, 0.0)

    def component():  # stationary: cut from a larger field (the filter's edges are not)
        field = ndimage.gaussian_filter(rng.standard_normal((70, 70, 40)), width)[5:-5, 5:-5]
        return field / field.std()

    magnitude = sigma * np.sqrt(component() ** 2 + component() ** 2)
    model = noise.estimate_from_air(magnitude, np.ones(shape, bool))
    truth = component()
    true_lag1 = [
        np.corrcoef(
            np.take(truth, range(n - 1), a).ravel(), np.take(truth, range(1, n), a).ravel()
        )[0, 1]
        for a, n in enumerate(shape)
    ]
    assert abs(model.sigma / sigma - 1) < 0.05
    assert np.allclose(model.lag1_correlation(), true_lag1, atol=0.06), (
        model.lag1_correlation(),
        true_lag1,
    )
    fresh = noise.textured_noise(shape, model.kernel, np.random.default_rng(2))
    assert abs(fresh.std() - 1) < 0.05
    lag = np.corrcoef(fresh[:-1].ravel(), fresh[1:].ravel())[0, 1]
    assert abs(lag - true_lag1[0]) < 0.06
    # White noise stays white (estimation noise is not turned into texture).
    white = sigma * np.sqrt(rng.standard_normal(shape) ** 2 + rng.standard_normal(shape) ** 2)
    assert np.allclose(noise.estimate_from_air(white, np.ones(shape, bool)).lag1_correlation(), 0)


def test_magnitude_correlation_is_inverted():
    rho = np.array([-0.6, 0.0, 0.2, 0.5, 0.9, 1.0])
    back = noise.gaussian_correlation_from_magnitude(
        np.sign(rho) * noise.magnitude_correlation(rho)
    )
    assert np.allclose(back, rho, atol=1e-3)
    assert abs(noise.magnitude_correlation(0.1) / 0.01 - 0.915) < 0.01


@pytest.mark.parametrize("flip", [12.0, 20.0])
@pytest.mark.parametrize("t10", [0.8, 1.6])
def test_spgr_dose_scaling_keeps_more_than_the_dose_fraction(flip, t10):
    """TR 6.1 ms, flip 12-20°, T10 0.8-1.6 s, d = 0.25: the low/standard enhancement ratio is 0.26-0.29 for
    ΔR1 ≤ 1 s⁻¹ and 0.28-0.39 for 2-4 s⁻¹ (design notes); linear keeps 0.25 exactly."""
    tr_ms = 6.1
    r10 = 1.0 / t10
    s0 = spgr_relative(r10, tr_s=tr_ms / 1000, flip_deg=flip)
    assert np.isclose(spgr_r1(s0, tr_s=tr_ms / 1000, flip_deg=flip), r10)
    for delta_r1, (low, high) in (
        (0.5, (0.255, 0.295)),
        (1.0, (0.255, 0.295)),
        (3.0, (0.28, 0.39)),
    ):
        full = spgr_relative(r10 + delta_r1, tr_s=tr_ms / 1000, flip_deg=flip)
        baseline = np.array([100.0])
        enhancement = baseline * (full / s0 - 1)
        scaled = scale_enhancement(
            baseline, enhancement, 0.25, model="spgr", tr_ms=tr_ms, flip_deg=flip, t10_s=t10
        )
        assert low <= float(scaled[0] / enhancement[0]) <= high, (delta_r1, scaled / enhancement)
        linear = scale_enhancement(baseline, enhancement, 0.25)
        assert np.isclose(linear[0], 0.25 * enhancement[0])


def test_dose_model_auto_reads_the_sidecar(tmp_path):
    image = tmp_path / "t1c.nii.gz"
    options = low_dose.LowDoseOptions(dose_fraction=0.25, model="auto", t10_s=1.4, seed=0)
    assert options.resolved(image).model == "linear"
    with pytest.raises(InputError, match="repetition time and flip angle"):
        low_dose.LowDoseOptions(0.25, "spgr", 1.4, 0).resolved(image)
    (tmp_path / "t1c.json").write_text(json.dumps({"RepetitionTime": 0.0061, "FlipAngle": 15}))
    resolved = options.resolved(image)
    assert (resolved.model, resolved.tr_ms, resolved.flip_deg) == ("spgr", 6.1, 15.0)
    with pytest.raises(InputError, match="dose fraction"):
        low_dose.LowDoseOptions(1.0, "linear", 1.4, 0).resolved(image)


def test_local_wiener_denoises_flat_regions_and_keeps_a_thin_wall():
    """Flat noise falls to a quarter; a 1-voxel wall of 3 noise levels above its surroundings keeps three
    quarters of its height (a Gaussian of σ 0.7 voxel, the same noise reduction, keeps 0.57); the noise is
    measured, not given."""
    rng = np.random.default_rng(0)
    shape = (40, 40, 40)
    region = np.zeros(shape, bool)
    region[2:-2, 2:-2, 2:-2] = True
    wall = np.zeros(shape)
    wall[:, 20, :] = 30.0
    image = wall + rng.normal(0, 10.0, shape)
    out, noise_std = local_wiener(image, region)
    assert 9.0 < noise_std < 11.0
    flat = region.copy()
    flat[:, 17:24, :] = False
    assert out[flat].std() < 0.3 * image[flat].std()
    inner = region[:, 20, :]
    assert out[:, 20, :][inner].mean() > 0.7 * 30.0
    assert np.all(out[~region] == 0)
