from _common import setup

from virtual_contrast.evaluate.uncertainty import calibration_from_files, plot_reliability
from virtual_contrast.io import write_table

log = setup(snakemake)
inp, out = snakemake.input, snakemake.output
table, summary, reliability = calibration_from_files(
    snakemake.params.subjects,
    vir=inp.vir,
    ref=inp.ref,
    mask=inp.mask,
    uncertainty=inp.uncertainty,
    spread=inp.spread,
)
write_table(table, out.table)
write_table(summary, out.summary)
write_table(reliability, out.reliability)
plot_reliability(
    reliability,
    out.figure,
    title=f"vir-T1c's uncertainty map, {len(snakemake.params.subjects)} held-out patients",
)
log.info("\n%s", summary.to_string())
