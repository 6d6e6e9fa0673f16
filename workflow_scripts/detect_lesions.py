import pandas as pd
from _common import setup

from virtual_contrast.evaluate.lesions import detect_lesions_from_files
from virtual_contrast.io import load_array, write_table

log = setup(snakemake)
subject = snakemake.wildcards.subject
exclude = load_array(snakemake.input.exclude)[0] > 0.5
tables = []
for modality in ("ref", "low", "vir"):
    if modality not in snakemake.input.keys():
        continue
    found = detect_lesions_from_files(
        post=snakemake.input[modality],
        pre=snakemake.input.pre,
        mask=snakemake.input.mask,
        subject=subject,
        threshold=snakemake.params.threshold,
        min_volume_mm3=snakemake.params.min_volume_mm3,
        exclude=exclude,
    )
    tables.append(found.assign(modality=modality))
    log.info("%s: %d lesions", modality, len(found))
write_table(pd.concat(tables, ignore_index=True), snakemake.output.detections)
