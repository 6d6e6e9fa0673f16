import json
from pathlib import Path

from _common import setup

from virtual_contrast.model.predict import predict_subject
from virtual_contrast.preprocess.native import export_native

log = setup(snakemake)
subject = snakemake.wildcards.subject
predict_subject(
    snakemake.input.models,
    dict(zip(snakemake.params.channels, snakemake.input.channels, strict=True)),
    snakemake.output.atlas,
    device=snakemake.params.device,
    flips=snakemake.params.flips,
    mask_path=snakemake.input.mask,
    subject=subject,
)
low = json.loads(Path(snakemake.input.normalize).read_text())[snakemake.params.low_dose]
export_native(
    snakemake.output.atlas,
    snakemake.input.native,
    snakemake.input.low_transform,
    snakemake.output.native,
    t1_mask=snakemake.input.native_mask,
    t1_transform=snakemake.input.t1_transform,
    intensity_range=(low["low_value"], low["high_value"]),
    subject=subject,
)
