from _common import setup

from virtual_contrast.io import write_json
from virtual_contrast.preprocess.options import skull_strip_options
from virtual_contrast.preprocess.skull_strip import skull_strip

log = setup(snakemake)
provenance = skull_strip(
    snakemake.input.t1,
    snakemake.output.mask,
    skull_strip_options(snakemake.params.options),
    threads=snakemake.threads,
    subject=snakemake.wildcards.subject,
)
write_json(provenance, snakemake.output.provenance)
