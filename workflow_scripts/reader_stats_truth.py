import pandas as pd
from _common import setup

from virtual_contrast.evaluate.froc import truth_in_atlas
from virtual_contrast.evaluate.lesions import auto_reader_tables, truth_reader_tables
from virtual_contrast.preprocess.transforms import load_transform
from virtual_contrast.reader.stats import reader_stats

log = setup(snakemake)
subjects = snakemake.params.subjects
detections = {}
for subject, path in zip(subjects, snakemake.input.detections, strict=True):
    table = pd.read_csv(path, sep="\t", dtype={"subject": str})
    for modality in ("ref", "low", "vir"):
        detections[(subject, modality)] = table[table["modality"] == modality]
auto_lesions, auto_reads = auto_reader_tables(detections)
truth = pd.read_csv(snakemake.input.truth, sep="\t", dtype={"subject": str, "session": str})
transforms = {
    s: load_transform(p) for s, p in zip(subjects, snakemake.input.transforms, strict=True)
}
truth_lesions, truth_reads = truth_reader_tables(truth_in_atlas(truth, transforms), subjects)
out_dir = snakemake.output.detection.rsplit("/", 1)[0]
tables = reader_stats(
    pd.concat([truth_lesions, auto_lesions], ignore_index=True),
    pd.concat([truth_reads, auto_reads], ignore_index=True),
    out_dir,
    reference_reader="truth",
    thresholds=snakemake.params.thresholds,
    labels=snakemake.params.labels,
)
log.info("\n%s", tables["detection"].to_string())
