import pandas as pd
from _common import setup

from virtual_contrast.annotations import load_lesions, load_reads
from virtual_contrast.evaluate.lesions import auto_reader_tables
from virtual_contrast.reader.stats import reader_stats

log = setup(snakemake)
if "detections" in snakemake.input.keys():
    # No radiologist reads configured: the automated detector is reader `auto` on ref, low and vir.
    detections = {}
    for subject, path in zip(snakemake.params.subjects, snakemake.input.detections, strict=True):
        table = pd.read_csv(path, sep="\t", dtype={"subject": str})
        for modality in ("ref", "low", "vir"):
            detections[(subject, modality)] = table[table["modality"] == modality]
    lesions, reads = auto_reader_tables(detections)
    reference = "auto"
else:
    lesions = load_lesions(snakemake.input.lesions)
    reads = load_reads(snakemake.input.reads) if "reads" in snakemake.input.keys() else None
    reference = snakemake.params.reference_reader
out_dir = snakemake.output.detection.rsplit("/", 1)[0]
tables = reader_stats(
    lesions,
    reads,
    out_dir,
    reference_reader=reference,
    thresholds=snakemake.params.thresholds,
    labels=snakemake.params.labels,
)
log.info("\n%s", tables["detection"].to_string())
