from _common import setup

from virtual_contrast.model.out_of_fold import predict_out_of_fold

log = setup(snakemake)
predict_out_of_fold(
    dict(zip(snakemake.params.folds, snakemake.input.models, strict=True)),
    snakemake.input.folds,
    snakemake.wildcards.subject,
    dict(zip(snakemake.params.channels, snakemake.input.channels, strict=True)),
    snakemake.output.atlas,
    snakemake.output.spread,
    mask_path=snakemake.input.mask,
    device=snakemake.params.device,
    flips=snakemake.params.flips,
)
