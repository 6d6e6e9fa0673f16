"""Blinding by construction (issue 25): every image a reader receives is a reading copy, and no simple statistic of
the copies tells a low-dose case from a vir-T1c case.

The statistics (virtual_contrast.reader.blinding) are computed over reading lists: the tiny workflow's (two test
patients: too few for an AUC, so there every encoding statistic must be the same for every case and no copy may
have a plateau at its maximum), and the demo's when VC_DEMO_RESULTS names a results folder of `make demo` (eight
test patients: neither the plateau nor any encoding statistic may separate low from vir with an AUC outside
0.2-0.8; the anchors must sit at their levels; the tail, vir-T1c's full-dose-like enhancement, is reported by
benchmarks/blinding.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from virtual_contrast.io import InputError
from virtual_contrast.reader import blinding
from virtual_contrast.reader.protocol import KEY_NAME
from virtual_contrast.reading_copy import (
    P1_LEVEL,
    P99_LEVEL,
    STORED_DTYPE,
    WINDOW,
    reading_copy,
    reading_nifti_bytes,
)


def _brain(shape=(24, 28, 20)) -> np.ndarray:
    ijk = np.indices(shape).astype(float)
    centre = (np.array(shape) - 1)[:, None, None, None] / 2
    return (((ijk - centre) / (np.array(shape)[:, None, None, None] * 0.42)) ** 2).sum(0) <= 1


def _pair(seed: int, clip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A normalised low-dose image (with ``clip``, as the old normalisation left it: clipped at 1, a plateau)
    and a smooth vir-T1c-like image, both 0 outside an ellipsoid brain."""
    rng = np.random.default_rng(seed)
    brain = _brain()
    anatomy = ndimage.gaussian_filter(rng.random(brain.shape), 2)
    anatomy = (anatomy - anatomy.min()) / np.ptp(anatomy)
    low = anatomy + rng.normal(0, 0.03, brain.shape)
    lo, hi = np.percentile(low[brain], [1, 99])
    low = (low - lo) / (hi - lo)
    low = np.where(brain, np.clip(low, 0, 1) if clip else low, 0)
    vir = np.where(brain, ndimage.gaussian_filter(anatomy, 0.7) * 1.1 - 0.05, 0)
    return low.astype(np.float32), vir.astype(np.float32)


def test_a_reading_copy_maps_its_own_percentiles_clips_nothing_and_carries_one_window():
    low, vir = _pair(0)
    copies = {
        name: reading_copy(data, np.eye(4), seed=name) for name, data in (("l", low), ("v", vir))
    }
    for copy in copies.values():
        brain = copy.stored[copy.stored > 0]
        assert copy.stored.dtype == STORED_DTYPE
        assert np.percentile(brain, [1, 99]) == pytest.approx([P1_LEVEL, P99_LEVEL], abs=1.5)
        img = nib.Nifti1Image.from_bytes(reading_nifti_bytes(copy))
        assert (img.header["cal_min"], img.header["cal_max"]) == WINDOW
        assert img.header["descrip"].item() == b"" and img.get_data_dtype() == STORED_DTYPE
    # the same header, byte for byte, whatever the image
    headers = {
        nib.Nifti1Image.from_bytes(reading_nifti_bytes(c)).header.binaryblock
        for c in copies.values()
    }
    assert len(headers) == 1
    # linear, not clipped: a brighter lesion stays brighter than the 99th percentile, in proportion
    bright = vir.copy()
    bright[12, 14, 10] = 3.0
    copy = reading_copy(bright, np.eye(4), seed="b")
    lo, hi = np.percentile(bright[bright != 0], [1, 99])
    expected = P1_LEVEL + (3.0 - lo) / (hi - lo) * (P99_LEVEL - P1_LEVEL)
    assert copy.stored[12, 14, 10] == pytest.approx(expected, abs=1)
    assert (copy.stored == copy.stored.max()).sum() == 1
    # another case: other bytes, the same levels within the half-level dither
    again = reading_copy(vir, np.eye(4), seed="another case")
    assert again.stored.tobytes() != copies["v"].stored.tobytes()
    assert np.abs(again.stored.astype(int) - copies["v"].stored).max() <= 1
    assert (again.stored > 0).sum() == (copies["v"].stored > 0).sum()
    # a copy of a copy keeps its levels (the server re-encodes the files of the lists)
    twice = reading_copy(copies["v"].stored, np.eye(4), seed="served")
    assert np.abs(twice.stored.astype(int) - copies["v"].stored).max() <= 2


def test_a_reading_copy_never_clips_it_refuses():
    low, _ = _pair(1)
    low[12, 14, 10] = 1e4  # would need a level beyond 65535
    with pytest.raises(InputError, match="beyond the 1-65535 of a reading copy"):
        reading_copy(low, np.eye(4), seed="x")
    with pytest.raises(InputError, match="constant"):
        reading_copy(np.where(_brain(), 1.0, 0.0), np.eye(4), seed="x")


