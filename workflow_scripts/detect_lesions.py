from _common import setup

from virtual_contrast.evaluate.froc import read_operating_point
from virtual_contrast.evaluate.lesions import (
    READ_MODALITIES,
    DetectorSettings,
    detect_subject_reads,
)
from virtual_contrast.io import save_image, write_table

log = setup(snakemake)
inp, subject = snakemake.input, snakemake.wildcards.subject
settings = DetectorSettings(**snakemake.params.detector)
if "operating_point" in inp.keys():
    # Embedded cohort: the threshold tuned on the training subjects (rule detector_froc), not the config's.
    settings = settings.replace(threshold=read_operating_point(inp.operating_point))
log.info("decision threshold %.4g", settings.threshold)
table, labels, affine = detect_subject_reads(
    {m: inp[m] for m in READ_MODALITIES if m in inp.keys()},
    pre=inp.pre,
    mask=inp.mask,
    prior=inp.prior,
    settings=settings,
    subject=subject,
    uncertainty=inp.uncertainty if "uncertainty" in inp.keys() else None,
)
write_table(table, snakemake.output.detections)
save_image(labels, affine, snakemake.output.labels, dtype="int16")
