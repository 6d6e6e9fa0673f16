from _common import setup

from virtual_contrast.io import write_json
from virtual_contrast.preprocess.skull_strip import skull_strip

log = setup(snakemake)
provenance = skull_strip(
    snakemake.input.t1,
    snakemake.output.mask,
    backend=snakemake.params.backend,
    atlas_brain_mask=snakemake.input.atlas_brain_mask,
    hdbet_weights=snakemake.params.hdbet_weights or None,
    subject=snakemake.wildcards.subject,
)
write_json(provenance, snakemake.output.provenance)
