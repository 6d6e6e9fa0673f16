import shutil

from _common import setup

from virtual_contrast.preprocess.normalize import normalize_image

log = setup(snakemake)
low, high = snakemake.params.percentiles
for channel in snakemake.params.channels:
    info = normalize_image(
        snakemake.input[channel],
        snakemake.input.mask,
        snakemake.output[channel],
        low=low,
        high=high,
        subject=snakemake.wildcards.subject,
    )
    log.info("%s: %s", channel, info)
shutil.copyfile(snakemake.input.mask, snakemake.output.mask)
