import shutil

from _common import setup

from virtual_contrast.io import write_json
from virtual_contrast.preprocess.normalize import normalize_image

log = setup(snakemake)
low, high = snakemake.params.percentiles
ranges = {
    channel: normalize_image(
        snakemake.input[channel],
        snakemake.input.mask,
        snakemake.output[channel],
        low=low,
        high=high,
        subject=snakemake.wildcards.subject,
    )
    for channel in snakemake.params.channels
}
shutil.copyfile(snakemake.input.mask, snakemake.output.mask)
write_json(ranges, snakemake.output.provenance)
