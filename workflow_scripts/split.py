import pandas as pd
from _common import setup

from virtual_contrast.io import write_table
from virtual_contrast.model.folds import make_folds

log = setup(snakemake)
folds = make_folds(
    pd.DataFrame(snakemake.params.subjects), k=snakemake.params.k, seed=snakemake.params.seed
)
write_table(folds, snakemake.output.folds)
log.info("fold sizes: %s", folds["fold"].value_counts().sort_index().to_dict())
