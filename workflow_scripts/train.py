from pathlib import Path

from _common import setup

from virtual_contrast.model.config import TrainConfig
from virtual_contrast.model.data import volumes_by_subject
from virtual_contrast.model.folds import fold_members, read_folds
from virtual_contrast.model.train import train_fold

log = setup(snakemake)
fold = int(snakemake.wildcards.fold)
train_ids, tune_ids = fold_members(read_folds(snakemake.input.folds), fold)
cfg = TrainConfig(**snakemake.params.config, threads=snakemake.threads)
# The normalised volumes this job declared as inputs, and no other file.
volumes = volumes_by_subject(
    snakemake.input.volumes, snakemake.params.subjects, snakemake.params.volume_keys, cfg.channels
)
log.info("fold %d: %d training, %d tuning subjects", fold, len(train_ids), len(tune_ids))
for subject in [*train_ids, *tune_ids]:
    log.info("reads sub-%s: %s", subject, " ".join(map(str, volumes[subject].files())))
train_fold(
    [volumes[s] for s in train_ids],
    [volumes[s] for s in tune_ids],
    Path(snakemake.output.model).parent,
    cfg,
    cache_dir=snakemake.params.cache_dir,
    checkpoint_dir=snakemake.params.checkpoint_dir,
    preprocess=snakemake.params.preprocess,
)
