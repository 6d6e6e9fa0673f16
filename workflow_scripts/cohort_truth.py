import pandas as pd
from _common import setup

from virtual_contrast.io import write_table

log = setup(snakemake)
tables = [
    pd.read_csv(path, sep="\t", dtype={"subject": str, "session": str}) for path in snakemake.input
]
lesions = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
write_table(lesions, snakemake.output.lesions)
log.info("%d true lesions in %d exams", len(lesions), len(tables))
