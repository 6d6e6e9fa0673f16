from pathlib import Path

from _common import setup

from virtual_contrast.preprocess.low_dose import LowDoseOptions, simulate_low_dose

log = setup(snakemake)
provenance = simulate_low_dose(
    Path(snakemake.input.t1),
    Path(snakemake.input.ref),
    Path(snakemake.output.low),
    options=LowDoseOptions.from_config({"low_dose": snakemake.params.options}),
    subject=snakemake.wildcards.subject,
    backend=snakemake.params.backend,
    sidecar=Path(snakemake.output.provenance),
)
log.info("simulated low-dose T1c: %s", provenance)
