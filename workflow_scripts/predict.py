import json
from pathlib import Path

from _common import setup

from virtual_contrast.model.predict import predict_subject
from virtual_contrast.model.uncertainty import Calibration
from virtual_contrast.preprocess.native import export_native, export_native_uncertainty
from virtual_contrast.sequences import LOW_DOSE

log = setup(snakemake)
subject = snakemake.wildcards.subject
channels = dict(zip(snakemake.params.channels, snakemake.input.channels, strict=True))
predict_subject(
    snakemake.input.models,
    {**channels, LOW_DOSE: snakemake.input.low},
    snakemake.output.atlas,
    device=snakemake.params.device,
    flips=snakemake.params.flips,
    mask_path=snakemake.input.mask,
    subject=subject,
    uncertainty_path=snakemake.output.uncertainty,
    spread_path=snakemake.output.spread,
    calibration=Calibration.load(snakemake.input.calibration),
    pre_path=snakemake.input.pre,
)
low = json.loads(Path(snakemake.input.normalize).read_text())[snakemake.params.low_dose]
for export, atlas, native in (
    (export_native, snakemake.output.atlas, snakemake.output.native),
    (export_native_uncertainty, snakemake.output.uncertainty, snakemake.output.uncertainty_native),
):
    export(
        atlas,
        snakemake.input.native,
        snakemake.input.low_transform,
        native,
        t1_mask=snakemake.input.native_mask,
        t1_transform=snakemake.input.t1_transform,
        intensity_range=(low["low_value"], low["high_value"]),
        subject=subject,
    )
