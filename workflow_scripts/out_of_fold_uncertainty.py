from _common import setup

from virtual_contrast.model.out_of_fold import uncertainty_from_files

log = setup(snakemake)
inp = snakemake.input
uncertainty_from_files(
    inp.calibration,
    vir=inp.vir,
    spread=inp.spread,
    low=inp.low,
    pre=inp.pre,
    mask=inp.mask,
    out=snakemake.output.uncertainty,
    subject=snakemake.wildcards.subject,
)
