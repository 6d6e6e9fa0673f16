from _common import setup

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
written = export_reading_images(
    key, snakemake.output.lists, image_pattern=lambda patient, modality: images[(patient, modality)]
)
log.info(
    "%d cases for %d readers, %d images exported",
    len(key),
    len(snakemake.params.readers),
    len(written),
)
