"""Measures of a low-dose T1c against the truth of an embedded-cohort exam, for the tests
(tests/test_low_dose.py) and the benchmark (benchmarks/simulate_low_dose.py).

A cohort exam's three T1 series share one grid, each with its own head position (about 1 mm and 1 degree
apart); the truth maps lie on that grid in the pre-contrast T1's position, and :meth:`ExamTruth.in_pose` moves
them to another series' position (from the truth's record of each series' pose), so that each image is
measured where its own lesions lie:

* lesion enhancement relative to white matter: mean over a lesion's enhancing voxels divided by the white
  matter's mean, minus the same ratio on the pre-contrast T1 (each in its own position); a simulated low dose
  lies in the full dose's position;
* the noise where it is pure: the air inside the field of view (:func:`air_region`): its standard deviation
  and its correlation with the full dose's there (acquisitions' noise is independent: about 0);
* the noise in tissue: the correlation of the high-pass residuals (image minus its 1-voxel Gaussian) of two
  images over white matter, whose anatomy is nearly flat (independent acquisitions: a few hundredths, the
  residual anatomy).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

#: Voxels of margin between the head (any truth label) and the air measured: the series' poses differ by
#: about 1 mm, and a voxel's blurred edge is not air.
AIR_MARGIN_VOX = 3


@dataclass
class ExamTruth:
    """The truth maps of one cohort exam (in the position of one of its series) and its true lesions."""

    dseg: np.ndarray
    lesions: np.ndarray
    table: pd.DataFrame
    affine: np.ndarray
    poses: dict  # series key (t1, low, ref) -> (rotation, translation): subject s = R (w - t)

    @classmethod
    def load(cls, truth_anat: Path, lesion_table: Path) -> ExamTruth:
        def read(pattern: str) -> nib.Nifti1Image:
            (path,) = sorted(Path(truth_anat).glob(pattern))
            return nib.load(path)

        dseg = read("*_space-T1w_dseg.nii.gz")
        (record,) = sorted(Path(truth_anat).glob("*_desc-truth.json"))
        series = json.loads(record.read_text())["series"]
        return cls(
            np.asanyarray(dseg.dataobj),
            np.asanyarray(read("*_space-T1w_desc-lesions_dseg.nii.gz").dataobj),
            pd.read_csv(lesion_table, sep="\t", dtype={"session": str}, keep_default_na=False),
            dseg.affine,
            {
                key: (np.asarray(v["rotation"]), np.asarray(v["translation_mm"]))
                for key, v in series.items()
            },
        )

    def in_pose(self, series: str) -> ExamTruth:
        """The truth maps where the head lay during ``series`` (same grid, nearest neighbour)."""
        r_t1, t_t1 = self.poses["t1"]
        r_x, t_x = self.poses[series]
        world = np.eye(4)  # world in the series' pose -> world in the pre-contrast T1's
        world[:3, :3] = r_t1.T @ r_x
        world[:3, 3] = t_t1 - r_t1.T @ r_x @ t_x
        vox = np.linalg.inv(self.affine) @ world @ self.affine

        def move(labels: np.ndarray) -> np.ndarray:
            return ndimage.affine_transform(
                labels, vox[:3, :3], vox[:3, 3], order=0, mode="constant", cval=0
            )

        return ExamTruth(move(self.dseg), move(self.lesions), self.table, self.affine, self.poses)

    def air(self) -> np.ndarray:
        return air_region(self.dseg)

    def white_matter(self) -> np.ndarray:
        return ndimage.binary_erosion(self.dseg == 3, iterations=1)

    def lesion_masks(self, min_long_axis_mm: float = 10.0) -> dict[int, np.ndarray]:
        """Enhancing voxels of each true lesion whose long axis is at least ``min_long_axis_mm``."""
        out = {}
        for row in self.table.itertuples():
            if row.long_axis_mm >= min_long_axis_mm:
                mask = (self.lesions == row.lesion_id) & (self.dseg == 5)
                if mask.sum() >= 3:
                    out[int(row.lesion_id)] = mask
        return out


def air_region(dseg: np.ndarray) -> np.ndarray:
    """Voxels of the field of view at least :data:`AIR_MARGIN_VOX` voxels from any tissue."""
    return ~ndimage.binary_dilation(dseg > 0, iterations=AIR_MARGIN_VOX)


def high_pass(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, np.float32)
    return image - ndimage.gaussian_filter(image, 1.0)


def correlation(a: np.ndarray, b: np.ndarray, region: np.ndarray) -> float:
    return float(np.corrcoef(np.asarray(a)[region], np.asarray(b)[region])[0, 1])


def noise_measures(image: np.ndarray, ref: np.ndarray, pre: np.ndarray, truth: ExamTruth) -> dict:
    """Noise of ``image`` against the full dose's (``ref``) and the pre-contrast T1's (module docstring)."""
    air, wm = truth.air(), truth.white_matter()
    hp, hp_ref, hp_pre = high_pass(image), high_pass(ref), high_pass(pre)
    return {
        "noise_ratio": float(np.std(image[air]) / np.std(ref[air])),
        "air_r_ref": correlation(image, ref, air),
        "air_r_pre": correlation(image, pre, air),
        "wm_noise_ratio": float(np.std(hp[wm]) / np.std(hp_ref[wm])),
        "wm_r_ref": correlation(hp, hp_ref, wm),
        "wm_r_pre": correlation(hp, hp_pre, wm),
    }


def lesion_enhancement(
    image: np.ndarray, truth: ExamTruth, pre: np.ndarray, pre_truth: ExamTruth, lesion_id: int
) -> float:
    """Enhancement of one lesion relative to white matter, each image with the truth in its own position."""

    def ratio(img: np.ndarray, t: ExamTruth) -> float:
        mask = (t.lesions == lesion_id) & (t.dseg == 5)
        return float(img[mask].mean() / img[t.white_matter()].mean())

    return ratio(image, truth) - ratio(pre, pre_truth)


def enhancement_ratios(
    image: np.ndarray,
    acquired: np.ndarray,
    pre: np.ndarray,
    truth: ExamTruth,
    *,
    image_pose: str = "ref",
) -> list[dict]:
    """Per lesion ≥ 10 mm: enhancement of ``image`` (in the position of series ``image_pose``: a simulated
    low dose lies in the full dose's) and of the acquired low dose (in its own), relative to white matter;
    ``truth`` in the pre-contrast T1's position."""
    at_image, at_low = truth.in_pose(image_pose), truth.in_pose("low")
    rows = []
    for lesion_id in truth.lesion_masks():
        simulated = lesion_enhancement(image, at_image, pre, truth, lesion_id)
        truth_value = lesion_enhancement(acquired, at_low, pre, truth, lesion_id)
        rows.append(
            {
                "lesion_id": lesion_id,
                "simulated": simulated,
                "acquired": truth_value,
                "ratio": simulated / truth_value if truth_value > 0 else float("nan"),
            }
        )
    return rows
