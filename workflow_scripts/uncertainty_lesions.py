import pandas as pd
from _common import setup

from virtual_contrast.evaluate.froc import truth_in_atlas
from virtual_contrast.evaluate.uncertainty import lesions_from_files
from virtual_contrast.io import write_table
from virtual_contrast.preprocess.transforms import load_transform

log = setup(snakemake)
inp, subjects = snakemake.input, snakemake.params.subjects
truth = pd.read_csv(inp.truth, sep="\t", dtype={"subject": str, "session": str})
# True centres are in the native full-dose T1c world; the registration's transform maps atlas -> native.
transforms = {s: load_transform(p) for s, p in zip(subjects, inp.transforms, strict=True)}
groups = {
    s: "test" if snakemake.params.split[s] == "test" else "train (out of fold)" for s in subjects
}
table, summary = lesions_from_files(
    subjects,
    groups=groups,
    detections=inp.detections,
    uncertainty=inp.uncertainty,
    truth=truth_in_atlas(truth, transforms),
    labels=inp.labels,
    spread=inp.spread,
)
write_table(table, snakemake.output.table)
write_table(summary, snakemake.output.summary)
log.info("\n%s", summary.to_string())
