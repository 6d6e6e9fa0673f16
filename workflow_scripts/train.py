from pathlib import Path

from _common import setup

from virtual_contrast.model.config import TrainConfig
from virtual_contrast.model.data import find_subject_volumes
from virtual_contrast.model.folds import fold_members, read_folds
from virtual_contrast.model.train import train_fold

log = setup(snakemake)
fold = int(snakemake.wildcards.fold)
train_ids, tune_ids = fold_members(read_folds(snakemake.input.folds), fold)
cfg = TrainConfig(**snakemake.params.config, threads=snakemake.threads)


def volumes(subject):
    return find_subject_volumes(
        Path("results") / f"sub-{subject}" / "normalize", subject, cfg.channels, mask=True
    )


log.info("fold %d: %d training, %d tuning subjects", fold, len(train_ids), len(tune_ids))
train_fold(
    [volumes(s) for s in train_ids],
    [volumes(s) for s in tune_ids],
    Path(snakemake.output.model).parent,
    cfg,
    cache_dir=snakemake.params.cache_dir,
    checkpoint_dir=snakemake.params.checkpoint_dir,
    preprocess=snakemake.params.preprocess,
)
