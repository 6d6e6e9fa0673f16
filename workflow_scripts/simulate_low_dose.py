from pathlib import Path

from _common import setup
from virtual_contrast.preprocess.low_dose import simulate_low_dose

from virtual_contrast.io import write_json

log = setup(snakemake)
options = snakemake.params.options
provenance = simulate_low_dose(
    Path(snakemake.input.t1),
    Path(snakemake.input.ref),
    Path(snakemake.output.low),
    dose_fraction=options["dose_fraction"],
    model=options["model"],
    subject=snakemake.wildcards.subject,
)
write_json(provenance, snakemake.output.provenance)
log.info(
    "simulated low-dose T1c (%s, dose fraction %g)", options["model"], options["dose_fraction"]
)