def _table(images: dict[tuple[int, str], np.ndarray]) -> pd.DataFrame:
    rows = [
        {"patient": f"p{p}", "modality": m, "form": "nifti", **blinding.value_statistics(stored)}
        | {"dtype": str(stored.dtype), "bytes": stored.nbytes, "window_centre": 0.0}
        | {"window_width": 1.0, "header": "h"}
        for (p, m), stored in images.items()
    ]
    return pd.DataFrame(rows)


def test_the_statistics_catch_what_the_old_copies_leaked_and_the_new_ones_do_not():
    """Copies as they were (the clipped normalised values as they are, float32) tell all low cases from all vir
    cases by the plateau of the clip and by the 99th percentile sitting at exactly 1; reading copies of the
    unclipped normalisation do not."""
    clipped = {p: _pair(10 + p, clip=True) for p in range(8)}
    old = _table(
        {
            (p, m): img
            for p, pair in clipped.items()
            for m, img in zip(("low", "vir"), pair, strict=True)
        }
    )
    old_auc = blinding.separation(old).set_index("statistic")["auc"]
    assert old_auc["fraction_at_max"] < 0.2 and not 0.2 <= old_auc["p99"] <= 0.8
    pairs = {p: _pair(10 + p) for p in range(8)}
    new = _table(
        {
            (p, m): reading_copy(img, np.eye(4), seed=f"p{p}{m}").stored
            for p, pair in pairs.items()
            for m, img in zip(("low", "vir"), pair, strict=True)
        }
    )
    assert np.all(new["fraction_at_max"] < 1e-3)
    new_auc = blinding.separation(new).set_index("statistic")["auc"]
    assert 0.2 <= new_auc["fraction_at_max"] <= 0.8
    assert (new["p99"] - P99_LEVEL).abs().max() <= 1.5


def _assert_encoding_is_one_for_all(table: pd.DataFrame) -> None:
    for form, group in table.groupby("form"):
        for statistic in blinding.ENCODING_STATISTICS:
            assert group[statistic].nunique() == 1, (form, statistic, group[statistic].unique())
        # the anchors of every copy are the same levels (the old low copies had p99 = 1 exactly, vir not)
        assert (group["p99"] - P99_LEVEL).abs().max() <= 1.5, form
        assert (group["p1"] - P1_LEVEL).abs().max() <= 1.5, form
        # no plateau at the maximum: a handful of voxels at most (a clip left 1 % of the brain there)
        assert group["fraction_at_max"].max() < 5e-4, form


def test_the_tiny_workflow_s_reading_copies_are_one_encoding(tiny_run):
    study = tiny_run / "results" / "reader_study"
    table = blinding.reading_list_statistics(study / "reading_lists", study / KEY_NAME)
    assert set(table["form"]) == {"nifti", "served"} and set(table["modality"]) == {"low", "vir"}
    _assert_encoding_is_one_for_all(table)
    served = table[table["form"] == "served"].set_index("case_id")
    files = table[table["form"] == "nifti"].set_index("case_id")
    # the page gets the copy of the file, re-encoded by the same gate: the same levels and header
    assert (served["header"] == files.loc[served.index, "header"]).all()
    assert (served["max"] - files.loc[served.index, "max"]).abs().max() <= 2


def test_companion_images_differ_between_the_cases_of_one_patient(tiny_run):
    study = tiny_run / "results" / "reader_study"
    key = pd.read_csv(study / KEY_NAME, sep="\t", dtype=str)
    for patient, cases in key.groupby("patient"):
        t1 = [
            (study / "reading_lists" / c.reader / f"phase-{c.phase}" / f"{c.case_id}_T1.nii")
            for c in cases.itertuples()
        ]
        contents = [path.read_bytes() for path in t1]
        assert len(set(contents)) == len(contents), patient  # no two byte-identical


@pytest.mark.skipif(
    not os.environ.get("VC_DEMO_RESULTS"),
    reason="set VC_DEMO_RESULTS to a `make demo` results folder to check its reading lists",
)
def test_no_statistic_of_the_demo_s_reading_copies_separates_low_from_vir():
    study = Path(os.environ["VC_DEMO_RESULTS"]) / "reader_study"
    table = blinding.reading_list_statistics(study / "reading_lists", study / KEY_NAME)
    _assert_encoding_is_one_for_all(table)
    result = blinding.separation(table)
    assert (result["n_low"] >= 8).all() and (result["n_vir"] >= 8).all()
    bounded = result[result["kind"].isin(blinding.BLINDING_KINDS)]
    # The plateau and 5 encoding statistics of each form: the NIfTI copies and what the page serves always,
    # the DICOM copies when the lists have them (reader_study.image_format dicom or both).
    forms = set(bounded["form"])
    assert {"nifti", "served"} <= forms and len(bounded) == 6 * len(forms), bounded
    outside = bounded[~bounded["within_bounds"]]
    assert outside.empty, f"{outside.to_string()}\n(all: {result.to_string()})"
