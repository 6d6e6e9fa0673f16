"""Blinding of the reading copies (issue 25): the statistics of every post image of a results folder's reading
lists (NIfTI files, DICOM series, what the reading page downloads), and the AUC with which each one tells vir-T1c
from low-T1c (virtual_contrast.reader.blinding; 0.5 tells nothing, the test bounds are 0.2-0.8). Also the
smoothness of the images (the median absolute Laplacian of the brain, relative to its 1st-99th percentile span),
which the copies cannot equalise: it is the image itself.

    .venv/bin/python benchmarks/blinding.py --results results
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from virtual_contrast import layout  # noqa: E402
from virtual_contrast.io import write_json  # noqa: E402
from virtual_contrast.reader import blinding  # noqa: E402
from virtual_contrast.reader.protocol import CASE_IMAGE, case_folder, load_key  # noqa: E402

OUT = REPO / "benchmarks" / "out" / "blinding.json"


def roughness(lists: Path, key_path: Path) -> pd.DataFrame:
    """Median |Laplacian| over the eroded brain of each post image, in units of its 1st-99th percentile span."""
    key = load_key(key_path)
    rows = []
    for case in key[key["modality"].isin(["low", "vir"])].itertuples():
        path = case_folder(lists, case.reader, case.phase) / CASE_IMAGE.format(case_id=case.case_id)
        data = np.asanyarray(nib.load(path).dataobj).astype(float)
        brain = ndimage.binary_erosion(data > 0, iterations=2)
        p1, p99 = np.percentile(data[data > 0], [1, 99])
        value = float(np.median(np.abs(ndimage.laplace(data))[brain]) / (p99 - p1))
        rows.append({"case_id": case.case_id, "modality": case.modality, "roughness": value})
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--results", type=Path, default=Path(layout.RESULTS))
    args = ap.parse_args()
    study = args.results / layout.READER_STUDY.removeprefix(f"{layout.RESULTS}/")
    lists, key = study / layout.READING_LISTS, study / layout.READING_KEY
    table = blinding.reading_list_statistics(lists, key)
    result = blinding.separation(table)
    pd.set_option("display.width", 200)
    print(result.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    rough = roughness(lists, key)
    is_vir = rough["modality"] == "vir"
    rough_auc = blinding.auc_vir_above_low(
        rough.loc[~is_vir, "roughness"], rough.loc[is_vir, "roughness"]
    )
    print(
        f"not equalised: roughness (median |Laplacian| / 1st-99th span) low {rough.loc[~is_vir, 'roughness'].median():.4f}, "
        f"vir {rough.loc[is_vir, 'roughness'].median():.4f}, AUC {rough_auc:.3f}"
    )
    outside = result[~result["within_bounds"]]
    print(f"statistics outside {blinding.AUC_BOUNDS}: {len(outside)}")
    write_json(
        {
            "separation": result.to_dict("records"),
            "roughness_auc": rough_auc,
            "cases": table.to_dict("records"),
        },
        OUT,
    )
    print(f"written to {OUT}")


if __name__ == "__main__":
    main()
