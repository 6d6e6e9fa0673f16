import numpy as np
import pandas as pd
from _common import setup

from virtual_contrast.evaluate.lesions import validate_detector
from virtual_contrast.io import write_table
from virtual_contrast.preprocess.transforms import load_transform

log = setup(snakemake)
subjects = snakemake.params.subjects
detections = pd.concat(
    [pd.read_csv(p, sep="\t", dtype={"subject": str}) for p in snakemake.input.detections]
)
detections = detections[detections["modality"] == "ref"]
truth = pd.read_csv(snakemake.input.truth, sep="\t", dtype={"subject": str, "session": str})
truth = truth[truth["subject"].isin(subjects)].copy()
# True centres are in the native full-dose T1c world; the registration's transform maps atlas -> native,
# so its inverse brings them into the atlas space the detector works in.
for subject, path in zip(subjects, snakemake.input.transforms, strict=True):
    rows = truth["subject"] == subject
    native = np.c_[truth.loc[rows, ["x_mm", "y_mm", "z_mm"]].to_numpy(), np.ones(rows.sum())]
    truth.loc[rows, ["x_mm", "y_mm", "z_mm"]] = (np.linalg.inv(load_transform(path)) @ native.T).T[
        :, :3
    ]
table = validate_detector(detections, truth, subjects=subjects)
write_table(table, snakemake.output.table)
log.info("\n%s", table.to_string())
