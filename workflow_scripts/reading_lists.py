from _common import setup

from virtual_contrast.dicom.deid import export_reading_dicom
from virtual_contrast.dicom.study import low_dose_file
from virtual_contrast.reader.protocol import (
    case_sources,
    export_reading_images,
    make_reading_lists,
)

log = setup(snakemake)
key = make_reading_lists(
    snakemake.params.patients,
    snakemake.params.readers,
    out_dir=snakemake.output.lists,
    key_path=snakemake.output.key,
    reference_reader=snakemake.params.reference_reader,
    seed=snakemake.params.seed,
)
patients = snakemake.params.patients
images = {
    (patient, modality): path
    for modality in ("vir", "low", "ref")
    for patient, path in zip(patients, snakemake.input[modality], strict=True)
}
companion_series = [series for series in ("t1", "flair") if series in snakemake.input.keys()]
companions = {
    (patient, series): path
    for series in companion_series
    for patient, path in zip(patients, snakemake.input[series], strict=True)
}
patterns = {
    "image_pattern": lambda patient, modality: images[(patient, modality)],
    "pre_pattern": lambda patient, _: companions[(patient, "t1")],
    "flair_pattern": (lambda patient, _: companions[(patient, "flair")])
    if "flair" in companion_series
    else None,
}
written = []
if snakemake.params.image_format in ("nifti", "both"):
    written += export_reading_images(key, snakemake.output.lists, **patterns)
if snakemake.params.image_format in ("dicom", "both"):
    sources = dict(
        zip(snakemake.params.patients, snakemake.input.get("manifests", []), strict=False)
    )
    written += export_reading_dicom(
        case_sources(key, **patterns),
        snakemake.output.lists,
        source_of=lambda patient: low_dose_file(sources[patient]) if patient in sources else None,
    )
log.info(
    "%d cases for %d readers (reference reader %s), %d images exported",
    len(key),
    len(snakemake.params.readers),
    snakemake.params.reference_reader,
    len(written),
)
