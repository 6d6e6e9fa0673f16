"""Exam-level checks before any work: every sequence loads, has signal, and overlaps the T1 in world space."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from virtual_contrast.io import InputError, save_image
from virtual_contrast.preprocess.inputs import check_exam, fov_overlap

SHAPE = (20, 22, 18)


def _affine(voxel=(2.0, 2.0, 2.0), origin=(-20.0, -22.0, -18.0)) -> np.ndarray:
    a = np.diag([*voxel, 1.0])
    a[:3, 3] = origin
    return a


@pytest.fixture
def exam(tmp_path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    files = {}
    for key, voxel in (
        ("t1", (2.0, 2.0, 2.0)),
        ("flair", (2.2, 2.2, 4.0)),
        ("low", (2.0, 2.0, 2.0)),
    ):
        files[key] = save_image(rng.random(SHAPE) * 100, _affine(voxel), tmp_path / f"{key}.nii.gz")
    dwi = rng.random((*SHAPE, 3)) * 100 + 1
    files["dwi"] = save_image(dwi, _affine(), tmp_path / "dwi.nii.gz")
    files["bval"] = tmp_path / "dwi.bval"
    files["bval"].write_text("0 1000 1000\n")
    return files


def _check(files):
    seq = {k: files[k] for k in ("t1", "flair", "low")}
    return check_exam(seq, subject="p01", dwi=files["dwi"], bval=files["bval"])


def test_a_good_exam_passes_with_its_overlaps(exam):
    overlaps = _check(exam)["overlap_with_t1"]
    assert set(overlaps) == {"flair", "low", "dwi"} and min(overlaps.values()) > 0.9


def test_an_all_zero_low_dose_t1c_is_named(exam):
    save_image(np.zeros(SHAPE), _affine(), exam["low"])
    with pytest.raises(
        InputError, match=r"subject 'p01', file '.*low.nii.gz': the low-dose T1c has no signal"
    ):
        _check(exam)


def test_a_sequence_that_does_not_overlap_the_t1_is_named(exam):
    save_image(
        np.ones(SHAPE) + np.arange(SHAPE[2]), _affine(origin=(180.0, -22.0, -18.0)), exam["flair"]
    )
    with pytest.raises(InputError) as err:
        _check(exam)
    message = str(err.value)
    assert "flair.nii.gz" in message and "FLAIR does not overlap the T1 in world space" in message
    assert "0 %" in message and "\n" not in message


def test_a_slab_that_covers_part_of_the_head_overlaps_enough(exam):
    # A thick-slab FLAIR covering 8 of the T1's 36 mm in z: its whole field of view lies inside the T1's.
    save_image(
        np.random.default_rng(1).random((20, 22, 2)) + 1,
        _affine((2.0, 2.0, 4.0), (-20, -22, -4)),
        exam["flair"],
    )
    assert _check(exam)["overlap_with_t1"]["flair"] == pytest.approx(1.0)


def test_the_broken_file_is_named_before_any_overlap(exam):
    blob = exam["t1"].read_bytes()
    exam["t1"].write_bytes(blob[: len(blob) // 2])
    with pytest.raises(InputError, match=r"t1.nii.gz.*truncated or corrupt"):
        _check(exam)


@pytest.mark.parametrize(
    "bvals, message",
    [
        ("0 1000", "2 b-values in 'dwi.bval' but the DWI series has 3 volumes"),
        ("0 500 500", "b≈1000"),
    ],
)
def test_dwi_problems(exam, bvals, message):
    exam["bval"].write_text(bvals + "\n")
    with pytest.raises(InputError, match=message):
        _check(exam)


def test_dwi_must_be_4d_and_the_others_3d(exam):
    save_image(np.ones((*SHAPE, 2)), _affine(), exam["low"])
    with pytest.raises(InputError, match="low.nii.gz.*expected a 3D image"):
        _check(exam)


def test_overlap_is_symmetric_in_the_smaller_field_of_view():
    class Img:
        def __init__(self, shape, affine):
            self.shape, self.affine = shape, affine

    big = Img((100, 100, 100), _affine((1, 1, 1), (0, 0, 0)))
    half = Img((10, 10, 10), _affine((1, 1, 1), (95, 0, 0)))
    assert fov_overlap(big, half) == pytest.approx(fov_overlap(half, big))
    assert 0.4 < fov_overlap(big, half) < 0.7
