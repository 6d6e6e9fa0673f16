import json
from pathlib import Path

from _common import setup

from virtual_contrast.model.predict import predict_subject
from virtual_contrast.model.uncertainty import Calibration
from virtual_contrast.preprocess.native import (
    native_grid,
    prediction_to_native,
    uncertainty_to_native,
)
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
grid = native_grid(
    snakemake.input.native,
    snakemake.input.low_transform,
    t1_mask=snakemake.input.native_mask,
    t1_transform=snakemake.input.t1_transform,
    intensity_range=(low["low_value"], low["high_value"]),
    subject=subject,
    t1=snakemake.input.t1,
)
prediction_to_native(snakemake.output.atlas, grid, snakemake.output.native)
uncertainty_to_native(snakemake.output.uncertainty, grid, snakemake.output.uncertainty_native)
