"""The registration quality gate: affine figures, the verdict, and a rejection that names the subject."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from virtual_contrast.preprocess import quality
from virtual_contrast.preprocess.options import GateOptions, default_options

GATE = GateOptions(
    scale_range=(0.67, 1.5), min_correlation=0.2, min_brain_dice=0.9, min_brain_coverage=0.9
)


def _affine(linear: np.ndarray) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = linear
    out[:3, 3] = [3.0, -2.0, 5.0]
    return out


def test_scales_shears_and_determinant_of_a_rotation_times_scaling():
    rot = Rotation.from_euler("xyz", (20, -10, 35), degrees=True).as_matrix()
    figures = quality.affine_figures(_affine(rot @ np.diag([1.1, 0.9, 0.8])))
    np.testing.assert_allclose(figures["scales"], [1.1, 0.9, 0.8], atol=1e-4)
    np.testing.assert_allclose(figures["shears"], [0, 0, 0], atol=1e-4)
    assert figures["determinant"] == pytest.approx(1.1 * 0.9 * 0.8, abs=1e-4)
    sheared = quality.affine_figures(_affine(np.array([[1, 0.3, 0], [0, 1, 0], [0, 0, 1.0]])))
    assert sheared["shears"][0] == pytest.approx(0.3, abs=1e-4)


def test_a_determinant_of_027_is_rejected_naming_the_subject_and_the_figure():
    """The fit a skull-stripped BraTS case once received: singular values 0.91 / 0.59 / 0.51."""
    rot = Rotation.from_euler("xyz", (5, 8, -3), degrees=True).as_matrix()
    transform = _affine(rot @ np.diag([0.91, 0.59, 0.51]))
    figures = quality.affine_figures(transform)
    assert figures["determinant"] == pytest.approx(0.27, abs=0.005)
    figures.update(correlation=0.55, brain_dice=0.95)  # everything else looks fine
    verdict = quality.gate_verdict(figures, GATE)
    assert not verdict["passed"] and len(verdict["failures"]) == 2
    with pytest.raises(quality.RegistrationRejectedError) as err:
        quality.reject(verdict, subject="BraTS00110", figure="qc/reg.png")
    message = str(err.value)
    assert "subject 'BraTS00110'" in message
    assert "scale 0.59" in message and "scale 0.51" in message and "[0.67, 1.5]" in message
    assert "look at qc/reg.png" in message and "\n" not in message


def test_correlation_and_dice_limits():
    figures = {"scales": [1.0, 1.0, 1.0], "correlation": 0.1, "brain_dice": 0.5}
    failures = quality.gate_failures(figures, GATE)
    assert any("correlation with the template 0.10 is below 0.2" in f for f in failures)
    assert any("Dice with the atlas brain mask 0.50 is below 0.9" in f for f in failures)
    figures["correlation"] = float("nan")
    assert any("correlation" in f for f in quality.gate_failures(figures, GATE))
    assert (
        quality.gate_failures(
            {"scales": [1.2, 1, 0.8], "correlation": 0.5, "brain_dice": 0.9}, GATE
        )
        == []
    )
    # A cohort head registered 36 degrees off (2.5 mm): its correlation is that of a right real head, only
    # its brain Dice tells (it passed the earlier minimum of 0.8).
    off = {"scales": [1.29, 1.172, 0.999], "correlation": 0.4423, "brain_dice": 0.874}
    failures = quality.gate_failures(off, GATE)
    assert len(failures) == 1 and "Dice with the atlas brain mask 0.87 is below 0.9" in failures[0]


def test_correlation_is_over_the_atlas_brain_with_the_subject_masked():
    rng = np.random.default_rng(0)
    template = rng.random((10, 10, 10))
    brain = np.zeros((10, 10, 10), bool)
    brain[2:8, 2:8, 2:8] = True
    assert quality.brain_correlation(template * 3 + 1, brain, template, brain) == pytest.approx(1.0)
    half = brain.copy()
    half[:5] = False  # the subject's brain covers half of the atlas brain: the rest counts as 0
    assert quality.brain_correlation(template, half, template, brain) < 0.9


def test_the_default_gate_comes_from_the_config_schema():
    assert default_options().register.gate == GATE


def test_the_study_tables_read_the_figures_and_the_rejections(tmp_path):
    import json

    figures = {**quality.affine_figures(np.eye(4)), "correlation": 0.5, "brain_dice": 0.95}
    figures["brain_volume_ratio"] = 1.0
    provenance = {"backend": "simpleitk", "quality": figures}
    row = quality.quality_row("vc001", provenance, GATE)
    assert (
        row["passed"]
        and row["scales"] == "1.000 1.000 1.000"
        and "scale_range [0.67, 1.5]" in row["limits"]
    )
    evidence = tmp_path / "sub-vc002_desc-rejected_registration.json"
    squeezed = {**figures, "scales": [0.9, 0.6, 0.5]}
    evidence.write_text(json.dumps({"gate": quality.gate_verdict(squeezed, GATE)}))
    rows = quality.rejected_registrations({"vc001": tmp_path / "none.json", "vc002": evidence})
    assert [r["subject"] for r in rows] == ["vc002"]
    assert rows[0]["failures"].startswith("scale 0.60") and rows[0]["figure"].endswith(".png")


def _figures(**changes) -> dict:
    figures = {**quality.affine_figures(np.eye(4)), "correlation": 0.5, "brain_dice": 0.96}
    figures.update(brain_volume_ratio=1.0, atlas_brain_in_field_of_view=1.0)
    figures["brain_coverage"] = {"T1": 1.0, "FLAIR": 0.98, "ADC": 0.95, "lowT1c": 1.0}
    figures.update(changes)
    return figures


def test_a_slab_that_covers_a_third_of_the_brain_fails_the_coverage_gate_for_that_sequence():
    """A 2D T1 slab covering 37 % of the brain: Dice 0.96 within its field of view passed the gate."""
    slab = _figures(brain_coverage={"T1": 0.367, "FLAIR": 1.0, "ADC": 0.95, "lowT1c": 0.367})
    failures = quality.gate_failures(slab, GATE)
    assert failures == [
        "the T1's field of view holds 37 % of the atlas brain, below 90 % (min_brain_coverage)",
        "the lowT1c's field of view holds 37 % of the atlas brain, below 90 % (min_brain_coverage)",
    ]
    assert quality.gate_failures(_figures(), GATE) == []
    # Figures of one registration (virtual-contrast register) hold the T1's coverage alone.
    single = _figures(atlas_brain_in_field_of_view=0.5)
    del single["brain_coverage"]
    assert "the T1's field of view holds 50 %" in quality.gate_failures(single, GATE)[0]


def test_the_study_table_lists_every_subject_with_the_verdict_of_the_gate_given(tmp_path):
    """The verdict comes from the gate passed in (the configured one), not from the registration's job."""
    provenances = {
        "vc001": {"backend": "simpleitk", "quality": _figures()},
        "vc002": {"backend": "simpleitk", "quality": _figures(brain_dice=0.83)},
    }
    rows = [quality.quality_row(s, p, GATE) for s, p in provenances.items()]
    assert [r["passed"] for r in rows] == [True, False]
    assert "Dice with the atlas brain mask 0.83 is below 0.9" in rows[1]["failures"]
    assert rows[0]["least_brain_coverage"] == 0.95 and "ADC 0.950" in rows[0]["brain_coverage"]
    looser = GateOptions(scale_range=(0.67, 1.5), min_correlation=0.2, min_brain_dice=0.8,
                         min_brain_coverage=0.9)  # fmt: skip
    assert quality.quality_row("vc002", provenances["vc002"], looser)["passed"]


