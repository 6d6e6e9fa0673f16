import pandas as pd
from _common import setup

from virtual_contrast.figures import plot_flowchart
from virtual_contrast.io import write_table

log = setup(snakemake)
excluded = pd.DataFrame(snakemake.params.excluded, columns=["subject", "session", "step", "reason"])
write_table(excluded, snakemake.output.table)
# Every exam with its subject id and its id in the source (a BraTS case id mapped to a valid subject id).
write_table(pd.DataFrame(snakemake.params.exams), snakemake.output.exams)
plot_flowchart(snakemake.params.counts, snakemake.output.flowchart)
for row in excluded.itertuples():
    log.info("excluded sub-%s ses-%s: %s", row.subject, row.session, row.reason)
