from _common import setup

from virtual_contrast.dicom.deid import export_reading_dicom
from virtual_contrast.dicom.study import low_dose_file
from virtual_contrast.reader.protocol import export_reading_images, make_reading_lists

log = setup(snakemake)
key = make_reading_lists(
    snakemake.params.patients,
    snakemake.params.readers,
    out_dir=snakemake.output.lists,
    key_path=snakemake.output.key,
    seed=snakemake.params.seed,
)
images = {
    (patient, "vir"): path
    for patient, path in zip(snakemake.params.patients, snakemake.input.vir, strict=True)
} | {
    (patient, "low"): path
    for patient, path in zip(snakemake.params.patients, snakemake.input.low, strict=True)
}
written = []
if snakemake.params.image_format in ("nifti", "both"):
    written += export_reading_images(
        key,
        snakemake.output.lists,
        image_pattern=lambda patient, modality: images[(patient, modality)],
    )
if snakemake.params.image_format in ("dicom", "both"):
    sources = dict(
        zip(snakemake.params.patients, snakemake.input.get("manifests", []), strict=False)
    )
    written += export_reading_dicom(
        key,
        snakemake.output.lists,
        lambda patient, modality: images[(patient, modality)],
        source_of=lambda patient: low_dose_file(sources[patient]) if patient in sources else None,
    )
log.info(
    "%d cases for %d readers, %d images exported",
    len(key),
    len(snakemake.params.readers),
    len(written),
)