def test_gate_subject_draws_a_rejection_raises_and_an_override_goes_on_saying_so(tmp_path, caplog):
    from virtual_contrast.io import save_image

    brain = np.zeros((20, 24, 20), np.float32)
    brain[4:16, 5:19, 4:16] = 1
    paths = {
        "t1_atlas": save_image(brain * 100, np.eye(4), tmp_path / "t1.nii.gz"),
        "mask_atlas": save_image(brain, np.eye(4), tmp_path / "mask.nii.gz"),
        "atlas_brain_mask": save_image(brain, np.eye(4), tmp_path / "atlas_mask.nii.gz"),
    }
    figure = tmp_path / "out" / "sub-x1_desc-rejected_registration.png"
    slab = _figures(brain_coverage={"T1": 0.37, "FLAIR": 1.0})
    with pytest.raises(quality.RegistrationRejectedError) as err:
        quality.gate_subject(slab, GATE, subject="x1", rejected_figure=figure, **paths)
    message = str(err.value)
    assert message.startswith("subject 'x1'") and "37 % of the atlas brain" in message
    assert f"look at {figure}" in message and "\n" not in message
    assert figure.exists() and figure.with_suffix(".json").exists()
    verdict = quality.gate_subject(
        slab, GATE, subject="x1", rejected_figure=figure, override=True, **paths
    )
    assert not verdict["passed"] and verdict["overridden"] and figure.exists()
    assert "REJECTED" in caplog.text and "override" in caplog.text
    verdict = quality.gate_subject(_figures(), GATE, subject="x1", rejected_figure=figure, **paths)
    assert verdict["passed"] and not figure.exists() and not figure.with_suffix(".json").exists()
