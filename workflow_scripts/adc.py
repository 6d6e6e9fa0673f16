from _common import setup

from virtual_contrast.preprocess.adc import adc_from_files

log = setup(snakemake)
info = adc_from_files(
    snakemake.input.dwi,
    snakemake.input.bval,
    snakemake.output.adc,
    snakemake.output.b0,
    subject=snakemake.wildcards.subject,
    allow_degenerate=snakemake.params.allow_degenerate,
)
log.info("ADC: %s", info)
