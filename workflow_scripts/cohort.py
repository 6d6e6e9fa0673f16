from pathlib import Path

from _common import setup

from virtual_contrast import layout
from virtual_contrast.atlas import load_atlas
from virtual_contrast.cohort.exam import make_exam

log = setup(snakemake)
out = snakemake.output
make_exam(
    {key: Path(out[key]) for key in layout.BIDS_SEQUENCES},
    Path(out.lesions),
    subject=snakemake.wildcards.subject,
    session=snakemake.wildcards.session,
    seed=snakemake.params.seed,
    atlas=load_atlas(Path(snakemake.input.atlas[0]).parent),
    native_voxel_mm=snakemake.params.native_voxel_mm,
)
