import shutil

from _common import setup

from virtual_contrast.io import write_json
from virtual_contrast.preprocess.normalize import normalize_images

log = setup(snakemake)
channels = snakemake.params.channels
ranges = normalize_images(
    {channel: snakemake.input[channel] for channel in channels},
    snakemake.input.mask,
    {channel: snakemake.output[channel] for channel in channels},
    percentiles=snakemake.params.percentiles,
    subject=snakemake.wildcards.subject,
)
shutil.copyfile(snakemake.input.mask, snakemake.output.mask)
write_json(ranges, snakemake.output.provenance)
