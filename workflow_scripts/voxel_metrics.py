import pandas as pd
from _common import setup

from virtual_contrast.evaluate.figures import plot_mean_roc
from virtual_contrast.evaluate.metrics import aggregate_voxel_metrics, table3_markdown
from virtual_contrast.io import write_table, write_text

log = setup(snakemake)
metrics = pd.concat(
    [pd.read_csv(p, sep="\t", dtype={"subject": str}) for p in snakemake.input.metrics]
)
curves = pd.concat([pd.read_csv(p, sep="\t", dtype={"subject": str}) for p in snakemake.input.roc])
write_table(metrics, snakemake.output.table)
table3 = aggregate_voxel_metrics(metrics)
write_table(table3, snakemake.output.table3)
labels = snakemake.params.labels
write_text(table3_markdown(table3, labels=labels), snakemake.output.table3_md)
plot_mean_roc(curves, snakemake.output.roc, metrics=metrics, labels=labels)
log.info("\n%s", table3_markdown(table3, labels=labels))
