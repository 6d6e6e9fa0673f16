from _common import setup

from virtual_contrast.model.out_of_fold import fit_from_files

log = setup(snakemake)
inp = snakemake.input
fit_from_files(
    [
        dict(subject=s, vir=v, spread=sp, low=lo, pre=pr, ref=r, mask=m)
        for s, v, sp, lo, pr, r, m in zip(
            snakemake.params.subjects,
            inp.vir,
            inp.spread,
            inp.low,
            inp.pre,
            inp.ref,
            inp.mask,
            strict=True,
        )
    ],
    snakemake.output.calibration,
    threads=snakemake.threads,
)
