from _common import setup

from virtual_contrast.preprocess.crop import crop_images

log = setup(snakemake)
keys = [*snakemake.params.channels, "mask"]
info = crop_images(
    {key: snakemake.input[key] for key in keys},
    {key: snakemake.output[key] for key in keys},
    shape=snakemake.params.shape,
    atlas_brain_mask=snakemake.input.atlas_brain_mask,
    subject=snakemake.wildcards.subject,
)
log.info("crop: %s", info)
