from _common import setup

from virtual_contrast.dicom.derivation import describe_models
from virtual_contrast.dicom.export import export_series
from virtual_contrast.dicom.study import read_manifest

log = setup(snakemake)
_, _, roles = read_manifest(snakemake.input.manifest)
derivation = describe_models(snakemake.input.models, tta=snakemake.params.tta)
export_series(snakemake.input.image, roles["low"], snakemake.output.series, derivation=derivation)
export_series(
    snakemake.input.uncertainty,
    roles["low"],
    snakemake.output.uncertainty,
    derivation=derivation,
    kind="uncertainty",
)
