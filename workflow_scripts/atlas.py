from _common import setup

from virtual_contrast.atlas import prepare_atlas

setup(snakemake)
prepare_atlas(
    snakemake.output.provenance.rsplit("/", 1)[0],
    snakemake.params.voxel_mm,
    t1=snakemake.params.t1 or None,
    brain_mask=snakemake.params.brain_mask or None,
    head_mask=snakemake.params.head_mask or None,
)
