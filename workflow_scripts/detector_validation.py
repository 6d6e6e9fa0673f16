import pandas as pd
from _common import setup

from virtual_contrast.evaluate.froc import truth_in_atlas, validate_by_split
from virtual_contrast.io import write_table
from virtual_contrast.preprocess.transforms import load_transform

log = setup(snakemake)
subjects = snakemake.params.subjects
detections = pd.concat(
    [pd.read_csv(p, sep="\t", dtype={"subject": str}) for p in snakemake.input.detections]
)
detections = detections[detections["modality"] == "ref"]
truth = pd.read_csv(snakemake.input.truth, sep="\t", dtype={"subject": str, "session": str})
# True centres are in the native full-dose T1c world; the registration's transform maps atlas -> native.
transforms = {
    s: load_transform(p) for s, p in zip(subjects, snakemake.input.transforms, strict=True)
}
split = {s: snakemake.params.split[s] for s in subjects}
table = validate_by_split(detections, truth_in_atlas(truth, transforms), split)
write_table(table, snakemake.output.table)
log.info("\n%s", table.to_string())
