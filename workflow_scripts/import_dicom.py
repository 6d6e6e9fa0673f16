from pathlib import Path

from _common import setup

from virtual_contrast.dicom.convert import import_series
from virtual_contrast.dicom.rules import ROLES, load_series_map
from virtual_contrast.dicom.study import read_manifest

log = setup(snakemake)
exam, series, _ = read_manifest(snakemake.input.manifest)
result = import_series(
    series,
    {
        key: Path(snakemake.output[key])
        for key in (*ROLES, "bval", "bvec")
        if key in snakemake.output.keys()
    },
    Path(snakemake.output.report),
    series_map=load_series_map(snakemake.params.series_map),
    subject=snakemake.wildcards.subject,
    exam=exam,
    require=tuple(snakemake.params.require),
)
log.info("%s imported with %s (%s)", exam, result.dcm2niix.path, result.dcm2niix.version)
